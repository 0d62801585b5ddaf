"""`python -m megamor.model.summary [CONFIG ...]`: parameters, FLOPs and KV-cache size per config.

With no arguments, summarises every YAML under configs/model/. Models are built on the `meta`
device, so even the 1.7B configs cost no memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megamor.cli import ArgumentParser
from megamor.env import repo_root
from megamor.model.config import ModelConfig, load_model_config
from megamor.model.flops import flops_per_token, kv_cache_bytes_per_token
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


def summarize(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    with torch.device("meta"):
        model = MoRLM(cfg)
    counts = ParamCounts.of(model)
    return {
        "total": counts.total,
        "unique": counts.unique,
        "non_embedding": counts.non_embedding,
        "gflops_per_token": flops_per_token(cfg, seq_len) / 1e9,
        "kv_bytes_per_token": kv_cache_bytes_per_token(cfg),
    }


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m megamor.model.summary", description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", help="model YAML files (default: all of configs/model)")
    ap.add_argument("--seq-len", type=int, default=2048, help="sequence length for FLOPs (default 2048)")
    args = ap.parse_args(argv)
    root = repo_root() / "configs" / "model"
    paths = [Path(p) for p in args.configs] or sorted(root.rglob("*.yaml"))
    header = f"{'config':<28} {'total':>9} {'unique':>9} {'non-emb':>9} {'GFLOPs/tok':>11} {'KV B/tok':>9}"
    print(header)
    print("-" * len(header))
    for p in paths:
        cfg = load_model_config(p)
        s = summarize(cfg, args.seq_len)
        name = str(p.relative_to(root).with_suffix("")) if p.is_relative_to(root) else str(p)
        print(
            f"{name:<28} {_fmt_params(s['total']):>9} {_fmt_params(s['unique']):>9} "
            f"{_fmt_params(s['non_embedding']):>9} {s['gflops_per_token']:>11.3f} {s['kv_bytes_per_token']:>9.0f}"
        )
    print(f"\nFLOPs: forward, causal attention, seq {args.seq_len}, expected routed tokens; training = 3x.")
    print("KV bytes: bf16 keys+values cached per token, expected over routed depths.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
