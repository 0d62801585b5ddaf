"""Benchmark: the speed adapter's quality (validation loss) against its compute (mean depth),
routers tuned against untuned, on a small Llama trained here.

1. the synthetic demo corpus (data_prep/make_demo_corpus.py) and a 512-piece tokenizer
   (data_prep/train_tokenizer.py), made once in --work;
2. a small vanilla megamor model trained on it (--steps), saved as a Hugging Face Llama
   folder (megamor.model.hf: what megamor.export writes for a vanilla run);
3. megamor.adapt wraps that folder: one routed step per layer, expert choice at the paper's
   capacities (N_r - r) / N_r (mean depth (N_r + 1) / 2 in training's top-k routing);
4. router-only tuning (`trainer.train_only: routers`'s freezing and parameter groups:
   megamor.train.optim), --tune-steps on the training text; every other weight is checked
   bit for bit unchanged afterwards.

Each row: validation loss and mean depth (layers a token ran, of N). Rows: the source (full
depth; the Hugging Face model and the adapted model with --no-skip), a static early exit (every
token runs the first k layers), and the routed model untuned / tuned under training's top-k
routing (the capacities fix the depth) and under causal routing (the decoding rule: router
logit > threshold; "calibrated": thresholds set on training text so each step keeps its
capacity share, megamor.inference.calibrate). Last, decoding throughput of the routed (tuned,
calibrated) model against --no-skip, measured in the same run.

    python evals/bench_adapt.py [--steps 400] [--tune-steps 200] [--tune-lr 1e-3,1e-2] [--work /tmp/megamor-bench-adapt]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from megamor.adapt import adapt_config, read_source, wrap
from megamor.benchmarks.cli import adapt_parser
from megamor.env import repo_root
from megamor.model import ModelConfig, MoRLM
from megamor.train.config import OptimConfig
from megamor.train.optim import ROUTER_PREFIXES, build_optimizer, freeze_for

SHAPE = {"vocab_size": 512, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_ff": 384, "max_seq_len": 128}


def corpus_tokens(work: Path, mb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, valid) token streams of the demo corpus (documents joined by EOS; the last 5% of
    documents are the validation split)."""
    from megamor.data.tokenizer import load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    corpus, tok_dir = work / "demo_corpus.jsonl", work / "tokenizer"
    py, root = sys.executable, repo_root()
    if not corpus.is_file():
        subprocess.run([py, "data_prep/make_demo_corpus.py", "--out", str(corpus), "--mb", str(mb)], cwd=root, check=True)
    if not (tok_dir / "tokenizer.model").is_file():
        subprocess.run([py, "data_prep/train_tokenizer.py", str(corpus), "--out", str(tok_dir), "--vocab-size", "512"],
                       cwd=root, check=True, capture_output=True)
    tok = load_tokenizer(tok_dir)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    cut = int(len(docs) * 0.95)
    stream = lambda ds: torch.tensor([i for d in ds for i in [tok.eos_id, *tok.encode(d)]])  # noqa: E731
    return stream(docs[:cut]), stream(docs[cut:])


def batches(stream: torch.Tensor, seq: int, batch: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq - 1, (n, batch), generator=g)
    return [torch.stack([stream[s : s + seq + 1] for s in row.tolist()]) for row in starts]


def train(model: MoRLM, data: list[torch.Tensor], lr: float, train_only: str = "all") -> float:
    """AdamW with the trainer's parameter groups (and its freezing), warmup then cosine; seconds."""
    freeze_for(model, train_only)
    opt = build_optimizer(model, OptimConfig(lr=lr), torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / len(data))))
    model.train()
    t0 = time.perf_counter()
    for step, xy in enumerate(data, start=1):
        model.set_train_step(step)
        out = model(xy[:, :-1], targets=xy[:, 1:], return_logits=False)
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model: MoRLM, data: list[torch.Tensor], causal: bool) -> tuple[float, float]:
    """(validation loss, mean layers run per token)."""
    model.eval()
    loss = layers = 0.0
    per_step = model.cfg.n_layers // max(1, len(model.steps)) if model.steps else model.cfg.n_layers
    for xy in data:
        out = model(xy[:, :-1], targets=xy[:, 1:], causal_routing=causal, return_logits=False)
        loss += float(out.loss)
        layers += (out.stats.mean_depth * per_step) if model.steps else model.cfg.n_layers
    return loss / len(data), layers / len(data)


@torch.no_grad()
def truncated_loss(model: MoRLM, data: list[torch.Tensor], k: int) -> float:
    """Validation loss when every token runs the first k layers only (static early exit)."""
    from megamor.model.layers import TokenMeta
    from megamor.model.loss import cross_entropy_from_logits

    total = 0.0
    for xy in data:
        x = xy[:, :-1]
        pos = torch.arange(x.shape[1]).unsqueeze(0).expand_as(x)
        meta, rope = TokenMeta(pos, causal_exact=True), model.rope(pos)
        h = model.embed_tokens(x)
        for layer in model.layers[:k]:
            h, _ = layer(h, meta, rope)
        total += float(cross_entropy_from_logits(model.lm_head(model.norm(h)), xy[:, 1:]))
    return total / len(data)


def hf_loss(folder: Path, data: list[torch.Tensor]) -> float:
    from transformers import AutoModelForCausalLM

    from megamor.model.loss import cross_entropy_from_logits

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return sum(float(cross_entropy_from_logits(hf(xy[:, :-1]).logits, xy[:, 1:])) for xy in data) / len(data)


def main(argv: list[str] | None = None) -> int:
    return run(adapt_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The benchmark on parsed arguments (evals/bench_adapt.py parses before importing this module)."""
    torch.manual_seed(args.seed)
    seq = SHAPE["max_seq_len"]
    train_s, valid_s = corpus_tokens(args.work, args.corpus_mb)
    valid = batches(valid_s, seq, args.batch, args.valid_batches, seed=1)
    print(f"corpus: {len(train_s)} train / {len(valid_s)} valid tokens; torch threads {torch.get_num_threads()}")

    from megamor.model.hf import llama_config, to_llama_state_dict

    hf_dir = args.work / f"llama-{args.steps}"
    if not (hf_dir / "config.json").is_file():
        base = MoRLM(ModelConfig(**SHAPE))
        secs = train(base, batches(train_s, seq, args.batch, args.steps, seed=2), args.lr)
        print(f"trained the small Llama: {args.steps} steps in {secs:.0f} s")
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM(llama_config(base.cfg))
        hf.load_state_dict(to_llama_state_dict(base.cfg, base.state_dict()), strict=False)
        hf.save_pretrained(hf_dir)  # a Hugging Face folder, as megamor.export writes for a vanilla run

    src, state, _ = read_source(hf_dir)
    n = src.n_layers
    rows: list[tuple[str, float, float]] = [("source (Hugging Face Llama)", hf_loss(hf_dir, valid), float(n))]
    full = wrap(src, state, adapt_config(src, n, no_skip=True))
    rows.append(("adapted, --no-skip", *evaluate(full, valid, causal=True)))
    for k in range(n - 1, 0, -1):
        rows.append((f"static early exit: first {k} layers", truncated_loss(full, valid, k), float(k)))

    from megamor.inference.calibrate import calibrate_routers

    calib = torch.cat(batches(train_s, seq, args.batch, 4, seed=3))[:, :-1]
    model = wrap(src, state, adapt_config(src, n))  # capacities (N_r - r) / N_r
    rows.append(("routed, untuned, top-k", *evaluate(model, valid, causal=False)))
    calibrate_routers(model, calib)
    rows.append(("routed, untuned, causal (calibrated)", *evaluate(model, valid, causal=True)))

    untuned = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_same = True
    for lr in args.tune_lr:
        model.load_state_dict(untuned)
        for p_ in model.parameters():
            p_.requires_grad_(True)
        secs = train(model, batches(train_s, seq, args.batch, args.tune_steps, seed=4), lr, train_only="routers")
        after = model.state_dict()
        same = all(torch.equal(untuned[k], after[k]) for k in untuned if not k.startswith(ROUTER_PREFIXES))
        frozen_same &= same
        print(f"router-only tuning at lr {lr:g}: {args.tune_steps} steps in {secs:.0f} s; "
              f"other weights unchanged bit for bit: {same}")
        rows.append((f"routed, tuned (lr {lr:g}), top-k", *evaluate(model, valid, causal=False)))
        rows.append((f"routed, tuned (lr {lr:g}), causal (learned threshold)", *evaluate(model, valid, causal=True)))
        calibrate_routers(model, calib)
        rows.append((f"routed, tuned (lr {lr:g}), causal (calibrated)", *evaluate(model, valid, causal=True)))

    # Decoding throughput (greedy, megamor.inference.generate, causal routing), best of 3 each.
    from megamor.adapt.cli import decode

    prompts = [row[:16].tolist() for row in valid[0][:4]]
    speed = {name: max(decode(m, prompts, args.new_tokens, None, None)[1] for _ in range(3))
             for name, m in (("--no-skip", full), ("tuned, calibrated", model))}  # the last tuning
    ref = rows[0][1]
    print(f"\n{n}-layer Llama ({SHAPE['d_model']} wide), {args.steps} steps; validation {args.valid_batches} x "
          f"{args.batch} x {seq} tokens; routed: {n} steps of 1 layer, capacities {model.cfg.capacities}\n")
    print("| model | mean depth (layers) | compute vs full | valid loss | loss - full |")
    print("|---|---|---|---|---|")
    for name, loss, depth in rows:
        print(f"| {name} | {depth:.2f} | {depth / n:.2f}x | {loss:.4f} | {loss - ref:+.4f} |")
    print(f"\ndecoding {len(prompts)} prompts x {args.new_tokens} new tokens (greedy, best of 3): "
          + ", ".join(f"{k} {v:.1f} tokens/s" for k, v in speed.items())
          + f"; routed / --no-skip = {speed['tuned, calibrated'] / speed['--no-skip']:.2f}x")
    return 0 if frozen_same else 1
