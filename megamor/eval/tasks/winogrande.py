"""WinoGrande: `{"sentence" (one "_"), "option1", "option2", "answer"}` jsonl, with an optional
line-aligned X-labels.lst (used when "answer" is absent, checked against it when present).

Partial scoring (Trinh & Le; lm-eval's `winogrande`): the context is the sentence up to the
blank with an option filled in, the continuation is the rest of the sentence, which is the
same for both options, so the options are compared on the same tokens."""

from __future__ import annotations

from pathlib import Path

from .base import Doc, Task, TaskDataError, iter_jsonl, read_labels, require, src


def read_winogrande(path: Path) -> list[Doc]:
    rows = list(iter_jsonl(path))
    stem = Path(path).name.split(".jsonl")[0]
    lab_path = Path(path).with_name(f"{stem}-labels.lst")
    labels = read_labels(lab_path, ("1", "2")) if lab_path.is_file() else None
    if labels is not None and len(labels) != len(rows):
        raise TaskDataError(lab_path, None, f"{len(labels)} labels for {len(rows)} examples in {path}")
    docs = []
    for i, (lineno, obj) in enumerate(rows):
        require(obj, {"sentence": str, "option1": str, "option2": str}, path, lineno)
        if obj["sentence"].count("_") != 1:
            raise TaskDataError(path, lineno, "sentence must contain exactly one '_' blank")
        answer = obj.get("answer")
        if labels is not None:
            lab_line, lab = labels[i]
            if answer not in (None, "") and str(answer) != lab:
                raise TaskDataError(lab_path, lab_line, f"label {lab!r} disagrees with answer {answer!r} at {path}:{lineno}")
            answer = lab
        if str(answer) not in ("1", "2"):
            raise TaskDataError(path, lineno, f"answer must be '1' or '2', got {answer!r}")
        docs.append({**{k: obj[k] for k in ("sentence", "option1", "option2")}, "answer": str(answer), "_src": src(path, lineno)})
    return docs


class WinoGrande(Task):
    name = "winogrande"
    kind = "partial"
    metrics = ("acc",)
    default_file = "winogrande/dev.jsonl"

    def read(self, path: Path) -> list[Doc]:
        return read_winogrande(path)

    def doc_to_choices(self, doc: Doc) -> list[str]:
        idx = doc["sentence"].index("_")
        return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]

    def partial_continuation(self, doc: Doc) -> str:
        idx = doc["sentence"].index("_") + 1
        return doc["sentence"][idx:].strip()

    def doc_to_target(self, doc: Doc) -> int:
        return {"1": 0, "2": 1}[doc["answer"]]
