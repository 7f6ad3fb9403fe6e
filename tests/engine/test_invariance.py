"""Acceptance 3: a request's tokens do not depend on its batch neighbours, the chunk size, the
block size, or whether its prefix came from the prefix cache or was recomputed after preemption.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def target() -> list[int]:
    return _prompt(random.Random(7), 45)


def _run(model_dir: Path, prompts: list[list[int]], params: SamplingParams, **kw: object):
    llm = LLM(str(model_dir), tokenizer=False, **kw)  # type: ignore[arg-type]
    results = llm.generate(prompts, params)
    llm.engine.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0
    return llm, [r.outputs[0].token_ids for r in results]


@pytest.fixture(scope="module", params=["greedy", "seeded"])
def case(request: pytest.FixtureRequest, model_dir: Path, target: list[int]):
    params = GREEDY if request.param == "greedy" else SEEDED
    _, (reference,) = _run(model_dir, [target], params, num_blocks=256)
    assert len(reference) == params.max_tokens
    return params, reference


def test_batch_neighbours_do_not_matter(model_dir: Path, target: list[int], case) -> None:
    params, reference = case
    rng = random.Random(1)
    neighbours = [_prompt(rng, n) for n in (3, 90, 17, 60, 1, 33, 120)]
    prompts = [*neighbours[:3], target, *neighbours[3:]]
    _, outs = _run(model_dir, prompts, params, num_blocks=256)
    assert outs[3] == reference


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_chunk_size_does_not_matter(model_dir: Path, target: list[int], case, chunk: int) -> None:
    params, reference = case
    _, (out,) = _run(model_dir, [target], params, num_blocks=256, max_num_batched_tokens=chunk)
    assert out == reference


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_block_size_does_not_matter(
    model_dir: Path, target: list[int], case, block_size: int
) -> None:
    params, reference = case
    _, (out,) = _run(
        model_dir, [target], params, num_blocks=4096 // block_size, block_size=block_size
    )
    assert out == reference


def test_prefix_from_cache_gives_same_tokens(model_dir: Path, target: list[int], case) -> None:
    params, reference = case
    llm = LLM(str(model_dir), tokenizer=False, num_blocks=256, block_size=8)
    rng = random.Random(3)
    # a different request sharing the first 40 tokens fills the cache
    llm.generate([target[:40] + _prompt(rng, 9)], params)
    (result,) = llm.generate([target], params)
    assert result.num_cached_tokens == 40
    assert result.outputs[0].token_ids == reference
    llm.engine.check_integrity()


def test_preemption_recompute_gives_same_tokens(model_dir: Path, target: list[int], case) -> None:
    params, reference = case
    rng = random.Random(5)
    prompts = [_prompt(rng, n) for n in (30, 50, 20)] + [target]
    _, ample = _run(model_dir, prompts, params, num_blocks=256, block_size=4)
    # 45 + 24 tokens need 18 blocks of 4; 40 blocks cannot hold all four requests at once
    llm, tight = _run(model_dir, prompts, params, num_blocks=40, block_size=4, max_model_len=128)
    assert llm.engine.scheduler.num_preemptions > 0
    assert tight == ample
    assert tight[3] == reference


def test_prefix_caching_off_gives_same_tokens(model_dir: Path, target: list[int], case) -> None:
    params, reference = case
    _, (out,) = _run(model_dir, [target], params, num_blocks=256, enable_prefix_caching=False)
    assert out == reference
