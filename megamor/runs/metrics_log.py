"""Reading a run's metrics.jsonl: one JSON object per record; a torn line (a killed writer) or
anything that is not an object is skipped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The file's records in order (nothing when it does not exist)."""
    if not path.is_file():
        return
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row
