"""BoolQ: `{"question","title","answer": bool,"passage"}` jsonl; choices "no"/"yes" (lm-eval's prompt)."""

from __future__ import annotations

from pathlib import Path

from .base import Doc, Task, iter_jsonl, require, src


def read_boolq(path: Path) -> list[Doc]:
    docs = []
    for lineno, obj in iter_jsonl(path):
        require(obj, {"question": str, "passage": str, "answer": bool}, path, lineno)
        docs.append({"question": obj["question"], "passage": obj["passage"], "label": int(obj["answer"]), "_src": src(path, lineno)})
    return docs


class BoolQ(Task):
    name = "boolq"
    metrics = ("acc",)
    default_file = "boolq/dev.jsonl"

    def read(self, path: Path) -> list[Doc]:
        return read_boolq(path)

    def doc_to_text(self, doc: Doc) -> str:
        return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"

    def doc_to_choices(self, doc: Doc) -> list[str]:
        return ["no", "yes"]

    def doc_to_target(self, doc: Doc) -> int:
        return doc["label"]
