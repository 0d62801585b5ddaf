"""What evaluation loads: `load_model(source)` for every source kind, and the checkpoints of a run.

The code is megamor.runs (the run-folder layer); this module is evaluation's name for it. See
megamor/runs/load.py for the accepted sources and megamor/runs/find.py for how a run folder
is listed (oldest step first, the cheapest form of each step).
"""

from __future__ import annotations

from megamor.runs.find import (
    CONSOLIDATED_SUFFIXES,
    CheckpointInfo,
    describe,
    find_tokenizer,
    is_deepspeed_tag,
    is_hf_export,
    list_checkpoints,
    read_meta,
)
from megamor.runs.layout import EXPORT_FILE, CheckpointError
from megamor.runs.load import (
    build_model,
    load_consolidated,
    load_deepspeed_tag,
    load_hf,
    load_model,
    load_model_and_meta,
    move,
)

__all__ = [
    "CONSOLIDATED_SUFFIXES", "EXPORT_FILE", "CheckpointError", "CheckpointInfo", "build_model", "describe",
    "find_tokenizer", "is_deepspeed_tag", "is_hf_export", "list_checkpoints", "load_consolidated",
    "load_deepspeed_tag", "load_hf", "load_model", "load_model_and_meta", "move", "read_meta",
]
