"""Training metrics: MoR-aware FLOPs, MFU/HFU, throughput, memory, router statistics.

FLOPs are counted from what actually ran: each micro-batch's per-recursion token counts
(`out.stats.routed`, kept on the device and read once per optimizer step by `step_flops`) go
through the model's `forward_flops`, so a recursion step costs only for the tokens routed to it. Training = 3 x forward (MFU, useful work); with
activation recomputation the hardware also redoes the forward: 4 x (HFU).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megamor.data.atomic import write_json
from megamor.model.config import ModelConfig
from megamor.model.flops import forward_flops

# Dense bf16 peak per device (TFLOP/s), by substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "V100": 125.0,
}


def batch_forward_flops(cfg: ModelConfig, batch: int, seq_len: int, tokens_per_step: list[int]) -> float:
    """Forward FLOPs of a micro-batch, from the tokens (whole batch) that ran each step."""
    if not tokens_per_step:
        return batch * forward_flops(cfg, seq_len, [])
    per_seq = [n / batch for n in tokens_per_step]
    return batch * forward_flops(cfg, seq_len, per_seq)


def step_flops(cfg: ModelConfig, shapes: list[tuple[int, int]], routed: list[torch.Tensor]) -> float:
    """Training FLOPs (3 x forward) of an optimizer step's micro-batches: shapes [(B, T)] and
    each micro-batch's routed counts [N_r] (device tensors; empty list without recursion),
    read from the device in one transfer."""
    counts = torch.stack(routed).tolist() if routed else [[] for _ in shapes]
    return sum(3.0 * batch_forward_flops(cfg, B, T, n) for (B, T), n in zip(shapes, counts))


def measure_cpu_tflops(dtype: torch.dtype = torch.float32, n: int = 1024, trials: int = 3, reps: int = 3) -> float:
    """This machine's matmul rate with the current thread count, best of a few trials: the
    CPU stand-in for a datasheet peak (so CPU MFU reads "share of what matmul achieves here")."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best / 1e12


PEAK_CACHE_FILE = "peak_tflops.json"


def cache_dir() -> Path:
    """$MEGAMOR_CACHE_DIR, else $XDG_CACHE_HOME/megamor, else ~/.cache/megamor."""
    if os.environ.get("MEGAMOR_CACHE_DIR"):
        return Path(os.environ["MEGAMOR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megamor"


def cpu_peak_key(precision: str) -> str:
    """What the measured CPU matmul rate depends on: CPU model, cores, threads, torch, precision."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model} | {os.cpu_count()} cores | {torch.get_num_threads()} threads | torch {torch.__version__} | "
            f"{precision}")


def cached_cpu_tflops(precision: str, folder: Path | None = None) -> float:
    """The CPU peak for MFU, measured once per machine (and thread count, torch version,
    precision) and kept in peak_tflops.json: a re-measured peak moved MFU by half from run to
    run. Delete the entry (or the file) to measure again."""
    path = (folder or cache_dir()) / PEAK_CACHE_FILE
    key = cpu_peak_key(precision)
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):  # missing or unreadable: measure and rewrite
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("tflops"), (int, float)) and entry["tflops"] > 0:
        return float(entry["tflops"])
    tf = measure_cpu_tflops(torch.bfloat16 if precision == "bf16" else torch.float32, trials=7)
    cache[key] = {"tflops": tf, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, cache)
    except OSError:  # a read-only home: the figure is still right for this run
        pass
    return tf


def peak_tflops(device: torch.device, precision: str, configured: float | None, probe_cpu: bool,
                cache_folder: Path | None = None) -> float | None:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf if precision == "bf16" else tf / 2  # tf32-ish; fp32 MFU is rarely quoted
        return None
    if probe_cpu:
        return cached_cpu_tflops(precision, cache_folder)
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


@dataclass
class StepTimer:
    """Wall time of a step split into data loading and the rest."""

    start: float = field(default_factory=time.perf_counter)
    data: float = 0.0

    def data_section(self) -> _Section:
        return _Section(self)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class _Section:
    def __init__(self, timer: StepTimer):
        self.timer = timer

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.data += time.perf_counter() - self.t


@dataclass
class WindowStats:
    """Sums over the steps since the last log line (rank 0 holds the global, reduced values)."""

    steps: int = 0
    loss: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0  # model FLOPs (3 x forward), all ranks
    time: float = 0.0
    data_time: float = 0.0
    skipped: int = 0
    grad_norm: float = 0.0
    grad_norm_steps: int = 0
    aux: dict[str, float] = field(default_factory=dict)
    tokens_per_step: list[float] = field(default_factory=list)  # routed tokens per recursion
    depth_hist: torch.Tensor | None = None  # token counts by depth 0..N_r

    def add_routing(self, tokens_per_step: list[float], depth_hist: torch.Tensor) -> None:
        if not self.tokens_per_step:
            self.tokens_per_step = [0.0] * len(tokens_per_step)
        self.tokens_per_step = [a + b for a, b in zip(self.tokens_per_step, tokens_per_step)]
        self.depth_hist = depth_hist.clone() if self.depth_hist is None else self.depth_hist + depth_hist
