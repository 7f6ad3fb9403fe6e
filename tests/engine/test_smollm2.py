"""The default model end to end: chat answers, text vs tokens, stop strings, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.request import FinishReason

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def llm(smollm2_dir: Path) -> LLM:
    return LLM(str(smollm2_dir), num_blocks=512)


def test_chat_names_paris(llm: LLM) -> None:
    (r,) = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=40, temperature=0.0),
    )
    out = r.outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason is FinishReason.STOP  # ended on <|im_end|>, not on length


def test_streamed_text_equals_decoded_tokens(llm: LLM) -> None:
    prompts = ["Write a haiku about the sea.", "Ünïcödé 日本語 🙂 and then", "1 2 3 4"]
    params = SamplingParams(max_tokens=48, temperature=0.8, seed=3, ignore_eos=True)
    assert llm.tokenizer is not None
    for r in llm.generate(prompts, params):
        out = r.outputs[0]
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stop_string_cuts_text_and_frees_blocks(llm: LLM) -> None:
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    (free_run,) = llm.generate(["The capital of France is"], params)
    text = free_run.outputs[0].text
    stop = text[5:9]  # a stop string that occurs in the greedy continuation
    assert stop.strip()
    cut = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, stop=(stop,))
    (r,) = llm.generate(["The capital of France is"], cut)
    out = r.outputs[0]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = SamplingParams(
        max_tokens=64,
        temperature=0.0,
        ignore_eos=True,
        stop=(stop,),
        include_stop_str_in_output=True,
    )
    (r2,) = llm.generate(["The capital of France is"], kept)
    assert r2.outputs[0].text == text[: text.index(stop) + len(stop)]
    assert len(out.token_ids) < len(free_run.outputs[0].token_ids)
    llm.engine.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0


def test_cli_generate_chat(smollm2_dir: Path) -> None:
    cmd = [
        sys.executable, "-m", "deploy.cli", "generate", "--chat", "--model", str(smollm2_dir),
        "--prompt", "What is the capital of France?", "--temperature", "0", "--max-tokens", "40",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
