"""Argument parsing shared by the evals/*.py entry points (which stay thin).

Light on purpose: torch, the model and the tokenizer load inside the functions that need them,
so an argument error answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megamor import cli
from megamor.cli import BadInput
from megamor.data.tokenizer import TokenizerMismatchError
from megamor.env import thread_defaults
from megamor.utils.atomic import atomic_open

from .errors import EvalInputError
from .identity import ALLOW_FLAG, check_identity

if TYPE_CHECKING:
    import torch

    from .scoring import Scorer
    from .tokenizer import EvalTokenizer


def add_model_args(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=checkpoint_required, help="consolidated .pt file, Hugging Face export folder, or run folder (newest complete checkpoint)")
    g.add_argument("--tokenizer", help="tokenizer.model (sentencepiece), tokenizer.json (Hugging Face) or their folder (default: one stored beside the checkpoint)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="autocast dtype (default fp32)")
    g.add_argument("--batch-size", type=cli.positive_int, default=16, help="rows per forward pass")
    g.add_argument("--max-batch-tokens", type=cli.positive_int, default=16384, help="cap on rows x longest row per batch (bounds the logits memory)")
    g.add_argument("--max-length", type=cli.positive_int, default=None,
                   help="context length; longer requests lose their oldest context tokens (default: the model's max_seq_len)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_identity_arg(g)


def add_identity_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(ALLOW_FLAG, action="store_true",
                   help="evaluate even with a tokenizer or shards other than the ones the checkpoint was trained with")


def default_device(device: str | None) -> str:
    """--device, checked against this torch build (a CUDA device asked of a CPU-only torch is
    bad input, not a crash), else cuda when available."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BadInput(f"--device {device}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadInput(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def tokenizer_for(source: Any, path: str | None) -> EvalTokenizer:
    from megamor.runs.find import find_tokenizer

    from .tokenizer import load_tokenizer

    p = path or find_tokenizer(source)
    if p is None:
        raise BadInput(f"no tokenizer given (--tokenizer) and none found beside the checkpoint {source}")
    return load_tokenizer(p)


def build_scorer(args: argparse.Namespace, source: Any = None, shards: Sequence[str] = ()) -> tuple[Scorer, EvalTokenizer, dict]:
    """The model, its tokenizer (checked against the one it was trained with, and `shards` too:
    megamor.eval.identity) and a Scorer at the evaluation context."""
    from megamor.runs.load import load_model_and_meta

    from .scoring import Scorer

    source = source if source is not None else args.checkpoint
    device = default_device(args.device)
    model, meta = load_model_and_meta(source, device=device)
    tok = tokenizer_for(source, args.tokenizer)
    meta.update(check_identity(meta, source, tok, shards, allow_mismatch=args.allow_tokenizer_mismatch))
    if tok.vocab_size > model.cfg.vocab_size:
        raise BadInput(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size} "
                       f"(--tokenizer {args.tokenizer or 'found beside the checkpoint'}): give the run's tokenizer")
    max_length, meta["context_from"] = context_length(args.max_length, model)
    scorer = Scorer(
        model,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_length=max_length,
        device=device,
        dtype=args.dtype,
        pad_id=tok.eos_id,
        progress=not args.no_progress,
    )
    return scorer, tok, meta


def context_length(given: int | None, model: torch.nn.Module) -> tuple[int, str]:
    """The evaluation context and where it came from: --max-length, else the model's max_seq_len
    (as Scorer's default). Not the training data.seq_len: few-shot requests are often longer than
    the training windows, and left truncation would cut their questions."""
    if given is not None:
        return given, "--max-length"
    from .scoring import model_max_length

    return model_max_length(model), "model.max_seq_len"


def write_text(path: str | Path, text: str) -> None:
    """An output file, atomically, its folder created first (a missing --out/--html folder is fine)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(p, "w") as f:
        f.write(text)


def write_json(path: str | None, payload: dict) -> None:
    text = json.dumps(payload, indent=2, default=str)
    if path:
        write_text(path, text + "\n")
    print(text, file=cli.results(), flush=True)


def run_main(main: Callable[[], Any]) -> None:
    """Run an evals/ entry point: bad input (a file, line, task or checkpoint named on the command
    line) prints one `TOOL: error:` line and exits 2, nothing evaluated; other failures keep
    their traceback. Library noise (DeepSpeed's start-up lines) goes to stderr: stdout is JSON."""
    from megamor.runs.layout import CheckpointError

    from .tasks.base import TaskDataError

    cli.run_main(main, bad_input=(TaskDataError, CheckpointError, EvalInputError, TokenizerMismatchError))


def set_threads() -> None:
    """Threads from OMP_NUM_THREADS, else the cores this process may use (megamor.env)."""
    import torch

    torch.set_num_threads(thread_defaults())
