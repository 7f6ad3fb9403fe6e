"""The two role hooks: a prefill engine holds a finished request's blocks for the hand-off;
a decode engine reserves blocks, receives the KV bytes and continues the request."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.block_manager import OutOfBlocks
from engine.request import FinishReason


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["qwen3"]


def _drain(llm: LLM) -> list:
    outs = []
    while llm.engine.has_unfinished():
        outs.extend(llm.engine.step())
    return outs


@pytest.mark.parametrize("prompt_len", [1, 16, 37])
def test_prefill_then_decode_equals_single_engine(model_dir: Path, prompt_len: int) -> None:
    prompt = [random.Random(prompt_len).randrange(3, 500) for _ in range(prompt_len)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    (single,) = LLM(str(model_dir), tokenizer=False, num_blocks=64).generate([prompt], params)

    prefill = LLM(str(model_dir), tokenizer=False, num_blocks=64)
    decode = LLM(str(model_dir), tokenizer=False, num_blocks=64)
    first_params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prefill.engine.add_request("r", prompt, first_params, hold_kv_on_finish=True)
    (out,) = _drain(prefill)
    assert out.finished and out.finish_reason is FinishReason.LENGTH
    held = list(out.held_block_ids)
    assert len(held) == -(-prompt_len // 16)
    assert prefill.engine.block_manager.num_used_blocks == len(held)
    prefill.engine.check_integrity()

    # decode side: reserve, receive the bytes (here: a plain copy), admit
    decode.engine.reserve_kv("r", prompt, params)
    decode.engine.check_integrity()
    dst = decode.engine.scheduler.reserved["r"]
    decode.engine.runner.kv_cache.write_blocks(
        dst, prefill.engine.runner.kv_cache.read_blocks(held)
    )
    prefill.engine.release_kv("r")
    assert prefill.engine.block_manager.num_used_blocks == 0
    prefill.engine.check_integrity()

    first = decode.engine.first_token("r", out.new_token_ids[0])
    decode.engine.admit_prefilled("r")
    tokens = [t for o in [first, *_drain(decode)] for t in o.new_token_ids]
    assert tokens == single.outputs[0].token_ids
    decode.engine.check_integrity()
    assert decode.engine.block_manager.num_used_blocks == 0


def test_reservation_cancel_and_exhaustion(model_dir: Path) -> None:
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=8, max_model_len=128)
    params = SamplingParams(max_tokens=4)
    reservation = llm.engine.reserve_kv("a", list(range(3, 103)), params)  # 7 blocks of 16
    assert len(reservation.block_ids) == 7 and reservation.num_hit_blocks == 0
    with pytest.raises(OutOfBlocks):
        llm.engine.reserve_kv("b", list(range(3, 43)), params)
    with pytest.raises(ValueError, match="must be in"):  # refused before any block is taken
        llm.engine.reserve_kv("c", [10**9], params)
    llm.engine.check_integrity()
    llm.engine.cancel_kv_reservation("a")
    assert not llm.engine.awaiting_kv
    assert llm.engine.block_manager.num_free_blocks == 8
    llm.engine.check_integrity()


def test_prompt_hashed_at_reservation(model_dir: Path) -> None:
    """reserve_kv hashes the prompt up to its first prefix-cache miss (on the critical path),
    hash_awaiting_prompt the rest (off it); admission then commits the same hashes a local
    prefill would (a later identical prompt hits them)."""
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=64)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = list(range(9, 49))  # 2 full blocks of 16 + 8 tokens
    llm.engine.reserve_kv("r", prompt, params)
    assert len(llm.engine.awaiting_kv["r"].block_hashes) == 1  # the first block missed
    llm.engine.hash_awaiting_prompt("r")
    assert len(llm.engine.awaiting_kv["r"].block_hashes) == 2
    llm.engine.first_token("r", 7)
    llm.engine.admit_prefilled("r")
    assert not llm.engine.awaiting_kv
    while llm.engine.has_unfinished():
        llm.engine.step()
    llm.engine.check_integrity()
    assert llm.engine.block_manager.num_cached_blocks == 2


def test_reservation_reuses_the_prefix_cache(model_dir: Path) -> None:
    """A second turn's reservation takes the first turn's full blocks from the prefix cache
    (never the last prompt token's block); only the rest is written from elsewhere. Output
    equals one engine's; cancelling a reservation with hits frees hits and new blocks once."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    turn1 = list(range(9, 49))  # 2 full blocks + 8
    prefill = LLM(str(model_dir), tokenizer=False, num_blocks=64)
    decode = LLM(str(model_dir), tokenizer=False, num_blocks=64)

    def remote(rid: str, prompt: list[int]) -> list[int]:
        first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        prefill.engine.add_request(rid, prompt, first, hold_kv_on_finish=True)
        (out,) = _drain(prefill)
        reservation = decode.engine.reserve_kv(rid, prompt, params)
        decode.engine.check_integrity()
        held = list(out.held_block_ids)[reservation.num_hit_blocks :]
        decode.engine.runner.kv_cache.write_blocks(
            list(reservation.write_block_ids), prefill.engine.runner.kv_cache.read_blocks(held)
        )
        prefill.engine.release_kv(rid)
        outs = [decode.engine.first_token(rid, out.new_token_ids[0])]
        decode.engine.admit_prefilled(rid)
        outs += _drain(decode)
        assert outs[-1].num_cached_tokens == reservation.num_hit_blocks * 16
        return [t for o in outs for t in o.new_token_ids]

    answer = remote("t1", turn1)
    turn2 = turn1 + answer + list(range(300, 330))  # 76 tokens: 4 full blocks + 12
    reservation = decode.engine.reserve_kv("x", turn2, params)
    # turn 1's 2 prompt blocks + the block its answer completed (the answer's last token,
    # never computed on the decode side, falls in block 2: 40 + 6 = 46 < 48)
    assert reservation.num_hit_blocks == 2
    assert decode.engine.block_manager.num_used_blocks == 5
    decode.engine.check_integrity()
    assert decode.engine.cancel_kv_reservation("x")
    decode.engine.check_integrity()
    assert decode.engine.block_manager.num_used_blocks == 0
    assert decode.engine.block_manager.num_cached_blocks >= 2  # the hits stay cached

    got = remote("t2", turn2)
    (single,) = LLM(
        str(model_dir), tokenizer=False, num_blocks=64, enable_prefix_caching=False
    ).generate([turn2], params)
    assert got == single.outputs[0].token_ids
    decode.engine.check_integrity()
    assert decode.engine.block_manager.num_used_blocks == 0

    full = list(range(9, 41))  # exactly 2 full blocks: the last token's block is written
    decode.engine.add_request("warm", [*full, 5], params)
    _drain(decode)
    assert decode.engine.reserve_kv("y", full, params).num_hit_blocks == 1
    decode.engine.cancel_kv_reservation("y")
    decode.engine.check_integrity()
    assert decode.engine.block_manager.num_used_blocks == 0


def test_abort_frees_blocks_mid_generation(model_dir: Path) -> None:
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=64)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    for i in range(3):
        llm.engine.add_request(f"r{i}", list(range(3, 40)), params)
    llm.engine.step()
    llm.engine.step()
    assert llm.engine.block_manager.num_used_blocks > 0
    for i in range(3):
        llm.engine.abort(f"r{i}")
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_used_blocks == 0
    llm.engine.check_integrity()


def test_abort_frees_held_blocks_whose_hand_off_was_abandoned(model_dir: Path) -> None:
    """Prefill role: the caller went away after the engine finished the request but before it
    saw the finish; the stream's abort frees the blocks pinned for the hand-off."""
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=64)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.engine.add_request("h", list(range(3, 40)), params, hold_kv_on_finish=True)
    _drain(llm)
    assert llm.engine.block_manager.num_used_blocks == 3
    llm.engine.abort("h")
    llm.engine.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0 and not llm.engine.scheduler.held
    assert llm.engine.cancel_kv_reservation("never") is False  # nothing reserved: a no-op


@pytest.mark.parametrize(
    ("params", "first", "reason"),
    [
        (SamplingParams(max_tokens=1, ignore_eos=True), 7, FinishReason.LENGTH),
        (SamplingParams(max_tokens=5), 2, FinishReason.STOP),  # the tiny model's EOS
        (SamplingParams(max_tokens=5, stop_token_ids=[9]), 9, FinishReason.STOP),
    ],
)
def test_first_token_that_finishes_is_never_admitted(
    model_dir: Path, params: SamplingParams, first: int, reason: FinishReason
) -> None:
    """The prefill side's first token may finish the request before its KV landed: its output
    says so, admission is refused, and cancel_kv_reservation frees every block once."""
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=16)
    llm.engine.reserve_kv("r", list(range(9, 49)), params)
    out = llm.engine.first_token("r", first)
    assert out.finished and out.finish_reason is reason and out.new_token_ids == (first,)
    with pytest.raises(ValueError, match="finished with its first token"):
        llm.engine.admit_prefilled("r")
    assert llm.engine.block_manager.num_used_blocks == 3  # still the reservation's
    assert llm.engine.cancel_kv_reservation("r")
    assert not llm.engine.awaiting_kv and not llm.engine.streams
    assert llm.engine.block_manager.num_used_blocks == 0
    llm.engine.check_integrity()


def test_first_token_once_then_admit(model_dir: Path) -> None:
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=16)
    llm.engine.reserve_kv("r", list(range(9, 49)), SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError, match="has no first token"):
        llm.engine.admit_prefilled("r")
    assert not llm.engine.first_token("r", 7).finished
    with pytest.raises(ValueError, match="given already"):
        llm.engine.first_token("r", 8)
    llm.engine.admit_prefilled("r")
    assert len([t for o in _drain(llm) for t in o.new_token_ids]) == 2
    assert llm.engine.block_manager.num_used_blocks == 0
    llm.engine.check_integrity()


def test_kv_lost_after_the_first_token_resumes_locally(model_dir: Path) -> None:
    """The decode worker's fallback once the first token went out: the reservation is given
    back while a local request under the same id resumes from prompt + first token. Its
    output equals one engine's, and the cancel leaves the new request's stream alone in
    either order."""
    prompt = list(range(9, 49))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    (single,) = LLM(str(model_dir), tokenizer=False, num_blocks=64).generate([prompt], params)
    want = single.outputs[0].token_ids
    for cancel_first in (True, False):
        llm = LLM(str(model_dir), tokenizer=False, num_blocks=64)
        llm.engine.reserve_kv("r", prompt, params)
        first = llm.engine.first_token("r", want[0])
        if cancel_first:
            assert llm.engine.cancel_kv_reservation("r")
        llm.engine.add_request("r", prompt, params, resume_output_token_ids=first.new_token_ids)
        if not cancel_first:
            assert llm.engine.cancel_kv_reservation("r")
        rest = [t for o in _drain(llm) for t in o.new_token_ids]
        assert [*first.new_token_ids, *rest] == want
        assert llm.engine.block_manager.num_used_blocks == 0
        llm.engine.check_integrity()
