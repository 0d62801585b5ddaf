#!/usr/bin/env python
"""Benchmark: few-shot scoring examples/s and perplexity tokens/s (not a test).

    python evals/bench_eval.py                                    # 33M MoR (random init) on the CPU
    python evals/bench_eval.py --config configs/model/135m/mor_expert_2.yaml --device cuda \
        --dtype bf16 --tasks hellaswag --examples 0 --batch-size 64   # full HellaSwag (examples 0 = all)
    python evals/bench_eval.py --checkpoint run/ --tokenizer tok.model

Without --checkpoint the model is randomly initialised from --config and a sentencepiece
tokenizer of the config's vocabulary size is trained on Gutenberg text (throughput does not
depend on the weights, except through how many tokens the causal router sends deeper: the
printed mean depth says how representative that is). Wall and process-CPU seconds are both
reported; CPU time is the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from typing import TYPE_CHECKING

from megamor.cli import ArgumentParser
from megamor.env import shared_data_dir

if TYPE_CHECKING:  # torch loads after the arguments are parsed (--help answers at once)
    from megamor.eval.tokenizer import SentencePieceTokenizer


def train_tokenizer(vocab_size: int, out: str) -> SentencePieceTokenizer:
    import sentencepiece as spm

    from megamor.eval.tokenizer import SentencePieceTokenizer

    data = shared_data_dir() / "gutenberg"
    text = "".join((data / f).read_text(encoding="utf-8-sig", errors="replace") for f in ("2600-0.txt", "1342-0.txt", "98-0.txt"))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
                                   byte_fallback=True, num_threads=os.cpu_count() or 2, minloglevel=2)
    with open(out, "wb") as f:
        f.write(buf.getvalue())
    return SentencePieceTokenizer(out)


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    r = fn()
    return r, time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/model/33m/mor_expert_2.yaml")
    p.add_argument("--checkpoint")
    p.add_argument("--tokenizer")
    p.add_argument("--device")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--tasks", default="hellaswag,piqa,arc_easy,winogrande,lambada")
    p.add_argument("--examples", type=int, default=200, help="per task; 0 = the whole task")
    p.add_argument("--ppl-tokens", type=int, default=65536, help="WikiText-2 test tokens for perplexity; 0 = skip")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    import torch

    from megamor.eval.cli import default_device, tokenizer_for, write_text
    from megamor.eval.harness import evaluate_task
    from megamor.eval.perplexity import perplexity_of_tokens
    from megamor.eval.scoring import Scorer
    from megamor.eval.tokenizer import load_tokenizer
    from megamor.runs.load import load_model

    if a.threads:
        torch.set_num_threads(a.threads)

    device = default_device(a.device)
    if a.checkpoint:
        model = load_model(a.checkpoint, device=device)
        tok = tokenizer_for(a.checkpoint, a.tokenizer)
    else:
        from megamor.model import MoRLM, load_model_config

        cfg = load_model_config(a.config)
        torch.manual_seed(0)
        model = load_model(MoRLM(cfg), device=device)
        tok = load_tokenizer(a.tokenizer) if a.tokenizer else train_tokenizer(cfg.vocab_size, "/tmp/megamor_bench_tok.model")
    scorer = Scorer(model, batch_size=a.batch_size, max_batch_tokens=a.max_batch_tokens, max_length=a.max_length, device=device, dtype=a.dtype, pad_id=tok.eos_id)
    env = {"device": device, "dtype": a.dtype or "fp32", "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "load_avg": os.getloadavg()[0], "params": model.num_params() if hasattr(model, "num_params") else None,
           "config": a.checkpoint or a.config, "batch_size": a.batch_size, "max_length": a.max_length}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    rows = []
    for name in [t for t in a.tasks.split(",") if t]:
        limit = a.examples or None
        evaluate_task(scorer, tok, name, limit=4)  # warm-up (and task file read into the page cache)
        before = (scorer.tokens_run, scorer.tokens_scored)
        res, wall, cpu = timed(lambda name=name, limit=limit: evaluate_task(scorer, tok, name, limit=limit))
        n_req = sum(len(s["loglikelihoods"]) for s in res.samples)
        run_tok = scorer.tokens_run - before[0]
        rows.append({"bench": f"fewshot {name}", "n": res.n, "requests": n_req, "wall_s": wall, "cpu_s": cpu, "examples_per_s": res.n / wall,
                     "tokens_per_s": run_tok / wall, "acc": res.metrics.get("acc")})
        print(json.dumps(rows[-1]), file=sys.stderr)
    if a.ppl_tokens:
        text = (shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text()
        ids = torch.tensor(tok.encode(text)[: a.ppl_tokens]).numpy()
        for stride in (None, a.max_length // 2):
            res, wall, cpu = timed(lambda stride=stride: perplexity_of_tokens(scorer, ids, tok.eos_id, stride=stride))
            rows.append({"bench": f"perplexity stride {stride or a.max_length}", "n": res.tokens, "wall_s": wall, "cpu_s": cpu,
                         "tokens_per_s": res.tokens / wall, "model_tokens_per_s": res.tokens_run / wall, "token_nll": res.token_nll})
            print(json.dumps(rows[-1]), file=sys.stderr)
    with torch.no_grad():
        x = torch.tensor(tok.encode(text[:20000] if a.ppl_tokens else "hello world " * 400)[: a.max_length])[None].to(device)
        env["mean_depth_causal"] = model(x, causal_routing=True).stats.mean_depth
    print(f"\n{json.dumps(env)}\n")
    print("| bench | n | wall s | CPU s | examples/s | tokens/s (model) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        eps = f"{r['examples_per_s']:.1f}" if "examples_per_s" in r else ""
        tps = r.get("model_tokens_per_s", r["tokens_per_s"])
        print(f"| {r['bench']} | {r['n']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {eps} | {tps:,.0f} |")
    payload = {"env": env, "rows": rows}
    if a.out:
        write_text(a.out, json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
