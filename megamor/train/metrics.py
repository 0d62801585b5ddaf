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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megamor.model.config import ModelConfig
from megamor.model.flops import forward_flops
from megamor.utils.atomic import write_json

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


def _best_matmul_rate(dtype: torch.dtype, sizes: tuple[int, ...], budget_s: float, min_timings: int) -> float:
    """Best FLOP/s of single timed matmuls: each timing is short (a few ms), so on a busy
    machine some of them run while this process has the cores, and the best is the rate the
    hardware gives, not the share a loaded scheduler left over."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up (kernel selection, page faults)
        end = time.perf_counter() + budget_s / len(sizes)
        k = 0
        while k < min_timings or time.perf_counter() < end:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / max(time.perf_counter() - t, 1e-9))
            k += 1
    return best


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def measure_cpu_tflops(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (256, 512, 1024),
                       budget_s: float = 1.0, min_timings: int = 5) -> float:
    """This machine's matmul peak with the current thread count: the CPU stand-in for a
    datasheet peak (so CPU MFU reads "share of what matmul achieves here").

    The larger of (a) the best single timed matmul with all threads and (b) one thread's best
    times the threads that have a core each. A loaded machine rarely leaves every thread
    running at once for a whole matmul, so (a) alone read 3-7x low with other jobs running
    (this made a cached peak 5x too low and MFU print 515%); one thread gets its turns, so (b)
    reads the same busy or idle. Matmul throughput scales with cores, which makes (b) the peak
    the cores can reach."""
    threads = torch.get_num_threads()
    rate = _best_matmul_rate(dtype, sizes, budget_s / 2 if threads > 1 else budget_s, min_timings)
    if threads > 1:
        try:
            torch.set_num_threads(1)
            single = _best_matmul_rate(dtype, sizes, budget_s / 2, min_timings)
        finally:
            torch.set_num_threads(threads)
        rate = max(rate, single * min(threads, usable_cores()))
    return rate / 1e12


PEAK_CACHE_FILE = "peak_tflops.json"
PEAK_METHOD = 2  # entries measured by an older method (no "method", or lower) are measured again


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


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # missing or unreadable: measure and rewrite
        return {}


def cached_cpu_tflops(precision: str, folder: Path | None = None, remeasure: bool = False) -> float:
    """The CPU peak for MFU, measured once per machine (and thread count, torch version,
    precision) and kept in peak_tflops.json: a re-measured peak moved MFU by half from run to
    run. The file keeps the best figure ever measured, so a measurement on a busy machine can
    raise it but never lower it; `remeasure` (an MFU above 100% proved it too low) measures
    again. Delete the entry (or the file) to start over."""
    path = (folder or cache_dir()) / PEAK_CACHE_FILE
    key = cpu_peak_key(precision)
    cache = _read_cache(path)
    entry = cache.get(key)
    old = 0.0
    if isinstance(entry, dict) and isinstance(entry.get("tflops"), (int, float)) and entry["tflops"] > 0:
        old = float(entry["tflops"])
        if not remeasure and entry.get("method", 1) >= PEAK_METHOD:
            return old
    tf = measure_cpu_tflops(torch.bfloat16 if precision == "bf16" else torch.float32)
    if tf <= old:
        return old
    cache = _read_cache(path)  # another rank or run may have written meanwhile
    cache[key] = {"tflops": tf, "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "method": PEAK_METHOD}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, cache)
    except OSError:  # a read-only home: the figure is still right for this run
        pass
    return tf


def peak_tflops(device: torch.device, precision: str, configured: float | None, probe_cpu: bool,
                cache_folder: Path | None = None) -> float | None:
    return PeakFlops.resolve(device, precision, configured, probe_cpu, cache_folder).tflops


@dataclass
class PeakFlops:
    """The per-device peak MFU divides by, and where it came from: `configured`
    (trainer.peak_tflops), `datasheet` (a known GPU) or `measured` (the CPU matmul probe)."""

    tflops: float | None
    source: str = "none"
    precision: str = "fp32"
    cache_folder: Path | None = None
    remeasured: bool = False
    warned: bool = False

    @classmethod
    def resolve(cls, device: torch.device, precision: str, configured: float | None, probe_cpu: bool,
                cache_folder: Path | None = None) -> PeakFlops:
        if configured:
            return cls(float(configured), "configured", precision, cache_folder)
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            for key, tf in GPU_PEAK_TFLOPS.items():
                if key in name:  # fp32: tf32-ish; fp32 MFU is rarely quoted
                    return cls(tf if precision == "bf16" else tf / 2, "datasheet", precision, cache_folder)
            return cls(None)
        if probe_cpu:
            return cls(cached_cpu_tflops(precision, cache_folder), "measured", precision, cache_folder)
        return cls(None)

    def utilisation(self, achieved_tflops: float, hardware_factor: float = 1.0,
                    warn: Callable[[str], None] | None = None) -> tuple[float, float] | None:
        """(MFU, HFU) of a per-device rate of model FLOPs; hardware_factor: hardware FLOPs per
        model FLOP (1 + recomputed_share / 3 with activation checkpointing). Hardware FLOPs above the peak prove the
        peak wrong: a measured one is measured again (once per run); what is still above 100%
        is printed as 100% with one warning, never more."""
        if not self.tflops:
            return None
        hw = achieved_tflops * hardware_factor
        if hw > self.tflops and self.source == "measured" and not self.remeasured:
            self.remeasured = True
            before = self.tflops
            self.tflops = max(before, cached_cpu_tflops(self.precision, self.cache_folder, remeasure=True))
            if warn is not None:
                warn(f"perf: {hw:.3g} TFLOP/s per device ran, above the cached CPU peak {before:.3g} TFLOP/s "
                     f"(measured on a busy machine?); measured again: {self.tflops:.3g} TFLOP/s")
        mfu, hfu = achieved_tflops / self.tflops, hw / self.tflops
        if hfu > 1.0:
            if warn is not None and not self.warned:
                warn(f"perf: {hw:.3g} TFLOP/s per device is above the {self.source} peak {self.tflops:.3g} TFLOP/s "
                     f"(HFU {100 * hfu:.0f}%): MFU/HFU are shown as at most 100%; set trainer.peak_tflops to this "
                     "device's real peak")
            self.warned = True
            mfu, hfu = min(mfu, 1.0), 1.0
        return mfu, hfu


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


@dataclass
class WindowStats:
    """Sums over the steps since the last log line (rank 0 holds the global, reduced values)."""

    steps: int = 0
    loss: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0  # model FLOPs (3 x forward), all ranks
    time: float = 0.0
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
