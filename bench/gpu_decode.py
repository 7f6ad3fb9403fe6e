"""GPU speed against the roofline (issue 7, acceptance 2-4), Llama-3.1-8B shape, dummy weights.

Measured in one run, on one GPU:
  copy bandwidth   device-to-device copy of 4 GiB, bytes read + written / time
  matmul rate      8192^3 bf16 torch.matmul, FLOP/s
  prefill          one 3,072-token prompt in one step: model FLOPs / step time vs matmul rate
  decode batch 1   1,024-token prompt, 128 new tokens: median decode step vs
                   (weight bytes + KV bytes read) / copy bandwidth
  batch 64, 256    1,024 in / 1,024 out each (EOS ignored): output tokens/s over the whole
                   run, and over its decode-only steps vs the roofline of those steps
  transformers     the same model shape on the same GPU (continuous-batching generate_batch;
                   else static-cache generate), a smaller workload run by both engines
Prints a table and one JSON line ("gpu_decode ..." prefix).

    python -m bench.gpu_decode --model engine/model_configs/llama-3.1-8b --kv-cache-gib 66
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from engine import LLM, SamplingParams
from engine.engine import Engine
from engine.stats import StepStats


def _cuda_time(fn: Any, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth() -> float:
    """Bytes/s, counting bytes read and written."""
    x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = _cuda_time(lambda: y.copy_(x), 20)
    return 2 * (4 << 30) / t


def matmul_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = _cuda_time(lambda: a @ b, 20)
    return 2 * n**3 / t


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


class Bench:
    def __init__(self, llm: LLM, bandwidth: float) -> None:
        self.llm = llm
        self.engine: Engine = llm.engine
        cfg = self.engine.config
        m = cfg.model
        model = self.engine.runner.model
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        embed = model.embed_tokens.weight
        # every weight is read once per step except the embedding table (a few rows)
        self.weight_bytes = params - embed.numel() * embed.element_size()
        self.token_kv_bytes = self.engine.runner.kv_cache.layout.token_bytes
        self.bandwidth = bandwidth
        self.vocab = m.vocab_size
        h, i, layers = m.hidden_size, m.intermediate_size, m.num_layers
        q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        self.linear_flops_per_token = 2 * layers * (h * (q + 2 * kv) + q * h + 3 * h * i)
        self.m = m
        self.ids = 0

    def _add(self, prompts: list[list[int]], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for p in prompts:
            self.ids += 1
            self.engine.add_request(f"b{self.ids}", p, params)

    def _drain(self) -> list[tuple[float, StepStats, int]]:
        """Step until idle: (seconds, stats, KV tokens read by decode rows) per step.
        Also records each step's time in runner.collect (the host waiting for the GPU's
        tokens): the rest of a step is host work (schedule, inputs, update, outputs). With
        overlapped steps (the default) that work runs while the GPU computes; without, the GPU
        waits for it."""
        steps = []
        self.wait_s: list[float] = []
        runner = self.engine.runner
        collect = type(runner).collect

        def timed(launched: Any) -> Any:
            t = time.perf_counter()
            out = collect(runner, launched)
            self.wait_s.append(time.perf_counter() - t)
            return out

        runner.collect = timed  # type: ignore[method-assign]
        while self.engine.has_unfinished():
            ctx = sum(
                r.num_tokens
                for r in self.engine.scheduler.requests.values()
                if r.num_computed_tokens >= r.num_prompt_tokens and not r.is_finished
            )
            n_wait = len(self.wait_s)
            t0 = time.perf_counter()
            self.engine.step()
            dt = time.perf_counter() - t0
            if len(self.wait_s) == n_wait:
                self.wait_s.append(0.0)  # nothing collected this step
            stats = self.engine.last_step_stats
            if stats is not None:
                steps.append((dt, stats, ctx))
            else:
                self.wait_s.pop()
        del runner.collect  # back to the class's method
        return steps

    def prefill(self, length: int) -> dict[str, Any]:
        self._add(_prompts(1, length, self.vocab, 1), 1)  # warm-up (other tokens)
        self._drain()
        self._add(_prompts(1, length, self.vocab, 2), 1)
        # wall time of the whole request: with overlapped steps, step() returns before the
        # GPU is done (its wait is in the next step), so one step's time is not the prefill's
        t0 = time.perf_counter()
        steps = self._drain()
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        assert len(steps) == 1, "raise --max-num-batched-tokens: the prompt must be one step"
        m = self.m
        attn_flops = 2 * 2 * m.num_layers * m.num_heads * m.head_dim * length * length / 2
        lm_head = 2 * m.hidden_size * self.vocab
        flops = self.linear_flops_per_token * length + attn_flops + lm_head
        return {"tokens": length, "seconds": t, "flops": flops, "flop_rate": flops / t}

    def decode_batch1(self, context: int, new_tokens: int) -> dict[str, Any]:
        self._add(_prompts(1, context, self.vocab, 3), new_tokens)
        steps = self._drain()
        dec = [(dt, ctx) for dt, s, ctx in steps if s.num_prefill_rows == 0]
        median = statistics.median(dt for dt, _ in dec)
        mean_ctx = statistics.mean(ctx for _, ctx in dec)
        roof = (self.weight_bytes + mean_ctx * self.token_kv_bytes) / self.bandwidth
        # the GPU's share: the batch-1 graph replayed back to back (no host work in between)
        graphs = getattr(self.engine.runner, "graphs", None)
        replay_s = _cuda_time(graphs.graph(1).replay, 50) if graphs is not None else None
        if graphs is not None:  # where the GPU time of one batch-1 step goes, by kernel
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    graphs.graph(1).replay()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)
        return {
            "graph_replay_s": replay_s,
            "context": context,
            "steps": len(dec),
            "median_step_s": median,
            "roofline_step_s": roof,
            "fraction_of_roofline": roof / median,
        }

    def batch(self, n: int, isl: int, osl: int) -> dict[str, Any]:
        self._add(_prompts(n, isl, self.vocab, 100 + n), osl)
        t0 = time.perf_counter()
        steps = self._drain()
        total = time.perf_counter() - t0
        decode_wait = [
            w for (_, s, _), w in zip(steps, self.wait_s, strict=True) if s.num_prefill_rows == 0
        ]
        dec = [(dt, s, ctx) for dt, s, ctx in steps if s.num_prefill_rows == 0]
        dec_time = sum(dt for dt, _, _ in dec)
        dec_tokens = sum(s.num_decode_tokens for _, s, _ in dec)
        roof_time = sum(
            (self.weight_bytes + ctx * self.token_kv_bytes) / self.bandwidth for _, _, ctx in dec
        )
        return {
            "batch": n,
            "input_len": isl,
            "output_len": osl,
            "seconds": total,
            "output_tok_s": n * osl / total,
            "decode_steps": len(dec),
            "decode_tok_s": dec_tokens / dec_time,
            "roofline_decode_tok_s": dec_tokens / roof_time,
            "fraction_of_roofline": roof_time / dec_time,
            "median_decode_step_s": statistics.median(dt for dt, _, _ in dec),
            # host work per decode step: all of it but the wait for the GPU's tokens
            "median_host_busy_s": statistics.median(
                dt - w for (dt, _, _), w in zip(dec, decode_wait, strict=True)
            ),
            "median_wait_s": statistics.median(decode_wait),
        }


def transformers_run(model_dir: Path, n: int, isl: int, osl: int) -> dict[str, Any]:
    """The same shape in transformers (random weights), same prompts/lengths; tokens/s."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    prompts = _prompts(n, isl, config.vocab_size, 100 + n)
    gen = GenerationConfig(
        max_new_tokens=osl, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=osl
    )
    result: dict[str, Any] = {"batch": n, "input_len": isl, "output_len": osl}
    try:
        model.generate_batch(inputs=prompts[:2], generation_config=gen)  # warm-up
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=prompts, generation_config=gen)
        total = time.perf_counter() - t0
        produced = sum(len(o.generated_tokens) for o in outs.values())
        result.update(method="generate_batch (continuous batching)", seconds=total)
        result.update(output_tokens=produced, output_tok_s=produced / total)
    except Exception as e:  # report, then fall back to the static-cache path
        result["generate_batch_error"] = f"{type(e).__name__}: {e}"[:400]
        ids = torch.tensor(prompts, device="cuda")
        kw = dict(generation_config=gen, cache_implementation="static")
        model.generate(
            ids[:, :64],
            **{
                **kw,
                "generation_config": GenerationConfig(
                    max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0
                ),
            },
        )
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        produced = (out.shape[1] - isl) * n
        result.update(method="generate, static cache, eager", seconds=total)
        result.update(output_tokens=produced, output_tok_s=produced / total)
    del model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="engine/model_configs/llama-3.1-8b")
    p.add_argument("--kv-cache-gib", type=float, default=66.0)
    p.add_argument("--batches", default="64,256")
    p.add_argument("--isl", type=int, default=1024)
    p.add_argument("--osl", type=int, default=1024)
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--hf-osl", type=int, default=256)
    p.add_argument("--skip", default="", help="comma list of: prefill,batch1,batches,hf")
    p.add_argument(
        "--no-async-scheduling", action="store_true", help="the synchronous loop (no overlap)"
    )
    ns = p.parse_args()
    skip = set(filter(None, ns.skip.split(",")))
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    out["async_scheduling"] = not ns.no_async_scheduling
    bw = copy_bandwidth()
    mm = matmul_rate()
    out.update(copy_bandwidth=bw, matmul_flop_rate=mm)
    print(
        f"device {out['device']}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    t0 = time.perf_counter()
    llm = LLM(
        ns.model,
        tokenizer=False,
        device="cuda",
        dtype="bfloat16",
        load_format="dummy",
        kv_cache_gib=ns.kv_cache_gib,
        max_model_len=4096,
        max_num_seqs=max(int(b) for b in ns.batches.split(",")),
        max_num_batched_tokens=8192,
        async_scheduling=not ns.no_async_scheduling,
    )
    out["startup_s"] = time.perf_counter() - t0
    bench = Bench(llm, bw)
    out["weight_bytes"] = bench.weight_bytes
    print(f"engine up in {out['startup_s']:.1f} s (graphs captured)", flush=True)
    if "prefill" not in skip:
        r = bench.prefill(3072)
        r["fraction_of_matmul_rate"] = r["flop_rate"] / mm
        out["prefill"] = r
        print(
            f"prefill 3072: {r['seconds'] * 1e3:.1f} ms, {r['flop_rate'] / 1e12:.0f} TFLOP/s "
            f"= {r['fraction_of_matmul_rate']:.2f} of matmul",
            flush=True,
        )
    if "batch1" not in skip:
        r = bench.decode_batch1(1024, 128)
        out["decode_batch1"] = r
        print(
            f"batch 1 @1K: graph replay {r['graph_replay_s'] * 1e3:.2f} ms, step "
            f"{r['median_step_s'] * 1e3:.2f} ms, roofline "
            f"{r['roofline_step_s'] * 1e3:.2f} ms = {r['fraction_of_roofline']:.2f}",
            flush=True,
        )
    out["batches"] = []
    if "batches" not in skip:
        for b in ns.batches.split(","):
            r = bench.batch(int(b), ns.isl, ns.osl)
            out["batches"].append(r)
            print(
                f"batch {b}: host busy {r['median_host_busy_s'] * 1e3:.2f} ms, waits "
                f"{r['median_wait_s'] * 1e3:.2f} ms of "
                f"{r['median_decode_step_s'] * 1e3:.2f} ms; "
                f"{r['output_tok_s']:.0f} tok/s overall, decode {r['decode_tok_s']:.0f}"
                f" vs roofline {r['roofline_decode_tok_s']:.0f} = {r['fraction_of_roofline']:.2f}",
                flush=True,
            )
    if "hf" not in skip:
        r = bench.batch(ns.hf_batch, ns.isl, ns.hf_osl)
        out["tandem_vs_hf"] = r
        print(
            f"tandem {ns.hf_batch}x{ns.isl}/{ns.hf_osl}: {r['output_tok_s']:.0f} tok/s", flush=True
        )
        del bench, llm
        torch.cuda.empty_cache()
        h = transformers_run(Path(ns.model), ns.hf_batch, ns.isl, ns.hf_osl)
        out["transformers"] = h
        out["speedup_vs_transformers"] = r["output_tok_s"] / h["output_tok_s"]
        print(
            f"transformers ({h['method']}): {h['output_tok_s']:.0f} tok/s -> Tandem "
            f"{out['speedup_vs_transformers']:.2f}x",
            flush=True,
        )
    print("gpu_decode " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
