"""The little a tokenizer must do for evaluation, and loading one from a path.

Evaluation needs `encode(text) -> ids` without special tokens, `decode(ids)`, `eos_id` (the
document separator, used as the "start of document" prefix as lm-eval does) and
`vocab_size`. Tokenizers load through megamor's one loader (`megamor.data.tokenizer.
load_tokenizer`: a sentencepiece model or a Hugging Face tokenizer.json, file or folder);
any object with these members works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from megamor.data.tokenizer import SentencePieceTokenizer, Tokenizer, TokenizerError
from megamor.data.tokenizer import load_tokenizer as _load

from .errors import EvalInputError

__all__ = ["EvalTokenizer", "SentencePieceTokenizer", "id_to_piece", "load_tokenizer"]


@runtime_checkable
class EvalTokenizer(Protocol):
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def load_tokenizer(path: str | Path) -> Tokenizer:
    """megamor's loader; a path that is no tokenizer, or one with no EOS (evaluation's document
    prefix), is EvalInputError: one line naming the file (exit 2 in the entry points)."""
    try:
        tok = _load(path)
    except TokenizerError as e:
        raise EvalInputError(str(e)) from None
    if tok.eos_id < 0:
        raise EvalInputError(f"{tok.path}: the tokenizer has no EOS token (evaluation uses it as the document prefix)")
    return tok


def id_to_piece(tok: EvalTokenizer, i: int) -> str:
    f = getattr(tok, "id_to_piece", None)
    return f(int(i)) if f else tok.decode([int(i)])
