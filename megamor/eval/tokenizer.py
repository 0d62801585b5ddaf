"""The little a tokenizer must do for evaluation, and loading one from a path.

Evaluation needs `encode(text) -> ids` without special tokens, `decode(ids)`, `eos_id` (the
document separator, used as the "start of document" prefix as lm-eval does) and
`vocab_size`. megamor's own `megamor.data.tokenizer.Tokenizer` is used when present; a bare
sentencepiece model file works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from megamor.data.tokenizer import Tokenizer, file_sha256


@runtime_checkable
class EvalTokenizer(Protocol):
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece model; encode() adds no BOS/EOS."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        eos = self.sp.eos_id()
        if eos < 0:
            raise ValueError(f"{model_file}: the sentencepiece model has no EOS piece (evaluation uses it as the document prefix)")
        self.eos_id = eos
        self.bos_id = self.sp.bos_id()
        self.content_hash = file_sha256(self.path)  # its identity (megamor.eval.identity)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


class _MegamorTokenizer:
    """Adapts megamor.data.tokenizer.Tokenizer (whose encode may take add_bos/add_eos flags)."""

    def __init__(self, tok):
        self.tok = tok
        self.path = tok.path
        self.content_hash = tok.content_hash
        self.eos_id = int(tok.eos_id)
        self.vocab_size = int(tok.vocab_size)

    def encode(self, text: str) -> list[int]:
        try:
            return list(self.tok.encode(text, add_bos=False, add_eos=False))
        except TypeError:
            return list(self.tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        f = getattr(self.tok, "id_to_piece", None)
        return f(int(i)) if f else self.decode([int(i)])


def load_tokenizer(path: str | Path) -> EvalTokenizer:
    """A tokenizer from a sentencepiece `.model` file or a folder megamor's Tokenizer can load."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    try:
        return _MegamorTokenizer(Tokenizer.load(p))
    except Exception:
        if p.is_dir():
            raise
    if p.is_dir():
        models = sorted(p.glob("*.model"))
        if not models:
            raise FileNotFoundError(f"no sentencepiece *.model file in {p}")
        p = models[0]
    return SentencePieceTokenizer(p)


def id_to_piece(tok: EvalTokenizer, i: int) -> str:
    f = getattr(tok, "id_to_piece", None)
    return f(int(i)) if f else tok.decode([int(i)])
