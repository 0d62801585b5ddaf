"""What a folder holds that can be loaded: describe one path, list a run's checkpoints, find
the tokenizer stored with a checkpoint. Nothing here builds a model (see load.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from megamor.runs.integrity import check_tag, quarantine_dir, quarantined
from megamor.runs.layout import CHECKPOINTS, CONFIG_FILE, EXPORT_FILE, CheckpointError
from megamor.runs.tags import read_complete

CONSOLIDATED_SUFFIXES = (".pt", ".pth", ".bin")
_STEP_RE = re.compile(r"(?:step|global_step|iter)[_\-]?(\d+)", re.IGNORECASE)


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


def is_hf_export(path: Path) -> bool:
    cfg = path / "config.json"
    return path.is_dir() and cfg.is_file() and (any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file())


def is_deepspeed_tag(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("mp_rank_*_model_states.pt")) or any(path.glob("*zero_pp_rank_*")))


def read_meta(obj: dict[str, Any], path: Path) -> dict[str, Any]:
    meta = dict(obj.get("meta") or obj.get("metadata") or {})
    for k in ("step", "tokens", "flops", "seq_len", "tokenizer_hash"):
        if k in obj and k not in meta:
            meta[k] = obj[k]
    if "step" not in meta:
        m = _STEP_RE.search(path.name)
        if m:
            meta["step"] = int(m.group(1))
    return meta


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
        meta = read_complete(path)
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
    for d in [run] + [run / s for s in (CHECKPOINTS, "export", "exports") if (run / s).is_dir()]:
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
    if not out and not pending and not any((run / s).is_dir() for s in (CHECKPOINTS, "export", "exports")):
        raise CheckpointError(f"{run}: not a checkpoint: neither a run folder (no checkpoints/) nor a checkpoint file "
                              "(.pt/.pth/.bin), export folder (megamor.pt), Hugging Face folder or DeepSpeed tag")
    if not out:
        extra = f"; incomplete DeepSpeed tags (no COMPLETE marker or damaged): {', '.join(pending)}" if pending else ""
        raise CheckpointError(f"{run}: no complete checkpoint to evaluate{extra}")
    out.sort(key=lambda c: (c.step is None, c.step if c.step is not None else 0, c.path.name))
    return out


def skipped_tags(run_dir: str | Path) -> list[str]:
    """`PATH: why` for every DeepSpeed tag of a run folder that list_checkpoints leaves out: one
    without its COMPLETE marker or with damaged files, and one moved to checkpoints/quarantine/
    (its recorded reason), so a sweep can say what it did not evaluate."""
    run = Path(run_dir)
    out = []
    for d in [run] + [run / s for s in (CHECKPOINTS, "export", "exports") if (run / s).is_dir()]:
        for p in sorted(d.iterdir()):
            if is_deepspeed_tag(p):
                meta, why = check_tag(p, "size")
                if meta is None:
                    out.append(f"{p}: {why}")
    qdir = quarantine_dir(run / CHECKPOINTS)
    out += [f"{qdir / name}: quarantined ({why})" for name, why in quarantined(run / CHECKPOINTS)]
    return out


def find_tokenizer(source: Any) -> Path | None:
    """A tokenizer stored with a checkpoint: tokenizer.model, tokenizer.json or tokenizer/ in its folder, its
    parents (run folder), or the training config's `data.tokenizer` of a DeepSpeed tag."""
    if isinstance(source, (torch.nn.Module, type(None))):
        return None
    p = Path(source.path if isinstance(source, CheckpointInfo) else source)
    if is_deepspeed_tag(p) and (p / CONFIG_FILE).is_file():
        # Best effort: a broken experiment.yaml falls back to the search below.
        with contextlib.suppress(Exception):
            tok = OmegaConf.load(p / CONFIG_FILE).get("data", {}).get("tokenizer")
            if tok and Path(tok).exists():
                return Path(tok)
    for d in [p if p.is_dir() else p.parent, p.parent, p.parent.parent, p.parent.parent.parent]:
        for cand in (d / "tokenizer.model", d / "tokenizer.json", d / "tokenizer"):  # tokenizer.json: an HF tokenizer's export
            if cand.exists():
                return cand
    return None
