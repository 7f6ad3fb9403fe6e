"""Optional TLS for Tandem's gRPC (router -> workers, decode -> prefill): PEM files -> credentials.

One `TlsFiles` per process, built at its entry point from `--grpc-tls-cert/-key/-ca`:

    serving (a worker's gRPC server)   cert + key: its identity; ca: when given, clients must
                                       present a certificate signed by it (mutual TLS)
    dialling (router, decode worker)   ca: the roots the server's certificate must chain to
                                       (None: the system's roots); cert + key: the client's
                                       own certificate, for servers that ask for one

The server's certificate must name the address clients dial (a 127.0.0.1 IP SAN, a DNS SAN of
the host name). The files are read when a server or channel is created, so a rotated
certificate takes effect on the next restart. The KV-transfer control channel and NIXL's data
path are not covered (docs/operations.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path | None = None  # PEM certificate chain of this process
    key: Path | None = None  # PEM private key of `cert`
    ca: Path | None = None  # PEM roots that the peer's certificate must chain to

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both a TLS certificate and its key, or neither")
        for path in (self.cert, self.key, self.ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise ValueError("a TLS gRPC server needs --grpc-tls-cert and --grpc-tls-key")
        roots = self.ca.read_bytes() if self.ca is not None else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=roots,
            require_client_auth=roots is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca is not None else None,
            private_key=self.key.read_bytes() if self.key is not None else None,
            certificate_chain=self.cert.read_bytes() if self.cert is not None else None,
        )


def tls_from_args(cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
    """The process's TLS files from its flags; None when none is given (plaintext)."""
    if cert is None and key is None and ca is None:
        return None
    return TlsFiles(
        cert=Path(cert) if cert else None,
        key=Path(key) if key else None,
        ca=Path(ca) if ca else None,
    )


def add_tls_args(parser: argparse._ActionsContainer) -> None:
    """`--grpc-tls-cert/-key/-ca` on an argparse parser (or argument group)."""
    add = parser.add_argument
    add("--grpc-tls-cert", default=None, help="PEM certificate: enables TLS on gRPC")
    add("--grpc-tls-key", default=None, help="PEM private key of --grpc-tls-cert")
    add(
        "--grpc-tls-ca", default=None,
        help="PEM roots the peer's certificate must chain to (a server given one requires "
        "client certificates: mutual TLS)",
    )  # fmt: skip


def open_channel(
    address: str, tls: TlsFiles | None, options: list[tuple[str, int]] | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`: TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
