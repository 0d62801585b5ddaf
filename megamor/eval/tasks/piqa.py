"""PIQA: `{"goal","sol1","sol2"}` jsonl plus a line-aligned labels file (X.jsonl + X-labels.lst)."""

from __future__ import annotations

from pathlib import Path

from .base import Doc, Task, TaskDataError, iter_jsonl, read_labels, require, src


def labels_file(path: Path) -> Path:
    name = Path(path).name
    stem = name.split(".jsonl")[0]
    return Path(path).with_name(f"{stem}-labels.lst")


def read_piqa(path: Path) -> list[Doc]:
    rows = list(iter_jsonl(path))
    lab_path = labels_file(path)
    labels = read_labels(lab_path, ("0", "1"))
    if len(labels) != len(rows):
        raise TaskDataError(lab_path, None, f"{len(labels)} labels for {len(rows)} examples in {path}")
    docs = []
    for (lineno, obj), (_, lab) in zip(rows, labels):
        require(obj, {"goal": str, "sol1": str, "sol2": str}, path, lineno)
        docs.append({"goal": obj["goal"], "sol1": obj["sol1"], "sol2": obj["sol2"], "label": int(lab), "_src": src(path, lineno)})
    return docs


class PIQA(Task):
    name = "piqa"
    default_file = "piqa/valid.jsonl"

    def read(self, path: Path) -> list[Doc]:
        return read_piqa(path)

    def doc_to_text(self, doc: Doc) -> str:
        return f"Question: {doc['goal']}\nAnswer:"

    def doc_to_choices(self, doc: Doc) -> list[str]:
        return [doc["sol1"], doc["sol2"]]

    def doc_to_target(self, doc: Doc) -> int:
        return doc["label"]
