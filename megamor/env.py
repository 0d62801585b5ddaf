"""Settings read from the environment, in one place."""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The offline datasets folder: $MEGAMOR_DATA_DIR, else ../shared/data beside the repo."""
    env = os.environ.get("MEGAMOR_DATA_DIR")
    return Path(env) if env else (_REPO_ROOT.parent / "shared" / "data")


def repo_root() -> Path:
    return _REPO_ROOT
