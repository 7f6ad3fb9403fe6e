"""EngineArgs: user-facing knobs with "auto" values, resolved once into a frozen EngineConfig."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import NUMERICS, EngineConfig, ModelConfig
from engine.kv_layout import DTYPE_BYTES

GiB = 1 << 30


@dataclass(slots=True)
class EngineArgs:
    model: str
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available, else cpu
    load_format: str = "auto"  # auto: safetensors; "dummy": random weights
    block_size: int = 16
    kv_cache_gib: float = 2.0  # KV pool size when num_blocks is not given
    num_blocks: int | None = None
    max_model_len: int | None = None  # None: the model's max_position_embeddings (<= 8192)
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    seed: int = 0
    # None: on CPU all cores but one (the one left runs the caller's loop, gRPC and the OS;
    # two OpenMP threads on two shared cores stall whenever either is descheduled, see
    # docs/benchmarks.md), on CUDA 1 (the GPU does the work)
    num_threads: int | None = None
    enforce_eager: bool = False  # CUDA: run decode steps without CUDA graphs
    tensor_parallel_size: int = 1  # one process per rank, torch.distributed initialised
    # None: on CUDA (the host's work per step hides behind the GPU's), off on CPU (the host
    # is the device: nothing to overlap with)
    async_scheduling: bool | None = None
    tp_invariant_shards: int | None = None  # bit-identical logits for every TP dividing it
    # "fast" | "reference" (EngineConfig.numerics); reference turns CUDA graphs off itself
    numerics: str = "fast"

    def resolve(self) -> EngineConfig:
        model_dir = Path(self.model).expanduser()
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        model = ModelConfig.from_dir(model_dir)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else "bfloat16"
        max_model_len = self.max_model_len or min(model.max_position_embeddings, 8192)
        if model.sliding_window is not None and self.max_model_len is None:
            max_model_len = min(max_model_len, model.sliding_window)
        num_blocks = self.num_blocks
        if num_blocks is None:
            token_bytes = model.num_layers * 2 * model.num_kv_heads * model.head_dim
            block_bytes = token_bytes * DTYPE_BYTES[dtype] * self.block_size
            num_blocks = int(self.kv_cache_gib * GiB) // block_bytes
        return EngineConfig(
            model_dir=model_dir,
            model=model,
            dtype=dtype,
            device=device,
            load_format="safetensors" if self.load_format == "auto" else self.load_format,
            block_size=self.block_size,
            num_blocks=num_blocks,
            max_model_len=max_model_len,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed,
            num_threads=self.num_threads or (max(1, (os.cpu_count() or 1) - 1)),
            # reference numerics: no CUDA graphs (a documented part of the mode, not a fallback)
            enforce_eager=self.enforce_eager or self.numerics == "reference",
            tensor_parallel_size=self.tensor_parallel_size,
            tp_invariant_shards=self.tp_invariant_shards,
            numerics=self.numerics,
            async_scheduling=(
                device.startswith("cuda")
                if self.async_scheduling is None
                else self.async_scheduling
            ),
        )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The EngineArgs flags, shared by every entry point that builds an engine."""
    p.add_argument("--model", help="local Hugging Face model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument(
        "--num-threads", type=int, default=None, help="torch threads (default: CPU cores - 1)"
    )
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs")
    p.add_argument(
        "--no-async-scheduling",
        action="store_true",
        help="CUDA: schedule each step only after the previous one's tokens are read",
    )
    p.add_argument("--engine-seed", type=int, default=0, help="dummy weights and unseeded sampling")
    p.add_argument(
        "--tensor-parallel-size", type=int, default=1,
        help="ranks of this worker, one process each (cuda: one GPU each, cuda:0..N-1)",
    )  # fmt: skip
    p.add_argument(
        "--tp-invariant-shards", type=int, default=None, metavar="S",
        help="deterministic tensor parallelism: every TP size dividing S computes bit-identical "
        "logits (each rank runs S / TP virtual shards; slower); default off",
    )  # fmt: skip
    p.add_argument(
        "--numerics", default="fast", choices=NUMERICS,
        help="fast: the engine's own kernels (default). reference: transformers' op sequence "
        "and attention calls (torch SDPA per request over K/V gathered from the paged pool, "
        "torch RMSNorm/RoPE/SiLU, cuBLAS linears), for output that matches transformers token "
        "for token; implies --enforce-eager (no CUDA graphs) and no batch-1 GEMV path, one "
        "rank only (no tensor parallelism); several times slower at decode",
    )  # fmt: skip


def engine_args_from(ns: argparse.Namespace, model_dir: str) -> EngineArgs:
    return EngineArgs(
        model=model_dir,
        dtype=ns.dtype,
        device=ns.device,
        load_format=ns.load_format,
        block_size=ns.block_size,
        kv_cache_gib=ns.kv_cache_gib,
        num_blocks=ns.num_blocks,
        max_model_len=ns.max_model_len,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_num_seqs=ns.max_num_seqs,
        enable_prefix_caching=not ns.no_prefix_caching,
        seed=ns.engine_seed,
        num_threads=ns.num_threads,
        enforce_eager=ns.enforce_eager,
        async_scheduling=False if ns.no_async_scheduling else None,
        tensor_parallel_size=ns.tensor_parallel_size,
        tp_invariant_shards=ns.tp_invariant_shards,
        numerics=ns.numerics,
    )
