"""One study run: train (a real `python -m megamor.train` process, resumed from its newest
checkpoint when rerun), evaluate, and write `study_result.json` atomically, with a copy kept
beside the report (megamor.study.archive). A run with either file is done: nothing is
recomputed, even when its run folder is gone. The run folder records what it is trained with
(RUN/study_identity.json, written before training starts; the `identity` of study_result.json)
and run_one first checks that against the run the study would train now (archive.check): a
changed study is a configuration error naming the file, never a silent reuse."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megamor.env import pythonpath_with_repo
from megamor.parallel.launch import torchrun_command
from megamor.parallel.orphan import child_follows_parent
from megamor.runs.load import load_model_from_run
from megamor.runs.tags import newest_complete
from megamor.study import archive
from megamor.study.config import StudyConfig
from megamor.study.data import data_paths
from megamor.study.evaluate import depth_analysis, fewshot, validation
from megamor.study.plan import RunSpec
from megamor.train.config import load_experiment
from megamor.utils.atomic import write_json

STUDY_LOCK = "study.lock"  # held by the study process training/evaluating the run (megamor.train.runlock)


class RunFailed(RuntimeError):
    def __init__(self, run: RunSpec, rc: int):
        self.rc = rc
        super().__init__(f"run {run.name}: megamor.train exited with {rc}; rerun the study to resume it")


def is_done(run: RunSpec) -> bool:
    return run.result_path.is_file() or run.kept_path.is_file()


def is_trained(run: RunSpec) -> bool:
    ref = newest_complete(run.run_dir)
    return ref is not None and ref.step >= run.budget.steps


def train_command(study: StudyConfig, run: RunSpec) -> list[str]:
    args = ["--config", str(run.config), *run.overrides]
    if study.nproc > 1:
        return torchrun_command(study.nproc, args, log_dir=run.run_dir / "torchrun-logs")
    return [sys.executable, "-m", "megamor.train", *args]


def train(study: StudyConfig, run: RunSpec) -> float:
    """Train (or resume) until the run's final checkpoint exists; seconds spent."""
    if is_trained(run):
        return 0.0
    cmd = train_command(study, run)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    print(f"\n== {run.name}: {run.budget.steps} steps, {run.budget.tokens:,} tokens, {run.budget.flops:.3e} FLOPs\n$ "
          + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    # In the study's own folder: its relative paths (out_dir, the runs' run_dir=) mean the same to
    # the trainer; megamor importable from there even when it is not installed.
    proc = subprocess.Popen(cmd, cwd=Path.cwd(), env={**os.environ, "PYTHONPATH": pythonpath_with_repo()},
                            preexec_fn=child_follows_parent())  # no orphan trainer
    with _stops_passed_to(proc):
        rc = proc.wait()
    if rc != 0 or not is_trained(run):
        raise RunFailed(run, rc or 1)
    return time.time() - t0


@contextlib.contextmanager
def _stops_passed_to(proc: subprocess.Popen) -> Iterator[None]:
    """While the trainer runs, a stop signal to the study (slurm/study.sbatch passes SLURM's USR1
    on to it) goes to the trainer, which saves and exits 75; the study then exits 75 too
    (RunFailed) instead of dying by the signal. SIGINT goes on as SIGTERM: a Ctrl-C reaches the
    trainer by itself, and a second SIGINT would make it abandon its save."""
    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def metrics_records(run: RunSpec) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows (a line cut by a kill is skipped)."""
    path = run.run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def logged_curve(run: RunSpec, key: str) -> list[list[float]]:
    """[FLOPs, value] at every validation the trainer logged `key` (FLOPs in the budget's count)."""
    out = {int(r["step"]): float(r[key]) for r in metrics_records(run) if r.get(key) is not None}  # null: not defined
    per_step = run.budget.flops / run.budget.steps
    return [[s * per_step, v] for s, v in sorted(out.items())]


def val_curve(run: RunSpec) -> list[list[float]]:
    return logged_curve(run, "val/loss")


def corr_curve(run: RunSpec) -> list[list[float]]:
    """The trainer's validation corr(depth, loss) over the run (Pearson, causal routing; routed
    models only): whether depth follows difficulty more as training goes on."""
    return logged_curve(run, "val/corr_depth_loss")


def router_health_over_run(run: RunSpec) -> dict[str, Any]:
    """Training-time router health from the logged rows (expert choice only): the largest
    |logit| of any routed step over the whole run, and the share of saturated gates (worst
    step) at the last logged row."""
    prefix = "train/router_health/"
    rows = [r for r in metrics_records(run) if any(k.startswith(prefix) for k in r)]
    if not rows:
        return {}
    def worst(row: dict[str, Any], stat: str) -> float:
        return max(float(v) for k, v in row.items() if k.startswith(prefix) and k.endswith("/" + stat))
    series = [[int(r["step"]), worst(r, "logit_max_abs")] for r in rows]
    return {"router_max_abs_logit_run": max(v for _, v in series), "router_max_abs_logit_series": series,
            "router_saturated_final": worst(rows[-1], "saturated")}


def gate_scales(model: Any) -> list[float] | None:
    """The learned gate scale of each recursion step (router.learn_alpha), else None."""
    routers = getattr(model, "routers", None)
    if routers is None or any(getattr(r, "scale", None) is None for r in routers):
        return None
    return [float(r.scale.alpha.detach()) for r in routers]


def causal_thresholds(model: Any) -> list[float] | None:
    """Each routed expert-choice step's causal threshold (a logit; learned or fixed), else None."""
    routers = getattr(model, "routers", None)
    if routers is None:
        return None
    return [float(r.threshold) for r, c in zip(routers, model.cfg.capacities) if c < 1.0]


def evaluate_run(study: StudyConfig, run: RunSpec, train_seconds: float) -> dict[str, Any]:
    torch.manual_seed(run.seed)
    exp = load_experiment([run.config], run.overrides)
    model, _ = load_model_from_run(run.run_dir)
    t0 = time.time()
    res: dict[str, Any] = {
        "run": run.name, "variant": run.variant, "seed": run.seed, "budget": run.budget_name, "steps": run.budget.steps,
        "tokens": run.budget.tokens, "flops": run.budget.flops, "flops_convention": study.flops.convention,
        # flops (the budget) and budget_flops_per_token are in the study's convention and count;
        # flops_per_token is the forward FLOPs the hardware runs (exact), as MFU counts them
        "flops_per_token": run.forward_flops_per_token, "budget_flops_per_token": run.budget.flops_per_token,
        "params": model.num_params(), "params_non_embedding": model.num_params(non_embedding=True),
        "num_recursions": model.cfg.num_recursions, "router": model.cfg.router.type, "kv_mode": model.cfg.kv_mode,
        "train_seconds": train_seconds,
    }
    val, trace = validation(model, exp, study.eval)
    res.update(val)
    res.update(depth_analysis(trace, run.run_dir / "depth" if study.eval.depth_plots else None))
    res.update(fewshot(model, Path(exp.data.tokenizer or ""), study.eval))
    res["gate_scales"] = gate_scales(model)
    res["causal_thresholds"] = causal_thresholds(model)
    res["val_curve"] = val_curve(run)
    res["corr_curve"] = corr_curve(run)
    res.update(router_health_over_run(run))
    res["eval_seconds"] = time.time() - t0
    return res


def load_result(run: RunSpec) -> dict[str, Any]:
    """A finished run's result: its run folder's, else the copy kept beside the report. Fields
    added since it was written that come from its logs (router health over the run) are filled
    in from the run folder, nothing is recomputed."""
    if not run.result_path.is_file():
        kept = archive.load(run)
        if kept is None:
            raise FileNotFoundError(f"run {run.name} has no result ({run.result_path} or {run.kept_path})")
        kept.setdefault("budget", run.budget_name)
        return kept
    res = json.loads(run.result_path.read_text())
    res.pop("identity", None)  # what the result was made for (archive.check), not part of it
    res.setdefault("budget", run.budget_name)  # results written before studies had several budgets
    if "router_max_abs_logit_series" not in res:
        res.update(router_health_over_run(run))
    if "corr_curve" not in res:
        res["corr_curve"] = corr_curve(run)
    if ("gate_scales" not in res or "causal_thresholds" not in res) and res.get("router") == "expert_choice":
        model = load_model_from_run(run.run_dir)[0]  # the final checkpoint (weights only), nothing recomputed
        res.setdefault("gate_scales", gate_scales(model))
        res.setdefault("causal_thresholds", causal_thresholds(model))
    return res


def run_one(study: StudyConfig, run: RunSpec) -> dict[str, Any]:
    shards, tokenizer = data_paths(study)
    archive.check(run, tokenizer, study, shards)  # a result or checkpoint made for another run: ConfigError
    if is_done(run):
        res = load_result(run)
        if run.result_path.is_file() and archive.load(run) != res:  # kept first, or fields added since
            archive.save(run, res, tokenizer, study, shards)
        return res
    archive.write_run_identity(run, tokenizer, study, shards)  # before training: the checkpoints' identity
    seconds = train(study, run)
    res = evaluate_run(study, run, seconds)
    write_json(run.result_path, {**res, "identity": archive.identity(run, tokenizer, study, shards)})
    kept = archive.save(run, res, tokenizer, study, shards)
    print(f"== {run.name}: val loss {res['val_loss']:.4f} (causal {res['val_loss_causal']:.4f}) -> {run.result_path}, "
          f"{kept}", flush=True)
    return res
