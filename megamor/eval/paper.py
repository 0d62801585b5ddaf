"""The paper's few-shot table (MoR, arXiv 2507.10524, as its released eval computes it).

Six columns, zero-shot, full sets: LAMBADA, HellaSwag, PIQA, WinoGrande, ARC and MMLU
(continuation form). ARC is one column, the mean of ARC-Easy and ARC-Challenge, so the
average counts it once. Each column's metric (PAPER_METRICS) is the released eval's:
byte-length normalised accuracy (`acc_bytes`) except LAMBADA (greedy `acc` of the last
word), WinoGrande (partial-scoring `acc`) and MMLU (unnormalised `acc`).

    summary = paper_summary(results)   # results: {task name: TaskResult or its metrics dict}
    summary["average"], summary["columns"]["arc"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# How expert-choice routing picks tokens at evaluation (Scorer's `routing`). causal (the default):
# each token's depth from its own prefix (a threshold on the router), as decoding does. topk:
# training's top-k over the whole sequence, as the paper's released eval ran it: NON-CAUSAL (a
# token's depth depends on later tokens, the scored continuation's included). Other routers are
# causal either way.
ROUTINGS = ("causal", "topk")


def routing_label(routing: str) -> str:
    return "topk (non-causal, as the paper's eval)" if routing == "topk" else routing


PAPER_METRICS: dict[str, str] = {
    "lambada": "acc", "hellaswag": "acc_bytes", "piqa": "acc_bytes", "winogrande": "acc",
    "arc_easy": "acc_bytes", "arc_challenge": "acc_bytes", "mmlu": "acc",
}
# column -> the tasks it averages
PAPER_COLUMNS: dict[str, tuple[str, ...]] = {
    "lambada": ("lambada",), "hellaswag": ("hellaswag",), "piqa": ("piqa",), "winogrande": ("winogrande",),
    "arc": ("arc_easy", "arc_challenge"), "mmlu": ("mmlu",),
}


def headline_metric(task: str, metrics: Mapping[str, float]) -> str:
    """The metric a task's column uses: the paper's where it names one, else byte-normalised
    accuracy where the task has it, else accuracy."""
    if task in PAPER_METRICS and PAPER_METRICS[task] in metrics:
        return PAPER_METRICS[task]
    return next(m for m in ("acc_bytes", "acc_norm", "acc") if m in metrics)


def _metrics(r: Any) -> Mapping[str, float]:
    return r.metrics if hasattr(r, "metrics") else r


def column_values(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: {metric, value}, the value of its headline metric."""
    out = {}
    for name, r in results.items():
        m = _metrics(r)
        metric = headline_metric(name, m)
        out[name] = {"metric": metric, "value": float(m[metric])}
    return out


def suite_average(values: Mapping[str, float]) -> float:
    """Mean over columns of the tasks present: ARC-Easy and ARC-Challenge fold into one ARC column
    (their mean) when both are there; any other task is its own column. NaN when empty."""
    cols: list[float] = []
    used: set[str] = set()
    for tasks in PAPER_COLUMNS.values():
        if len(tasks) > 1 and all(t in values for t in tasks):
            cols.append(sum(values[t] for t in tasks) / len(tasks))
            used.update(tasks)
    cols += [v for t, v in values.items() if t not in used]
    return sum(cols) / len(cols) if cols else math.nan


def paper_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The paper's columns (those whose tasks are all present), each with its metric, and the
    average over them ("complete": all six present)."""
    per = column_values(results)
    cols = {}
    for col, tasks in PAPER_COLUMNS.items():
        if all(t in per for t in tasks):
            cols[col] = {"metric": "/".join(sorted({per[t]["metric"] for t in tasks})), "tasks": list(tasks),
                         "value": sum(per[t]["value"] for t in tasks) / len(tasks)}
    avg = sum(c["value"] for c in cols.values()) / len(cols) if cols else math.nan
    return {"columns": cols, "average": avg, "complete": len(cols) == len(PAPER_COLUMNS)}


def paper_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table: one row per labelled summary (e.g. causal, top-k), one column per paper column."""
    cols = [c for c in PAPER_COLUMNS if any(c in s["columns"] for s in summaries.values())]
    head = "| routing | " + " | ".join(cols) + " | average |"
    metric = "| metric | " + " | ".join(next(s["columns"][c]["metric"] for s in summaries.values() if c in s["columns"]) for c in cols) + " | |"
    lines = [head, "|---|" + "---:|" * (len(cols) + 1), metric]
    for label, s in summaries.items():
        vals = [f"{100 * s['columns'][c]['value']:.2f}" if c in s["columns"] else "" for c in cols]
        lines.append(f"| {label} | " + " | ".join(vals) + f" | {100 * s['average']:.2f} |")
    return "\n".join(lines) + "\n"
