"""HellaSwag: the derived 6-line text format (optionally .bz2) and the original jsonl."""

from __future__ import annotations

import re
from pathlib import Path

from .base import Doc, Task, TaskDataError, iter_jsonl, read_lines, require, src


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning (WikiHow `[title]`/`[step]` artefacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_six_line(path: Path) -> list[Doc]:
    """`activity_label: ctx`, gold label 0-3, then the 4 endings; 6 lines per example.

    The derived format has ctx_a and ctx_b already joined, so unlike lm-eval's HF
    HellaSwag, ctx_b is not capitalised: scores differ slightly from published ones.
    """
    lines = read_lines(path)
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    docs = []
    for start in range(0, len(lines), 6):
        lineno = start + 1
        block = lines[start : start + 6]
        if len(block) < 6:
            raise TaskDataError(path, lineno, f"incomplete example: {len(block)} of 6 lines before end of file")
        ctx, label, *endings = block
        if not ctx.strip():
            raise TaskDataError(path, lineno, "empty context line")
        if label.strip() not in ("0", "1", "2", "3"):
            raise TaskDataError(path, lineno + 1, f"gold label must be 0-3, got {label!r}")
        docs.append(
            {
                "query": preprocess(ctx),
                "choices": [preprocess(e) for e in endings],
                "label": int(label),
                "_src": src(path, lineno),
            }
        )
    return docs


def read_jsonl(path: Path) -> list[Doc]:
    """The original release: activity_label, ctx_a, ctx_b, endings, label."""
    docs = []
    for lineno, obj in iter_jsonl(path):
        require(obj, {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list, "label": (int, str)}, path, lineno)
        if len(obj["endings"]) != 4:
            raise TaskDataError(path, lineno, f"expected 4 endings, got {len(obj['endings'])}")
        if str(obj["label"]) not in ("0", "1", "2", "3"):
            raise TaskDataError(path, lineno, f"label must be 0-3, got {obj['label']!r}")
        ctx = obj["ctx_a"] + " " + obj["ctx_b"].capitalize()
        docs.append(
            {
                "query": preprocess(obj["activity_label"] + ": " + ctx),
                "choices": [preprocess(e) for e in obj["endings"]],
                "label": int(obj["label"]),
                "_src": src(path, lineno),
            }
        )
    return docs


class HellaSwag(Task):
    name = "hellaswag"
    default_file = "hellaswag/hellaswag_val_full.txt.bz2"

    def read(self, path: Path) -> list[Doc]:
        name = Path(path).name
        return read_jsonl(path) if ".jsonl" in name or ".json" in name else read_six_line(path)

    def doc_to_text(self, doc: Doc) -> str:
        return doc["query"]

    def doc_to_choices(self, doc: Doc) -> list[str]:
        return doc["choices"]

    def doc_to_target(self, doc: Doc) -> int:
        return doc["label"]
