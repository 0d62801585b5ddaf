"""Data: tokenizer, tokenize-and-shard pipeline, shard format, packed dataset, resumable loader.

Imports are lazy so that data_prep tools (and their worker processes) never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "megamor.data.config",
    "Tokenizer": "megamor.data.tokenizer",
    "train_tokenizer": "megamor.data.tokenizer_train",
    "ShardSettings": "megamor.data.pipeline",
    "tokenize_and_shard": "megamor.data.pipeline",
    "finalize": "megamor.data.finalize",
    "verify_shards": "megamor.data.verify",
    "ReadOptions": "megamor.data.readers",
    "ShardSet": "megamor.data.dataset",
    "PackedDataset": "megamor.data.dataset",
    "TrainLoader": "megamor.data.loader",
    "build_train_loader": "megamor.data.loader",
    "build_eval_batches": "megamor.data.loader",
    "build_eval_sets": "megamor.data.loader",
    "iter_eval_batches": "megamor.data.loader",
    "DataError": "megamor.data.errors",
    "ShardError": "megamor.data.errors",
    "DataStateError": "megamor.data.errors",
    "OutputExistsError": "megamor.data.errors",
}

__all__ = tuple(sorted(_EXPORTS))


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'megamor.data' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
