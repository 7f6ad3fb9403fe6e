"""Sampler: logits of the rows that sample -> next token ids (+ logprobs). No scheduler state.

Order of logit processing (as vLLM): logit_bias, min_tokens bans, penalties, then greedy argmax
or temperature -> top_k -> top_p -> min_p -> draw. Logprobs are of the model's raw distribution.

Batch invariance: every operation is row-wise, and a seeded row draws its noise from its own
generator keyed by (seed, output position), so a seeded request samples the same tokens whatever
its neighbours are. Unseeded rows share one engine generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.plan import ScheduledRow, TokenLogprob


def _row_seed(seed: int, position: int) -> int:
    # splitmix-style mix so that (seed, position) pairs map to well-spread generator seeds
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class Sampler:
    def __init__(
        self, vocab_size: int, device: torch.device, seed: int, num_valid_tokens: int | None = None
    ) -> None:
        """num_valid_tokens: ids >= this are never sampled (a model's embedding table is often
        padded beyond the tokenizer's vocabulary; those ids cannot be detokenized)."""
        self.vocab_size = vocab_size
        self.num_valid_tokens = num_valid_tokens
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, rows: Sequence[ScheduledRow]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [num_rows, vocab] (any float dtype), one row per sampling ScheduledRow."""
        next_ids, raw_logprobs = self.sample(logits, rows)
        token_ids: list[int] = next_ids.tolist()  # the step's one host sync for tokens
        return token_ids, self.logprobs(token_ids, raw_logprobs, rows)

    def sample(
        self, logits: torch.Tensor, rows: Sequence[ScheduledRow]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The device half: [R] next token ids and, when a row asks for logprobs, the raw
        [R, vocab] log-softmax, both still on the device (no host sync for greedy rows with
        no logit_bias, bans or penalties: those copy small index tensors from the host)."""
        logits = logits.float()
        raw_logprobs = None
        if any(r.sampling.logprobs is not None for r in rows):
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [R, V]
        logits = self._process(logits, rows)

        greedy = [i for i, r in enumerate(rows) if r.sampling.greedy]
        random = [i for i, r in enumerate(rows) if not r.sampling.greedy]
        next_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if len(greedy) == len(rows):  # no index tensor: its host->device copy would sync
            next_ids = logits.argmax(dim=-1)
        elif greedy:
            idx = torch.tensor(greedy, device=logits.device)
            next_ids[idx] = logits[idx].argmax(dim=-1)
        if random:
            idx = torch.tensor(random, device=logits.device)
            next_ids[idx] = self._draw(logits[idx], [rows[i] for i in random])

        return next_ids, raw_logprobs

    def logprobs(
        self,
        token_ids: list[int],
        raw_logprobs: torch.Tensor | None,
        rows: Sequence[ScheduledRow],
    ) -> list[TokenLogprob | None]:
        """The host half: each row's TokenLogprob (None where it asked for none)."""
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if raw_logprobs is not None:
            for i, r in enumerate(rows):
                if r.sampling.logprobs is None:
                    continue
                lp = raw_logprobs[i]
                top: tuple[tuple[int, float], ...] = ()
                if r.sampling.logprobs > 0:
                    vals, ids = lp.topk(r.sampling.logprobs)
                    top = tuple(zip(ids.tolist(), vals.tolist(), strict=True))
                logprobs[i] = TokenLogprob(token_ids[i], float(lp[token_ids[i]]), top)
        return logprobs

    def _process(self, logits: torch.Tensor, rows: Sequence[ScheduledRow]) -> torch.Tensor:
        """A processed copy of `logits`, or `logits` itself when nothing changes it (no invalid
        tail, no bias, bans or penalties: the common case; the [R, vocab] copy was ~5 ms of a
        64-row CPU decode step)."""
        mask_tail = self.num_valid_tokens is not None and self.num_valid_tokens < logits.shape[1]
        per_row = any(
            r.sampling.logit_bias or r.banned_token_ids or r.penalty_context is not None
            for r in rows
        )
        if not (mask_tail or per_row):
            return logits
        logits = logits.clone()
        if mask_tail:
            logits[:, self.num_valid_tokens :] = float("-inf")
        for i, r in enumerate(rows):
            sp = r.sampling
            if sp.logit_bias:
                ids = torch.tensor(list(sp.logit_bias), device=logits.device)
                bias = torch.tensor(list(sp.logit_bias.values()), device=logits.device)
                logits[i].index_add_(0, ids, bias)
            if r.banned_token_ids:
                logits[i, list(r.banned_token_ids)] = float("-inf")
            if r.penalty_context is not None:
                self._penalize(logits[i], r)
        return logits

    def _penalize(self, row: torch.Tensor, r: ScheduledRow) -> None:
        """In place on one row [V]. Presence/frequency count output tokens only (OpenAI);
        repetition covers prompt and output (CTRL / HF / vLLM)."""
        assert r.penalty_context is not None
        prompt_ids, output_ids = r.penalty_context
        sp = r.sampling
        if sp.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=row.device)
            if seen.numel():
                vals = row[seen]
                vals = torch.where(
                    vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty
                )
                row[seen] = vals
        if output_ids and (sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0):
            out = torch.tensor(output_ids, device=row.device)
            counts = torch.bincount(out, minlength=self.vocab_size)[: row.numel()].to(row.dtype)
            row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(row.dtype)

    def _draw(self, logits: torch.Tensor, rows: Sequence[ScheduledRow]) -> torch.Tensor:
        """logits: [R, V] processed; returns [R] token ids. Exponential-race sampling
        (argmax p/q, q ~ Exp(1)) avoids torch.multinomial's host sync and is exact."""
        temps = torch.tensor([r.sampling.temperature for r in rows], device=logits.device)
        logits = logits / temps.unsqueeze(1)
        top_ks = [r.sampling.top_k for r in rows]
        top_ps = [r.sampling.top_p for r in rows]
        if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
            logits = _top_k_top_p(logits, top_ks, top_ps)
        probs = torch.softmax(logits, dim=-1)  # [R, V]
        min_ps = torch.tensor([r.sampling.min_p for r in rows], device=logits.device)
        if bool((min_ps > 0).any()):
            keep = probs >= min_ps.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.sampling.seed is None]
        if unseeded:
            idx = torch.tensor(unseeded, device=probs.device)
            noise[idx] = torch.empty(
                len(unseeded), probs.shape[1], device=probs.device
            ).exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.sampling.seed is not None:
                g = torch.Generator(device=probs.device)
                g.manual_seed(_row_seed(r.sampling.seed, r.num_output_tokens))
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Mask to -inf everything outside each row's top_k and top_p nucleus (keeps >= 1 token)."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ks = torch.tensor([k if k > 0 else vocab for k in top_ks], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    drop = ranks >= ks.unsqueeze(1)
    ps = torch.tensor(top_ps, device=logits.device, dtype=logits.dtype)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # a token is kept while the mass strictly before it is < p (so the top token always stays)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= ps.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
