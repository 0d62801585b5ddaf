"""Benchmark: document masking through FlexAttention block masks against the dense mask.

A tiny MoR expert-choice model (full-sequence layers around gathered recursion steps) runs
packed rows of random-length documents at each sequence length, once with
`doc_mask_impl=dense` (a [B, 1, n, n] boolean mask per layer application, SDPA) and once with
`flex`, in the same process on the same input. Printed per length and mode: median wall and
CPU ms per step, peak memory the step adds (`megamor.observe.throughput`: CUDA max allocated,
or the CPU RSS high-water mark), and flex's ratios to dense.

Modes: `eval` (forward, no gradients: validation, evaluation) and `train` (forward and
backward). On CPU torch's FlexAttention has no backward, so `train` with flex runs the dense
mask (`megamor.model.flex`): that row is printed, not timed; on a GPU both modes run the kernel.
The first flex call of each shape compiles (inductor): a warm-up call is not timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch

from megamor.benchmarks.cli import DOCMASK_MODES, docmask_parser
from megamor.model import ModelConfig, MoRLM, RouterConfig
from megamor.model.flex import flex_unusable
from megamor.observe.throughput import _median_times, _peak_bytes

MODES = DOCMASK_MODES


def tiny_model(seq_len: int, device: torch.device) -> MoRLM:
    """Attention-heavy on purpose (d_model 64, 4 heads): the mask is what is measured."""
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=seq_len, sharing="middle_cycle", num_recursions=2,
                      router=RouterConfig(type="expert_choice"))
    torch.manual_seed(0)
    return MoRLM(cfg).to(device).train()  # training routing: the steps gather their top-k


def packed_rows(batch: int, seq_len: int, mean_doc: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of documents with geometric lengths (mean `mean_doc`), positions restarting per document."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, seq_len, generator=g) < 1.0 / mean_doc
    starts[:, 0] = True
    doc = starts.long().cumsum(1) - 1
    idx = torch.arange(seq_len).expand(batch, seq_len)
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    ids = torch.randint(0, 256, (batch, seq_len), generator=g)
    return {"input_ids": ids, "doc_ids": doc, "position_ids": idx - first}


def _step(model: MoRLM, batch: dict[str, torch.Tensor], impl: str, mode: str):
    def run() -> None:
        model.doc_mask_impl = impl
        with torch.set_grad_enabled(mode == "train"):
            model.zero_grad(set_to_none=True)
            out = model(batch["input_ids"], targets=batch["input_ids"], position_ids=batch["position_ids"],
                        doc_ids=batch["doc_ids"], return_logits=False)
            if mode == "train":
                (out.loss + out.aux_loss).backward()
    return run


def measure(seq_lens: list[int], modes: list[str], batch: int, mean_doc: int, repeats: int,
            device: torch.device) -> list[dict]:
    """Per length and mode: dense and flex warmed up, peak memory of one step each, then
    `repeats` rounds timing dense and flex alternately (a shared machine's load drifts; the
    median of alternating rounds compares like with like). A flex run that would use the dense
    mask (CPU training) is reported as such and not timed."""
    rows = []
    for n in seq_lens:
        model, data = tiny_model(n, device), {k: v.to(device) for k, v in packed_rows(batch, n, mean_doc).items()}
        for mode in modes:
            impls = ["dense", "flex"]
            why = flex_unusable(device, mode == "train")
            if why:
                print(f"| {n} | {mode} | flex | {why}: runs the dense mask, not measured | | | | |", flush=True)
                impls = ["dense"]
            steps = {}
            for impl in impls:
                model.doc_mask_impl = impl
                steps[impl] = _step(model, data, impl, mode)
                steps[impl]()  # warm-up: flex compiles here
            peaks = {impl: _peak_bytes(device, steps[impl]) for impl in impls}
            times: dict[str, list[tuple[float, float]]] = {impl: [] for impl in impls}
            for _ in range(repeats):
                for impl in impls:
                    times[impl].append(_median_times(steps[impl], 1, device))
            base = None
            for impl in impls:
                wall = statistics.median(t[0] for t in times[impl])
                cpu = statistics.median(t[1] for t in times[impl])
                row = {"seq": n, "mode": mode, "impl": impl, "ms": wall * 1e3, "cpu_ms": cpu * 1e3,
                       "peak_mib": peaks[impl][0] / 2**20, "source": peaks[impl][1]}
                base = base or row
                row["time_ratio"], row["cpu_ratio"] = row["ms"] / base["ms"], row["cpu_ms"] / base["cpu_ms"]
                row["mem_ratio"] = row["peak_mib"] / max(base["peak_mib"], 1e-9)
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    return (f"| {r['seq']} | {r['mode']} | {r['impl']} | {r['ms']:.0f} | {r['cpu_ms']:.0f} | {r['peak_mib']:.1f} | "
            f"{r['time_ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {r['mem_ratio']:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    return run(docmask_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The benchmark on parsed arguments (evals/bench_docmask.py parses before importing this module)."""
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        print(f"bench_docmask: --modes: each must be one of {MODES}, got {args.modes!r}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"load average {load:.1f}), torch {torch.__version__}, batch {args.batch}, mean document {args.mean_doc} tokens, "
          f"median of {args.repeats}; ratios are flex / dense in this run")
    print("| seq | mode | impl | ms/step | CPU ms/step | peak MiB | time vs dense | CPU time vs dense | memory vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    measure([int(s) for s in args.seq_lens.split(",")], modes, args.batch, args.mean_doc, args.repeats, device)
    return 0
