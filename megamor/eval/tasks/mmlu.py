"""MMLU in continuation form (lm-eval's `mmlu_continuation`), read from the standard CSV layout:
`<dir>/test/<subject>_test.csv` (and `dev/<subject>_dev.csv` for k-shot examples), each row
`question, A, B, C, D, answer letter`, no header.

The folder: the task's path (`--mmlu-dir`), else $MEGAMOR_MMLU_DIR, else `mmlu/` under the
data dir. Continuation form scores each choice's text (not its letter) after
"Question: ...\nAnswer:", with the subject's one-line description first; metric: acc."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import Doc, Task, TaskDataError, src

ENV = "MEGAMOR_MMLU_DIR"
LETTERS = ("A", "B", "C", "D")


def mmlu_files(folder: Path, split: str) -> list[Path]:
    """The `<subject>_<split>.csv` files of one split, sorted; a missing folder is bad input."""
    d = Path(folder) / split
    files = sorted(d.glob(f"*_{split}.csv")) if d.is_dir() else []
    if not files:
        raise TaskDataError(folder, None, f"no MMLU data: expected {split}/<subject>_{split}.csv files under it; "
                            f"give the MMLU folder with --mmlu-dir or ${ENV}")
    return files


def read_mmlu_csv(path: Path) -> list[Doc]:
    subject = path.name.rsplit("_", 1)[0]
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if len(row) != 6:
                raise TaskDataError(path, line, f"expected 6 fields (question, 4 choices, answer letter), got {len(row)}")
            answer = row[5].strip()
            if answer not in LETTERS:
                raise TaskDataError(path, line, f"answer must be one of {LETTERS}, got {row[5]!r}")
            docs.append({"subject": subject, "question": row[0], "choices": row[1:5], "answer": LETTERS.index(answer),
                         "_src": src(path, line)})
    return docs


def read_mmlu(folder: Path, split: str = "test") -> list[Doc]:
    return [d for p in mmlu_files(folder, split) for d in read_mmlu_csv(p)]


class MMLU(Task):
    name = "mmlu"
    metrics = ("acc",)  # the paper's released eval: MMLU unnormalised
    default_file = "mmlu"

    def eval_file(self, data_dir: Path | None = None) -> Path:
        if self.path:
            return Path(self.path)
        if os.environ.get(ENV):
            return Path(os.environ[ENV])
        return super().eval_file(data_dir)

    def load(self, data_dir: Path | None = None) -> list[Doc]:
        return read_mmlu(self.eval_file(data_dir), "test")

    def load_fewshot(self, data_dir: Path | None = None) -> list[Doc] | None:
        """k-shot examples from dev/ (every subject; `fewshot_choice` takes the document's own)."""
        return read_mmlu(Path(self.fewshot_path) if self.fewshot_path else self.eval_file(data_dir), "dev")

    def check_available(self, data_dir: Path | None = None) -> None:
        mmlu_files(self.eval_file(data_dir), "test")

    def fewshot_choice(self, doc: Doc, pool: Sequence[Doc], candidates: list[int], k: int, rng: Any) -> list[int]:
        """lm-eval's MMLU: the first k dev examples of the document's own subject (its first_n sampler)."""
        return [i for i in candidates if pool[i]["subject"] == doc["subject"]][:k]

    def description(self, doc: Doc) -> str:
        return f"The following are questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"

    def doc_to_text(self, doc: Doc) -> str:
        return f"Question: {doc['question'].strip()}\nAnswer:"

    def doc_to_choices(self, doc: Doc) -> list[str]:
        return list(doc["choices"])

    def doc_to_target(self, doc: Doc) -> int:
        return doc["answer"]

    def requests(self, doc: Doc, prefix: str = "") -> list[tuple[str, str]]:
        ctx = self.description(doc) + prefix + self.doc_to_text(doc)  # the description once, before any shots
        return [(ctx, self.target_delimiter + c) for c in self.doc_to_choices(doc)]
