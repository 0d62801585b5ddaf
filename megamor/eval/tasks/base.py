"""The task abstraction and the file-reading helpers shared by every loader.

A task turns a file in its native format into a list of docs (plain dicts holding the
native fields, plus `_src` = "file:line" so any later error can point at the input), and
says how a doc becomes log-likelihood requests. Prompts mirror lm-evaluation-harness's
built-in task YAMLs so numbers are comparable (and `evals/tasks/*.yaml` re-implements the
same prompts in lm-eval's Jinja, which the parity test checks).

Three kinds of task:
- `multiple_choice`: one context, one continuation per choice (acc, acc_norm, acc_bytes).
- `partial`: one context per choice, one shared continuation (WinoGrande "partial
  scoring": the text after the blank, conditioned on each option filled in).
- `loglikelihood`: one (context, continuation) per doc (LAMBADA: acc = the continuation is
  the greedy decode; perplexity = exp(-mean log-likelihood of the target word)).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megamor.env import shared_data_dir

Doc = dict[str, Any]


class TaskDataError(ValueError):
    """Malformed task input. The message starts with `file:line:` when a line is to blame."""

    def __init__(self, path: str | Path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file, decompressing .bz2/.gz/.xz by suffix. Missing file: a clear error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"task file not found: {p} (datasets are read from $MEGAMOR_DATA_DIR, "
            f"now {shared_data_dir()}; or pass an explicit path)"
        )
    opener = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}.get(p.suffix, open)
    return opener(p, "rt", encoding="utf-8", newline=None)  # type: ignore[operator]


def read_lines(path: str | Path) -> list[str]:
    with open_text(path) as f:
        return f.read().split("\n")


def _decoded_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 file; bytes that are not UTF-8 are a TaskDataError
    naming the line (a text-mode reader decodes ahead, so its errors cannot say which line)."""
    p = Path(path)
    open_text(p).close()  # a missing file: the usual message
    opener = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}.get(p.suffix, open)
    with opener(p, "rb") as f:  # type: ignore[operator]
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskDataError(path, lineno, f"not valid UTF-8 at byte {e.start} of the line ({e.reason})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Doc]]:
    """(1-based line number, object) for each non-blank line; bad JSON names file:line."""
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TaskDataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def require(obj: Doc, fields: dict[str, type | tuple[type, ...]], path: str | Path, lineno: int) -> None:
    """Check that `obj` has each field with the given type(s)."""
    for name, typ in fields.items():
        if name not in obj:
            raise TaskDataError(path, lineno, f"missing field {name!r}")
        if not isinstance(obj[name], typ):
            raise TaskDataError(
                path, lineno, f"field {name!r} should be {getattr(typ, '__name__', typ)}, got {type(obj[name]).__name__}"
            )


def read_labels(path: str | Path, allowed: tuple[str, ...]) -> list[tuple[int, str]]:
    """A one-label-per-line file (PIQA, WinoGrande): (line number, label) pairs."""
    out = []
    for lineno, line in enumerate(read_lines(path), 1):
        s = line.strip()
        if not s:
            continue
        if s not in allowed:
            raise TaskDataError(path, lineno, f"label must be one of {allowed}, got {s!r}")
        out.append((lineno, s))
    return out


def src(path: str | Path, lineno: int) -> str:
    return f"{path}:{lineno}"


@dataclass
class Task:
    """One evaluation task. Subclasses set the class attributes and implement the doc hooks.

    Adding a task (see megamor/eval/tasks/__init__.py): write a loader returning docs with
    `_src`, subclass Task with `doc_to_text`, `doc_to_choices`, `doc_to_target`, register it
    in TASKS, and (for lm-eval) add a YAML in evals/tasks/ with the same prompt.
    """

    path: Path | None = None  # the eval file; None: `default_file` under the data dir
    fewshot_path: Path | None = None  # None: `default_fewshot_file`, else the eval docs themselves

    name = "task"
    kind = "multiple_choice"  # multiple_choice | partial | loglikelihood
    metrics = ("acc", "acc_norm", "acc_bytes")
    default_file = ""
    default_fewshot_file = None  # a file beside the eval file to draw k-shot examples from
    target_delimiter = " "
    fewshot_delimiter = "\n\n"

    # -- files ----------------------------------------------------------------------------
    def eval_file(self, data_dir: Path | None = None) -> Path:
        return Path(self.path) if self.path else (data_dir or shared_data_dir()) / self.default_file

    def fewshot_file(self, data_dir: Path | None = None) -> Path | None:
        if self.fewshot_path:
            return Path(self.fewshot_path)
        if self.default_fewshot_file:
            p = (data_dir or shared_data_dir()) / self.default_fewshot_file
            return p if p.is_file() else None
        return None

    def load(self, data_dir: Path | None = None) -> list[Doc]:
        return self.read(self.eval_file(data_dir))

    def load_fewshot(self, data_dir: Path | None = None) -> list[Doc] | None:
        """The pool k-shot examples are drawn from; None means the eval docs (minus the doc itself)."""
        p = self.fewshot_file(data_dir)
        return self.read(p) if p is not None else None

    def check_available(self, data_dir: Path | None = None) -> None:
        """Raise TaskDataError before any model loads when the task's data is plainly missing
        (tasks read from one file report a missing file when they load)."""

    def read(self, path: Path) -> list[Doc]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- prompts --------------------------------------------------------------------------
    def doc_to_text(self, doc: Doc) -> str:
        raise NotImplementedError

    def doc_to_choices(self, doc: Doc) -> list[str]:
        """multiple_choice: the continuations; partial: the per-option contexts."""
        raise NotImplementedError

    def doc_to_target(self, doc: Doc) -> Any:
        """multiple_choice/partial: the gold index; loglikelihood: the continuation string."""
        raise NotImplementedError

    def partial_continuation(self, doc: Doc) -> str:  # partial tasks only
        raise NotImplementedError

    def fewshot_choice(self, doc: Doc, pool: Sequence[Doc], candidates: list[int], k: int, rng: Any) -> list[int]:
        """Which of the pool's candidate examples are doc's k shots: k at random (lm-eval's
        default sampler); rng is the harness's random.Random, seeded per document."""
        return rng.sample(candidates, k) if len(candidates) >= k else candidates

    def fewshot_example(self, doc: Doc) -> str:
        """A solved example as it appears in a k-shot prompt (as lm-eval formats it)."""
        if self.kind == "multiple_choice":
            return self.doc_to_text(doc) + self.target_delimiter + self.doc_to_choices(doc)[self.doc_to_target(doc)]
        if self.kind == "partial":
            return self.doc_to_choices(doc)[self.doc_to_target(doc)] + self.target_delimiter + self.partial_continuation(doc)
        return self.doc_to_text(doc) + self.doc_to_target(doc)

    def requests(self, doc: Doc, prefix: str = "") -> list[tuple[str, str]]:
        """(context, continuation) string pairs for one doc; `prefix` holds the k-shot examples."""
        if self.kind == "multiple_choice":
            ctx = prefix + self.doc_to_text(doc)
            return [(ctx, self.target_delimiter + c) for c in self.doc_to_choices(doc)]
        if self.kind == "partial":
            cont = self.target_delimiter + self.partial_continuation(doc)
            return [(prefix + c, cont) for c in self.doc_to_choices(doc)]
        if self.kind == "loglikelihood":
            return [(prefix + self.doc_to_text(doc), self.doc_to_target(doc))]
        raise ValueError(f"unknown task kind {self.kind!r}")
