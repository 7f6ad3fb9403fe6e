"""Prefix-cache block hashes: a chained, process-independent digest of each full KV block.

Stdlib-only on purpose: a router that routes by prefix-cache overlap must compute bit-identical
hashes without torch or the engine. Never use Python's hash() here: it is salted per process
(PYTHONHASHSEED), so two workers would disagree.

Format. Changing it silently turns every prefix-cache lookup across versions into a miss; the
router and the engine both import this module, and tests pin a golden value:

    blake2b(digest_size=8) over
        b"\\x00"                        if parent_hash is None
        b"\\x01" + parent_hash (u64 LE) otherwise
        len(token_ids)        (u32 LE)
        token_ids             (u32 LE each)
        extra                 (the remaining bytes: a salt such as a LoRA or model id)
    read as a little-endian unsigned int, in [0, 2**64)

The presence byte and the length prefix make the encoding injective, so distinct inputs collide
only by chance (2**-64 per pair).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_HASH_LIMIT = 2**64  # hashes are unsigned 64-bit ints


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int], extra: bytes = b"") -> int:
    """Hash of one block, chained to its parent block's hash (None for a sequence's first block).

    Pure. Raises ValueError for a token id outside uint32 or a parent hash outside uint64.
    """
    digest = hashlib.blake2b(digest_size=8)
    if parent_hash is None:
        digest.update(b"\x00")
    elif 0 <= parent_hash < _HASH_LIMIT:
        digest.update(b"\x01" + parent_hash.to_bytes(8, "little"))
    else:
        raise ValueError(f"parent_hash {parent_hash} is not a uint64")
    try:
        digest.update(struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids))
    except struct.error as exc:
        raise ValueError(f"token ids must be uint32 ints: {exc}") from exc
    digest.update(extra)
    return int.from_bytes(digest.digest(), "little")


def hash_request_blocks(
    token_ids: Sequence[int], block_size: int, parent: int | None = None, *, extra: bytes = b""
) -> list[int]:
    """Chained hashes of every full block of token_ids; a partial tail block gets none.

        token_ids  |t0 t1 t2 t3|t4 t5 t6 t7|t8 t9|      (block_size 4)
        hashes     [    h0     ,    h1     ]           h0 = H(parent, t0..t3), h1 = H(h0, t4..t7)

    parent continues an earlier chain (the hash of the block just before token_ids[0]).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes
