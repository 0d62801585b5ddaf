"""Throughput over a grid of sequence lengths and batch sizes: tokens/s, ms/token and peak memory.

    rows = throughput_grid({"MoR": model, "routing off": dense}, [128, 256], [1, 4], mode="train")
    write_grid_csv(rows, "evals/results/model_grid.csv")

Each cell times `repeats` calls after one warm-up and keeps the median (wall and CPU seconds;
CPU seconds are the steadier figure on a shared machine). Peak memory is what the step adds on
top of what was resident before it: on CUDA `max_memory_allocated`, on CPU the process's
resident-set high-water mark (Linux `VmHWM`, reset through `/proc/self/clear_refs` before each
measurement, after `malloc_trim` has returned the memory earlier cells freed: otherwise a later
model would reuse it and show no peak), so both are measured, not modelled. Every model of a cell runs the same input, and each
row carries its ratio to the first model (the baseline measured in the same run).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from megamor.utils.atomic import atomic_open

MODES = ("train", "forward")


@dataclass
class GridRow:
    model: str
    mode: str
    seq_len: int
    batch: int
    tokens_per_s: float  # from wall time
    ms_per_token: float  # wall
    cpu_ms_per_token: float  # process CPU time: steadier when the machine is shared
    peak_mem_mb: float  # added over the resident baseline during one step
    peak_mem_source: str  # cuda_max_allocated | cpu_rss_high_water
    vs_baseline: float  # this model's tokens/s over the grid's first model's, same cell


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _trim_heap() -> None:
    """Hand memory the allocator keeps after frees back to the OS (glibc), so RSS counts live memory."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the baseline then includes retained memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak_bytes(device: torch.device, fn: Callable[[], None]) -> tuple[float, str]:
    """Bytes `fn` adds at its peak over what was in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda_max_allocated"
    _trim_heap()
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    fn()
    return max(0, _status_bytes("VmHWM") - before), "cpu_rss_high_water"


def _median_times(fn: Callable[[], None], repeats: int, device: torch.device) -> tuple[float, float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    wall, cpu = [], []
    for _ in range(repeats):
        sync()
        w, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def _step(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "train":
        def run() -> None:
            model.zero_grad(set_to_none=True)
            out = model(x, targets=x, return_logits=False)
            (out.loss + out.aux_loss).backward()
    else:
        def run() -> None:
            with torch.no_grad():
                model(x, targets=x, return_logits=False)
    return run


def throughput_grid(models: Mapping[str, nn.Module], seq_lens: Sequence[int], batch_sizes: Sequence[int], *,
                    mode: str = "train", repeats: int = 3, vocab_size: int | None = None,
                    seed: int = 0) -> list[GridRow]:
    """Time every model on every (seq_len, batch) cell; the first model is the baseline."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not models or not seq_lens or not batch_sizes or repeats < 1:
        raise ValueError("throughput_grid needs at least one model, sequence length, batch size and repeat")
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    vocab = vocab_size or first.cfg.vocab_size
    rows: list[GridRow] = []
    for seq_len in seq_lens:
        for batch in batch_sizes:
            x = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
            cell: list[GridRow] = []
            for name, model in models.items():
                model.train(mode == "train")
                run = _step(model, x, mode)
                peak, source = _peak_bytes(device, run)  # doubles as the warm-up
                wall, cpu = _median_times(run, repeats, device)
                n = batch * seq_len
                cell.append(GridRow(name, mode, seq_len, batch, n / wall, 1e3 * wall / n, 1e3 * cpu / n,
                                    peak / 2**20, source, 1.0))
            for row in cell:
                row.vs_baseline = row.tokens_per_s / cell[0].tokens_per_s
            rows += cell
    return rows


def write_grid_csv(rows: Sequence[GridRow], path: str | os.PathLike) -> Path:
    """Write the rows as CSV, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", durable=False) as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(GridRow)], lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(row).items()})
    return path


def grid_markdown(rows: Sequence[GridRow]) -> str:
    lines = ["| model | mode | seq | batch | tokens/s | ms/token | CPU ms/token | peak MiB | vs baseline |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.mode} | {r.seq_len} | {r.batch} | {r.tokens_per_s:.0f} | "
                     f"{r.ms_per_token:.3f} | {r.cpu_ms_per_token:.3f} | {r.peak_mem_mb:.1f} | {r.vs_baseline:.2f}x |")
    return "\n".join(lines)
