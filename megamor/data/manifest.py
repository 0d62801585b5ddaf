"""The manifest of a shard folder: written last, so its presence means the folder is complete.

Schema (format "megamor-shards", version 1):
  tokenizer: {hash, vocab_size, bos_id, eos_id, pad_id, unk_id[, kind: "hf"]}  (Tokenizer.info; the
             hash is the identity megamor.data.tokenizer.check_same_tokenizer compares)
  dtype: "uint16" | "uint32"
  settings: {shard_tokens, valid_fraction, split_seed, text_field, txt_mode, skip_bad_lines}
  sources: [{kind, path, bytes, ...}]
  splits: {train|valid: {tokens, documents, shards: [{file, docs_file, tokens, documents,
                                                       sha256, docs_sha256}]}}
  stats: the read statistics (documents, empty/bad skipped, replaced characters, bytes)
  plan_fingerprint: the hash of the run's plan (inputs + settings), to recognise reruns
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from megamor.data.errors import ShardError

MANIFEST = "manifest.json"
PLAN = "plan.json"
REPORT = "report.json"
FORMAT = "megamor-shards"
VERSION = 1


def canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest (not a finished tokenize_and_shard output)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}:{e.lineno}: manifest is not valid JSON ({e.msg})") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ShardError(f"{path}: not a {FORMAT} v{VERSION} manifest (format={m.get('format')!r}, version={m.get('version')!r})")
    return m


def split_fingerprint(manifest: dict[str, Any], split: str) -> str:
    """Identifies the exact tokens of one split: tokenizer, dtype and every shard's hash."""
    s = manifest["splits"].get(split, {"shards": []})
    return canonical_hash({
        "tokenizer": manifest["tokenizer"]["hash"],
        "dtype": manifest["dtype"],
        "shards": [sh["sha256"] for sh in s["shards"]],
    })
