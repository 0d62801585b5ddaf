"""Loading a model to evaluate, and finding the checkpoints of a run.

`load_model(source)` is the one seam every entry point goes through. It accepts
- an `nn.Module` (returned as is),
- a consolidated file: `torch.save({"model": state_dict, "config": model-config dict,
  optional "step"/"tokens"/"flops" or "meta": {...}})`, e.g. `megamor.pt` of an export,
- an export folder of `python -m megamor.export` (its `megamor.pt`), or a Hugging Face
  Llama folder (`config.json` + weights; vanilla models only),
- a DeepSpeed checkpoint tag of a training run (`checkpoints/step_NNNNNNNN/` with its
  COMPLETE marker; any ZeRO stage, consolidated in memory by megamor.train.checkpoint),
- a run folder: its newest complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CONSOLIDATED_SUFFIXES = (".pt", ".pth", ".bin")
_STEP_RE = re.compile(r"(?:step|global_step|iter)[_\-]?(\d+)", re.IGNORECASE)


class CheckpointError(RuntimeError):
    """A checkpoint or run folder that cannot be evaluated; the message says why and where."""


@dataclass
class CheckpointInfo:
    path: Path
    run: str
    kind: str  # consolidated | export | hf | deepspeed
    step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # tokens, flops, ... when the checkpoint records them

    @property
    def name(self) -> str:
        return f"{self.run}@{self.step}" if self.step is not None else f"{self.run}:{self.path.name}"

    def fingerprint(self) -> str:
        """Changes when the checkpoint's bytes change (path, size and mtime of its files)."""
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        h = hashlib.sha256(str(self.path.resolve()).encode())
        for p in files:
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


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
    from megamor.config import from_node
    from megamor.model import ModelConfig

    if isinstance(cfg, ModelConfig):
        return cfg
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: 'config' must be a model-config dict, got {type(cfg).__name__}")
    if "vocab_size" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]  # a whole experiment config
    return from_node(ModelConfig, cfg, prefix="config")


def build_model(cfg: Any, state_dict: dict[str, torch.Tensor], where: Path):
    from megamor.model import MoRLM

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


def read_meta(obj: dict[str, Any], path: Path) -> dict[str, Any]:
    meta = dict(obj.get("meta") or obj.get("metadata") or {})
    for k in ("step", "tokens", "flops", "seq_len"):
        if k in obj and k not in meta:
            meta[k] = obj[k]
    if "step" not in meta:
        m = _STEP_RE.search(path.name)
        if m:
            meta["step"] = int(m.group(1))
    return meta


def load_consolidated(path: Path):
    from megamor.train.safe_load import UnsafeCheckpointError
    from megamor.train.safe_load import load as safe_load

    try:
        obj = safe_load(path, map_location="cpu")
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint: {e}") from e
    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a consolidated megamor checkpoint (needs 'model' and 'config' keys, found {keys})")
    return build_model(obj["config"], obj["model"], path), read_meta(obj, path)


def is_hf_export(path: Path) -> bool:
    cfg = path / "config.json"
    return path.is_dir() and cfg.is_file() and (any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file())


def load_hf(path: Path):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is a dev extra
        raise CheckpointError(f"{path}: loading a Hugging Face export needs `transformers`") from e
    from megamor.model.hf import from_llama_state_dict, model_config_from_llama

    info = json.loads((path / "config.json").read_text())
    if info.get("model_type") == "megamor":  # a MoR export (megamor names) without its megamor.pt
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        meta = {k: info.get(k) for k in ("step", "tokens", "flops", "seq_len") if info.get(k) is not None}
        return build_model(info["megamor"], sd, path), meta
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    if getattr(hf.config, "model_type", None) != "llama":
        raise CheckpointError(f"{path}: only Llama-architecture exports map onto megamor models, got {hf.config.model_type!r}")
    cfg = model_config_from_llama(hf.config)
    return build_model(cfg, from_llama_state_dict(hf.state_dict()), path), {}


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


# -- DeepSpeed tags of a training run (layout: megamor/train/checkpoint.py) ----------------
EXPORT_FILE = "megamor.pt"  # what `python -m megamor.export` writes into an export folder


def is_deepspeed_tag(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("mp_rank_*_model_states.pt")) or any(path.glob("*zero_pp_rank_*")))


def _complete_meta(path: Path) -> dict[str, Any] | None:
    """The COMPLETE marker's metadata when the tag is complete and intact, else None."""
    from megamor.train.checkpoint import read_complete

    return read_complete(path)


def load_deepspeed_tag(path: Path):
    from megamor.train.checkpoint import CheckpointError as TrainCheckpointError
    from megamor.train.checkpoint import consolidated_state_dict, experiment_of, resolve_tag
    from megamor.train.safe_load import UnsafeCheckpointError

    if _complete_meta(path) is None:
        raise CheckpointError(f"{path}: an incomplete DeepSpeed checkpoint (no COMPLETE marker, or its files changed size)")
    try:
        ref = resolve_tag(path)
        exp = experiment_of(ref)
        sd = consolidated_state_dict(ref)  # weights-only loads (megamor.train.safe_load)
    except (TrainCheckpointError, UnsafeCheckpointError) as e:
        raise CheckpointError(str(e)) from None
    cfg = exp.model
    meta = {k: ref.meta.get(k) for k in ("step", "tokens", "flops") if ref.meta.get(k) is not None}
    meta["seq_len"] = exp.data.seq_len  # the context it was trained with: evaluation's default
    return build_model(cfg, sd, path), meta


def _peek_meta(path: Path) -> dict[str, Any]:
    """Step/tokens/FLOPs of a consolidated file without building the model: a sidecar
    `<file>.json` when present, else the file's own metadata."""
    side = path.with_suffix(path.suffix + ".json")
    if side.is_file():
        return json.loads(side.read_text())
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  any unreadable file just has no metadata to peek at
        return read_meta({}, path)
    return read_meta(obj, path) if isinstance(obj, dict) else {}


def describe(path: Path, run: str) -> CheckpointInfo | None:
    """A CheckpointInfo for anything evaluable at `path`, None otherwise (incomplete tags too)."""
    if path.is_file() and path.suffix in CONSOLIDATED_SUFFIXES and path.name != "pytorch_model.bin":
        meta = _peek_meta(path)
        return CheckpointInfo(path, run, "consolidated", meta.get("step"), meta)
    if not path.is_dir():
        return None
    if (path / EXPORT_FILE).is_file():
        meta = _peek_meta(path / EXPORT_FILE)
        return CheckpointInfo(path, run, "export", meta.get("step"), meta)
    if is_deepspeed_tag(path):
        meta = _complete_meta(path)
        if meta is None:
            return None
        return CheckpointInfo(path, run, "deepspeed", meta.get("step"), {k: meta.get(k) for k in ("step", "tokens", "flops") if meta.get(k) is not None})
    if is_hf_export(path):
        m = _STEP_RE.search(path.name)
        return CheckpointInfo(path, run, "hf", int(m.group(1)) if m else None)
    return None


_PREFERENCE = {"export": 0, "consolidated": 1, "hf": 2, "deepspeed": 3}  # cheapest to load first


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Every evaluable checkpoint of a run folder, oldest step first.

    Looks in the folder and its `checkpoints/`, `export/`, `exports/` subfolders for
    consolidated files (`*.pt`, `*.pth`, `*.bin`), export folders, Hugging Face folders and
    complete DeepSpeed tags. When one step exists in several forms, the cheapest to load is
    kept (an export over its DeepSpeed tag). Raises CheckpointError when there is none."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run folder not found: {run}")
    found: list[CheckpointInfo] = []
    pending: list[str] = []
    for d in [run] + [run / s for s in ("checkpoints", "export", "exports") if (run / s).is_dir()]:
        for p in sorted(d.iterdir()):
            info = describe(p, run.name)
            if info is not None:
                found.append(info)
            elif p.is_dir() and is_deepspeed_tag(p):
                pending.append(p.name)
    by_step: dict[Any, CheckpointInfo] = {}
    for c in found:
        key = c.step if c.step is not None else str(c.path)
        if key not in by_step or _PREFERENCE[c.kind] < _PREFERENCE[by_step[key].kind]:
            by_step[key] = c
    out = list(by_step.values())
    if not out:
        extra = f"; incomplete DeepSpeed tags (no COMPLETE marker or damaged): {', '.join(pending)}" if pending else ""
        raise CheckpointError(f"{run}: no complete checkpoint to evaluate{extra}")
    out.sort(key=lambda c: (c.step is None, c.step if c.step is not None else 0, c.path.name))
    return out


def find_tokenizer(source: Any) -> Path | None:
    """A tokenizer stored with a checkpoint: tokenizer.model or tokenizer/ in its folder, its
    parents (run folder), or the training config's `data.tokenizer` of a DeepSpeed tag."""
    if isinstance(source, (torch.nn.Module, type(None))):
        return None
    p = Path(source.path if isinstance(source, CheckpointInfo) else source)
    if is_deepspeed_tag(p) and (p / "experiment.yaml").is_file():
        try:
            from omegaconf import OmegaConf

            tok = OmegaConf.load(p / "experiment.yaml").get("data", {}).get("tokenizer")
            if tok and Path(tok).exists():
                return Path(tok)
        except Exception:  # noqa: BLE001, S110  best effort: a broken experiment.yaml falls back to the search below
            pass
    for d in [p if p.is_dir() else p.parent, p.parent, p.parent.parent, p.parent.parent.parent]:
        for cand in (d / "tokenizer.model", d / "tokenizer"):
            if cand.exists():
                return cand
    return None
