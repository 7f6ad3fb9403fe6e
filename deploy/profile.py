"""`tandem profile`: measure this machine's prefill and decode curves for the capacity model.

    tandem profile --model DIR --out profile.json
    tandem profile --dummy-config llama-3.1-8b --out llama8b.json     # random weights, any shape

Runs the engine in-process (no servers):

- prefill: one request of exactly N uncached prompt tokens at a time, timed from add to its
  first token (chunked by --max-num-batched-tokens as serving would); the median of --repeats.
- decode: B requests of context C admitted as remote-prefilled (their KV blocks are reserved
  and left as they are, so no prefill is paid to set them up; attention cost does not depend
  on the bytes), then --decode-steps steps timed one by one; the median. Every step checked to
  be B decode rows.

The curves are only as good as the machine is quiet: on a shared CPU, other processes inflate
and scatter the times (and torch's default thread count can oversubscribe it: see --threads).

Writes profile.json (the schema deploy/capacity.py reads; extra keys are informational) and two
PNG plots next to it: <stem>_prefill.png and <stem>_decode.png. The default sweep is sized for
a 2-core CPU and the default model (a minute or two); widen it with the flags for a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.capacity import DecodePoint, PrefillPoint, Profile

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "engine" / "model_configs"
DEFAULT_INPUT_LENS = (32, 128, 512)
DEFAULT_BATCH_SIZES = (1, 4, 16)
DEFAULT_CONTEXT_LENS = (128, 512)


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    model_dir: Path  # a Hugging Face dir; with load_format="dummy" only its config.json
    model_name: str
    load_format: str = "auto"  # "dummy": seeded random weights
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # the serving default: long prompts are chunked alike
    input_lens: tuple[int, ...] = DEFAULT_INPUT_LENS
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    context_lens: tuple[int, ...] = DEFAULT_CONTEXT_LENS
    repeats: int = 2  # prefill runs per length (median)
    decode_steps: int = 4  # timed decode steps per point (median), after one warm-up step
    threads: int | None = None  # torch.set_num_threads; None: torch's default (the workers')
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("input_lens", "batch_sizes", "context_lens"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values}")
        if self.repeats < 1 or self.decode_steps < 1:
            raise ValueError("repeats and decode_steps must be >= 1")


def run_profile(cfg: ProfileConfig, log: Any = None) -> Profile:
    """Build the engine, sweep, return the profile (also with `extra` info in cfg.extra).
    Progress goes to `log` (default: stderr)."""
    log = sys.stderr if log is None else log
    import torch

    from engine.args import EngineArgs
    from engine.engine import Engine

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    steps_room = cfg.decode_steps + 4
    max_model_len = max(max(cfg.input_lens) + 2, max(cfg.context_lens) + steps_room)
    max_tokens_resident = max(
        max(cfg.input_lens) + 2,
        max(b * (c + steps_room) for b in cfg.batch_sizes for c in cfg.context_lens),
    )
    num_blocks = -(-max_tokens_resident // cfg.block_size) + max(cfg.batch_sizes) + 1
    args = EngineArgs(
        model=str(cfg.model_dir),
        dtype=cfg.dtype,
        device=cfg.device,
        load_format=cfg.load_format,
        block_size=cfg.block_size,
        num_blocks=num_blocks,
        max_model_len=max_model_len,
        max_num_batched_tokens=max(cfg.max_num_batched_tokens, max(cfg.batch_sizes)),
        max_num_seqs=max(256, max(cfg.batch_sizes)),
        enable_prefix_caching=False,  # every prompt is computed in full
        seed=cfg.seed,
    )
    config = args.resolve()
    engine = Engine(config, tokenizer=None)
    rng = random.Random(cfg.seed)
    vocab = config.model.vocab_size
    print(
        f"profiling {cfg.model_name} on {config.device} ({config.dtype}, "
        f"{torch.get_num_threads()} threads)",
        file=log,
        flush=True,
    )
    _prefill_once(engine, _ids(rng, vocab, min(cfg.input_lens)))  # warm-up
    prefill = [
        PrefillPoint(n, _median_prefill_s(engine, rng, vocab, n, cfg.repeats, log))
        for n in sorted(cfg.input_lens)
    ]
    decode = [
        DecodePoint(b, c, _median_step_s(engine, rng, vocab, b, c, cfg.decode_steps, log))
        for c in sorted(cfg.context_lens)
        for b in sorted(cfg.batch_sizes)
    ]
    engine.check_integrity()
    cfg.extra.update(
        {
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "host": platform.node(),
            "created_unix_s": round(time.time(), 3),
        }
    )
    return Profile(
        model=cfg.model_name,
        device=config.device,
        dtype=config.dtype,
        block_size=config.block_size,
        prefill=tuple(prefill),
        decode=tuple(decode),
    )


def _ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def _prefill_once(engine: Any, prompt: list[int]) -> float:
    from engine.sampling_params import SamplingParams

    rid = f"prefill-{time.monotonic_ns()}"
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def _median_prefill_s(
    engine: Any, rng: random.Random, vocab: int, n: int, repeats: int, log: Any
) -> float:
    times = [_prefill_once(engine, _ids(rng, vocab, n)) for _ in range(repeats)]
    median = statistics.median(times)
    print(f"  prefill {n:6d} tokens: {median * 1e3:9.2f} ms", file=log, flush=True)
    return median


def _median_step_s(
    engine: Any, rng: random.Random, vocab: int, batch: int, context: int, steps: int, log: Any
) -> float:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 3, temperature=0.0, ignore_eos=True)
    rids = [f"decode-{batch}-{context}-{i}" for i in range(batch)]
    for rid in rids:
        prompt = _ids(rng, vocab, context)
        engine.reserve_kv(rid, prompt, params)  # the KV "arrives" as it is: decode cost is the same
        engine.first_token(rid, rng.randrange(3, vocab))
        engine.admit_prefilled(rid)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        stats = engine.last_step_stats
        if stats is None or stats.num_decode_rows != batch or stats.num_prefill_rows:
            raise RuntimeError(f"decode step of batch {batch} ran {stats}")
        if i > 0:  # the first step after admission warms caches and allocator
            times.append(elapsed)
    for rid in rids:
        engine.abort(rid)
    median = statistics.median(times)
    print(
        f"  decode batch {batch:4d} x context {context:6d}: {median * 1e3:9.2f} ms/step",
        file=log,
        flush=True,
    )
    return median


# ---- output ---------------------------------------------------------------------------------


def write_profile(profile: Profile, out: Path, extra: dict[str, Any]) -> list[Path]:
    """profile.json (schema keys first, then `extra`) and its plots; returns the paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**profile.to_dict(), **extra}, indent=2) + "\n")
    return [out, *plot_profile(profile, out)]


def plot_profile(profile: Profile, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    title = f"{profile.model} on {profile.device} ({profile.dtype})"
    prefill_png = out.with_name(f"{out.stem}_prefill.png")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    lens = [p.input_len for p in profile.prefill]
    ax[0].plot(lens, [p.time_s * 1e3 for p in profile.prefill], "o-")
    ax[0].set(xlabel="prompt tokens", ylabel="time to first token (ms)", title="Prefill time")
    ax[1].plot(lens, [p.input_len / p.time_s for p in profile.prefill], "o-", color="tab:green")
    ax[1].set(xlabel="prompt tokens", ylabel="prefill tokens/s", title="Prefill throughput")
    for a in ax:
        a.grid(alpha=0.3)
        a.set_ylim(bottom=0)
        if max(lens) >= 16 * min(lens):
            a.set_xscale("log", base=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(prefill_png, dpi=110)
    plt.close(fig)

    decode_png = out.with_name(f"{out.stem}_decode.png")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for context in sorted({d.context_len for d in profile.decode}):
        points = sorted(
            (d.batch_size, d.step_time_s) for d in profile.decode if d.context_len == context
        )
        batches = [b for b, _ in points]
        ax[0].plot(batches, [t * 1e3 for _, t in points], "o-", label=f"context {context}")
        ax[1].plot(batches, [b / t for b, t in points], "o-", label=f"context {context}")
    ax[0].set(xlabel="batch size (requests)", ylabel="step time = ITL (ms)", title="Decode step")
    ax[1].set(xlabel="batch size (requests)", ylabel="decode tokens/s", title="Decode throughput")
    for a in ax:
        a.grid(alpha=0.3)
        a.set_ylim(bottom=0)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(decode_png, dpi=110)
    plt.close(fig)
    return [prefill_png, decode_png]


# ---- command line ---------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `tandem profile` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "profile",
        help="measure prefill and decode curves on this machine (for tandem plan)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="Hugging Face model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--dummy-config",
        help="profile this shape with random weights: a config.json path, a dir holding one, or "
        f"a bundled name ({', '.join(sorted(d.name for d in MODEL_CONFIGS.iterdir()))})",
    )
    p.add_argument("--out", type=Path, default=Path("profile.json"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--input-lens", type=_ints, default=DEFAULT_INPUT_LENS,
                   help="prefill sweep, comma-separated prompt lengths")  # fmt: skip
    p.add_argument("--batch-sizes", type=_ints, default=DEFAULT_BATCH_SIZES,
                   help="decode sweep, comma-separated batch sizes")  # fmt: skip
    p.add_argument("--context-lens", type=_ints, default=DEFAULT_CONTEXT_LENS,
                   help="decode sweep, comma-separated context lengths")  # fmt: skip
    p.add_argument("--repeats", type=int, default=2, help="prefill runs per length (median)")
    p.add_argument("--decode-steps", type=int, default=4, help="timed steps per decode point")
    p.add_argument(
        "--threads", type=int,
        help="torch CPU threads (default: torch's, as the workers run; on a shared machine 1 "
        "avoids OpenMP oversubscription, which can slow a step several times)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_profile)
    return p


def cmd_profile(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="tandem-profile-") as scratch:
        model_dir, name, load_format = _resolve_model(args.model, args.dummy_config, Path(scratch))
        cfg = ProfileConfig(
            model_dir=model_dir,
            model_name=name,
            load_format=load_format,
            device=args.device,
            dtype=args.dtype,
            block_size=args.block_size,
            max_num_batched_tokens=args.max_num_batched_tokens,
            input_lens=args.input_lens,
            batch_sizes=args.batch_sizes,
            context_lens=args.context_lens,
            repeats=args.repeats,
            decode_steps=args.decode_steps,
            threads=args.threads,
            seed=args.seed,
        )
        started = time.perf_counter()
        profile = run_profile(cfg)
    cfg.extra["profile_wall_s"] = round(time.perf_counter() - started, 1)
    cfg.extra["weights"] = "dummy (random)" if load_format == "dummy" else "checkpoint"
    for path in write_profile(profile, args.out, cfg.extra):
        print(f"wrote {path}")
    return 0


def _resolve_model(model: str | None, dummy: str | None, scratch: Path) -> tuple[Path, str, str]:
    """(model dir, profile name, load format). A dummy config is copied into `scratch` alone,
    so nothing but its config.json is read."""
    if dummy is None:
        if model is None:
            from engine.default_model import default_cache_dir, ensure_default_model

            model = str(ensure_default_model(default_cache_dir()))
        path = Path(model)
        return path, path.resolve().name, "auto"
    candidates: Sequence[Path] = (
        Path(dummy),
        Path(dummy) / "config.json",
        MODEL_CONFIGS / dummy / "config.json",
    )
    config = next((c for c in candidates if c.is_file()), None)
    if config is None:
        raise FileNotFoundError(f"--dummy-config {dummy!r}: no config.json there or bundled")
    (scratch / "config.json").write_text(config.read_text())
    name = config.parent.name if config.name == "config.json" else config.stem
    return scratch, f"{name} (dummy weights)", "dummy"
