"""Which tests start processes: the rule behind the `launch` test marker.

The suite has two tiers: `pytest -m "not launch"` (fast: no training process, no SLURM daemon,
no multi-process group) and everything. A test that starts any of those must carry
`@pytest.mark.launch`; tests/conftest.py installs `guard` so that forgetting the marker fails the
test at the moment it would start the process (the fast tier never pays for the launch).

What counts as a launch (one rule, here):
- a subprocess whose command line runs a trainer, a launcher or SLURM (`launch_kind`), seen by wrapping
  `subprocess.Popen` (which `subprocess.run` uses too);
- a process group started with `torch.multiprocessing.start_processes`/`spawn` (which
  `megamor.testing.distributed.run_distributed` uses);
- the `slurm_cluster` fixture (checked by conftest from the test's fixture names).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from os import PathLike

MARKER = "launch"

# Programs (by file name) and Python modules/scripts that start training processes, launchers
# or SLURM jobs. Python CLIs that train inside themselves count: they are named by module.
PROGRAMS = frozenset({"torchrun", "deepspeed", "sbatch", "srun", "salloc"})
MODULES = ("megamor.train", "megamor.demo", "megamor.study", "megamor.gpu_check", "tests.train.compile_engines",
           "torch.distributed.run", "deepspeed.launcher")
SCRIPTS = ("compile_engines.py",)
# Flags with which a module above only plans or reports (its argparse makes them exclusive
# with running anything): such a command is a quick CLI check, not a launch.
DRY_RUN = {"megamor.study": ("--plan", "--report")}
# A module asked for its help prints it from argparse and exits before anything starts (every
# entry point parses first: tests/test_cli_help.py checks that nothing heavy even loads).
HELP = ("-h", "--help")


def launch_kind(args: str | bytes | PathLike | Sequence) -> str | None:
    """What in a subprocess command line starts a launch (a program, module or script), or None."""
    if isinstance(args, (str, bytes, PathLike)):
        args = [args]
    words = [w.decode(errors="replace") if isinstance(w, bytes) else str(w) for w in args]
    if words and words[0].split()[0].rsplit("/", 1)[-1] in PROGRAMS:  # a shell string: its first word
        return words[0].split()[0].rsplit("/", 1)[-1]
    for w in words:
        if any(w == m or w.startswith(m + ".") for m in MODULES) or w.endswith(SCRIPTS):
            return None if any(flag in words for flag in (*DRY_RUN.get(w, ()), *HELP)) else w
    return None


class Guard:
    """Installed once per session; `check(what)` is called whenever a launch is about to happen
    and raises (via `on_unmarked`) when the running test is not marked."""

    def __init__(self) -> None:
        self.allowed = True  # outside a test (collection, session fixtures): no check
        self.seen: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def begin(self, allowed: bool) -> None:
        self.allowed, self.seen = allowed, []

    def end(self) -> list[str]:
        seen, self.allowed, self.seen = self.seen, True, []
        return seen

    def check(self, what: str) -> None:
        self.seen.append(what)
        if not self.allowed:
            raise UnmarkedLaunch(what)

    def install(self) -> None:
        import importlib

        import torch.multiprocessing as tmp

        tspawn = importlib.import_module("torch.multiprocessing.spawn")  # the package's `spawn` is a function

        guard = self
        popen_init = subprocess.Popen.__init__

        def init(self, args, *a, **kw):  # Popen's own signature
            kind = launch_kind(args)
            if kind:
                guard.check(f"a subprocess running {kind}")
            popen_init(self, args, *a, **kw)

        subprocess.Popen.__init__ = init
        self._undo.append(lambda: setattr(subprocess.Popen, "__init__", popen_init))

        original = tspawn.start_processes

        def start_processes(*a, **kw):
            guard.check(f"a process group (torch.multiprocessing, nprocs={kw.get('nprocs', '?')})")
            return original(*a, **kw)

        for module in (tspawn, tmp):
            before = module.start_processes
            module.start_processes = start_processes
            self._undo.append(lambda m=module, b=before: setattr(m, "start_processes", b))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


class UnmarkedLaunch(RuntimeError):
    def __init__(self, what: str) -> None:
        super().__init__(f"this test starts {what} but is not marked @pytest.mark.{MARKER}: mark it (see "
                         "docs/testing.md) so that the fast tier (`make test-fast`) skips it")
