"""Datasets for the lm-eval task YAMLs in this folder, read from local files by megamor's loaders.

Each YAML says `custom_dataset: !function megamor_tasks.<task>`; lm-eval calls it with the
task's `metadata` (plus anything passed as `--metadata '{"data_dir": ..., "path": ...}'`):
- data_dir: the datasets folder (default $MEGAMOR_DATA_DIR or ../shared/data),
- path: an explicit file for this task (same format).
The docs keep their native fields; the prompts are written in each YAML's Jinja,
independently of megamor's Python prompts, and the parity test checks they agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from megamor.env import shared_data_dir
from megamor.eval.perplexity import read_texts
from megamor.eval.tasks import get_task


def _dataset(name: str, data_dir: str | None = None, path: str | None = None, **_: Any) -> dict[str, datasets.Dataset]:
    task = get_task(name, path=path)
    root = Path(data_dir) if data_dir else None
    out = {"test": datasets.Dataset.from_list(task.load(root))}
    shots = task.load_fewshot(root)
    if shots is not None:
        out["validation"] = datasets.Dataset.from_list(shots)
    return out


def hellaswag(**kw: Any):
    return _dataset("hellaswag", **kw)


def piqa(**kw: Any):
    return _dataset("piqa", **kw)


def arc_easy(**kw: Any):
    return _dataset("arc_easy", **kw)


def arc_challenge(**kw: Any):
    return _dataset("arc_challenge", **kw)


def winogrande(**kw: Any):
    return _dataset("winogrande", **kw)


def lambada(**kw: Any):
    return _dataset("lambada", **kw)


def boolq(**kw: Any):
    return _dataset("boolq", **kw)


def openbookqa(**kw: Any):
    return _dataset("openbookqa", **kw)


def wikitext(data_dir: str | None = None, path: str | None = None, **_: Any):
    """WikiText-2 raw test, one doc per article (megamor.eval.perplexity.split_wikitext_articles)."""
    p = Path(path) if path else Path(data_dir or shared_data_dir()) / "wikitext-2-raw" / "wiki.test.raw"
    return {"test": datasets.Dataset.from_list([{"page": t} for t in read_texts([p], split="wikitext")])}


# WinoGrande partial scoring: lm-eval's own functions (lm_eval/tasks/winogrande/preprocess_winogrande.py).
def wg_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def wg_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def wg_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
