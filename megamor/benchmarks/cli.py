"""The benchmarks' argument parsers, in a module that imports nothing heavy: evals/bench_*.py
parse (and answer --help or a bad argument) before the benchmark module loads torch."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path

from megamor.cli import ArgumentParser

DECODE_VARIANTS = ("vanilla", "recursive_3", "mor_expert_3", "mor_token_3", "vanilla_eq")
DECODE_DTYPES = ("bf16", "fp32")
DOCMASK_MODES = ("eval", "train")


def module_doc(module: str) -> str:
    """A module's docstring, read from its source without importing it (that would load torch)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""


def adapt_parser() -> ArgumentParser:
    p = ArgumentParser(description=module_doc("megamor.benchmarks.adapt"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/megamor-bench-adapt"), help="corpus, tokenizer, checkpoints")
    p.add_argument("--corpus-mb", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=400, help="training steps of the small Llama")
    p.add_argument("--tune-steps", type=int, default=200, help="router-only tuning steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tune-lr", type=lambda t: [float(x) for x in t.split(",")], default=[1e-3, 1e-2],
                   help="router-only tuning learning rates (comma-separated: one tuning from the untuned routers each)")
    p.add_argument("--valid-batches", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48, help="decoding throughput: new tokens per prompt")
    p.add_argument("--seed", type=int, default=0)
    return p


def decode_args(argv: list[str] | None = None) -> argparse.Namespace:
    """evals/bench_decode.py's arguments; --device (default: cuda when available) and --dtype
    (default bf16 on GPU, fp32 on CPU) stay None here: megamor.benchmarks.decode resolves them."""
    p = ArgumentParser(prog="python evals/bench_decode.py", description=module_doc("megamor.benchmarks.decode"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="33m", help="configs/model/<size>/ (33m, 135m, 360m, ...) or a folder of <variant>.yaml")
    p.add_argument("--variants", nargs="+", default=list(DECODE_VARIANTS))
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DECODE_DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--part-timeout", type=float, default=120.0, help="seconds per measured part")
    p.add_argument("--total-timeout", type=float, default=450.0, help="seconds for the whole run (parts after it are skipped)")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    p.add_argument("--modes", nargs="+", choices=["static", "dynamic"], default=None,
                   help="engine step: static (fixed shapes; a CUDA graph on GPU) and/or dynamic; default both")
    p.add_argument("--compile", action="store_true", help="torch.compile the static step")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per part (median)")
    p.add_argument("--calibrate-on", choices=["same", "other"], default="same", help="router calibration prompts")
    p.add_argument("--bucket-slack", type=float, default=1.25, help="static step: rows per recursion = c_r x batch x slack")
    p.add_argument("--out", default=None, help="also write the markdown table here (atomically)")
    paper = p.add_argument_group("--protocol paper (megamor.benchmarks.decode_paper): lockstep vs depth-wise schedule")
    paper.add_argument("--protocol", choices=["engine", "paper"], default="engine")
    paper.add_argument("--requests", type=int, default=128, help="requests queued (paper protocol)")
    paper.add_argument("--gen-mean", type=float, default=256.0, help="generation length mean (paper: 256)")
    paper.add_argument("--gen-std", type=float, default=32.0, help="generation length standard deviation")
    paper.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    paper.add_argument("--gpu", default="h100", help="GPU whose memory sets the relative maximum batch")
    paper.add_argument("--kv-seq-len", type=int, default=2048, help="sequence length of the relative maximum batch")
    paper.add_argument("--schedules", nargs="+", choices=["lockstep", "depthwise"], default=["lockstep", "depthwise"],
                       help="schedules to measure (default both)")
    paper.add_argument("--static", action=argparse.BooleanOptionalAction, default=None,
                       help="both schedules on the engine's fixed-shape operations (CUDA graphs on GPU); default on GPU")
    paper.add_argument("--depth-buckets", type=float, default=0.0, metavar="SLACK",
                       help="static depth-wise: per-depth buckets of each depth's expected share x SLACK (0: none)")
    paper.add_argument("--plain-linear", action="store_true",
                       help="the engine on torch's linear instead of oneDNN-packed weights (CPU fp32 default)")
    paper.add_argument("--profile", action="store_true", help="one more cProfiled run per row: torch linear calls and time")
    paper.add_argument("--depthwise-slots", type=int, default=1,
                       help="depthwise: requests in flight = this x batch (2: the exit buffer fills to a batch too)")
    args = p.parse_args(argv)
    args.variants_given = "--variants" in (argv if argv is not None else sys.argv[1:])
    if not Path(args.size).is_dir():
        args.size = str(Path("configs/model") / args.size)
    if not Path(args.size).is_dir():
        p.error(f"--size: no folder {args.size}")
    args.modes = args.modes or ["static", "dynamic"]
    if args.protocol == "paper":
        if args.prompt_len == 64 and "--prompt-len" not in (argv or sys.argv[1:]):
            args.prompt_len = 1  # no prefix
        for name in ("requests", "batch", "prompt_len", "repeats", "depthwise_slots"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        if args.depth_buckets < 0:
            p.error(f"--depth-buckets: must be >= 0, got {args.depth_buckets:g}")
        if args.gen_mean < 1 or args.gen_std < 0:
            p.error("--gen-mean must be >= 1 and --gen-std >= 0")
    return args


def docmask_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python evals/bench_docmask.py", description=module_doc("megamor.benchmarks.docmask").split("\n")[0])
    p.add_argument("--seq-lens", default="2048,8192", help="comma list (default 2048,8192)")
    p.add_argument("--modes", default="eval,train", help="comma list of eval, train (default both)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mean-doc", type=int, default=512, help="mean document length in tokens (default 512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    return p


# (size, N_r, micro-batch, budget s) of evals/bench_train.py's GPU plan (megamor.benchmarks.train)
TRAIN_GPU_SIZES = {"135m": (3, 8, 110.0), "360m": (3, 8, 110.0), "1_7b": (2, 4, 120.0)}


def train_args(argv: list[str] | None = None) -> argparse.Namespace:
    """evals/bench_train.py's arguments, defaults filled in (--tiny: toy shapes on a CPU)."""
    from megamor.env import repo_root

    p = ArgumentParser(prog="bench_train.py", description=module_doc("megamor.benchmarks.train"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy shapes (d_model 64, seq 64), dynamo-only compile: checks the script on a CPU")
    p.add_argument("--parts", nargs="+", default=list(TRAIN_GPU_SIZES) + ["trainer", "lm_head"])
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (parts have their own limits)")
    p.add_argument("--trainer-budget", type=float, default=60.0)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --tiny: eager)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", type=Path, default=None, help="markdown here, .json beside it (default evals/results/train_gpu.md, --tiny: none)")
    a = p.parse_args(argv)
    a.seq_len = a.seq_len or (64 if a.tiny else 2048)
    a.steps = a.steps or (2 if a.tiny else 5)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)
    a.backend = a.backend or ("eager" if a.tiny else "inductor")
    if a.out is None and not a.tiny:
        a.out = repo_root() / "evals" / "results" / "train_gpu.md"
    return a
