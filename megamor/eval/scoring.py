"""Batched, leak-free log-likelihood scoring: the one place evaluation calls the model.

A `ScoreRequest` is a token sequence and how many of its last next-token predictions to
score. Requests are sorted by length (longest first, so the first batch shows an
out-of-memory at once), packed into batches by a row and a token budget, right-padded,
and run with `causal_routing=True`: with right padding, causal attention and causal
routing, no real token sees a pad, a later token or another row, so a request's score
does not depend on the batch it lands in (tests/eval/test_leak_free.py checks this).
`routing="topk"` (the paper's eval, non-causal) batches only rows of one length, so no pad
takes part in a row's top-k and a score still does not depend on its batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from megamor.config import note_once

from .errors import EvalInputError
from .paper import ROUTINGS


class ContinuationTooLong(EvalInputError):
    """A continuation that alone exceeds the context: it cannot be scored whole (lm-eval asserts
    the same). `index` is the pair's position in the request list, for the caller to name it."""

    def __init__(self, index: int, n_tokens: int, max_length: int):
        self.index, self.n_tokens, self.max_length = index, n_tokens, max_length
        super().__init__(f"a continuation of {n_tokens} tokens does not fit the {max_length}-token context")


@dataclass
class ScoreRequest:
    tokens: Sequence[int]  # the model reads tokens[:-1] and predicts tokens[1:]
    n_score: int  # score the last n_score predictions

    def __post_init__(self) -> None:
        if not 1 <= self.n_score <= len(self.tokens) - 1:
            raise ValueError(f"n_score {self.n_score} must be in [1, {len(self.tokens) - 1}] for {len(self.tokens)} tokens")


@dataclass
class TokenScores:
    logprobs: np.ndarray  # float32 [n_score]: log p(target | prefix)
    greedy: np.ndarray  # bool [n_score]: the target is the argmax
    depth: np.ndarray | None = None  # int [n_score]: recursion depth of the token that made each prediction

    @property
    def total(self) -> float:
        return float(self.logprobs.astype(np.float64).sum())


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def model_max_length(model: torch.nn.Module, default: int = 2048) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return int(getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None) or default)


def _content_key(r: ScoreRequest) -> tuple[bytes, int]:
    return np.asarray(r.tokens, dtype=np.int64).tobytes(), r.n_score


ForwardFn = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


class Scorer:
    """Scores requests against a model. `forward` is the seam: (input_ids, mask) -> (logits, depth)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int = 16,
        max_batch_tokens: int | None = None,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        pad_id: int = 0,
        progress: bool = False,
        forward: ForwardFn | None = None,
        routing: str = "causal",
    ):
        if routing not in ROUTINGS:
            raise EvalInputError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        self.routing = routing
        self.model = model
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_length = max_length or model_max_length(model)
        if self.max_length > model_max_length(model):  # allowed (length extrapolation), never silent
            note_once(f"max length {self.max_length} exceeds the model's max_seq_len {model_max_length(model)}: "
                      "positions past it were never trained")
        if device is None:
            try:
                device = next(model.parameters()).device
            except StopIteration:
                device = "cpu"
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.pad_id = pad_id
        self.progress = progress
        self._forward = forward or self._model_forward
        self.tokens_scored = 0  # predictions scored so far (for throughput reports)
        self.tokens_run = 0  # non-pad tokens run through the model

    # -- the seam --------------------------------------------------------------------------
    def _model_forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(input_ids, attention_mask=mask, causal_routing=self.routing == "causal", return_logits=True)
        stats = getattr(out, "stats", None)
        return out.logits, getattr(stats, "depth", None)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    # -- batching ---------------------------------------------------------------------------
    def _batches(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        batches, cur, cur_max = [], [], 0
        for i in order:
            n = lengths[i]
            new_max = max(cur_max, n)
            too_many_tokens = self.max_batch_tokens is not None and cur and new_max * (len(cur) + 1) > self.max_batch_tokens
            # top-k routing ranks every position of a row, pads too: rows of one length only, no pads
            other_length = self.routing == "topk" and cur and n != cur_max
            if cur and (len(cur) >= self.batch_size or too_many_tokens or other_length):
                batches.append(cur)
                cur, new_max = [], n
            cur.append(i)
            cur_max = new_max
        if cur:
            batches.append(cur)
        return batches

    @torch.no_grad()
    def score_requests(self, requests: Sequence[ScoreRequest], desc: str = "scoring") -> list[TokenScores]:
        for r in requests:
            if len(r.tokens) - 1 > self.max_length:
                raise ValueError(f"a request of {len(r.tokens) - 1} input tokens exceeds max_length {self.max_length}")
        lengths = [len(r.tokens) - 1 for r in requests]
        # Longest first; ties broken by content, so the same set of requests always forms the
        # same batches whatever order it came in (bitwise-equal scores from the harness and
        # from lm-eval, which orders requests its own way).
        order = sorted(range(len(requests)), key=lambda i: (-lengths[i], _content_key(requests[i])))
        results: list[TokenScores | None] = [None] * len(requests)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in tqdm(self._batches(order, lengths), desc=desc, disable=not self.progress, leave=False):
                for i, res in zip(batch, self._score_batch([requests[i] for i in batch])):
                    results[i] = res
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _score_batch(self, reqs: list[ScoreRequest]) -> list[TokenScores]:
        T = max(len(r.tokens) - 1 for r in reqs)
        ids = torch.full((len(reqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), T), dtype=torch.bool)
        rows, pos, tgt = [], [], []
        for b, r in enumerate(reqs):
            toks = torch.as_tensor(np.asarray(r.tokens, dtype=np.int64))
            n = len(toks) - 1
            ids[b, :n] = toks[:-1]
            mask[b, :n] = True
            rows.append(torch.full((r.n_score,), b, dtype=torch.long))
            pos.append(torch.arange(n - r.n_score, n))
            tgt.append(toks[n - r.n_score + 1 :])
        padded = not bool(mask.all())
        ids = ids.to(self.device)
        with self.autocast():
            logits, depth = self._forward(ids, mask.to(self.device) if padded else None)
        rows_t, pos_t, tgt_t = (torch.cat(x).to(self.device) for x in (rows, pos, tgt))
        sel = logits[rows_t, pos_t].float()  # only the scored positions: [M, V]
        lp = sel.gather(1, tgt_t[:, None])[:, 0] - torch.logsumexp(sel, dim=-1)
        greedy = sel.argmax(dim=-1) == tgt_t
        dep = depth[rows_t, pos_t].cpu().numpy() if depth is not None else None
        lp_np, greedy_np = lp.cpu().numpy(), greedy.cpu().numpy()
        self.tokens_scored += len(tgt_t)
        self.tokens_run += int(mask.sum())
        out, start = [], 0
        for r in reqs:
            end = start + r.n_score
            out.append(TokenScores(lp_np[start:end], greedy_np[start:end], dep[start:end] if dep is not None else None))
            start = end
        return out

    # -- (context, continuation) log-likelihoods ------------------------------------------
    def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy decode) per pair.

        As lm-eval: the sequence is left-truncated to max_length + 1 tokens (the continuation
        stays whole, the oldest context tokens go); identical pairs are scored once. A
        continuation longer than max_length raises ContinuationTooLong before anything is scored.
        """
        keys: dict[tuple, int] = {}
        reqs: list[ScoreRequest] = []
        index = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("empty continuation")
            if len(cont) > self.max_length:
                raise ContinuationTooLong(i, len(cont), self.max_length)
            toks = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            key = (tuple(toks), len(cont))
            if key not in keys:
                keys[key] = len(reqs)
                reqs.append(ScoreRequest(toks, len(cont)))
            index.append(keys[key])
        scored = self.score_requests(reqs, desc=desc)
        return [(scored[i].total, bool(scored[i].greedy.all())) for i in index]
