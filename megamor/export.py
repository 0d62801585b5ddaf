"""python -m megamor.export RUN_DIR [--tag step_00001000] [--out DIR] [--overwrite]

Turns a training checkpoint (any ZeRO stage; ZeRO-3 shards are consolidated with DeepSpeed's
zero_to_fp32) into a self-contained folder:

    DIR/megamor.pt         fp32 {"model": state dict, "config": model config, "step", "tokens", "flops"}
    DIR/megamor.pt.json    the same metadata, readable without torch
    DIR/config.json        Hugging Face config: LlamaConfig for vanilla models (load with
                           transformers.LlamaForCausalLM.from_pretrained(DIR)); for MoR models
                           {"model_type": "megamor", "megamor": {...}, "auto_map": ...}: load with
                           AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
                           (or megamor's load_exported)
    DIR/configuration_megamor.py, DIR/modeling_megamor.py, DIR/routing.py   MoR models: the
                           self-contained transformers code (no megamor import needed;
                           routing.py is megamor's routing policy)
    DIR/model.safetensors  the weights, Llama names for vanilla models, megamor names for MoR
    DIR/tokenizer.*        when the run's tokenizer is known (checked against the hash the
                           checkpoint recorded): tokenizer.model with tokenizer.json +
                           tokenizer_config.json made from it, or a Hugging Face tokenizer's
                           tokenizer.json and configs as they were. AutoTokenizer.from_pretrained(DIR)
                           loads either (built-in class, no remote code) and encodes as megamor does

Default DIR: RUN_DIR/export/<tag>. DIR must be new or empty; with --overwrite a non-empty DIR
is replaced whole (the export is written into a hidden sibling folder and swapped in, so old
files never sit beside new ones and a failed export leaves DIR as it was). The tag's files are
checked against their content hashes and read with the weights-only loader. Exit 2 when DIR is
not empty (without --overwrite), the checkpoint is missing, damaged or holds anything but
weights (a planted pickle payload is refused, never run), or the tokenizer found is not the one
it was trained with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megamor.cli import ArgumentParser
from megamor.config import from_node
from megamor.data.tokenizer import (
    Tokenizer,
    TokenizerError,
    TokenizerMismatchError,
    check_same_tokenizer,
    load_tokenizer,
)
from megamor.hf.tokenizer_files import TokenizerFilesError, export_tokenizer
from megamor.runs.layout import CheckpointError, CheckpointRef
from megamor.runs.tags import resolve_tag
from megamor.utils.atomic import replace_dir, temp_path, write_json

if TYPE_CHECKING:  # torch and the model load after the arguments are parsed (--help answers at once)
    from megamor.model import MoRLM
    from megamor.model.config import ModelConfig

CONSOLIDATED = "megamor.pt"
MOR_MODEL_TYPE = "megamor"


def _is_vanilla(cfg: ModelConfig) -> bool:
    return cfg.sharing == "none" and cfg.router.type == "none"


def _find_tokenizer(cfg_data: Any, run_dir: Path) -> Tokenizer | None:
    for cand in ([Path(cfg_data.tokenizer)] if cfg_data.tokenizer else []) + [run_dir / "tokenizer", run_dir / "tokenizer.model"]:
        if cand.exists():
            return load_tokenizer(cand)
    return None


class ExportTargetError(ValueError):
    """The output folder holds files already (and --overwrite was not given), or is a file."""


def check_target(out_dir: Path, overwrite: bool) -> None:
    """An export goes into a new or empty folder; a non-empty one only with overwrite (replaced
    whole, never merged into: old files must not sit beside new ones)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportTargetError(f"{out_dir}: is a file, not a folder")
    if out_dir.is_dir() and not overwrite:
        entries = sorted(p.name for p in out_dir.iterdir())
        if entries:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ExportTargetError(f"{out_dir}: is not empty ({len(entries)} entries: {shown}); pass --overwrite to "
                                    "replace it, or choose another --out")


def export(run_dir: str | Path, out: str | Path | None = None, tag: str | None = None, overwrite: bool = False) -> Path:
    """Export a tag into `out` (default RUN/export/<tag>): written into a hidden sibling folder,
    then swapped in whole (atomic.replace_dir), so a failed or killed export leaves the target
    as it was. A non-empty target is refused unless `overwrite`."""
    from megamor.model.hf import unexportable_keys
    from megamor.runs.load import trained_tokenizer_hash
    from megamor.train.config import load_tag_experiment

    if out:
        check_target(Path(out), overwrite)  # before the (long) hash check of the tag
    ref = resolve_tag(run_dir, tag)
    exp = load_tag_experiment(ref)
    if unexportable_keys(exp.model):
        raise CheckpointError(f"{ref.path}: {', '.join(unexportable_keys(exp.model))} set: the Hugging Face export does not "
                              "implement it (the run's checkpoints and megamor.pt load everywhere else)")
    run = ref.root.parent
    trained_hash = trained_tokenizer_hash(ref)
    tok = _find_tokenizer(exp.data, run)
    if tok is not None:  # the same identity check as training and evaluation, before anything is written
        check_same_tokenizer(trained_hash, tok.content_hash, f"{ref.path} was trained with", f"tokenizer {tok.path}")
    out_dir = Path(out) if out else run / "export" / ref.tag
    check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out_dir)
    tmp.mkdir()
    try:
        _write_export(ref, exp, tok, trained_hash, tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_export(ref: CheckpointRef, exp: Any, tok: Tokenizer | None, trained_hash: str | None, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from megamor.hf.remote_code import hf_weights, write_remote_code
    from megamor.model.hf import llama_config, to_llama_state_dict
    from megamor.runs.consolidate import consolidated_state_dict

    cfg = exp.model
    sd = consolidated_state_dict(ref)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
    meta = {"step": ref.step, "tokens": ref.meta.get("tokens"), "flops": ref.meta.get("flops"), "source": str(ref.path),
            "run": exp.name, "seq_len": exp.data.seq_len,
            "tokenizer_hash": trained_hash or (tok.content_hash if tok is not None else None)}  # what evaluation checks
    torch.save({"model": sd, "config": dataclasses.asdict(cfg), **meta}, out_dir / CONSOLIDATED)
    write_json(out_dir / f"{CONSOLIDATED}.json", meta)

    ids = special_token_ids(tok)
    if _is_vanilla(cfg):
        hf_cfg = llama_config(cfg)
        hf_cfg.architectures = ["LlamaForCausalLM"]
        for name, value in ids.items():
            setattr(hf_cfg, name, value)
        hf_cfg.save_pretrained(out_dir)
        weights = to_llama_state_dict(cfg, sd)
    else:
        write_remote_code(out_dir, cfg, **meta, **ids)  # AutoModelForCausalLM(..., trust_remote_code=True)
        weights = hf_weights(sd, cfg)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        _write_hf_tokenizer(out_dir, tok, cfg.max_seq_len)


def special_token_ids(tok: Tokenizer | None) -> dict[str, int | None]:
    """The ids transformers' generation reads from config.json (its EOS stops `generate`): the
    run's tokenizer's, None without one (LlamaConfig's defaults, 1 and 2, are another vocabulary's)."""
    def known(i: int | None) -> int | None:
        return i if i is not None and i >= 0 else None

    if tok is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {"bos_token_id": known(tok.bos_id), "eos_token_id": known(tok.eos_id), "pad_token_id": known(tok.pad_id)}


def _write_hf_tokenizer(out_dir: Path, tok: Tokenizer, max_length: int) -> None:
    """The tokenizer's files (megamor.hf.tokenizer_files.export_tokenizer); without the
    `tokenizers` package (the [eval] extra) or for a model it cannot express, a note instead."""
    try:
        export_tokenizer(out_dir, tok, max_length)
    except ImportError as e:
        print(f"megamor.export: note: no tokenizer.json written ({e.name} is not installed: pip install -e '.[eval]'); "
              "AutoTokenizer will not load this folder", file=sys.stderr)
    except TokenizerFilesError as e:
        print(f"megamor.export: note: no tokenizer.json written: {e}", file=sys.stderr)


def load_exported(path: str | Path) -> tuple[MoRLM, ModelConfig]:
    """(MoRLM, ModelConfig) from an export folder (vanilla or MoR) or its megamor.pt."""
    import torch

    from megamor.model import MoRLM
    from megamor.model.config import ModelConfig, with_stored_defaults

    p = Path(path)
    f = p / CONSOLIDATED if p.is_dir() else p
    obj = torch.load(f, map_location="cpu", weights_only=True)
    cfg = from_node(ModelConfig, with_stored_defaults(obj["config"]), prefix="config")
    model = MoRLM(cfg)
    missing, unexpected = model.load_state_dict(obj["model"], strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{f}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m megamor.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder (newest complete checkpoint) or a checkpoint tag folder")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00001000 (default: the newest complete)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/export/<tag>); must be new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (swapped in whole)")
    args = p.parse_args(argv)
    from megamor.runs.safe_load import UnsafeCheckpointError

    try:
        out = export(args.run_dir, args.out, args.tag, overwrite=args.overwrite)
    except (CheckpointError, UnsafeCheckpointError, TokenizerMismatchError, TokenizerError, ExportTargetError) as e:  # bad input
        print(f"megamor.export: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / f"{CONSOLIDATED}.json").read_text())
    print(f"exported step {info['step']} of {info['run']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
