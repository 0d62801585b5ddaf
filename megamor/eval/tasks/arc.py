"""ARC-Easy, ARC-Challenge and OpenBookQA: the AI2 jsonl format
`{"id", "question": {"stem", "choices": [{"text","label"}]}, "answerKey"}`."""

from __future__ import annotations

from pathlib import Path

from .base import Doc, Task, TaskDataError, iter_jsonl, require, src


def read_ai2(path: Path) -> list[Doc]:
    docs = []
    for lineno, obj in iter_jsonl(path):
        require(obj, {"question": dict, "answerKey": str}, path, lineno)
        q = obj["question"]
        require(q, {"stem": str, "choices": list}, path, lineno)
        choices = q["choices"]
        if len(choices) < 2:
            raise TaskDataError(path, lineno, f"need at least 2 choices, got {len(choices)}")
        for c in choices:
            if not isinstance(c, dict) or not isinstance(c.get("text"), str) or not isinstance(c.get("label"), str):
                raise TaskDataError(path, lineno, "each choice needs string 'text' and 'label'")
        labels = [c["label"] for c in choices]
        key = obj["answerKey"].strip()  # OpenBookQA keys may carry whitespace (lm-eval lstrips)
        if key not in labels:
            raise TaskDataError(path, lineno, f"answerKey {obj['answerKey']!r} is not one of the choice labels {labels}")
        docs.append(
            {
                "id": str(obj.get("id", lineno)),
                "question": {"stem": q["stem"], "choices": [{"text": c["text"], "label": c["label"]} for c in choices]},
                "answerKey": key,
                "_src": src(path, lineno),
            }
        )
    return docs


class _AI2(Task):
    def read(self, path: Path) -> list[Doc]:
        return read_ai2(path)

    def doc_to_choices(self, doc: Doc) -> list[str]:
        return [c["text"] for c in doc["question"]["choices"]]

    def doc_to_target(self, doc: Doc) -> int:
        return [c["label"] for c in doc["question"]["choices"]].index(doc["answerKey"])


class ARCEasy(_AI2):
    name = "arc_easy"
    default_file = "arc/ARC-Easy-Test.jsonl"
    default_fewshot_file = "arc/ARC-Easy-Dev.jsonl"

    def doc_to_text(self, doc: Doc) -> str:
        return f"Question: {doc['question']['stem']}\nAnswer:"


class ARCChallenge(ARCEasy):
    name = "arc_challenge"
    default_file = "arc/ARC-Challenge-Test.jsonl"
    default_fewshot_file = "arc/ARC-Challenge-Dev.jsonl"


class OpenBookQA(_AI2):
    name = "openbookqa"
    default_file = "openbookqa/test.jsonl"

    def doc_to_text(self, doc: Doc) -> str:
        return doc["question"]["stem"]
