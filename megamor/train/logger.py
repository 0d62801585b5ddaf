"""Where metrics go (rank 0 only): the console (a progress bar on terminals), metrics.jsonl
in the run folder (one JSON object per logged step or evaluation), W&B, and the optional sinks
(`Sink`: TensorBoard, the depth-histogram CSV).

W&B runs online, offline (files under run_dir/wandb, `wandb sync` later) or disabled. The run
id is created once and kept in run_dir/wandb_id (and in every checkpoint), so a resumed run
continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from megamor.runs.layout import METRICS_FILE
from megamor.train.config import ExperimentConfig
from megamor.train.wandb_setup import init_run
from megamor.utils.atomic import atomic_open

WANDB_ID_FILE = "wandb_id"


def wandb_run_id(run_dir: Path, from_checkpoint: str | None) -> str:
    path = run_dir / WANDB_ID_FILE
    if from_checkpoint:
        run_id = from_checkpoint
    elif path.is_file() and path.read_text().strip():
        run_id = path.read_text().strip()
    else:
        import secrets

        run_id = secrets.token_hex(4)
    if not path.is_file() or path.read_text().strip() != run_id:
        with atomic_open(path, "w") as f:
            f.write(run_id + "\n")
    return run_id


def cut_back_metrics(path: Path, step: int) -> int:
    """Drop the rows of steps after `step` (the checkpoint this run resumes from; 0 for a fresh
    start): those steps are about to be run again, and a plot must not show them twice. A torn
    last line (a killed writer) goes too. Atomic; returns the number of rows dropped."""
    if not path.is_file():
        return 0
    keep: list[str] = []
    dropped = 0
    with open(path) as f:
        for line in f:
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if row_step <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with atomic_open(path, "w") as f:
            f.writelines(keep)
    return dropped


def _fmt_si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


TIME_LABELS = (("data", "data"), ("forward", "fwd"), ("backward", "bwd"), ("optimizer", "opt"),
               ("checkpoint", "ckpt"), ("eval", "eval"), ("other", "other"))


def format_times(m: dict[str, Any]) -> str:
    """`1.23s/step (data 0.01 fwd 0.30 bwd 0.60 opt 0.10 other 0.22)`: the phases that took time,
    then the slowest rank when it is 10% behind the median."""
    phases = " ".join(f"{label} {m[f'time/{k}']:.2f}" for k, label in TIME_LABELS if m.get(f"time/{k}", 0.0) >= 0.005)
    text = f"{m['time/step']:.2f}s/step" + (f" ({phases})" if phases else "")
    if m.get("time/straggler_ratio", 1.0) > 1.1:
        text += f" slowest rank {m['time/straggler_rank']} x{m['time/straggler_ratio']:.2f}"
    return text


def format_line(step: int, max_steps: int, m: dict[str, Any]) -> str:
    parts = [f"step {step}/{max_steps}"]
    if "train/loss" in m:
        parts.append(f"loss {m['train/loss']:.4f}")
    if "train/lr" in m:
        parts.append(f"lr {m['train/lr']:.2e}")
    if m.get("train/grad_norm") is not None:
        parts.append(f"gnorm {m['train/grad_norm']:.3f}")
    if "perf/tokens_per_s" in m:
        parts.append(f"{_fmt_si(m['perf/tokens_per_s'])} tok/s")
    if m.get("perf/mfu") is not None:
        parts.append(f"MFU {100 * min(m['perf/mfu'], 1.0):.1f}%")  # PeakFlops clamps already; never print more
    if "time/step" in m:
        parts.append(format_times(m))
    if "router/mean_depth" in m:
        sel = "/".join(f"{m[k]:.2f}" for k in sorted(m) if k.startswith("router/selected_frac_r"))
        parts.append(f"depth {m['router/mean_depth']:.2f} (sel {sel})")
    if m.get("train/skipped_steps"):
        parts.append(f"skipped {m['train/skipped_steps']}")
    if "perf/peak_mem_gb" in m:
        parts.append(f"mem {m['perf/peak_mem_gb']:.2f}GB")
    return " | ".join(parts)


class Sink(Protocol):
    """An optional metrics destination (rank 0), told every step and every logged window."""

    def on_step(self, step: int, depth_hist: torch.Tensor | None) -> None: ...

    def log(self, step: int, metrics: dict[str, Any], histograms: dict[str, tuple[list, list]] | None = None) -> None: ...

    def close(self) -> None: ...


def build_sinks(cfg: ExperimentConfig, run_dir: Path, start_step: int) -> list[Sink]:
    sinks: list[Sink] = []
    if cfg.logging.tensorboard:
        from megamor.train.tensorboard_sink import TensorBoardSink

        sinks.append(TensorBoardSink(run_dir, start_step))
    csv_path = cfg.logging.depth_hist_path(run_dir)
    if csv_path is not None:
        from megamor.runs.depth_csv import DepthCsvSink

        sinks.append(DepthCsvSink(csv_path, lambda step: cfg.logging.depth_hist_due(step, cfg.max_steps), start_step))
    return sinks


class RunLogger:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, enabled: bool, start_step: int, wandb_id: str | None,
                 config_dict: dict[str, Any]):
        self.enabled = enabled
        self.max_steps = cfg.max_steps
        self.wandb = None
        self.bar = None
        self.jsonl = None
        self.sinks: list[Sink] = []
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        cut_back_metrics(run_dir / METRICS_FILE, start_step)
        # appended to for the whole run; closed in close()
        self.jsonl = open(run_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115
        if cfg.logging.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.max_steps, initial=start_step, dynamic_ncols=True, desc=cfg.name)
        mode = cfg.wandb.resolved_mode()
        if mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = init_run(
                mode,
                cfg.wandb.init_timeout,
                self.print,
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=cfg.wandb.name or cfg.name,
                group=cfg.wandb.group,
                tags=list(cfg.wandb.tags) or None,
                id=wandb_id,
                resume="allow",
                dir=str(run_dir),
                config=config_dict,
            )
        self.sinks = build_sinks(cfg, run_dir, start_step)

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self.wandb, "dir", None) if self.wandb is not None else None

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def on_step(self, step: int, depth_hist: torch.Tensor | None) -> None:
        """After every optimizer step (depth_hist None when skipped or without routing)."""
        for sink in self.sinks:
            sink.on_step(step, depth_hist)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log(self, step: int, metrics: dict[str, Any], histograms: dict[str, tuple[list, list]] | None = None,
            console: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), **clean}
        if histograms:
            record.update({f"{k}/counts": list(c) for k, (c, _) in histograms.items()})
        assert self.jsonl is not None
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            import numpy as np
            import wandb

            payload: dict[str, Any] = {k: v for k, v in metrics.items() if v is not None}
            for k, (counts, edges) in (histograms or {}).items():
                payload[k] = wandb.Histogram(np_histogram=(np.asarray(counts, dtype=float), np.asarray(edges, dtype=float)))
            self.wandb.log(payload, step=step)
        for sink in self.sinks:
            sink.log(step, metrics, histograms)
        if console and any(k.startswith("train/") for k in metrics):
            self.print(format_line(step, self.max_steps, metrics))
        elif console:
            self.print(f"step {step}: " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in metrics.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
