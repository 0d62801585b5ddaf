"""The data half of `make demo` in one call: corpus -> tokenizer -> shards, reusing what exists."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megamor.data.demo_corpus import write_demo_corpus
from megamor.data.pipeline import ShardSettings, tokenize_and_shard
from megamor.data.tokenizer import INFO_FILE, MODEL_FILE
from megamor.data.tokenizer_train import train_tokenizer


@dataclass
class DemoData:
    corpus: Path
    tokenizer: Path  # the tokenizer.model file
    shards: Path  # train and valid splits


def prepare_demo_data(out_dir: str | Path, mb: float = 4.0, vocab_size: int = 2048, seed: int = 0,
                      valid_fraction: float = 0.01, workers: int = 1,
                      log: Callable[[str], None] = print) -> DemoData:
    """Same arguments, same files: each step is skipped when its output is already complete."""
    out = Path(out_dir)
    corpus, tok_dir, shards = out / "demo_corpus.jsonl", out / "tokenizer", out / "shards"
    meta = out / "demo_corpus.settings.json"
    want = {"mb": mb, "seed": seed}
    if not (corpus.is_file() and meta.is_file() and json.loads(meta.read_text()) == want):
        counts = write_demo_corpus(corpus, seed=seed, target_bytes=int(mb * 1e6))
        meta.write_text(json.dumps(want))
        log(f"wrote {corpus}: {sum(counts.values())} documents")
    info = tok_dir / INFO_FILE
    fresh = info.is_file() and json.loads(info.read_text())["settings"]["vocab_size"] == vocab_size \
        and info.stat().st_mtime_ns >= corpus.stat().st_mtime_ns
    if not fresh:
        tok = train_tokenizer([str(corpus)], tok_dir, vocab_size=vocab_size, seed=seed, overwrite=True)
        log(f"trained {tok}")
    tokenize_and_shard([str(corpus)], shards, tok_dir / MODEL_FILE, ShardSettings(valid_fraction=valid_fraction),
                       workers=workers, overwrite=True, progress=False, log=log)
    return DemoData(corpus, tok_dir / MODEL_FILE, shards)
