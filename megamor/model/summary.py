"""`python -m megamor.model.summary [CONFIG ...]`: parameters, FLOPs and KV-cache size per config.

With no arguments, summarises every YAML under configs/model/. Models are built on the `meta`
device, so even the 1.7B configs cost no memory. `--convention paper` counts FLOPs as the MoR
paper does (megamor.model.flops.paper_flops_per_token; default `exact`, megamor's count), and
`--budget 16.5e18` adds each config's tokens and optimizer steps at that many forward FLOPs:

    python -m megamor.model.summary --convention paper --budget 16.5e18 configs/model/360m/*.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megamor.cli import ArgumentParser, positive_int
from megamor.config import ConfigError
from megamor.env import repo_root
from megamor.model.config import ModelConfig, load_model_config
from megamor.model.flops import CONVENTIONS, convention_flops_per_token, kv_cache_bytes_per_token

if TYPE_CHECKING:  # torch loads in summarize, after the arguments are parsed
    from megamor.model.mor import MoRLM


@dataclass(frozen=True)
class ParamCounts:
    """total: the parameters a token at full depth is run through, a shared layer counted once
    per application (the size of the unrolled model); unique: what is stored and trained;
    non_embedding: unique, without the embedding and an untied output head."""

    total: int
    unique: int
    non_embedding: int

    @classmethod
    def of(cls, model: MoRLM) -> ParamCounts:
        return cls(model.num_params(unique=False), model.num_params(), model.num_params(non_embedding=True))

    def describe(self) -> str:
        """For banners: e.g. '33.0M params in use (18.6M unique, shared across recursions), 14.4M non-embedding unique'."""
        if self.total == self.unique:
            return f"{_fmt_params(self.total)} params ({_fmt_params(self.non_embedding)} non-embedding)"
        return (f"{_fmt_params(self.total)} params in use ({_fmt_params(self.unique)} unique, shared across "
                f"recursions), {_fmt_params(self.non_embedding)} non-embedding unique")


def summarize(cfg: ModelConfig, seq_len: int, convention: str = "exact") -> dict[str, float]:
    import torch

    from megamor.model.mor import MoRLM

    with torch.device("meta"):
        model = MoRLM(cfg)
    counts = ParamCounts.of(model)
    return {
        "total": counts.total,
        "unique": counts.unique,
        "non_embedding": counts.non_embedding,
        "gflops_per_token": convention_flops_per_token(cfg, seq_len, convention) / 1e9,
        "kv_bytes_per_token": kv_cache_bytes_per_token(cfg),
    }


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m megamor.model.summary", description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", help="model YAML files (default: all of configs/model)")
    ap.add_argument("--seq-len", type=positive_int, default=2048, help="sequence length for FLOPs (default 2048)")
    ap.add_argument("--convention", choices=CONVENTIONS, default="exact",
                    help="FLOPs count: exact (megamor's, what MFU uses; default) or paper (the MoR paper's, Appendix D)")
    ap.add_argument("--budget", type=float, default=None, metavar="FLOPS",
                    help="also print the tokens and optimizer steps that spend this many forward FLOPs")
    ap.add_argument("--batch-size", type=positive_int, default=1024,
                    help="sequences per optimizer step, for --budget's steps (default 1024, the paper's)")
    args = ap.parse_args(argv)
    if args.budget is not None and not args.budget > 0:
        ap.error(f"--budget must be positive, got {args.budget}")  # exit 2
    root = repo_root() / "configs" / "model"
    paths = [Path(p) for p in args.configs] or sorted(root.rglob("*.yaml"))
    at_budget = f" {'tokens':>9} {'steps':>8}" if args.budget is not None else ""
    header = f"{'config':<28} {'total':>9} {'unique':>9} {'non-emb':>9} {'GFLOPs/tok':>11} {'KV B/tok':>9}{at_budget}"
    print(header)
    print("-" * len(header))
    for p in paths:
        try:
            cfg = load_model_config(p)
        except (ConfigError, FileNotFoundError) as e:
            print(f"megamor.model.summary: {p}: {e}", file=sys.stderr)
            return 2
        s = summarize(cfg, args.seq_len, args.convention)
        full = p.resolve()
        name = str(full.relative_to(root).with_suffix("")) if full.is_relative_to(root) else str(p)
        line = (f"{name:<28} {_fmt_params(s['total']):>9} {_fmt_params(s['unique']):>9} "
                f"{_fmt_params(s['non_embedding']):>9} {s['gflops_per_token']:>11.4f} {s['kv_bytes_per_token']:>9.0f}")
        if args.budget is not None:
            tokens = args.budget / (s["gflops_per_token"] * 1e9)
            line += f" {tokens / 1e9:>8.2f}B {round(tokens / (args.batch_size * args.seq_len)):>8}"
        print(line)
    print(f"\nFLOPs: forward, {args.convention} convention, causal attention, seq {args.seq_len}, expected routed "
          "tokens; training = 3x.")
    if args.budget is not None:
        print(f"tokens, steps: at {args.budget:.3g} forward FLOPs, {args.batch_size} x {args.seq_len} tokens per step.")
    print("KV bytes: bf16 keys+values cached per token, expected over routed depths.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
