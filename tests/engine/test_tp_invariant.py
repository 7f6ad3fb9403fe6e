"""TP-invariant mode (engine/tp_invariant.py) on CPU, bf16: 2 ranks over gloo give the logits of
one rank bit for bit (torch.equal, not allclose), through a prefill and a decode step that reads
each rank's own KV pool, for S = 2 and S = 4 virtual shards; the engine's greedy tokens and their
logprobs are identical at TP=1 and TP=2; the default sharding still matches the unsharded model
to bf16 tolerance; bad shard counts are refused when the config is built."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine.config import EngineConfig, ModelConfig
from engine.kv_layout import KVLayout
from engine.loader import init_dummy
from engine.models.llama import CausalLM
from engine.parallel import TensorParallel, kv_layout_for_rank, shard_model
from engine.tp_invariant import shard_model_invariant
from tests.engine.test_parallel import PROMPT, _layout, _run, spawn

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
}


def _bf16_model(cfg: ModelConfig) -> CausalLM:
    model = CausalLM(cfg, 128).eval().requires_grad_(False)
    init_dummy(model, seed=5)
    return model.to(torch.bfloat16)


def _layout_bf16(cfg: ModelConfig) -> KVLayout:
    return dataclasses.replace(_layout(cfg), dtype="bfloat16")


def _model_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cfg = ModelConfig.from_dict(CONFIG)
        base = _bf16_model(cfg)
        tp = TensorParallel.from_initialized(world)
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            out["unsharded"] = _run(copy.deepcopy(base), _layout_bf16(cfg))
            default = copy.deepcopy(base)
            shard_model(default, tp)
            out["default_tp2"] = _run(default, kv_layout_for_rank(_layout_bf16(cfg), tp))
            for shards in (2, 4):
                one = copy.deepcopy(base)
                shard_model_invariant(one, 0, 1, shards)
                out[f"s{shards}_tp1"] = _run(one, _layout_bf16(cfg))
                two = copy.deepcopy(base)
                shard_model_invariant(two, rank, world, shards)
                out[f"s{shards}_tp2"] = _run(two, kv_layout_for_rank(_layout_bf16(cfg), tp))
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_one_ranks_logits_bit_for_bit(tmp_path: Path) -> None:
    world = 2
    spawn(_model_rank, world, str(tmp_path / "init"), str(tmp_path), world=world)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["unsharded"].dtype == torch.bfloat16
        # rows [0, PROMPT): the prefill step's logits; row PROMPT: the decode step's
        for shards in (2, 4):
            one, two = got[f"s{shards}_tp1"], got[f"s{shards}_tp2"]
            assert torch.equal(two[:PROMPT], one[:PROMPT]), f"S={shards} prefill"
            assert torch.equal(two[PROMPT:], one[PROMPT:]), f"S={shards} decode"
            assert torch.equal(two.argmax(-1), one.argmax(-1))
            # the invariant mode computes the same function as the plain model, up to rounding
            torch.testing.assert_close(one, got["unsharded"], atol=0.1, rtol=0.05)
        # the default sharding still runs and agrees with the unsharded model to bf16 rounding
        torch.testing.assert_close(got["default_tp2"], got["unsharded"], atol=0.1, rtol=0.05)


def _engine_args(tp: int, cuda: bool) -> dict[str, object]:
    if cuda:  # the Llama-3.1-8B shape cut to 2 layers, dummy weights: CUDA graphs, NCCL
        return {
            "device": "cuda", "dtype": "bfloat16", "load_format": "dummy", "kv_cache_gib": 1.0,
            "max_model_len": 1024, "max_num_seqs": 8, "max_num_batched_tokens": 256,
            "tensor_parallel_size": tp, "tp_invariant_shards": 2,
        }  # fmt: skip
    return {
        "device": "cpu",
        "dtype": "bfloat16",
        "num_threads": 1,
        "num_blocks": 64,
        "max_model_len": 128,
        "max_num_batched_tokens": 32,  # the 45-token prompt is chunked: prefill over a prefix
        "tensor_parallel_size": tp,
        "tp_invariant_shards": 2,
    }


def _engine_rank(rank: int, init_file: str, model_dir: str, out_dir: str, cuda: bool) -> None:
    from engine import LLM, SamplingParams
    from engine.args import EngineArgs
    from engine.gpu_runner import GpuModelRunner
    from engine.model_runner import ModelRunner

    kwargs: dict[str, object] = {}
    if cuda:
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device(f"cuda:{rank}")
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=2,
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    try:
        if rank > 0:
            args = {**_engine_args(2, cuda), **({"device": "cuda:1"} if cuda else {})}
            config = EngineArgs(model=model_dir, **args).resolve()  # type: ignore[arg-type]
            (GpuModelRunner if cuda else ModelRunner)(config).serve_followers()
            return
        prompts = [[(7 * i + 3) % 500 + 3 for i in range(n)] for n in (45, 9, 20)]
        if cuda:
            prompts.append([(13 * i + 5) % 120000 + 3 for i in range(300)])
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
        out = {}
        for tp in (1, 2):
            llm = LLM(model_dir, tokenizer=False, **_engine_args(tp, cuda))
            results = llm.generate(prompts, params)
            out[tp] = [(r.outputs[0].token_ids, repr(r.outputs[0].logprobs)) for r in results]
            llm.engine.runner.stop_followers()
            del llm
        torch.save(out, f"{out_dir}/engine.pt")
    finally:
        dist.destroy_process_group()


def test_engine_greedy_tokens_and_logprobs_equal_at_tp1_and_tp2(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    spawn(_engine_rank, str(tmp_path / "init"), str(tiny_model_dirs["llama"]), str(tmp_path), False)
    got = torch.load(tmp_path / "engine.pt")
    assert got[1] == got[2]
    assert all(len(tokens) == 12 for tokens, _ in got[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_greedy_tokens_and_logprobs_equal_at_tp1_and_tp2(tmp_path: Path) -> None:
    """On two GPUs (nvidia-h200-x2): NCCL, Triton kernels, cuBLAS, CUDA graphs; bf16 on near-flat
    dummy-weight logits, where the default sharding departs within a few tokens."""
    shape = Path(__file__).parents[2] / "engine/model_configs/llama-3.1-8b/config.json"
    cfg = json.loads(shape.read_text())
    cfg["num_hidden_layers"] = 2
    model_dir = tmp_path / "llama8b-2l"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(cfg))
    spawn(_engine_rank, str(tmp_path / "init"), str(model_dir), str(tmp_path), True)
    got = torch.load(tmp_path / "engine.pt")
    assert got[1] == got[2]


@pytest.mark.parametrize(
    ("tp", "shards", "message"),
    [
        (2, 3, "tp_invariant_shards=3 is not a multiple of tensor_parallel_size=2"),
        (1, 4, "num_kv_heads=2 is not divisible by tp_invariant_shards=4"),
        (1, 0, "tp_invariant_shards must be >= 1"),
    ],
)
def test_bad_shard_counts_are_refused(
    tiny_model_dirs: dict[str, Path], tp: int, shards: int, message: str
) -> None:
    model = ModelConfig.from_dir(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match=message):
        EngineConfig(
            tiny_model_dirs["llama"],
            model,
            max_model_len=128,
            tensor_parallel_size=tp,
            tp_invariant_shards=shards,
        )


@pytest.mark.parametrize("shards", [2, None])
def test_prefill_chunks_run_alone_in_the_invariant_mode(
    tiny_model_dirs: dict[str, Path], shards: int | None
) -> None:
    """Batch invariance for prefills: in this mode a step holds one prefill chunk and nothing
    else, or decode rows only (engine/scheduler.py), so a prompt's prefill GEMMs have the same
    M batched as alone (the default mode batches prefills); the tokens equal each prompt's
    alone."""
    from engine import LLM, SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[3 + (7 * i + j) % 200 for j in range(n)] for i, n in enumerate((40, 9, 23, 2))]
    llm = LLM(
        str(tiny_model_dirs["llama"]),
        tokenizer=False,
        tp_invariant_shards=shards,
        max_num_batched_tokens=32,
        enable_prefix_caching=False,
    )
    scheduler = llm.engine.scheduler
    steps: list[list[tuple[int, bool]]] = []  # per step: (new tokens, prompt not done) per row
    schedule = scheduler.schedule

    def recording_schedule():  # type: ignore[no-untyped-def]
        plan = schedule()
        requests = scheduler.requests
        steps.append(
            [(r.num_new_tokens, requests[r.request_id].num_output_tokens == 0) for r in plan.rows]
        )
        return plan

    scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    batched = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    prefill_steps = [s for s in steps if any(prefill for _, prefill in s)]
    if shards is None:
        assert any(len(s) > 1 for s in prefill_steps)
        return
    assert prefill_steps and all(len(s) == 1 for s in prefill_steps)
    assert any(len(s) > 1 for s in steps)  # decode steps still batch
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone
    assert llm.engine.block_manager.num_used_blocks == 0
