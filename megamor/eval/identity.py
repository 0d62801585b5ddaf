"""Evaluate with the tokenizer and data the checkpoint was trained with, or say so.

Training records its tokenizer's identity (`Tokenizer.content_hash`: the SHA-256 of
`tokenizer.model`, or of a Hugging Face `tokenizer.json` and its special tokens): in every
checkpoint tag (`trainer_state.pt`'s `tokenizer_hash`), in exports (`megamor.pt` and its
`.json`), and in every shard folder's manifest (`tokenizer.hash`); it refuses a tokenizer or
shards that differ. Every evaluation entry point runs that same check
(`megamor.data.tokenizer.check_same_tokenizer`) here, before scoring anything: a mismatch is
bad input (one line, exit 2) unless the caller allows it on purpose
(`--allow-tokenizer-mismatch`), which is then printed as a warning and kept in the results.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megamor.data.errors import DataError
from megamor.data.manifest import load_manifest
from megamor.data.tokenizer import TokenizerMismatchError, check_same_tokenizer

ALLOW_FLAG = "--allow-tokenizer-mismatch"


def shard_folder(path: str | Path) -> Path:
    """The shard folder (the one holding manifest.json) of a folder or of a shard file in it."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def _problems(recorded: str | None, source: str, tok: Any, shards: Sequence[str | Path]) -> list[str]:
    actual = getattr(tok, "content_hash", None)
    tok_name = f"tokenizer {getattr(tok, 'path', '(given as an object)')}"
    found = []
    try:
        check_same_tokenizer(recorded, actual, f"{source} was trained with", tok_name)
    except TokenizerMismatchError as e:
        found.append(str(e))
    # Shards: against the checkpoint's record, else (as training's preflight) against the tokenizer.
    reference, reference_as = (recorded, f"{source} was trained with") if recorded else (actual, tok_name)
    for folder in dict.fromkeys(shard_folder(s) for s in shards):
        try:
            shard_hash = load_manifest(folder)["tokenizer"]["hash"]
        except DataError:
            found.append(f"the shards in {folder} have no readable manifest.json, so the tokenizer that made them is unknown")
            continue
        try:
            check_same_tokenizer(reference, shard_hash, reference_as, f"the tokenizer of the shards in {folder}")
        except TokenizerMismatchError as e:
            found.append(str(e))
    return found


def check_identity(meta: dict[str, Any], source: Any, tok: Any, shards: Sequence[str | Path] = (),
                   allow_mismatch: bool = False, flag: str | None = ALLOW_FLAG) -> dict[str, Any]:
    """Check `tok` (and the shard folders to score) against the tokenizer the checkpoint was
    trained with (`meta["tokenizer_hash"]`, from megamor.runs.load). Raises
    TokenizerMismatchError (one line naming both hashes and `flag`, the caller's way to allow
    it) unless `allow_mismatch`.
    Returns what to record beside the results."""
    source = str(getattr(source, "path", source))
    recorded = meta.get("tokenizer_hash")
    problems = _problems(recorded, source, tok, shards)
    if problems and not allow_mismatch:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TokenizerMismatchError(f"{problems[0]}{more}; evaluate with the checkpoint's own tokenizer and data"
                                     + (f", or pass {flag} to evaluate anyway" if flag else ""))
    for p in problems:
        print(f"warning: {p} ({flag})", file=sys.stderr)
    if problems:
        status = "mismatch allowed: " + "; ".join(problems)
    elif recorded:
        status = "same as the checkpoint's"
    else:
        status = "not recorded by the checkpoint"
    return {"tokenizer_hash": getattr(tok, "content_hash", None), "trained_tokenizer_hash": recorded, "tokenizer_check": status}
