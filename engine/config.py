"""ModelConfig (what the checkpoint is) and EngineConfig (how we run it), both frozen.

Both are built once at the entry point; "auto" values are resolved there, before freezing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Architectures the one decoder in engine/models/llama.py implements. Qwen2 adds q/k/v biases,
# Qwen3 adds per-head RMSNorm on q and k; Mistral is Llama with an optional sliding window.
SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)
DTYPES = ("float32", "bfloat16", "float16")
# EngineConfig.numerics: "fast", the engine's own kernels (Triton attention/norms, CUDA graphs, the
# batch-1 GEMV path on CUDA; C kernels and prepacked linears on CPU); "reference", transformers'
# own op sequence and attention calls (engine/reference_runner.py): slower, for parity checks
NUMERICS = ("fast", "reference")


def check_invariant_shards(
    shards: int, world: int, num_heads: int, num_kv_heads: int, intermediate: int
) -> None:
    """TP-invariant mode (engine/tp_invariant.py): S virtual shards need TP | S and the heads,
    kv heads and intermediate columns divisible by S (the lm_head is replicated: any vocab)."""
    if shards < 1:
        raise ValueError(f"tp_invariant_shards must be >= 1, got {shards}")
    if shards % world:
        raise ValueError(
            f"tp_invariant_shards={shards} is not a multiple of tensor_parallel_size={world}: "
            "each rank computes tp_invariant_shards / tensor_parallel_size virtual shards"
        )
    for name, n in (
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("intermediate_size", intermediate),
    ):
        if n % shards:
            raise ValueError(f"{name}={n} is not divisible by tp_invariant_shards={shards}")


def _check_reference(config: EngineConfig) -> None:
    """Reference numerics (engine/reference_runner.py) computes transformers' function on one
    rank with its op sequence; options that would change that are refused, never ignored."""
    if config.tensor_parallel_size != 1:
        raise ValueError(
            f"numerics='reference' runs on one rank (transformers' unsharded sums), got "
            f"tensor_parallel_size={config.tensor_parallel_size}"
        )
    if config.tp_invariant_shards is not None:
        raise ValueError(
            "numerics='reference' and tp_invariant_shards exclude each other: reference mode "
            "runs the unsharded projections"
        )
    if not config.enforce_eager:
        raise ValueError(
            "numerics='reference' runs without CUDA graphs: set enforce_eager=True "
            "(EngineArgs and --numerics reference do so)"
        )


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3.x frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None  # the checkpoint's own dtype, informational

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model dir")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architectures {archs}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        arch = archs[0]
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_theta = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling: RopeScaling | None = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list) else (int(eos),))
        window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=int(window) if window else None,
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How one engine runs. Every field is resolved (no "auto") by the time this is built."""

    model_dir: Path
    model: ModelConfig
    dtype: str = "float32"  # one of DTYPES
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    load_format: str = "safetensors"  # "safetensors" | "dummy" (random weights, seeded)
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 4096  # KV blocks in the pool
    max_model_len: int = 4096  # prompt + output tokens per request
    max_num_batched_tokens: int = 2048  # token budget per step (prefill chunks + decodes)
    max_num_seqs: int = 256  # running requests per step
    enable_prefix_caching: bool = True
    seed: int = 0  # dummy weights and unseeded sampling
    num_threads: int = 1  # torch intra-op threads for the forward pass (CPU device)
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    tensor_parallel_size: int = 1  # ranks of one worker, one process each (engine/parallel.py)
    # Overlapped steps: schedule and prepare step N+1 while the device runs step N, read step
    # N's tokens one step late (engine/engine.py). Token for token the same output.
    async_scheduling: bool = False
    # TP-invariant numerics (engine/tp_invariant.py): None, the default sharding (fastest; bf16
    # logits differ between TP sizes in the last bits); S: every rank computes its S / TP
    # virtual shards as a TP=S rank would, so any TP dividing S gives bit-identical logits
    tp_invariant_shards: int | None = None
    # "fast" | "reference": see NUMERICS. Reference mode runs one rank, no CUDA graphs
    # (enforce_eager must be True; EngineArgs.resolve sets it) and no TP-invariant shards
    numerics: str = "fast"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.numerics == "reference":
            _check_reference(self)
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be safetensors or dummy, got {self.load_format!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_model_len > self.model.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.model.max_position_embeddings}"
            )
        window = self.model.sliding_window
        if window is not None and self.max_model_len > window:
            raise ValueError(
                f"the model attends over a sliding window of {window} tokens, which this engine "
                f"does not implement; pass max_model_len <= {window}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tp_invariant_shards is not None:
            m = self.model
            check_invariant_shards(
                self.tp_invariant_shards,
                self.tensor_parallel_size,
                m.num_heads,
                m.num_kv_heads,
                m.intermediate_size,
            )
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        if self.num_blocks < blocks_per_seq:
            raise ValueError(
                f"num_blocks {self.num_blocks} cannot hold one request of max_model_len "
                f"{self.max_model_len} ({blocks_per_seq} blocks of {self.block_size} tokens)"
            )
