"""A real decode worker's gRPC edge: mutual TLS (certificates made here, signed by a test CA),
and malformed or oversized messages answered with a status and a message, never a hang.

One worker process serves the whole module with `--grpc-tls-cert/-key/-ca` (mutual TLS). The
router's own channel code (router/client.py) dials it, and the router app reaches it over TLS.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient

from deploy.local_cluster import Child, spawn, stop_children, wait_ready
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from router.client import WorkerClient
from router.config import Mode, Role, RouterConfig, WorkerAddress
from router.server import build_app
from runtime.grpc_server import MAX_MESSAGE_BYTES
from runtime.tls import TlsFiles
from runtime.tokenizer import Tokenizer

x509 = pytest.importorskip("cryptography.x509")
pytestmark = pytest.mark.slow  # a worker process: ~30-60 s on 2 busy cores


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _write_certs(out: Path) -> Certs:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def cert(
        name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
        issuer_key: ec.EllipticCurvePrivateKey, ca: bool,
    ) -> x509.Certificate:  # fmt: skip
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name: str, data: bytes) -> Path:
        path = out / name
        path.write_bytes(data)
        return path

    pem = serialization.Encoding.PEM
    ca_key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = cert("tandem-test-ca", ca_key, None, ca_key, ca=True)
    other = cert("other-ca", other_key, None, other_key, ca=True)
    server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    server = cert("decode-0", server_key, ca.subject, ca_key, ca=False)
    client = cert("router", client_key, ca.subject, ca_key, ca=False)
    return Certs(
        ca=write("ca.pem", ca.public_bytes(pem)),
        server_cert=write("server.pem", server.public_bytes(pem)),
        server_key=write("server.key", key_pem(server_key)),
        client_cert=write("client.pem", client.public_bytes(pem)),
        client_key=write("client.key", key_pem(client_key)),
        other_ca=write("other-ca.pem", other.public_bytes(pem)),
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return _write_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def worker(tiny_chat_model_dir: Path, certs: Certs) -> Iterator[Child]:
    child = spawn(
        "decode-0",
        "decode_worker",
        ["--model", str(tiny_chat_model_dir), "--port", "0", "--worker-id", "decode-0",
         "--num-blocks", "64", "--max-model-len", "256",
         "--grpc-tls-cert", str(certs.server_cert), "--grpc-tls-key", str(certs.server_key),
         "--grpc-tls-ca", str(certs.ca)],
    )  # fmt: skip
    try:
        wait_ready(child, 120)
        yield child
    finally:
        stop_children([child])


def mtls(certs: Certs) -> TlsFiles:
    return TlsFiles(cert=certs.client_cert, key=certs.client_key, ca=certs.ca)


async def _health(address: str, tls: TlsFiles | None) -> pb.HealthResponse:
    client = WorkerClient(WorkerAddress("decode-0", address, Role.DECODE), 5.0, tls)
    try:
        return await client.health()
    finally:
        await client.close()


def test_mutual_tls_admits_only_a_client_with_a_certificate_of_the_ca(
    worker: Child, certs: Certs
) -> None:
    assert asyncio.run(_health(worker.address, mtls(certs))).ready
    refused = [
        None,  # plaintext
        TlsFiles(ca=certs.ca),  # TLS, but no client certificate
        TlsFiles(cert=certs.client_cert, key=certs.client_key, ca=certs.other_ca),  # wrong roots
    ]
    for tls in refused:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            asyncio.run(_health(worker.address, tls))
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


async def _raw_call(address: str, tls: TlsFiles, method: str, payload: bytes) -> grpc.StatusCode:
    """Send bytes that are not (or too big for) the method's message; return the status."""
    async with grpc.aio.secure_channel(
        address, tls.channel_credentials(),
        options=[("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)],
    ) as channel:  # fmt: skip
        call = channel.unary_unary(method)
        try:
            await call(payload, timeout=30)
        except grpc.aio.AioRpcError as exc:
            assert exc.details(), f"{exc.code()} without a message"
            return exc.code()
    raise AssertionError(f"{method} accepted {len(payload)} bytes of garbage")


def test_oversized_and_malformed_messages_get_a_status(worker: Child, certs: Certs) -> None:
    method = "/tandem.v1.DecodeWorker/Load"
    too_big = b"\x0a" + b"\xff" * (MAX_MESSAGE_BYTES + 16)
    code = asyncio.run(_raw_call(worker.address, mtls(certs), method, too_big))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    garbage = b"\xff\xff\xff\xff\x0f\x08"  # a truncated varint field: not a LoadRequest
    # grpcio's own answer, before any handler runs: UNKNOWN "Exception deserializing request!"
    code = asyncio.run(_raw_call(worker.address, mtls(certs), method, garbage))
    assert code is grpc.StatusCode.UNKNOWN
    # the worker is still serving
    assert asyncio.run(_health(worker.address, mtls(certs))).ready


async def _generate_status(address: str, tls: TlsFiles, req: pb.GenerateRequest) -> str:
    async with grpc.aio.secure_channel(address, tls.channel_credentials()) as channel:
        try:
            async for _ in pb_grpc.DecodeWorkerStub(channel).Generate(req, timeout=30):
                pass
        except grpc.aio.AioRpcError as exc:
            assert exc.details()
            return exc.code().name
    return "OK"


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": ""},
        {"prompt_token_ids": []},
        {"prompt_token_ids": [10**9]},
        {"prompt_token_ids": list(range(1, 300))},  # longer than the context
        {"sampling": pb.SamplingParams(max_tokens=4, temperature=-1.0)},
        {"sampling": pb.SamplingParams(max_tokens=4, top_p=2.0)},
        {"sampling": pb.SamplingParams(max_tokens=0)},
    ],
)
def test_bad_generate_fields_are_invalid_argument(
    worker: Child, certs: Certs, fields: dict[str, object]
) -> None:
    base: dict[str, object] = {
        "request_id": f"bad-{time.monotonic_ns()}",
        "prompt_token_ids": [1, 2, 3],
        "sampling": pb.SamplingParams(max_tokens=4),
        "prefill": pb.PrefillPlan(local=pb.LocalPrefill()),
    }
    req = pb.GenerateRequest(**{**base, **fields})  # type: ignore[arg-type]
    assert asyncio.run(_generate_status(worker.address, mtls(certs), req)) == "INVALID_ARGUMENT"


def test_the_router_reaches_its_worker_over_mutual_tls(
    worker: Child, certs: Certs, tiny_chat_model_dir: Path
) -> None:
    config = RouterConfig(
        model_dir=tiny_chat_model_dir,
        served_model_name="tiny",
        decode_workers=(WorkerAddress("decode-0", worker.address, Role.DECODE),),
        mode=Mode.COLLOCATED,
        grpc_tls=mtls(certs),
    )
    with TestClient(build_app(config, Tokenizer.from_dir(tiny_chat_model_dir))) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the router never saw its TLS worker healthy"
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
