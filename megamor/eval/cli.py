"""Argument parsing shared by the evals/*.py entry points (which stay thin)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import CheckpointError, find_tokenizer, load_model_and_meta
from .scoring import Scorer
from .tokenizer import EvalTokenizer, load_tokenizer


def add_model_args(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=checkpoint_required, help="consolidated .pt file, Hugging Face export folder, or run folder (newest complete checkpoint)")
    g.add_argument("--tokenizer", help="sentencepiece .model file or tokenizer folder (default: one stored beside the checkpoint)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="autocast dtype (default fp32)")
    g.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    g.add_argument("--max-batch-tokens", type=int, default=16384, help="cap on rows x longest row per batch (bounds the logits memory)")
    g.add_argument("--max-length", type=int, default=None, help="context length (default: the model's max_seq_len)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def default_device(device: Optional[str]) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def tokenizer_for(source: Any, path: Optional[str]) -> EvalTokenizer:
    p = path or find_tokenizer(source)
    if p is None:
        raise SystemExit("no tokenizer given (--tokenizer) and none found beside the checkpoint")
    return load_tokenizer(p)


def build_scorer(args: argparse.Namespace, source: Any = None) -> tuple[Scorer, EvalTokenizer, dict]:
    source = source if source is not None else args.checkpoint
    device = default_device(args.device)
    try:
        model, meta = load_model_and_meta(source, device=device)
    except CheckpointError as e:  # a missing, damaged or unsafe checkpoint: bad input, exit 2
        print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    tok = tokenizer_for(source, args.tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    scorer = Scorer(
        model,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_length=args.max_length,
        device=device,
        dtype=args.dtype,
        pad_id=tok.eos_id,
        progress=not args.no_progress,
    )
    return scorer, tok, meta


def write_json(path: Optional[str], payload: dict) -> None:
    text = json.dumps(payload, indent=2, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


def set_threads() -> None:
    n = os.environ.get("OMP_NUM_THREADS")
    if n:
        torch.set_num_threads(int(n))
