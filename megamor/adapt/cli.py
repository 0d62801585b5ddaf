"""python -m megamor.adapt --model HF_DIR --out DIR [--num-recursions N] [--capacity C,...] [--no-skip]
python -m megamor.adapt --model SOURCE --generate N (--prompt TEXT | --prompt-ids 1,2,3) [--csv PATH]

Wraps a pretrained Hugging Face Llama, Mistral, Qwen2 or Qwen3 checkpoint as a megamor model
that routes tokens over the checkpoint's own layers (megamor.adapt.wrap): the N layers become
--num-recursions steps of distinct layers (default: one per layer), an expert-choice router
before each, capacities --capacity (default (N_r - r) / N_r) or all 1 with --no-skip (the
source model's logits, exactly). The weights are not changed; only the routers are new.

--out DIR writes DIR/megamor.pt (loadable everywhere a megamor checkpoint is) and
DIR/model.yaml (the model config to train with). Router-only tuning on text:

    python -m megamor.train --config EXPERIMENT.yaml model_config=DIR/model.yaml \\
        trainer.init_from=DIR/megamor.pt trainer.train_only=routers

--generate N decodes N tokens per prompt (greedy, megamor.inference.generate, causal routing)
and prints the throughput, the depth histogram of the generated tokens and the text coloured
by depth; --csv PATH writes the depth trace (one histogram per generated position, the
format of megamor.runs.depth_csv). SOURCE is a Hugging Face folder (wrapped as above) or a
megamor model (an --out folder's megamor.pt, a run folder: e.g. after router tuning).
Exit codes: 0 done, 1 unreadable checkpoint, 2 bad input (unsupported architecture, bad
arguments).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from megamor.cli import ArgumentParser, positive_int, report
from megamor.config import ConfigError

if TYPE_CHECKING:  # torch and the model load after the arguments are parsed (--help answers at once)
    from megamor.model.mor import MoRLM

TOOL = "megamor.adapt"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder that is not one of megamor's own exports."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") != "megamor"
    except (OSError, json.JSONDecodeError):
        return True  # read_source names the problem


def build(args: argparse.Namespace) -> MoRLM:
    import torch

    from megamor.adapt.wrap import adapt_config, wrap
    from megamor.model.hf_source import read_source

    src = Path(args.model)
    if is_hf_folder(src):
        source, state, _ = read_source(src)
        return wrap(source, state, adapt_config(source, args.num_recursions, args.capacity, args.no_skip), args.seed)
    from megamor.runs.load import load_model

    return load_model(src, dtype=torch.float32)


def save(model: MoRLM, out: Path, source: str) -> Path:
    from omegaconf import OmegaConf

    from megamor.convert import save as save_checkpoint
    from megamor.utils.atomic import atomic_open

    path = save_checkpoint(model, out, source=source, init="adapt")
    with atomic_open(out / "model.yaml", "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(model.cfg))))
    return path


def histogram(depths: Sequence[int], num_depths: int) -> list[int]:
    counts = [0] * (num_depths + 1)
    for d in depths:
        counts[d] += 1
    return counts


def format_histogram(counts: Sequence[int], width: int = 40) -> str:
    total = max(1, sum(counts))
    lines = [f"  depth {d}: {n:6d} ({n / total:6.1%}) {'#' * round(width * n / total)}" for d, n in enumerate(counts)]
    mean = sum(d * n for d, n in enumerate(counts)) / total
    return "\n".join(lines + [f"  mean depth {mean:.3f} of {len(counts) - 1}"])


def decode(model: MoRLM, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
           csv: Path | None) -> tuple[object, float]:
    """Greedy decoding; returns (GenerationOutput, generated tokens per second)."""
    from megamor.inference.generate import generate
    from megamor.runs.depth_csv import write_csv

    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens, eos_id=eos_id)
    wall = time.perf_counter() - t0
    n = sum(len(t) for t in out.tokens)
    if csv is not None:  # one histogram per generated position j (over the prompts), step j + 1
        longest = max((len(d) for d in out.depths), default=0)
        rows = [(j + 1, histogram([d[j] for d in out.depths if j < len(d)], model.cfg.num_recursions))
                for j in range(longest)]
        write_csv(csv, rows)
    return out, n / max(wall, 1e-9)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m megamor.adapt", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder (llama, mistral, qwen2, qwen3) or a megamor model")
    p.add_argument("--out", default=None, help="write DIR/megamor.pt and DIR/model.yaml")
    p.add_argument("--num-recursions", type=int, default=0, help="routed steps of distinct layers (0: one per layer)")
    p.add_argument("--capacity", type=_floats, default=None, help="kept fraction per step, e.g. 1,0.75,0.5,0.25")
    p.add_argument("--no-skip", action="store_true", help="capacity 1 at every step: the source model exactly")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers' initialisation")
    p.add_argument("--generate", type=positive_int, default=None, metavar="N", help="decode N tokens per prompt")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable); needs a tokenizer")
    p.add_argument("--prompt-ids", type=_ints, action="append", default=[], help="prompt as token ids (repeatable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file/folder (default: the --model folder's)")
    p.add_argument("--csv", type=Path, default=None, help="write the depth trace of the generated tokens here")
    args = p.parse_args(argv)
    if args.out is None and not args.generate:
        p.error("nothing to do: give --out DIR and/or --generate N")
    if args.generate and not (args.prompt or args.prompt_ids):
        p.error("--generate needs --prompt TEXT or --prompt-ids 1,2,3")
    from megamor.model.hf_source import AdaptError

    try:
        model = build(args).eval()
    except (AdaptError, ConfigError, FileNotFoundError) as e:
        report(TOOL, e)
        return 2
    except Exception as e:  # noqa: BLE001  # the checkpoint's own loader failed: unreadable
        from megamor.runs.layout import CheckpointError

        report(TOOL, e)
        return 2 if isinstance(e, CheckpointError) else 1
    cfg = model.cfg
    print(f"{TOOL}: {cfg.n_layers} layers in {cfg.num_recursions} routed steps, capacities {cfg.capacities}, "
          f"{model.num_params() / 1e6:.2f}M params")
    if args.out:
        print(f"{TOOL}: wrote {save(model, Path(args.out), str(args.model))}")
    if not args.generate:
        return 0
    tok = None
    if args.prompt or args.tokenizer:
        from megamor.eval.errors import EvalInputError
        from megamor.eval.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(args.tokenizer or args.model)
        except EvalInputError as e:
            report(TOOL, e)
            return 2
    prompts = [list(ids) for ids in args.prompt_ids] + [tok.encode(t) for t in args.prompt]
    bad = [i for ids in prompts for i in ids if not 0 <= i < cfg.vocab_size]
    if bad or any(not ids for ids in prompts):
        report(TOOL, f"--prompt-ids: token ids must be in [0, {cfg.vocab_size}) and prompts non-empty")
        return 2
    out, speed = decode(model, prompts, args.generate, getattr(tok, "eos_id", None), args.csv)
    depths = [d for row in out.depths for d in row]
    print(f"{TOOL}: {sum(len(t) for t in out.tokens)} tokens generated at {speed:.1f} tokens/s")
    # A token's depth is that of the pass it was fed to: the last token of each output never ran.
    print(f"{TOOL}: depth histogram of the {len(depths)} generated tokens fed back through the model "
          f"(the last of each output never ran; steps of {cfg.n_layers // cfg.num_recursions} layers):")
    print(format_histogram(histogram(depths, cfg.num_recursions)))
    if tok is not None:
        import numpy as np

        from megamor.eval.depth import DepthTrace, render_terminal, token_strings

        for toks, ds in zip(out.tokens, out.depths):
            ids = toks[: len(ds)]
            trace = DepthTrace(np.array(ids), token_strings(tok, ids), np.array(ds[: len(ids)]),
                               np.full(len(ids), np.nan), cfg.num_recursions)
            print(render_terminal(trace, colour=sys.stdout.isatty()), end="")
    if args.csv is not None:
        print(f"{TOOL}: depth trace -> {args.csv}")
    return 0
