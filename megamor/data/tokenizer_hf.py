"""A Hugging Face tokenizer (`tokenizer.json`) behind megamor's Tokenizer interface.

Run by the `tokenizers` library directly (no transformers in the hot path). BOS/EOS/PAD/UNK
come from `tokenizer_config.json`, else `special_tokens_map.json`, beside the tokenizer.json
(tokens named there but absent from the vocabulary are bad input); a role neither names is -1.
As with megamor's sentencepiece models: `encode` adds no special tokens (a post-processor
that would add BOS is not run), special-token text inside a document ("<|endoftext|>") is
encoded as text, and special tokens decode to nothing.

Identity (`content_hash`): SHA-256 of the tokenizer.json bytes and the resolved special-token
names, so the same vocabulary with another EOS is another tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megamor.data.tokenizer import Tokenizer, TokenizerError

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # looked up in this order
ROLES = ("bos", "eos", "pad", "unk")


def _token_name(value: Any) -> str | None:
    """A special token as configs write it: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def special_tokens(folder: Path) -> tuple[dict[str, str | None], dict[str, Path]]:
    """Each role's token name and the config file that named it."""
    names: dict[str, str | None] = dict.fromkeys(ROLES)
    where: dict[str, Path] = {}
    for fname in CONFIG_FILES:
        p = folder / fname
        if not p.is_file():
            continue
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{p}: expected a JSON object")
        for role in ROLES:
            if names[role] is None and (name := _token_name(cfg.get(f"{role}_token"))):
                names[role], where[role] = name, p
    return names, where


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, json_path: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(json_path)
        raw = self.path.read_bytes()
        try:
            self.tok = RustTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # noqa: BLE001  tokenizers raises a bare Exception for a JSON or schema error
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer.json ({first})") from None
        self.tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text
        self.names, where = special_tokens(self.path.parent)
        ids = {}
        for role, name in self.names.items():
            i = self.tok.token_to_id(name) if name is not None else None
            if name is not None and i is None:
                raise TokenizerError(f"{where[role]}: {role}_token {name!r} is not in the vocabulary of {self.path}")
            ids[role] = -1 if i is None else int(i)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (ids[r] for r in ROLES)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1  # ids may have holes: the largest one bounds them
        h = hashlib.sha256(raw)
        h.update(b"\0" + json.dumps(self.names, sort_keys=True).encode())
        self.content_hash = h.hexdigest()

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i)) or ""

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Display text per token: a token that ends inside a multi-byte character is shown
        together with the following ones (up to 4) on its first token."""
        out: list[str] = []
        i = 0
        while i < len(ids):
            j = i + 1
            s = self.decode(ids[i:j])
            while s.endswith("\ufffd") and j < len(ids) and j - i < 4:
                j += 1
                s = self.decode(ids[i:j])
            out.append(s)
            out.extend([""] * (j - i - 1))
            i = j
        return out

    def files(self) -> list[Path]:
        return [self.path] + [self.path.parent / f for f in CONFIG_FILES if (self.path.parent / f).is_file()]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kind": self.kind}  # sentencepiece entries stay as before (same plan fingerprints)
