"""LAMBADA (OpenAI-processed test set): `{"text": ...}`; the target is the last word.

As lm-eval's `lambada_openai`: context = every word but the last (split on single spaces),
continuation = " " + last word; acc = the whole continuation is the greedy decode;
perplexity = exp(-mean over examples of the target's log-likelihood)."""

from __future__ import annotations

from pathlib import Path

from .base import Doc, Task, TaskDataError, iter_jsonl, require, src


def read_lambada(path: Path) -> list[Doc]:
    docs = []
    for lineno, obj in iter_jsonl(path):
        require(obj, {"text": str}, path, lineno)
        words = obj["text"].split(" ")
        if len(words) < 2 or not words[-1]:
            raise TaskDataError(path, lineno, "text needs a context and a final word separated by a space")
        docs.append({"text": obj["text"], "_src": src(path, lineno)})
    return docs


class Lambada(Task):
    name = "lambada"
    kind = "loglikelihood"
    metrics = ("acc", "perplexity")
    default_file = "lambada/lambada_test.jsonl"
    target_delimiter = ""

    def read(self, path: Path) -> list[Doc]:
        return read_lambada(path)

    def doc_to_text(self, doc: Doc) -> str:
        return " ".join(doc["text"].split(" ")[:-1])

    def doc_to_target(self, doc: Doc) -> str:
        return " " + doc["text"].split(" ")[-1]
