"""The console (rank 0): the print path every part of the run writes through (`trainer.console.print`;
a progress bar on terminals, `logging.progress_bar`, which prints go around), and one line per
metrics record: the training line (loss, lr, throughput, phase times, depth, memory) or the
evaluation's `step N: key value | ...`."""

from __future__ import annotations

import sys
from typing import Any

from megamor.train.callbacks.base import Callback


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
        text = f"{_fmt_si(m['perf/tokens_per_s'])} tok/s"
        wall = m.get("perf/wall_tokens_per_s")
        if wall is not None and wall < 0.95 * m["perf/tokens_per_s"]:  # the s/step below is wall time: say both
            text += f" (wall {_fmt_si(wall)})"
        parts.append(text)
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


def format_record(step: int, max_steps: int, metrics: dict[str, Any]) -> str:
    if any(k.startswith("train/") for k in metrics):
        return format_line(step, max_steps, metrics)
    return f"step {step}: " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in metrics.items())


class Console(Callback):
    def __init__(self) -> None:
        self.bar: Any = None

    def setup(self) -> None:
        t = self.trainer
        if t.is_main and t.cfg.logging.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=t.max_steps, initial=t.step, dynamic_ncols=True, desc=t.cfg.name)

    def print(self, text: str) -> None:
        if not self.trainer.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def after_step(self, step: int, result: Any) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log_metrics(self, step: int, metrics: dict[str, Any], histograms: dict[str, tuple[list, list]] | None) -> None:
        self.print(format_record(step, self.trainer.max_steps, metrics))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
