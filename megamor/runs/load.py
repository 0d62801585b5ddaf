"""Loading a model from a run folder or anything else that holds one.

`load_model(source)` is the one seam every entry point goes through. It accepts
- an `nn.Module` (returned as is),
- a consolidated file: `torch.save({"model": state_dict, "config": model-config dict,
  optional "step"/"tokens"/"flops" or "meta": {...}})`, e.g. `megamor.pt` of an export,
- an export folder of `python -m megamor.export` (its `megamor.pt`), or a Hugging Face
  folder (`config.json` + weights: a MoR export, or a vanilla Llama model),
- a DeepSpeed checkpoint tag of a training run (`checkpoints/step_NNNNNNNN/` with its
  COMPLETE marker; any ZeRO stage and TP size, consolidated in memory: consolidate.py),
- a run folder: its newest complete checkpoint (find.list_checkpoints).
Every torch file is read by the weights-only loader (safe_load.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from megamor.config import from_node, merge_sources
from megamor.data.config import DataConfig
from megamor.env import repo_root
from megamor.model import ModelConfig, MoRLM
from megamor.model.config import with_stored_defaults
from megamor.runs.consolidate import consolidated_state_dict
from megamor.runs.find import CheckpointInfo, describe, is_deepspeed_tag, is_hf_export, list_checkpoints, read_meta
from megamor.runs.layout import CONFIG_FILE, EXPORT_FILE, TRAINER_STATE, CheckpointError, CheckpointRef
from megamor.runs.safe_load import UnsafeCheckpointError
from megamor.runs.safe_load import load as safe_load
from megamor.runs.tags import read_complete, resolve_tag


def load_model(source: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The model (in eval mode) from any supported source; see the module docstring."""
    model, _ = load_model_and_meta(source, device, dtype)
    return model


def load_model_and_meta(source: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    if isinstance(source, torch.nn.Module):
        model, meta = source, {}
    elif isinstance(source, CheckpointInfo):
        model, meta = _load_path(source.path)
        meta = {**source.meta, **meta}
        if meta.get("step") is None:
            meta["step"] = source.step
    else:
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.is_dir() and describe(path, path.name) is None:
            if is_deepspeed_tag(path):  # a tag that describe() refused: say why
                raise CheckpointError(f"{path}: an incomplete DeepSpeed checkpoint (no COMPLETE marker, or its files changed size)")
            return load_model_and_meta(list_checkpoints(path)[-1], device, dtype)
        model, meta = _load_path(path)
    model = move(model, device, dtype)
    model.eval()
    return model, meta


def move(model: torch.nn.Module, device: str | torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """model.to(device, dtype): floating-point tensors take the dtype, integer buffers stay."""
    return model.to(device=torch.device(device), dtype=dtype) if dtype is not None else model.to(torch.device(device))


def _load_path(path: Path):
    if path.is_file():
        return load_consolidated(path)
    if (path / EXPORT_FILE).is_file():
        return load_consolidated(path / EXPORT_FILE)
    if is_deepspeed_tag(path):
        return load_deepspeed_tag(path)
    if is_hf_export(path):
        return load_hf(path)
    raise CheckpointError(f"{path}: not a checkpoint file, export folder, Hugging Face folder or DeepSpeed tag")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes: DDP/DeepSpeed `module.`, torch.compile `_orig_mod.`, and a
    `model.` that every key carries (a wrapper module)."""
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod."):
            while k.startswith(pre):
                k = k[len(pre) :]
        out[k] = v
    if out and all(k.startswith("model.") for k in out):
        out = {k[len("model.") :]: v for k, v in out.items()}
    return out


def _model_config(cfg: Any, where: Path):
    if isinstance(cfg, ModelConfig):
        return cfg
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: 'config' must be a model-config dict, got {type(cfg).__name__}")
    if "vocab_size" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]  # a whole experiment config
    return from_node(ModelConfig, with_stored_defaults(cfg), prefix="config")


def build_model(cfg: Any, state_dict: dict[str, torch.Tensor], where: Path):
    model = MoRLM(_model_config(cfg, where))
    sd = _strip_prefixes(state_dict)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{where}: state dict does not match the config: {str(e).splitlines()[-1].strip()}") from e
    if model.cfg.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{where}: state dict does not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model


def load_consolidated(path: Path):
    try:
        obj = safe_load(path, map_location="cpu")
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:
        if not _looks_like_torch_file(path):
            raise CheckpointError(f"{path}: cannot read as a torch checkpoint: not a file written by torch.save") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint: {first}") from e
    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a consolidated megamor checkpoint (needs 'model' and 'config' keys, found {keys})")
    return build_model(obj["config"], obj["model"], path), read_meta(obj, path)


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_hf(path: Path):
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - transformers is a dev extra
        raise CheckpointError(f"{path}: loading a Hugging Face export needs `transformers`") from e
    try:
        info = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unreadable: {e}") from None
    if info.get("model_type") == "megamor":  # a MoR export (megamor names) without its megamor.pt
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        meta = {k: info.get(k) for k in ("step", "tokens", "flops", "seq_len", "tokenizer_hash") if info.get(k) is not None}
        return build_model(info["megamor"], sd, path), meta
    # One reader for every Hugging Face folder (megamor.adapt's): it refuses, naming the key,
    # what megamor would compute differently (RoPE scaling, other activations, biases), which
    # reading the Llama config here silently dropped.
    from megamor.model.hf_source import AdaptError, read_source

    try:
        cfg, sd, _ = read_source(path)
    except AdaptError as e:
        raise CheckpointError(str(e)) from None
    return build_model(cfg, sd, path), {}


def saved_experiment(ref: CheckpointRef) -> Any:
    """The untyped experiment config a tag was trained with (its experiment.yaml); typed by
    megamor.train.config when the trainer needs it."""
    cfg_file = ref.path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{ref.path}: no {CONFIG_FILE}")
    return merge_sources([cfg_file])


def saved_model_config(ref: CheckpointRef) -> ModelConfig:
    """The model config of a tag. experiment.yaml holds the resolved `model:` section; a
    `model_config:` file it names, when still there, fills keys an older save lacks."""
    node = saved_experiment(ref)
    model = with_stored_defaults(node.get("model") or {})
    model_file = node.get("model_config")
    if model_file:
        path = Path(str(model_file)).expanduser()
        path = path if path.is_absolute() or path.exists() else repo_root() / path
        if path.is_file():
            model = OmegaConf.merge(merge_sources([path]), model)
    return from_node(ModelConfig, model, prefix="model")


def trained_tokenizer_hash(ref: CheckpointRef) -> str | None:
    """The SHA-256 of the tokenizer a tag was trained with (its trainer_state.pt records it; evaluation checks it)."""
    state = ref.path / TRAINER_STATE
    return safe_load(state, map_location="cpu").get("tokenizer_hash") if state.is_file() else None


def load_deepspeed_tag(path: Path):
    if read_complete(path) is None:
        raise CheckpointError(f"{path}: an incomplete DeepSpeed checkpoint (no COMPLETE marker, or its files changed size)")
    try:
        ref = resolve_tag(path)
        node = saved_experiment(ref)
        cfg = saved_model_config(ref)
        sd = consolidated_state_dict(ref)  # weights-only loads (megamor.runs.safe_load)
        tokenizer_hash = trained_tokenizer_hash(ref)
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    meta = {k: ref.meta.get(k) for k in ("step", "tokens", "flops") if ref.meta.get(k) is not None}
    meta["seq_len"] = int(OmegaConf.select(node, "data.seq_len", default=DataConfig.seq_len))  # the training context
    if tokenizer_hash:
        meta["tokenizer_hash"] = tokenizer_hash
    return build_model(cfg, sd, path), meta


def load_model_from_run(run_dir: str | Path, tag: str | None = None, device: str | torch.device = "cpu"):
    """(MoRLM in eval mode with fp32 weights, its ModelConfig) from a run folder or tag folder,
    any ZeRO stage. No process group needed."""
    ref = resolve_tag(run_dir, tag)
    cfg = saved_model_config(ref)
    model = MoRLM(cfg)
    sd = consolidated_state_dict(ref)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{ref.path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), cfg
