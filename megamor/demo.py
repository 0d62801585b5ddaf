"""`make demo`: megamor end to end in a few minutes on a laptop CPU.

    python -m megamor.demo [--out runs/demo] [--steps 300] [--fresh]

1. writes the synthetic demo corpus      data_prep/make_demo_corpus.py
2. trains a tokenizer on it               data_prep/train_tokenizer.py
3. tokenizes and shards it                data_prep/tokenize_and_shard.py
4. trains the default small MoR model     python -m megamor.train --config configs/experiments/demo.yaml
5. reports the validation loss, samples a few continuations showing each token's recursion
   depth, and says where everything was written.

Every step is the command a user would run by hand (printed as it runs); finished steps are
reused, so a second `make demo` only re-samples (`--fresh` deletes the output and starts over).
An interrupted training resumes from its newest checkpoint. Another length (`--steps N`
after a run of another length) trains in OUT/run-N beside it, reusing the data: nothing is
deleted, and `--out DIR` puts a whole new demo elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from megamor.cli import ArgumentParser, positive_int
from megamor.data.tokenizer import load_tokenizer
from megamor.env import repo_root, thread_defaults
from megamor.runs.tags import newest_complete

CONFIG = "configs/experiments/demo.yaml"
PROMPTS = [
    "Q: What is the capital of",
    "The sum of 12 and 30 is",
    "Once upon a time",
]
SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _run(cmd: Sequence[str], what: str, on_config_error: str = "") -> None:
    print(f"\n== {what}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t = time.time()
    r = subprocess.run(list(cmd), cwd=repo_root(), check=False)
    if r.returncode != 0:
        hint = f"; {on_config_error}" if r.returncode == 2 and on_config_error else ""
        raise SystemExit(f"megamor.demo: '{what}' failed with exit code {r.returncode}{hint}")
    print(f"   ({time.time() - t:.1f}s)", flush=True)


def prepare_data(data: Path, workers: int) -> tuple[Path, Path]:
    py = sys.executable
    corpus, tok, shards = data / "corpus.jsonl", data / "tokenizer", data / "shards"
    if not corpus.is_file():
        _run([py, "data_prep/make_demo_corpus.py", "--out", str(corpus), "--mb", "4"], "1/4 demo corpus")
    if not (tok / "tokenizer.model").is_file():
        _run([py, "data_prep/train_tokenizer.py", str(corpus), "--out", str(tok), "--vocab-size", "2048"], "2/4 tokenizer")
    if not (shards / "manifest.json").is_file():
        _run([py, "data_prep/tokenize_and_shard.py", str(corpus), "--tokenizer", str(tok), "--out", str(shards),
              "--workers", str(workers), "--valid-fraction", "0.02", "--no-progress"], "3/4 tokenize and shard")
    return tok, shards


def _planned_steps(config: Path) -> int | None:
    """trainer.max_steps of an experiment YAML or a run's resolved config.yaml (None if absent)."""
    try:
        return int(yaml.safe_load(config.read_text())["trainer"]["max_steps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def choose_run_dir(out: Path, steps: int) -> Path:
    """OUT/run, unless it holds a run of another length: then OUT/run-STEPS beside it, so that
    shortening or extending the demo keeps the finished run (a run's schedule is fixed by its
    length: the trainer refuses to resume it with another)."""
    first = out / "run"
    have = _planned_steps(first / "config.yaml")
    if have is None or have == steps:
        return first
    other = out / f"run-{steps}"
    print(f"\n== {first} holds a {have}-step run, kept: this {steps}-step run trains in {other} (same data; "
          f"--out DIR puts a whole new demo elsewhere)", flush=True)
    return other


def train(run_dir: Path, shards: Path, tok: Path, steps: int, out: Path) -> None:
    args = ["--config", CONFIG, f"run_dir={run_dir}", f"data.train=[{shards}]", f"data.valid=[{shards}]",
            f"data.tokenizer={tok}", f"trainer.max_steps={steps}"]
    _run([sys.executable, "-m", "megamor.train", *args], "4/4 train the small MoR model (Ctrl-C safe: rerun resumes)",
         # e.g. a demo run left by an older megamor whose defaults differ
         on_config_error=f"to keep it and run the demo elsewhere: make demo DEMO_ARGS=\"--out {out}-2\" "
                         f"(or --fresh, which deletes {out} and starts over)")


def _last_validation(run_dir: Path) -> dict:
    best: dict = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "val/loss" in rec:
                best = rec
    return best


def show_samples(run_dir: Path, tok_dir: Path, max_new_tokens: int = 40) -> None:
    import torch  # lazy, as the imports in _render: torch only once training is done (`--help` stays fast)

    from megamor.inference.generate import generate
    from megamor.runs.load import load_model_from_run

    torch.manual_seed(0)
    model, cfg = load_model_from_run(run_dir)
    tok = load_tokenizer(tok_dir)
    prompts = [[tok.eos_id] + tok.encode(p) for p in PROMPTS]  # EOS = start of a document
    out = generate(model, prompts, max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
    colour = sys.stdout.isatty()
    print(f"\n== samples (greedy, causal routing; each token's recursion depth 0-{cfg.num_recursions}"
          f"{', coloured' if colour else ' as a subscript'})")
    for prompt_ids, gen, depths, prompt_depths in zip(prompts, out.tokens, out.depths, out.prompt_depths):
        # A generated token's depth is the recursion steps it ran when fed back in (the last
        # one never is); the prompt's come from the prefill (minus the EOS prefix).
        ids = prompt_ids[1:] + gen[: len(depths)]
        print("  " + _render(tok, ids, prompt_depths[1:] + depths, cfg.num_recursions, colour))


def _render(tok, ids: list[int], depths: list[int], n_rec: int, colour: bool) -> str:
    import numpy as np

    from megamor.eval.depth import DepthTrace, render_terminal, token_strings  # lazy: imports torch

    pieces = token_strings(tok, ids)
    if colour:
        trace = DepthTrace(np.asarray(ids), pieces, np.asarray(depths), np.full(len(ids), np.nan), n_rec)
        return render_terminal(trace, legend=False).rstrip("\n")
    return "".join(f"{p}{str(d).translate(SUBSCRIPT)}" for p, d in zip(pieces, depths)).replace("\n", "⏎")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m megamor.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="everything goes here (default runs/demo)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the config's); a run of another length goes to OUT/run-STEPS")
    p.add_argument("--workers", type=positive_int, default=2, help="tokenizing processes (default 2)")
    p.add_argument("--fresh", action="store_true", help="delete the previous demo output (OUT) first")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "offline")
    thread_defaults()  # for every step's process (they inherit it) and this one's sampling
    out = Path(args.out)
    if not out.is_absolute():
        out = repo_root() / out
    steps = args.steps if args.steps is not None else _planned_steps(repo_root() / CONFIG)
    if steps is None or steps < 1:
        print(f"megamor.demo: --steps must be a positive number of steps, got {steps}", file=sys.stderr)
        return 2
    if args.fresh and out.exists():
        shutil.rmtree(out)
    data, run_dir = out / "data", choose_run_dir(out, steps)
    t0 = time.time()
    tok, shards = prepare_data(data, args.workers)
    train(run_dir, shards, tok, steps, out)
    val = _last_validation(run_dir)
    if val:
        line = f"validation loss {val['val/loss']:.4f} at step {val['step']}"
        if "val/loss_causal" in val:  # expert choice: top-k above sees later tokens; decoding routes causally
            line = (f"validation loss {val['val/loss_causal']:.4f} with causal routing (as in decoding), "
                    f"{val['val/loss']:.4f} with training's top-k routing, at step {val['step']}")
        line += f"; perplexity {val.get('val/ppl', float('nan')):.2f}"
        print(f"\n== {line}")
    show_samples(run_dir, tok)
    ref = newest_complete(run_dir)
    export_pt = run_dir / "export" / (ref.tag if ref else "step_N") / "megamor.pt"
    wandb_dirs = sorted((run_dir / "wandb").glob("offline-run-*")) if (run_dir / "wandb").is_dir() else []
    print(f"""
== written (in {time.time() - t0:.0f}s)
  corpus, tokenizer, shards   {data}
  run folder                  {run_dir}
    resolved config             {run_dir / 'config.yaml'}
    metrics (one JSON a line)   {run_dir / 'metrics.jsonl'}
    checkpoints                 {run_dir / 'checkpoints'}
    W&B (offline)               {wandb_dirs[-1] if wandb_dirs else run_dir / 'wandb'}   (`wandb sync` to upload)
  next: python -m megamor.export {run_dir}      (consolidated weights + HF-style folder), then e.g.
        python evals/depth.py --checkpoint {export_pt} --tokenizer {tok} --text "Q: What is the capital of Stougel?"
        (docs/evaluation.md)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
