"""LLM: the offline Python API. `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from engine.args import EngineArgs
from engine.config import EngineConfig
from engine.engine import Engine
from engine.outputs import CompletionOutput, GenerationResult
from engine.sampling_params import SamplingParams
from runtime.tokenizer import Tokenizer

Prompt = str | Sequence[int]


class LLM:
    def __init__(self, model: str, *, tokenizer: bool = True, **engine_args: Any) -> None:
        """model: a local Hugging Face model directory. engine_args: EngineArgs fields.
        tokenizer=False runs on token ids only (no text, no stop strings)."""
        self._init(EngineArgs(model=str(model), **engine_args).resolve(), tokenizer)

    @classmethod
    def from_args(cls, args: EngineArgs, tokenizer: bool = True) -> LLM:
        llm = cls.__new__(cls)
        llm._init(args.resolve(), tokenizer)
        return llm

    def _init(self, config: EngineConfig, tokenizer: bool) -> None:
        self.tokenizer = Tokenizer.from_dir(config.model_dir) if tokenizer else None
        self.engine = Engine(config, self.tokenizer)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Run every prompt to completion (batched continuously); results in prompt order."""
        prompt_list: list[Prompt]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompt_list = [prompts]  # type: ignore[list-item]
        else:
            prompt_list = list(prompts)  # type: ignore[arg-type]
        params = params if params is not None else SamplingParams()
        param_list = [params] * len(prompt_list) if isinstance(params, SamplingParams) else params
        if len(param_list) != len(prompt_list):
            raise ValueError(f"{len(prompt_list)} prompts but {len(param_list)} SamplingParams")
        results: list[GenerationResult] = []
        children: dict[str, CompletionOutput] = {}
        for prompt, sp in zip(prompt_list, param_list, strict=True):
            ids = self._encode(prompt)
            rid = f"gen-{next(self._ids)}"
            result = GenerationResult(rid, prompt if isinstance(prompt, str) else None, ids, [])
            results.append(result)
            for i in range(sp.n):
                # n > 1: independent children sharing the prompt (and its cached blocks);
                # a seeded parent gives each child its own derived seed
                seed = None if sp.seed is None else sp.seed + i
                child = dataclasses.replace(sp, n=1, seed=seed)
                out = CompletionOutput(index=i, logprobs=[] if sp.logprobs is not None else None)
                result.outputs.append(out)
                children[f"{rid}-{i}"] = out
                self.engine.add_request(f"{rid}-{i}", ids, child)
        by_child = {f"{r.request_id}-{o.index}": r for r in results for o in r.outputs}
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                out = children[delta.request_id]
                out.token_ids.extend(delta.new_token_ids)
                out.text += delta.text_delta
                if out.logprobs is not None:
                    out.logprobs.extend(delta.new_logprobs)
                if delta.finished:
                    out.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason
                    by_child[delta.request_id].num_cached_tokens = delta.num_cached_tokens
        return results

    def chat(
        self,
        conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
    ) -> list[GenerationResult]:
        """Apply the model's chat template (with the generation prompt) and generate."""
        if self.tokenizer is None:
            raise ValueError("chat needs the tokenizer (LLM(..., tokenizer=True))")
        convs: list[list[dict[str, Any]]]
        if conversations and isinstance(conversations[0], dict):
            convs = [conversations]
        else:
            convs = conversations  # type: ignore[assignment]
        prompts = [self.tokenizer.encode_chat(c) for c in convs]
        return self.generate(prompts, params)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need the tokenizer; pass token ids instead")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]
