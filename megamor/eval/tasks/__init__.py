"""Evaluation tasks read from local files in their native formats.

    from megamor.eval.tasks import get_task
    task = get_task("arc_easy")                 # default file under $MEGAMOR_DATA_DIR
    task = get_task("arc_easy", path="x.jsonl")  # any file in the same format
    docs = task.load()

Adding a task:
1. a reader `read(path) -> list[dict]` that keeps the native fields, adds `_src`
   ("file:line") and raises `TaskDataError(path, line, reason)` on bad input;
2. a `Task` subclass (see base.py) with `name`, `kind`, `metrics`, `default_file` and the
   prompt hooks `doc_to_text` / `doc_to_choices` / `doc_to_target`;
3. an entry in TASKS below;
4. for lm-eval, `evals/tasks/megamor_<name>.yaml` with the same prompt in Jinja and a
   `custom_dataset` line (see evals/tasks/megamor_tasks.py); the parity test compares them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from megamor.cli import BadInput

from .arc import ARCChallenge, ARCEasy, OpenBookQA
from .base import Doc, Task, TaskDataError
from .boolq import BoolQ
from .hellaswag import HellaSwag
from .lambada import Lambada
from .mmlu import MMLU
from .piqa import PIQA
from .winogrande import WinoGrande

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (HellaSwag, PIQA, ARCEasy, ARCChallenge, WinoGrande, Lambada, BoolQ, OpenBookQA, MMLU)
}
# The paper's few-shot suite without MMLU (the default of the tools: MMLU is not in the shared data).
PAPER_TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge")
# Suites a task list may name: `--tasks paper` is the paper's six columns (megamor.eval.paper).
SUITES: dict[str, tuple[str, ...]] = {"paper": (*PAPER_TASKS, "mmlu")}


def expand_suites(names: Iterable[str]) -> list[str]:
    """The names with each suite replaced by its tasks, first occurrence kept."""
    out: list[str] = []
    for n in names:
        for t in SUITES.get(n, (n,)):
            if t not in out:
                out.append(t)
    return out


class UnknownTaskError(BadInput, KeyError):
    """A task name that is not in TASKS (a KeyError for old callers, bad input for the tools)."""

    __str__ = BadInput.__str__


def check_task_names(names: Iterable[str], flag: str = "--tasks") -> list[str]:
    """The names, each a known task; else an UnknownTaskError naming them with a suggestion."""
    names = list(names)
    for name in names:
        if name not in TASKS:
            close = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UnknownTaskError(f"{flag}: unknown task {name!r}{hint} (tasks: {', '.join(sorted(TASKS))})")
    return names


def get_task(name: str, path: str | Path | None = None, fewshot_path: str | Path | None = None) -> Task:
    check_task_names([name], "task")
    return TASKS[name](path=Path(path) if path else None, fewshot_path=Path(fewshot_path) if fewshot_path else None)


__all__ = ["PAPER_TASKS", "SUITES", "TASKS", "Doc", "Task", "TaskDataError", "UnknownTaskError", "check_task_names", "expand_suites", "get_task"]
