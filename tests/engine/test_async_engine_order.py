"""AsyncEngine delivers a remote-prefilled request's outputs in order even when the event loop
wakes late: the first token (returned by `first_token`, before admission) then every decode
step's outputs, which the engine thread may all produce before the loop sees the admission's
result (the stream is registered before the admission command runs)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.mark.parametrize("max_tokens", [2, 3, 6])
def test_outputs_in_order_when_the_loop_wakes_late(model_dir: Path, max_tokens: int) -> None:
    prompt = list(range(5, 40))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    (single,) = LLM(str(model_dir), tokenizer=False, num_blocks=64).generate([prompt], params)
    expected = single.outputs[0].token_ids

    prefill = LLM(str(model_dir), tokenizer=False, num_blocks=64).engine
    first_params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prefill.add_request("r", prompt, first_params, hold_kv_on_finish=True)
    (out,) = prefill.step()
    held = list(out.held_block_ids)

    decode = LLM(str(model_dir), tokenizer=False, num_blocks=64).engine
    decode.reserve_kv("r", prompt, params)
    decode.runner.kv_cache.write_blocks(
        decode.scheduler.reserved["r"], prefill.runner.kv_cache.read_blocks(held)
    )

    async def run() -> list[int]:
        engine = AsyncEngine(decode, asyncio.get_running_loop())
        try:
            first = await engine.first_token("r", out.new_token_ids[0])
            admitting = asyncio.ensure_future(engine.admit_prefilled("r"))
            await asyncio.sleep(0)  # the admission command is queued to the engine thread
            # Hold the loop while the engine thread admits and runs every decode step: all
            # their outputs are handed over before the loop sees the admission's result.
            deadline = time.monotonic() + 10
            while "r" in decode.scheduler.reserved or decode.has_unfinished():
                assert time.monotonic() < deadline, "the engine thread did not finish"
                time.sleep(0.01)
            stream = await admitting
            return [*first.new_token_ids, *[t async for o in stream for t in o.new_token_ids]]
        finally:
            engine.shutdown()

    assert asyncio.run(run()) == expected
    assert decode.block_manager.num_used_blocks == 0
