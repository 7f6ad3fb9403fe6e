"""GPU correctness (issue 7, acceptance 1): Tandem vs transformers on the same GPU and weights.

For each dtype (bf16, fp32):
  - teacher-forced top-1 agreement over >= 1,000 positions, through both of Tandem's GPU paths:
      prefill: each text runs as chunks over its cached prefix (Triton prefill kernel), logits
               at every position;
      decode:  the same texts fed one true token per step, all texts batched (CUDA graph,
               Triton decode kernel); the greedy sample of each step is Tandem's top-1;
    against transformers' logits of one full forward over each text;
  - the same agreement (prefill path) on a second, separately reported text set: the model's
    own greedy continuation (transformers fp32, CONTINUATION tokens after each chat prompt),
    positions predicting the continuation only. Natural text has many near-tied top-2 logits;
    the model's own continuation fewer. Both sets are always reported;
  - greedy text: the first 32 new tokens of each prompt, Tandem LLM.generate (all prompts
    batched) vs transformers generate (each prompt alone); where they part, transformers' gap
    between its token and ours, in bf16 ulps;
  - the decode picks also against transformers' own decode (its KV cache, one true token per
    call: what its generate computes), and that decode against its full forward;
  - for every agreement figure, beside the strict one: the tie-aware agreement (our top-1 among
    transformers' exactly tied maxima) and where the disagreements sit in transformers' bf16
    ulps (bench/agreement.py).
Each of the above for every engine numerics mode asked for (--numerics, default both in the
same run): "fast", the engine's own kernels, and "reference", transformers' op sequence and
SDPA calls (engine/reference_runner.py); transformers' logits are the same for both. Then the
cost of reference mode: decode tokens/s of both modes at batch 1 and 8 (bf16, SmolLM2).
Prints a table and one JSON line.

    python -m bench.gpu_correctness --model DIR [--numerics fast,reference] [--dtypes ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.agreement import agreement, bf16_ulp, logits_agreement, summary
from engine import LLM, SamplingParams
from engine.gpu_runner import GpuModelRunner
from engine.plan import ScheduledRow, StepPlan

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Before him, books were copied by hand, usually by monks, and a single volume could take "
    "months to finish. The new machine changed that within a generation: printers spread from "
    "Mainz to Venice, Paris and London, and by 1500 some twenty million volumes had been printed. "
    "Cheaper books meant more readers, and more readers meant new ideas travelled faster than "
    "any authority could control them. Historians link the press to the Reformation, to the "
    "scientific revolution and to the rise of vernacular languages, because pamphlets, tables "
    "of data and translated scripture could now reach people far from universities. ",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\ndef is_prime(n):\n"
    "    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
    "        if n % i == 0:\n"
    "            return False\n        i += 1\n    return True\n\n\nclass Stack:\n"
    "    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n\n"
    "    def __len__(self):\n        return len(self.items)\n\n\nif __name__ == '__main__':\n"
    "    print([fibonacci(i) for i in range(10)])\n"
    "    print([n for n in range(50) if is_prime(n)])\n",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light "
    "into chemical energy. In the chloroplasts, chlorophyll absorbs mostly blue and red light "
    "and uses its energy to split water molecules, releasing oxygen as a by-product. The "
    "electrons freed this way travel along a transport chain that pumps protons across a "
    "membrane; the resulting gradient drives ATP synthase. In the Calvin cycle, the ATP and "
    "NADPH made in the light reactions fix carbon dioxide into three-carbon sugars, which the "
    "plant then builds into glucose, starch and cellulose. Nearly all life on Earth depends on "
    "this process, directly or through food chains, and the oxygen in the atmosphere exists "
    "because of it. ",
    "Dear hiring committee,\n\nI am writing to apply for the position of data engineer that "
    "you advertised last week. Over the past six years I have designed and run pipelines that "
    "move several terabytes a day from operational databases into an analytics warehouse, "
    "first at a logistics start-up and then at a regional bank. I care about correctness "
    "first: every job I own has tests, alerts and a written runbook, and I have reduced "
    "late-night incidents on my team by two thirds. I also enjoy teaching; I run an internal "
    "workshop on SQL performance that more than a hundred colleagues have attended. I would "
    "welcome the chance to discuss how I could help your team.\n\nKind regards,\nAlex",
]
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 17 times 23?",
    "Give me a tip for learning a new language.",
]
GREEDY_TOKENS = 32
CONTINUATION = 200  # tokens of the model's own greedy continuation per chat prompt
CHUNK = 100  # prefill chunk size for the teacher-forced prefill path (cached prefix after #1)


def _hf(model_dir: Path, dtype: torch.dtype, attn: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    return model.cuda().eval()


def _top1(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b, strict=True))
    return same / sum(len(x) for x in a)


@torch.inference_mode()
def noise_floor(model_dir: Path, texts: list[list[int]], ours: list[torch.Tensor]) -> dict:
    """How far apart two bf16 implementations of transformers itself are, and each from fp32:
    the scale against which Tandem's bf16 agreement should be read."""
    logits = {}
    for name, dtype, attn in (
        ("sdpa_bf16", torch.bfloat16, "sdpa"),
        ("eager_bf16", torch.bfloat16, "eager"),
        ("sdpa_fp32", torch.float32, "sdpa"),
    ):
        hf = _hf(model_dir, dtype, attn)
        logits[name] = [hf(torch.tensor([t], device="cuda")).logits[0].float() for t in texts]
        del hf
    return {
        "hf_sdpa_bf16_vs_hf_eager_bf16": _top1(logits["sdpa_bf16"], logits["eager_bf16"]),
        "hf_sdpa_bf16_vs_hf_fp32": _top1(logits["sdpa_bf16"], logits["sdpa_fp32"]),
        "hf_eager_bf16_vs_hf_fp32": _top1(logits["eager_bf16"], logits["sdpa_fp32"]),
        "tandem_bf16_vs_hf_fp32": _top1(ours, logits["sdpa_fp32"]),
    }


@torch.inference_mode()
def _teacher_forced_prefill(llm: LLM, texts: list[list[int]]) -> list[torch.Tensor]:
    """Tandem's logits at every position of each text, computed in chunks of CHUNK tokens
    over the cached prefix (blocks assigned by hand; the engine holds no request)."""
    runner = llm.engine.runner
    bs = runner.config.block_size
    out = []
    for ids in texts:
        table = tuple(range(-(-len(ids) // bs)))
        logits = []
        for start in range(0, len(ids), CHUNK):
            chunk = tuple(ids[start : start + CHUNK])
            row = ScheduledRow("tf", chunk, start, table, False, SamplingParams(), 0)
            if isinstance(runner, GpuModelRunner):
                input_ids, positions, meta, _ = runner._prepare_eager((row,))
            else:  # ReferenceModelRunner
                input_ids, positions, meta, _ = runner._prepare(StepPlan((row,), ()))
            hidden = runner.model(input_ids, positions, meta, runner.kv_cache)
            logits.append(runner.model.compute_logits(hidden).float())
        out.append(torch.cat(logits))
    return out


@torch.inference_mode()
def _teacher_forced_decode(llm: LLM, texts: list[list[int]], first: int) -> list[list[int]]:
    """Tandem's greedy pick after each position >= first of each text, fed the true tokens
    one per step, all texts in one batch (CUDA-graph decode steps after one prefill step)."""
    runner = llm.engine.runner
    bs = runner.config.block_size
    greedy = SamplingParams(temperature=0.0)
    tables, next_block = [], 0
    for ids in texts:
        nb = -(-len(ids) // bs)
        tables.append(tuple(range(next_block, next_block + nb)))
        next_block += nb
    prefill = tuple(
        ScheduledRow(f"r{i}", tuple(ids[:first]), 0, tables[i], True, greedy, 0)
        for i, ids in enumerate(texts)
    )
    picks: list[list[int]] = [[] for _ in texts]
    result = runner.execute(StepPlan(prefill, ()))
    for i in range(len(texts)):
        picks[i].append(result.sampled_token_ids[f"r{i}"])
    steps = min(len(t) for t in texts) - first
    for s in range(steps - 1):
        pos = first + s
        rows = tuple(
            ScheduledRow(f"r{i}", (ids[pos],), pos, tables[i], True, greedy, s + 1)
            for i, ids in enumerate(texts)
        )
        result = runner.execute(StepPlan(rows, ()))
        for i in range(len(texts)):
            picks[i].append(result.sampled_token_ids[f"r{i}"])
    return picks


@torch.inference_mode()
def _hf_teacher_forced_decode(
    hf: Any, texts: list[list[int]], first: int, steps: list[int]
) -> list[torch.Tensor]:
    """transformers' logits predicting positions first .. first + steps - 1 of each text, as
    its generate computes them: a forward over text[:first] with a DynamicCache, then one true
    token per call over the cache (batch 1, no mask: the q_len-1 SDPA call)."""
    out = []
    for ids, n in zip(texts, steps, strict=True):
        res = hf(torch.tensor([ids[:first]], device="cuda"), use_cache=True)
        cache, logits = res.past_key_values, [res.logits[0, -1:].float()]
        for pos in range(first, first + n - 1):
            res = hf(
                torch.tensor([[ids[pos]]], device="cuda"), past_key_values=cache, use_cache=True
            )
            cache = res.past_key_values
            logits.append(res.logits[0, -1:].float())
        out.append(torch.cat(logits))
    return out


def _chat_prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False
            )
        )["input_ids"]
        for c in CHATS
    ]


@torch.inference_mode()
def _hf_greedy(hf: Any, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt: num_tokens ids, EOS ignored."""
    ids = torch.tensor([prompt], device="cuda")
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=num_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return list(out[0, len(prompt) :].tolist())


@torch.inference_mode()
def own_continuations(model_dir: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt, transformers fp32 greedy continuation of CONTINUATION tokens) per chat prompt:
    a text set neutral to both bf16 implementations (neither produced it)."""
    hf = _hf(model_dir, torch.float32)
    out = []
    for p in _chat_prompts(model_dir):
        out.append((p, _hf_greedy(hf, p, CONTINUATION)))
    del hf
    torch.cuda.empty_cache()
    return out


def _continuation_top1(
    hf: Any, llm: LLM, sets: list[tuple[list[int], list[int]]]
) -> tuple[float, int, dict[str, Any]]:
    """Top-1 agreement (prefill path) at the positions that predict each continuation."""
    texts = [p + c for p, c in sets]
    ours = _teacher_forced_prefill(llm, texts)
    with torch.inference_mode():
        ref = [hf(torch.tensor([t], device="cuda")).logits[0].float() for t in texts]
    a = [x[len(p) - 1 : len(p) - 1 + len(c)] for x, (p, c) in zip(ours, sets, strict=True)]
    b = [x[len(p) - 1 : len(p) - 1 + len(c)] for x, (p, c) in zip(ref, sets, strict=True)]
    return _top1(a, b), sum(len(x) for x in a), logits_agreement(a, b)


def _llm(model_dir: Path, dtype_name: str, numerics: str) -> LLM:
    return LLM(
        str(model_dir),
        tokenizer=False,
        device="cuda",
        dtype=dtype_name,
        numerics=numerics,
        max_model_len=2048,
        num_blocks=1024,
        max_num_seqs=8,
        max_num_batched_tokens=1024,
    )


def decode_rate(model_dir: Path, numerics: str, batches: tuple[int, ...] = (1, 8)) -> dict:
    """Decode tokens/s (bf16) at each batch size: B chat prompts (cycled), 129 vs 1 new
    tokens, the difference timed (median of 3 after a warm-up), so prefill drops out."""
    llm = _llm(model_dir, "bfloat16", numerics)
    prompts = _chat_prompts(model_dir)
    out = {}
    for b in batches:
        batch = [prompts[i % len(prompts)] for i in range(b)]

        def timed(n: int, batch: list[list[int]] = batch) -> float:
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate(batch, params)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        timed(129)  # warm-up: Triton compiles, cuBLAS/cuDNN pick their kernels
        times = sorted(timed(129) - timed(1) for _ in range(3))
        out[f"batch_{b}_decode_tok_s"] = b * 128 / times[1]
        out[f"batch_{b}_step_ms"] = times[1] / 128 * 1e3
    return out


def run(
    model_dir: Path,
    dtype_name: str,
    numerics: str,
    continuations: list[tuple[list[int], list[int]]],
    with_floor: bool,
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    tok = AutoTokenizer.from_pretrained(model_dir)
    # each text followed by the next: ~400 tokens each, > 1,000 positions per path
    texts = [tok(a + b)["input_ids"] for a, b in zip(TEXTS, TEXTS[1:] + TEXTS[:1], strict=True)]
    hf = _hf(model_dir, dtype)
    llm = _llm(model_dir, dtype_name, numerics)
    with torch.inference_mode():
        raw = [hf(torch.tensor([ids], device="cuda")).logits[0] for ids in texts]
    ref_dtype = raw[0].dtype
    ref = [x.float() for x in raw]
    del raw
    with torch.inference_mode():
        runner = llm.engine.runner
        our_dtype = runner.model.compute_logits(runner.model.embed_tokens.weight[:1]).dtype
    # prefill path: every position of every text
    ours = _teacher_forced_prefill(llm, texts)
    floor = noise_floor(model_dir, texts, ours) if with_floor and dtype == torch.bfloat16 else {}
    pre_total = sum(len(t) for t in texts)
    # decode path: positions [first, min_len) of each text
    first = 64
    picks = _teacher_forced_decode(llm, texts, first)
    dec_agree = dec_total = 0
    for p, r in zip(picks, ref, strict=True):
        top1 = r.argmax(-1)[first - 1 : first - 1 + len(p)].tolist()
        dec_agree += sum(int(x == y) for x, y in zip(p, top1, strict=True))
        dec_total += len(p)
    dec_ties = agreement(
        torch.tensor([t for p in picks for t in p]),
        torch.cat([r[first - 1 : first - 1 + len(p)] for p, r in zip(picks, ref, strict=True)]),
    )
    # the same decode picks against transformers' own decode (one true token per step over its
    # KV cache, q_len 1: the SDPA call its generate makes), not its full forward
    hf_dec = _hf_teacher_forced_decode(hf, texts, first, [len(p) for p in picks])
    dec_vs_hf_decode = agreement(torch.tensor([t for p in picks for t in p]), torch.cat(hf_dec))
    hf_decode_vs_forward = logits_agreement(
        hf_dec, [r[first - 1 : first - 1 + len(p)] for p, r in zip(picks, ref, strict=True)]
    )
    # second text set: the model's own (fp32) greedy continuations
    cont_top1, cont_total, cont_ties = _continuation_top1(hf, llm, continuations)
    # greedy text: chat prompts
    prompts = _chat_prompts(model_dir)
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    mine = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    theirs = [_hf_greedy(hf, p, GREEDY_TOKENS) for p in prompts]
    same = [a == b for a, b in zip(mine, theirs, strict=True)]
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(mine, theirs, strict=True)
    ]
    # where they part: transformers' logits there, its token's lead over ours in its ulps
    split_gap_ulps = []
    for p, a, b, d in zip(prompts, mine, theirs, first_diff, strict=True):
        if d is None:
            continue
        with torch.inference_mode():
            lg = hf(torch.tensor([p + b[:d]], device="cuda")).logits[0, -1].float()
        split_gap_ulps.append(float((lg[b[d]] - lg[a[d]]) / bf16_ulp(lg[b[d]])))
    del llm, hf
    torch.cuda.empty_cache()
    return {
        "dtype": dtype_name,
        "numerics": numerics,
        "prefill_top1": _top1(ours, ref),
        "prefill_positions": pre_total,
        "decode_top1": dec_agree / dec_total,
        "decode_positions": dec_total,
        "continuation_top1": cont_top1,
        "continuation_positions": cont_total,
        "greedy_identical": sum(same),
        "greedy_prompts": len(same),
        "greedy_first_diff": first_diff,
        "greedy_split_ref_gap_ulps": split_gap_ulps,
        "logits_dtype": {"transformers": str(ref_dtype), "tandem": str(our_dtype)},
        "prefill_ties": logits_agreement(ours, ref),
        "decode_ties": dec_ties,
        "decode_vs_hf_decode": dec_vs_hf_decode,
        "hf_decode_vs_hf_forward": hf_decode_vs_forward,
        "continuation_ties": cont_ties,
        "sample_text": tok.decode(mine[0]),
        "reference_text": tok.decode(theirs[0]),
        "noise_floor": floor,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--numerics", default="fast,reference", help="engine modes, in one run")
    p.add_argument("--no-speed", action="store_true", help="skip the decode tokens/s per mode")
    ns = p.parse_args()
    started = time.time()
    model = Path(ns.model)
    modes = ns.numerics.split(",")
    continuations = own_continuations(model)
    results = [
        run(model, d, m, continuations, with_floor=i == 0)
        for i, m in enumerate(modes)
        for d in ns.dtypes.split(",")
    ]
    speed = {} if ns.no_speed else {m: decode_rate(model, m) for m in modes}
    import transformers

    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"transformers {transformers.__version__}"
    )
    print(
        f"{'numerics':<10}{'dtype':<10}{'natural: prefill top-1':>26}{'decode top-1':>22}"
        f"{'own continuation top-1':>28}{'greedy 32 identical':>22}"
    )
    for r in results:
        print(
            f"{r['numerics']:<10}{r['dtype']:<10}"
            f"{r['prefill_top1']:>19.4f} ({r['prefill_positions']})"
            f"{r['decode_top1']:>15.4f} ({r['decode_positions']})"
            f"{r['continuation_top1']:>21.4f} ({r['continuation_positions']})"
            f"{r['greedy_identical']:>18}/{r['greedy_prompts']}"
        )
    for r in results:
        print(f"{r['numerics']} {r['dtype']}: logits dtype {r['logits_dtype']}")
        for name in ("prefill", "decode", "continuation"):
            print(f"  {name:<13}{summary(r[name + '_ties'])}")
        print(f"  decode vs transformers' decode: {summary(r['decode_vs_hf_decode'])}")
        print(f"  transformers' decode vs its forward: {summary(r['hf_decode_vs_hf_forward'])}")
        if r["greedy_split_ref_gap_ulps"]:
            gaps = r["greedy_split_ref_gap_ulps"]
            print(f"  greedy: transformers' lead at each split, in its ulps: {gaps}")
        for k, v in r["noise_floor"].items():
            print(f"  top-1 agreement {k}: {v:.4f}")
    for m, rates in speed.items():
        print(f"decode speed, {m}: " + "  ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "seconds": time.time() - started,
                "results": results,
                "speed": speed,
            }
        )
    )


if __name__ == "__main__":
    main()
