"""An `evals/` entry-point script loaded as a module, so tests call its `main(argv)` in-process
(the script's process-level exit codes are covered by tests/test_cli.py's walk)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from megamor.env import repo_root


def load_evals_script(name: str) -> ModuleType:
    """evals/<name>.py as a fresh module named `evals_<name>`."""
    spec = importlib.util.spec_from_file_location(f"evals_{name}", repo_root() / "evals" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
