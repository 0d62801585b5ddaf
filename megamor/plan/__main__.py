"""`python -m megamor.plan --config X [key=value ...] [--world N] [--gpu NAME | --gpu-mem-gib G --peak-tflops P] [--json]`

Before launching: the bytes per rank (parameters, gradients, optimizer states, activations,
the decode KV cache), whether the config's layout fits, its predicted step time and tokens/day
at an assumed MFU and communication overlap with its data- and tensor-parallel traffic (ZeRO-3's
parameter gathers replayed as DeepSpeed's coordinator runs them), and the layouts of the same
world size that fit, ranked by predicted throughput, ties (within 1%) by less traffic, then the
larger micro-batch (up to 16k tokens), then less memory. The speeds are a model until a GPU run
measures them. No GPU needed: the model is built on `meta`.
Bad input (unknown GPU, a layout that does not divide, a bad config key) is one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from megamor.cli import EXIT_BAD_INPUT, ArgumentParser, positive_int, report
from megamor.config import ConfigError
from megamor.plan.hardware import gpu_spec
from megamor.plan.report import document, render


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m megamor.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], required=True, help="experiment YAML (repeatable)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. batch.micro_batch_size=4")
    p.add_argument("--world", type=int, default=None, help="GPUs in the run (default: parallel.tensor)")
    p.add_argument("--gpu", default=None, help="h100 | h200 | a100-40 | a100-80 (default h100)")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="a custom GPU's memory (with --peak-tflops)")
    p.add_argument("--peak-tflops", type=float, default=None, help="a custom GPU's dense peak (with --gpu-mem-gib)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--overlap", type=float, default=None,
                   help="share of side-stream communication the compute beside it hides (default 0.5; 1 = free)")
    p.add_argument("--headroom", type=float, default=0.10, help="memory fraction kept free (default 0.1)")
    p.add_argument("--attention", default="sdpa", help="sdpa (KV heads repeated under GQA) | flash (default sdpa)")
    p.add_argument("--decode-batch", type=int, default=None, help="sequences in the KV-cache figure (default micro-batch)")
    p.add_argument("--top", type=positive_int, default=10, help="ranked layouts shown (default 10)")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    return p.parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> dict:
    # lazy: these import torch; `--help` and argument errors answer without it
    from megamor.model.summary import ParamCounts
    from megamor.plan.layouts import ranked_layouts
    from megamor.plan.memory import meta_model
    from megamor.plan.planner import Layout, plan_layout
    from megamor.plan.speed import DEFAULT_OVERLAP
    from megamor.train.config import load_experiment

    overlap = DEFAULT_OVERLAP if args.overlap is None else args.overlap
    if not (0.0 <= overlap <= 1.0):
        raise ConfigError("--overlap", f"must be in [0, 1], got {args.overlap}")
    if not (0.0 < args.mfu <= 1.0):
        raise ConfigError("--mfu", f"must be in (0, 1], got {args.mfu}")
    if not (0.0 <= args.headroom < 1.0):
        raise ConfigError("--headroom", f"must be in [0, 1), got {args.headroom}")
    if args.attention not in ("sdpa", "flash"):
        raise ConfigError("--attention", f"must be sdpa or flash, got {args.attention!r}")
    if args.decode_batch is not None and args.decode_batch < 1:
        raise ConfigError("--decode-batch", f"must be >= 1, got {args.decode_batch}")
    gpu = gpu_spec(args.gpu, args.gpu_mem_gib, args.peak_tflops)
    exp = load_experiment(args.config, args.overrides, need_data=False)  # the plan reads no data
    world = args.world if args.world is not None else exp.parallel.tensor
    plan = plan_layout(exp, Layout.of(exp, world), gpu, args.mfu, args.headroom, args.attention, args.decode_batch,
                       overlap)
    layouts = ranked_layouts(exp, world, gpu, args.mfu, args.headroom, args.attention, overlap)
    doc = document(exp.name, world, gpu, args.mfu, args.headroom, plan, layouts, overlap)
    doc["_text"] = (exp.data.seq_len, exp.batch.global_batch_size, ParamCounts.of(meta_model(exp.model)).describe())
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        doc = run(args)
    except (ConfigError, FileNotFoundError) as e:
        report("megamor.plan", e)
        return EXIT_BAD_INPUT
    seq_len, global_batch, desc = doc.pop("_text")
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(render(doc, seq_len, global_batch, desc, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
