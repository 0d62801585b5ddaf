"""Offline evaluation sweeps over checkpoints x tasks, cached per (checkpoint, task).

    sweep = Sweep(SweepConfig(tasks=["hellaswag", "piqa"], limit=500, tokenizer="tok.model"),
                  out_dir="sweeps/s1")
    ckpts = discover(["runs/a", "runs/b", "extra.pt"])   # run folders: every checkpoint
    sweep.run(ckpts)                                     # only missing (checkpoint, task) pairs run
    sweep.report(ckpts)                                  # results.csv, results.md, plots/*.png

A cache entry is `cache/<checkpoint>/<task key>.json`; it is reused when the checkpoint's
fingerprint (path, sizes, mtimes) is unchanged, so a rerun loads no model and recomputes
nothing. Writes are atomic, so job-array tasks (one checkpoint each) can share the folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megamor.model.flops import flops_per_token
from megamor.runs.find import CheckpointInfo, describe, find_tokenizer, list_checkpoints, skipped_tags
from megamor.runs.layout import CheckpointError
from megamor.runs.load import load_model_and_meta
from megamor.utils.atomic import atomic_open

from .identity import check_identity
from .paper import ROUTINGS, column_values, suite_average
from .scoring import Scorer
from .tasks import get_task
from .tokenizer import load_tokenizer

FEWSHOT_METRICS = ("acc", "acc_norm", "acc_bytes", "perplexity")
PPL_METRICS = ("token_nll", "bits_per_byte", "word_perplexity")


@dataclass
class SweepConfig:
    tasks: list[str] = field(default_factory=lambda: ["hellaswag"])  # few-shot task names
    ppl: dict[str, str] = field(default_factory=dict)  # name -> text file, for perplexity
    ppl_split: str = "file"
    ppl_max_docs: int | None = None
    stride: int | None = None
    num_fewshot: int = 0
    limit: int | None = None
    seed: int = 1234
    tokenizer: str | None = None
    data_dir: str | None = None
    batch_size: int = 16
    max_batch_tokens: int | None = None
    max_length: int | None = None
    device: str | None = None
    dtype: str | None = None
    tokens_per_step: int | None = None  # x-axis "tokens" when checkpoints do not record it
    allow_tokenizer_mismatch: bool = False  # evaluate even with another tokenizer than the checkpoint's (megamor.eval.identity)
    mmlu_dir: str | None = None  # MMLU CSV folder (megamor.eval.tasks.mmlu); None: $MEGAMOR_MMLU_DIR, else mmlu/ in data_dir
    routing: str = "causal"  # "topk": each few-shot task also as "<task>@topk", top-k routing (non-causal, the paper's eval)

    @property
    def context(self) -> int | str:
        """The context in cache keys: results made at another default (the training seq_len, before) are not reused."""
        return self.max_length or "model.max_seq_len"

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        """(task id, everything that changes its numbers) for every evaluation."""
        out = []
        for t in self.tasks:
            spec = {"kind": "fewshot", "task": t, "k": self.num_fewshot, "limit": self.limit, "seed": self.seed, "data_dir": self.data_dir, "max_length": self.context, "dtype": self.dtype}
            if t == "mmlu":
                spec["mmlu_dir"] = str(Path(self.mmlu_dir).resolve()) if self.mmlu_dir else None
            out.append((t, spec))
            if self.routing == "topk":  # a key only when not causal: older caches stay valid
                out.append((f"{t}@topk", {**spec, "routing": "topk"}))
        for name, path in self.ppl.items():
            out.append((f"ppl:{name}", {"kind": "ppl", "path": str(Path(path).resolve()), "split": self.ppl_split, "max_docs": self.ppl_max_docs, "stride": self.stride, "max_length": self.context, "dtype": self.dtype}))
        return out


def item_key(task_id: str, spec: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task_id)}-{h}"


def discover(sources: Sequence[str | Path]) -> list[CheckpointInfo]:
    """Run folders (every checkpoint in each) and single checkpoints (files, export folders,
    DeepSpeed tags), in a stable order. A run folder's tags left out (no COMPLETE marker,
    damaged, quarantined) are named on stderr, one line each."""
    out: list[CheckpointInfo] = []
    for s in map(Path, sources):
        if not s.exists():
            raise CheckpointError(f"not found: {s}")
        info = describe(s, s.parent.parent.name if s.parent.name in ("checkpoints", "export", "exports") else s.parent.name)
        if info is None:  # a run folder: say which of its tags are not evaluated, and why
            for line in skipped_tags(s):
                print(f"sweep: skipping {line}", file=sys.stderr, flush=True)
        out.extend([info] if info is not None else list_checkpoints(s))
    seen: set[Path] = set()  # a checkpoint reached through two sources (a run folder given twice) is one row
    unique = []
    for ck in out:
        where = ck.path.resolve()
        if where not in seen:
            seen.add(where)
            unique.append(ck)
    return unique


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        f.write(text)


class Sweep:
    def __init__(self, cfg: SweepConfig, out_dir: str | Path):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.cache = self.out / "cache"
        self.computed = 0  # evaluations run by the last run()
        self.reused = 0
        self.models_loaded = 0

    def _entry(self, ck: CheckpointInfo, task_id: str, spec: dict) -> Path:
        ck_id = hashlib.sha256(str(ck.path.resolve()).encode()).hexdigest()[:10]
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{ck.run}-{ck.step if ck.step is not None else ck.path.stem}")
        return self.cache / f"{name}-{ck_id}" / f"{item_key(task_id, spec)}.json"

    def cached(self, ck: CheckpointInfo, task_id: str, spec: dict, fingerprint: str | None = None) -> dict | None:
        p = self._entry(ck, task_id, spec)
        if not p.is_file():
            return None
        rec = json.loads(p.read_text())
        return rec if rec.get("fingerprint") == (fingerprint or ck.fingerprint()) else None

    def run(self, checkpoints: Sequence[CheckpointInfo], progress: bool = True) -> None:
        self.computed = self.reused = self.models_loaded = 0
        for ck in checkpoints:
            fp = ck.fingerprint()
            todo = [(t, s) for t, s in self.cfg.items() if self.cached(ck, t, s, fp) is None]
            self.reused += len(self.cfg.items()) - len(todo)
            if not todo:
                continue
            self._evaluate(ck, fp, todo, progress)

    def _evaluate(self, ck: CheckpointInfo, fp: str, todo: list[tuple[str, dict]], progress: bool) -> None:
        from .cli import default_device
        from .harness import evaluate_task
        from .perplexity import perplexity_of_texts, read_texts

        device = default_device(self.cfg.device)
        model, meta = load_model_and_meta(ck, device=device)
        self.models_loaded += 1
        tok_path = self.cfg.tokenizer or find_tokenizer(ck)
        if tok_path is None:
            raise CheckpointError(f"{ck.path}: no tokenizer given and none stored beside the checkpoint")
        tok = load_tokenizer(tok_path)
        check_identity(meta, ck, tok, allow_mismatch=self.cfg.allow_tokenizer_mismatch)
        scorers = {r: Scorer(model, batch_size=self.cfg.batch_size, max_batch_tokens=self.cfg.max_batch_tokens, max_length=self.cfg.max_length,
                             device=device, dtype=self.cfg.dtype, pad_id=tok.eos_id, progress=progress, routing=r) for r in ROUTINGS}
        base = {"checkpoint": str(ck.path), "run": ck.run, "step": meta.get("step", ck.step), "fingerprint": fp,
                "tokens": meta.get("tokens"), "flops": meta.get("flops"), "train_flops_per_token": _train_flops_per_token(model)}
        for task_id, spec in todo:
            t0 = time.perf_counter()
            if spec["kind"] == "fewshot":
                task = get_task(spec["task"], path=spec.get("mmlu_dir"))
                r = evaluate_task(scorers[spec.get("routing", "causal")], tok, task, num_fewshot=spec["k"], seed=spec["seed"], limit=spec["limit"],
                                  data_dir=Path(spec["data_dir"]) if spec["data_dir"] else None)
                metrics, n = r.metrics, r.n
            else:
                docs = read_texts([spec["path"]], split=spec["split"])[: spec["max_docs"]]
                res = perplexity_of_texts(scorers["causal"], tok, docs, stride=spec["stride"]).to_dict()
                metrics = {m: res[m] for m in PPL_METRICS if m in res}
                n = res["tokens"]
            rec = {**base, "task": task_id, "spec": spec, "n": n, "metrics": metrics, "seconds": time.perf_counter() - t0}
            _atomic_write(self._entry(ck, task_id, spec), json.dumps(rec, indent=2, default=str))
            self.computed += 1

    # -- report ---------------------------------------------------------------------------
    def rows(self, checkpoints: Sequence[CheckpointInfo]) -> tuple[list[dict], list[str]]:
        rows, missing = [], []
        for ck in checkpoints:
            fp = ck.fingerprint()
            for task_id, spec in self.cfg.items():
                rec = self.cached(ck, task_id, spec, fp)
                if rec is None:
                    missing.append(f"{ck.name} x {task_id}")
                    continue
                tokens = rec.get("tokens")
                if tokens is None and self.cfg.tokens_per_step and rec.get("step") is not None:
                    tokens = rec["step"] * self.cfg.tokens_per_step
                flops = rec.get("flops")
                if flops is None and tokens is not None and rec.get("train_flops_per_token"):
                    flops = tokens * rec["train_flops_per_token"]
                for m, v in rec["metrics"].items():
                    if m.endswith("_stderr"):
                        continue
                    rows.append({"run": rec["run"], "step": rec["step"], "tokens": tokens, "flops": flops, "task": task_id, "metric": m,
                                 "value": v, "stderr": rec["metrics"].get(m + "_stderr"), "n": rec["n"], "checkpoint": rec["checkpoint"]})
        return rows + average_rows(rows), missing

    def report(self, checkpoints: Sequence[CheckpointInfo], plots: bool = True) -> dict[str, Any]:
        rows, missing = self.rows(checkpoints)
        self.out.mkdir(parents=True, exist_ok=True)
        cols = ["run", "step", "tokens", "flops", "task", "metric", "value", "stderr", "n", "checkpoint"]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        _atomic_write(self.out / "results.csv", buf.getvalue())  # a reader never sees half a table
        _atomic_write(self.out / "results.md", markdown_pivot(rows))
        pngs = write_plots(rows, self.out / "plots") if plots and rows else []
        return {"rows": len(rows), "missing": missing, "csv": str(self.out / "results.csv"), "md": str(self.out / "results.md"), "plots": [str(p) for p in pngs]}


def average_rows(rows: list[dict]) -> list[dict]:
    """Per checkpoint and routing with two or more few-shot tasks, a "fewshot_avg" row (metric "avg"):
    the mean over the tasks of each one's headline metric (megamor.eval.paper), ARC-Easy and
    ARC-Challenge as one column (the paper's average when the tasks are the paper suite)."""
    groups: dict[tuple, dict[str, dict[str, float]]] = {}
    first: dict[tuple, dict] = {}
    for r in rows:
        if r["task"].startswith("ppl:"):
            continue
        task, _, routing = r["task"].partition("@")
        key = (r["run"], r["step"], r["checkpoint"], routing)
        groups.setdefault(key, {}).setdefault(task, {})[r["metric"]] = r["value"]
        first.setdefault(key, r)
    out = []
    for key, per in groups.items():
        if len(per) < 2:
            continue
        vals = {t: v["value"] for t, v in column_values(per).items()}
        r = first[key]
        out.append({**r, "task": "fewshot_avg" + (f"@{key[3]}" if key[3] else ""), "metric": "avg", "value": suite_average(vals),
                    "stderr": None, "n": None})
    return out


def _train_flops_per_token(model) -> float | None:
    """Training FLOPs per token (3x forward, megamor's exact count, not the paper's) at the model's context length."""
    try:
        return 3.0 * flops_per_token(model.cfg, model.cfg.max_seq_len)
    except Exception:  # noqa: BLE001  optional metadata: a model the FLOP counter cannot describe gets None
        return None


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_pivot(rows: list[dict]) -> str:
    """One row per checkpoint, one column per task/metric."""
    cols = sorted({(r["task"], r["metric"]) for r in rows})
    keys = sorted({(r["run"], r["step"] if r["step"] is not None else -1, r["checkpoint"]) for r in rows})
    val = {(r["run"], r["step"] if r["step"] is not None else -1, r["checkpoint"], r["task"], r["metric"]): r["value"] for r in rows}
    head = "| run | step | " + " | ".join(f"{t} {m}" for t, m in cols) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(cols)]
    for run, step, ck in keys:
        lines.append(f"| {run} | {step if step >= 0 else ''} | " + " | ".join(_fmt(val.get((run, step, ck, t, m))) for t, m in cols) + " |")
    return "\n".join(lines) + "\n"


def write_plots(rows: list[dict], folder: Path) -> list[Path]:
    """One PNG per (task, metric): the metric against step, tokens and FLOPs, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for task, metric in sorted({(r["task"], r["metric"]) for r in rows}):
        sel = [r for r in rows if r["task"] == task and r["metric"] == metric]
        axes_x = [x for x in ("step", "tokens", "flops") if any(r[x] is not None for r in sel)]
        if not axes_x:
            continue
        fig, axes = plt.subplots(1, len(axes_x), figsize=(4.5 * len(axes_x), 3.4), squeeze=False)
        for ax, x in zip(axes[0], axes_x):
            for run in sorted({r["run"] for r in sel}):
                pts = sorted((r[x], r["value"], r["stderr"]) for r in sel if r["run"] == run and r[x] is not None)
                if not pts:
                    continue
                xs, ys, es = zip(*pts)
                ax.plot(xs, ys, marker="o", label=run)
                if all(e is not None and not math.isnan(e) for e in es):
                    ax.fill_between(xs, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)], alpha=0.15)
            ax.set_xlabel({"step": "step", "tokens": "tokens", "flops": "training FLOPs"}[x])
            if x == "flops":
                ax.set_xscale("log")
            elif x == "tokens":
                ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{task} {metric}")
        fig.tight_layout()
        p = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}_{metric}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        out.append(p)
    return out


def config_to_json(cfg: SweepConfig) -> str:
    return json.dumps(asdict(cfg), indent=2)
