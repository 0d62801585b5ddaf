"""megamor's one tokenizer interface and its two implementations, chosen by `load_tokenizer`.

- `SentencePieceTokenizer`: a sentencepiece `.model`. Models trained by `train_tokenizer` use:
  unk=0, bos=1, eos=2, pad=3, "\\n" as its own piece, byte fallback (so every string
  round-trips: decode(encode(s)) == s), identity normalisation, digits split one per token.
  Any other sentencepiece model loads too; ids it lacks are -1.
- `HFTokenizer`: a Hugging Face `tokenizer.json` (a folder holding
  one, or the file), with BOS/EOS/PAD/UNK from the `tokenizer_config.json` /
  `special_tokens_map.json` beside it. Run by the `tokenizers` library directly.

Both: `encode` adds no special tokens unless asked (the pipeline appends EOS per document),
control tokens decode to nothing, and `content_hash` is the identity shards, checkpoints and
evaluations record and compare (`check_same_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megamor.data.errors import DataError

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
INFO_FILE = "tokenizer_info.json"
HF_FILE = "tokenizer.json"


class TokenizerMismatchError(ValueError):
    """A tokenizer (or shard set) other than the one recorded: bad input."""


class TokenizerError(DataError):
    """A tokenizer path that is missing or holds neither kind of tokenizer (bad input; names the file)."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """No such tokenizer file or folder (a FileNotFoundError too, as callers have always caught)."""


def check_same_tokenizer(recorded: str | None, actual: str | None, recorded_as: str, actual_as: str) -> None:
    """The one tokenizer identity check: training's (data.tokenizer against the shards' manifest,
    a resumed checkpoint against its data) and every evaluation entry point's. Two tokenizers are
    the same when their `Tokenizer.content_hash` (the `hash` of shard manifests) are equal; a
    side that recorded nothing has nothing to check.

    Raises TokenizerMismatchError: "<actual_as> (hash ...) is not the tokenizer <recorded_as> (hash ...)".
    """
    if recorded and actual and recorded != actual:
        raise TokenizerMismatchError(f"{actual_as} (hash {actual[:12]}) is not the tokenizer {recorded_as} (hash {recorded[:12]})")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class Tokenizer(ABC):
    """What training, data preparation and evaluation need from a tokenizer."""

    kind: str  # "sentencepiece" | "hf"
    path: Path  # the file that defines it (tokenizer.model or tokenizer.json)
    content_hash: str

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Either kind, by `load_tokenizer`'s rules."""
        return load_tokenizer(path)

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many documents in one call (single-threaded: workers are processes)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Control tokens (BOS/EOS/PAD) decode to nothing."""

    @abstractmethod
    def id_to_piece(self, i: int) -> str: ...

    @abstractmethod
    def files(self) -> list[Path]:
        """The files to copy for a copy of this tokenizer (run folders, exports)."""

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def info(self) -> dict[str, Any]:
        """The ids and hash, as recorded in shard manifests."""
        return {
            "hash": self.content_hash,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "path": str(self.path),
        }

    def settings(self) -> dict | None:
        """The training settings JSON written beside the model, if any."""
        p = self.path.parent / INFO_FILE
        return json.loads(p.read_text()) if p.is_file() else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}, vocab_size={self.vocab_size}, hash={self.content_hash[:12]})"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = Path(model_path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({str(e).splitlines()[0] if str(e) else e})") from None
        self.content_hash = file_sha256(self.path)  # what shard manifests record: old folders stay valid
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def files(self) -> list[Path]:
        return [self.path] + [p for p in (self.path.parent / VOCAB_FILE, self.path.parent / INFO_FILE) if p.is_file()]


# -- Hugging Face tokenizer.json ------------------------------------------------------------
# A Hugging Face tokenizer (`tokenizer.json`) behind megamor's Tokenizer interface.
#
# Run by the `tokenizers` library directly (no transformers in the hot path). BOS/EOS/PAD/UNK
# come from `tokenizer_config.json`, else `special_tokens_map.json`, beside the tokenizer.json
# (tokens named there but absent from the vocabulary are bad input); a role neither names is -1.
# As with megamor's sentencepiece models: `encode` adds no special tokens (a post-processor
# that would add BOS is not run), special-token text inside a document ("<|endoftext|>") is
# encoded as text, and special tokens decode to nothing.
#
# Identity (`content_hash`): SHA-256 of the tokenizer.json bytes and the resolved special-token
# names, so the same vocabulary with another EOS is another tokenizer.

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


def _sniff_json(path: Path) -> bool:
    """True when the file starts like a JSON object (a tokenizer.json); sentencepiece models are protobuf."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")


def resolve_tokenizer_file(path: str | Path) -> Path:
    """The file that defines the tokenizer at `path`: the file itself, or in a folder
    tokenizer.model (megamor's own, and what its exports record the identity of) before
    tokenizer.json, else a folder's only *.model file."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise TokenizerNotFoundError(f"tokenizer not found: {p}")
    for name in (MODEL_FILE, HF_FILE):
        if (p / name).is_file():
            return p / name
    models = sorted(p.glob("*.model"))
    if len(models) == 1:
        return models[0]
    raise TokenizerError(f"{p}: no {MODEL_FILE} (sentencepiece) or {HF_FILE} (Hugging Face) in this folder")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A sentencepiece model or a Hugging Face tokenizer from a file or a folder
    (`resolve_tokenizer_file`); TokenizerError (one line naming the file) when it is neither."""
    f = resolve_tokenizer_file(path)
    if _sniff_json(f):
        return HFTokenizer(f)
    try:
        return SentencePieceTokenizer(f)
    except TokenizerError:
        raise TokenizerError(f"{f}: neither a sentencepiece model nor a Hugging Face tokenizer.json") from None


def copy_tokenizer(tok: Tokenizer, dst_dir: str | Path) -> Path:
    """Copy the files of `tok` into `dst_dir` (atomically each) under the names `load_tokenizer`
    finds in a folder; returns the defining file's copy."""
    import shutil

    from megamor.utils.atomic import temp_path

    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    main = dst / (MODEL_FILE if tok.kind == "sentencepiece" else HF_FILE)
    for src in tok.files():
        target = main if src == tok.path else dst / src.name
        if src.resolve() == target.resolve():
            continue
        tmp = temp_path(target)
        shutil.copy2(src, tmp)
        tmp.replace(target)
    return main
