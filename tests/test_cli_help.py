"""Every command-line entry point (the walk of tests/test_cli.py) answers `--help` before torch,
DeepSpeed, transformers or datasets load: a tool's help and its argument errors are instant,
whatever the tool does after parsing. Measured with `python -X importtime`, which lists every
module a process imports (one subprocess per entry point, `--help` only: nothing starts)."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from tests.test_cli import entry_points, run

HEAVY = frozenset({"torch", "deepspeed", "transformers", "datasets"})
# Entry points whose parser belongs to a heavy library, with why they may load it first.
EXEMPT = {
    "megamor.runs.safe_universal": "DeepSpeed's ds_to_universal parser (an internal subprocess of resume, not a "
                                   "command users type)",
}


def heavy_imports(importtime_stderr: str) -> set[str]:
    """The HEAVY top-level packages named in `-X importtime` output."""
    found = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            found.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return found & HEAVY


def help_imports(cmd: list[str]) -> tuple[int, set[str], str]:
    r = run([cmd[0], "-X", "importtime", *cmd[1:], "--help"])
    return r.returncode, heavy_imports(r.stderr), r.stdout + r.stderr  # eval tools print help on stderr


def test_heavy_imports_are_read_from_importtime_output():
    _, heavy, _ = help_imports([sys.executable, "-c", "import torch.nn"])
    assert heavy == {"torch"}  # the check can fail: an import of torch is seen
    assert heavy_imports("import time:       120 |        120 |   torchvision_like\n") == set()


def test_every_entry_point_answers_help_before_torch_loads():
    points = [p for p in entry_points() if p[0] not in EXEMPT]
    assert set(EXEMPT) <= {name for name, _ in entry_points()}, "an exempt entry point is gone: drop it from EXEMPT"
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: (p[0], help_imports(p[1])), points))
    bad = [f"{name}: exit {rc}" if rc != 0 else f"{name}: --help loaded {', '.join(sorted(heavy)) or 'no usage'}"
           for name, (rc, heavy, out) in results if rc != 0 or heavy or "usage:" not in out]
    assert not bad, "\n".join(bad)
