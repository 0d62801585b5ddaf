"""The accelerators the planner knows: memory, dense peak and link speeds.

Peaks are NVIDIA's dense (no sparsity) figures: bf16 tensor cores, and TF32 for fp32 runs
(megamor's fp32 matmuls use TF32 on these GPUs only when allowed; the planner assumes they are).
Links: NVLink per GPU in one direction inside a node, the network per GPU between nodes
(one 400 Gb/s NIC per GPU, the usual HGX layout). Memory is the capacity in the GPU's name (80 for
an H100 80GB, 141 for an H200), taken as GiB: the device reports somewhat less (its
total_memory), which the planner's headroom (--headroom, default 10%) is there to absorb; give
a measured figure with --gpu-mem-gib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamor.config import ConfigError

GiB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float
    intra_node_gbps: float = 450.0  # GB/s per GPU, one direction (NVLink)
    inter_node_gbps: float = 50.0  # GB/s per GPU (400 Gb/s)
    gpus_per_node: int = 8

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GiB

    def peak_flops(self, precision: str) -> float:
        return (self.bf16_tflops if precision == "bf16" else self.fp32_tflops) * 1e12


GPUS = {
    "h100": GPU("h100", 80.0, 989.0, 494.0),
    "h200": GPU("h200", 141.0, 989.0, 494.0),
    "a100-40": GPU("a100-40", 40.0, 312.0, 156.0, intra_node_gbps=300.0, inter_node_gbps=25.0),
    "a100-80": GPU("a100-80", 80.0, 312.0, 156.0, intra_node_gbps=300.0, inter_node_gbps=25.0),
}


def gpu_spec(name: str | None, memory_gib: float | None = None, peak_tflops: float | None = None) -> GPU:
    """A known GPU by name, or a custom one from its memory and (bf16 and fp32) peak."""
    if name is not None:
        if memory_gib is not None or peak_tflops is not None:
            raise ConfigError("--gpu", "give either --gpu or --gpu-mem-gib with --peak-tflops, not both")
        spec = GPUS.get(name.lower())
        if spec is None:
            raise ConfigError("--gpu", f"unknown GPU {name!r} (known: {', '.join(GPUS)}; or give --gpu-mem-gib G --peak-tflops P)")
        return spec
    if memory_gib is None and peak_tflops is None:
        return GPUS["h100"]
    if memory_gib is None or peak_tflops is None:
        raise ConfigError("--gpu-mem-gib" if memory_gib is None else "--peak-tflops",
                          "a custom GPU needs both --gpu-mem-gib and --peak-tflops")
    for flag, value in (("--gpu-mem-gib", memory_gib), ("--peak-tflops", peak_tflops)):
        if not (math.isfinite(value) and value > 0):  # nan and inf parse as floats
            raise ConfigError(flag, f"must be a finite positive number, got {value}")
    return GPU("custom", float(memory_gib), float(peak_tflops), float(peak_tflops))
