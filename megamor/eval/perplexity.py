"""Perplexity of raw text and token streams with disjoint or sliding windows.

A document of n tokens is scored as the stream [EOS] + tokens (EOS = "start of document",
as lm-eval's rolling log-likelihood). A window predicting tokens [a, b) reads the up to
`max_length` stream tokens before b; windows advance by `stride` tokens:

- stride == max_length: disjoint windows, exactly lm-eval's `loglikelihood_rolling`
  (`get_rolling_token_windows(context_len=1)` + `make_disjoint_window`): every window but
  the last conditions only on its own tokens and the one before it; the last window is
  filled up with earlier context;
- stride < max_length: sliding windows (each prediction sees >= max_length - stride tokens
  of context); only the last `stride` tokens of each window are scored.

Reported: token NLL and perplexity, bits per byte and byte perplexity (UTF-8 bytes of the
original text), word perplexity (words = lm-eval's `len(re.split(r"\\s+", text))`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import EvalInputError
from .scoring import Scorer, ScoreRequest
from .tokenizer import EvalTokenizer


def window_spans(n_tokens: int, max_length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(first stream index read, b, n_score) per window; the window's request is
    stream[start : b + 1] and it scores tokens [b - n_score, b)."""
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise EvalInputError(f"--stride {stride}: must be in [1, max length {max_length}] (--max-length, or the model's)")
    spans = []
    a, b = 0, min(max_length, n_tokens)
    while a < n_tokens:
        spans.append((max(0, b - max_length), b, b - a))
        a, b = b, min(b + stride, n_tokens)
    return spans


def rolling_requests(tokens: Sequence[int] | np.ndarray, prefix_id: int, max_length: int, stride: int | None = None) -> list[ScoreRequest]:
    stream = np.concatenate([np.asarray([prefix_id], dtype=np.int64), np.asarray(tokens, dtype=np.int64)])
    return [ScoreRequest(stream[s : b + 1], k) for s, b, k in window_spans(len(stream) - 1, max_length, stride)]


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))  # lm-eval's count_words


@dataclass
class PerplexityResult:
    nll: float  # summed negative log-likelihood, nats
    tokens: int
    bytes: int  # 0 when unknown (token shards without a tokenizer)
    words: int
    docs: int
    windows: int
    max_length: int
    stride: int
    seconds: float = 0.0
    tokens_run: int = 0  # tokens run through the model (> tokens when windows overlap)

    @property
    def token_nll(self) -> float:
        return self.nll / max(1, self.tokens)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            token_nll=self.token_nll,
            token_perplexity=math.exp(self.token_nll),
            tokens_per_s=self.tokens / self.seconds if self.seconds else None,
        )
        if self.bytes:
            d.update(bits_per_byte=self.nll / self.bytes / math.log(2), byte_perplexity=math.exp(self.nll / self.bytes))
        if self.words:
            d.update(word_perplexity=math.exp(self.nll / self.words))
        return d


def score_token_docs(
    scorer: Scorer, docs: Sequence[Sequence[int] | np.ndarray], prefix_id: int, stride: int | None = None, max_length: int | None = None
) -> tuple[list[float], int]:
    """Summed NLL per token document, and the number of windows."""
    L = max_length or scorer.max_length
    reqs, owner = [], []
    for i, toks in enumerate(docs):
        for r in rolling_requests(toks, prefix_id, L, stride):
            reqs.append(r)
            owner.append(i)
    scored = scorer.score_requests(reqs, desc="perplexity")
    nll = [0.0] * len(docs)
    for i, s in zip(owner, scored):
        nll[i] -= s.total
    return nll, len(reqs)


def perplexity_of_texts(
    scorer: Scorer, tok: EvalTokenizer, texts: Sequence[str], stride: int | None = None, max_length: int | None = None
) -> PerplexityResult:
    t0 = time.perf_counter()
    run0 = scorer.tokens_run
    docs = [tok.encode(t) for t in texts]
    nll, n_windows = score_token_docs(scorer, docs, tok.eos_id, stride, max_length)
    L = max_length or scorer.max_length
    return PerplexityResult(
        nll=sum(nll),
        tokens=sum(len(d) for d in docs),
        bytes=sum(len(t.encode("utf-8")) for t in texts),
        words=sum(count_words(t) for t in texts),
        docs=len(texts),
        windows=n_windows,
        max_length=L,
        stride=stride or L,
        seconds=time.perf_counter() - t0,
        tokens_run=scorer.tokens_run - run0,
    )


def perplexity_of_tokens(
    scorer: Scorer, tokens: np.ndarray, eos_id: int, stride: int | None = None, max_length: int | None = None,
    tok: EvalTokenizer | None = None,
) -> PerplexityResult:
    """A token stream (e.g. a validation shard: documents joined by EOS) scored as one document.
    With a tokenizer, bytes are counted on the decoded text (an estimate: decoding may not
    reproduce the original bytes exactly)."""
    t0 = time.perf_counter()
    run0 = scorer.tokens_run
    nll, n_windows = score_token_docs(scorer, [tokens], eos_id, stride, max_length)
    L = max_length or scorer.max_length
    n_bytes = n_words = 0
    if tok is not None:
        text = tok.decode([int(t) for t in tokens if int(t) != eos_id])
        n_bytes, n_words = len(text.encode("utf-8")), count_words(text)
    return PerplexityResult(nll[0], len(tokens), n_bytes, n_words, 1, n_windows, L, stride or L, time.perf_counter() - t0, scorer.tokens_run - run0)


# -- reading inputs --------------------------------------------------------------------
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def split_wikitext_articles(text: str) -> list[str]:
    """WikiText raw split into articles at top-level ` = Title = ` lines (as the
    document-level WikiText lm-eval scores; our split of the raw file approximates it)."""
    docs, cur = [], []
    for line in text.split("\n"):
        if _WIKI_TITLE.match(line) and any(s.strip() for s in cur):
            docs.append("\n".join(cur))
            cur = []
        cur.append(line)
    if any(s.strip() for s in cur):
        docs.append("\n".join(cur))
    return docs


def read_texts(paths: Iterable[str | Path], split: str = "file", text_key: str = "text", encoding: str = "utf-8",
               errors: str = "strict") -> list[str]:
    """Documents from .txt files (split: file = one doc per file, wikitext = per article,
    blank = per blank-line paragraph block) or .jsonl files (one doc per line's `text_key`).
    A file with no text, or text that does not decode, is a TaskDataError naming it."""
    from .tasks.base import TaskDataError, iter_jsonl
    from .text_input import read_text, require_text

    paths = list(paths)
    docs: list[str] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():  # a file named on the command line, not a task's data file
            raise TaskDataError(p, None, "is a folder, not a text file" if p.is_dir() else "no such file (the text to evaluate is missing)")
        if ".jsonl" in p.name:
            n = len(docs)
            for lineno, obj in iter_jsonl(p):
                if not isinstance(obj.get(text_key), str):
                    raise TaskDataError(p, lineno, f"missing string field {text_key!r}")
                docs.append(obj[text_key])
            require_text(p, "".join(docs[n:]))
            continue
        text = require_text(p, read_text(p, encoding, errors))
        if split == "file":
            docs.append(text)
        elif split == "wikitext":
            docs.extend(split_wikitext_articles(text))
        elif split == "blank":
            docs.extend(d for d in re.split(r"\n\s*\n", text) if d.strip())
        else:
            raise ValueError(f"split must be file, wikitext or blank, got {split!r}")
    return docs


def load_shard_tokens(paths: Sequence[str | Path], split: str = "valid") -> np.ndarray:
    """One token stream from shard files and/or folders of `<split>-NNNNN.npy` shards (in order)."""
    arrays = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.glob(f"{split}-*.npy") if not f.name.endswith(".docs.npy"))
            if not files:
                raise FileNotFoundError(f"no {split}-NNNNN.npy shards in {p}")
            arrays.extend(load_token_stream(f) for f in files)
        else:
            arrays.append(load_token_stream(p))
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def load_token_stream(path: str | Path) -> np.ndarray:
    """Tokens of one shard: a .npy array (megamor's shard format, memory-mapped), or a raw
    .bin whose dtype a sibling .json names ({"dtype": ...}; default uint16)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"shard not found: {p}")
    if p.suffix == ".npy":
        arr = np.load(p, mmap_mode="r")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"{p}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}")
        return arr
    meta = p.with_suffix(".json")
    dtype = json.loads(meta.read_text()).get("dtype", "uint16") if meta.is_file() else "uint16"
    return np.memmap(p, dtype=np.dtype(dtype), mode="r")
