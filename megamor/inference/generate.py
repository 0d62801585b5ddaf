"""Autoregressive decoding with recursion-aware KV caches (always causal routing): `generate`,
`stream`, `sample_next` and `left_pad`, written against the model's forward (`MoRLM` holds no
decoding loop). The batched engine (`megamor.inference.engine`) equals this on each request."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from megamor.model.mor import MoRLM


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per prompt (EOS included when produced)
    depths: list[list[int]]  # recursion steps each generated token's *input* pass ran
    prompt_depths: list[list[int]]  # depth of every prompt token (prefill)


@dataclass
class StepOutput:
    """One decoding step for the whole batch (what `stream=True` yields)."""

    tokens: list[int]  # next token per row (-1 once a row has finished)
    finished: list[bool]


def check_request(model: MoRLM, prompt_len: int, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> None:
    """One ValueError line for a request no decoder should run: past the model's context (RoPE
    positions it never trained), or sampling settings outside their range (top_p 0 meant no
    filter, not near-greedy)."""
    if prompt_len == 0:
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    ctx = model.cfg.max_seq_len
    if prompt_len + max_new_tokens > ctx:
        raise ValueError(f"request of {prompt_len} prompt + {max_new_tokens} new tokens exceeds the model's "
                         f"context (max_seq_len {ctx})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no filter), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 or None: no filter), got {top_p}")


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids [B] from last-position logits [B, V]. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Prompts as one left-padded batch: (ids [B, T], valid mask [B, T])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long, device=device)
        mask[i, T - len(p) :] = True
    return ids, mask


@torch.no_grad()
def stream(
    model: MoRLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    trace: GenerationOutput | None = None,
) -> Iterator[StepOutput]:
    """Yield one StepOutput per decoding step. `use_cache=False` recomputes the whole prefix
    every step (the reference the caches are checked against)."""
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    for p in prompts:
        check_request(model, len(p), max_new_tokens, temperature, top_k, top_p)
    ids, mask = left_pad(prompts, 0, device)
    B = ids.shape[0]
    cache = model.new_kv_cache(B) if use_cache else None
    out = model(ids, attention_mask=mask, causal_routing=True, kv_cache=cache)
    if trace is not None:
        trace.prompt_depths = [out.stats.depth[i, mask[i]].tolist() for i in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = out.logits[:, -1]
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        tokens = torch.where(finished, torch.full_like(nxt, -1), nxt)
        if eos_id is not None:
            finished = finished | (nxt == eos_id)
        yield StepOutput(tokens.tolist(), finished.tolist())
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        if use_cache:
            out = model(nxt.unsqueeze(1), causal_routing=True, kv_cache=cache)
            step_depth = out.stats.depth[:, -1]
        else:
            ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
            out = model(ids, attention_mask=mask, causal_routing=True)
            step_depth = out.stats.depth[:, -1]
        if trace is not None:
            for i in range(B):
                if tokens[i] >= 0:
                    trace.depths[i].append(int(step_depth[i]))
        logits = out.logits[:, -1]


def generate(
    model: MoRLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stream_tokens: bool = False,
    **kw,
):
    """Decode from a batch of prompts. Returns GenerationOutput, or with stream_tokens=True an
    iterator of StepOutput. `depths[i][j]` is how many recursion steps generated token j took
    when it was fed back (the last token, never fed back, has none unless decoding goes on)."""
    if stream_tokens:
        return stream(model, prompts, max_new_tokens, **kw)
    was_training = model.training
    model.eval()
    trace = GenerationOutput([[] for _ in prompts], [[] for _ in prompts], [])
    try:
        for step in stream(model, prompts, max_new_tokens, trace=trace, **kw):
            for i, t in enumerate(step.tokens):
                if t >= 0:
                    trace.tokens[i].append(t)
    finally:
        model.train(was_training)
    return trace
