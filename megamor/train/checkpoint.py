"""Checkpoints of a run folder: save, find the newest complete one, resume, load a model.

Layout (run_dir/checkpoints/):

    step_00000500/            one DeepSpeed tag (engine.save_checkpoint: model + optimizer
        mp_rank_00_model_states.pt / zero_pp_rank_*   shards, client state)
        experiment.yaml       the resolved experiment config
        COMPLETE              JSON: step, tokens, DP size, ZeRO stage, every file's size.
                              Written last, atomically: a tag without it does not exist.
    latest                    the newest complete tag (DeepSpeed's convention, for its tools)
    universal/step_00000500/  a universal-checkpoint conversion, made on demand (DP size change)

A run killed at any moment therefore resumes from the newest tag whose COMPLETE marker is
present and whose files still have the recorded sizes; partial tags are ignored and swept.

Changing the data-parallel size on resume: ZeRO 1/2/3 optimizer state is partitioned per
rank, so the newest tag is converted to a DeepSpeed universal checkpoint (ds_to_universal,
once, by rank 0) and loaded with `load_universal`. ZeRO-0 in fp32 keeps the whole optimizer
state in the model-states file and loads at any DP size directly. Changing the ZeRO stage is
attempted through the universal path as well.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megamor.data.atomic import atomic_open, fsync_path, write_json
from megamor.parallel import dist as pdist

CHECKPOINTS = "checkpoints"
UNIVERSAL = "universal"
MARKER = "COMPLETE"
CONFIG_FILE = "experiment.yaml"
LATEST = "latest"
TAG_PREFIX = "step_"
# What ds_to_universal needs in the client state of a ZeRO-1/2 checkpoint (no TP/PP here).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> int | None:
    if not tag.startswith(TAG_PREFIX):
        return None
    try:
        return int(tag[len(TAG_PREFIX) :])
    except ValueError:
        return None


@dataclass(frozen=True)
class CheckpointRef:
    path: Path  # the tag folder
    step: int
    meta: dict[str, Any]

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def root(self) -> Path:
        return self.path.parent


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }


def read_complete(tag_dir: Path) -> dict[str, Any] | None:
    """The marker's metadata if the tag is complete and intact, else None."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for name, size in meta.get("files", {}).items():
        p = tag_dir / name
        if not p.is_file() or p.stat().st_size != size:
            return None
    return meta


def list_complete(run_dir: str | Path) -> list[CheckpointRef]:
    """Complete, intact checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            step = step_of(d.name)
            if step is None or not d.is_dir():
                continue
            meta = read_complete(d)
            if meta is not None:
                out.append(CheckpointRef(d, step, meta))
    return sorted(out, key=lambda c: c.step)


def newest_complete(run_dir: str | Path) -> CheckpointRef | None:
    found = list_complete(run_dir)
    return found[-1] if found else None


def _remove_tag(path: Path) -> None:
    """Marker first, so a deletion cut short never leaves something that looks complete."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


# -- RNG states ---------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- saving -------------------------------------------------------------------------------
class CheckpointManager:
    """Saves DeepSpeed tags with a completeness marker, keeps the last K, sweeps partial ones."""

    def __init__(self, run_dir: str | Path, keep_last: int, fault_hook: Any = None):
        self.root = checkpoints_dir(run_dir)
        self.keep_last = keep_last
        self.fault_hook = fault_hook  # testing: called between the shards and the marker

    def save(self, engine: Any, step: int, client_state: dict[str, Any], config_yaml: str, meta: dict[str, Any],
             extra_files: dict[str, Any] | None = None) -> Path:
        """Every rank calls this. `client_state` goes into DeepSpeed's checkpoint (plus every
        rank's RNG states); `extra_files` (name -> object) are torch.saved by rank 0 beside it."""
        tag = tag_for(step)
        path = self.root / tag
        if pdist.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a partial save of this step from a killed attempt
                _remove_tag(path)
        pdist.barrier()
        rng = pdist.all_gather_object(rng_state())
        client_state = {**client_state, "rng": rng, **UNIVERSAL_INFO}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        if pdist.rank() == 0:
            for name, obj in (extra_files or {}).items():
                if isinstance(obj, dict) and "rng" not in obj:
                    obj = {**obj, "rng": rng}
                with atomic_open(path / name, "wb") as f:
                    torch.save(obj, f)
        _fsync_tree(path)
        pdist.barrier()  # every rank's shards are on disk
        if self.fault_hook is not None:
            self.fault_hook(step)
        if pdist.rank() == 0:
            with atomic_open(path / CONFIG_FILE, "w") as f:
                f.write(config_yaml)
            write_json(path / MARKER, {**meta, "step": step, "time": time.time(), "files": _file_sizes(path)})
            with atomic_open(self.root / LATEST, "w") as f:
                f.write(tag)
            self.prune(keep=path)
        pdist.barrier()
        return path

    def prune(self, keep: Path) -> None:
        """Delete complete tags beyond the newest K and every partial tag (rank 0, after a save)."""
        complete = [c.path for c in list_complete(self.root.parent)]
        doomed = complete[: max(0, len(complete) - self.keep_last)]
        for d in self.root.iterdir():
            if d.is_dir() and step_of(d.name) is not None and read_complete(d) is None and d != keep:
                doomed.append(d)
        for d in doomed:
            if d != keep:
                _remove_tag(d)
                shutil.rmtree(self.root / UNIVERSAL / d.name, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush the tag's files to stable storage before the marker can claim they exist (a
    machine crash must not leave a marker over data still in the page cache). Every rank
    runs it: each flushes what its own node wrote."""
    for p in folder.rglob("*"):
        if p.is_file():
            fsync_path(p)


# -- resuming -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePlan:
    ref: CheckpointRef
    load_dir: Path  # the folder holding the tag to load (the universal folder when converting)
    universal: bool

    @property
    def tag(self) -> str:
        return self.ref.tag


def plan_resume(run_dir: str | Path, dp_size: int, zero_stage: int, precision: str) -> ResumePlan | None:
    """How to resume this run (rank 0 decides; broadcast the result), or None for a fresh start."""
    ref = newest_complete(run_dir)
    if ref is None:
        return None
    m = ref.meta
    same_layout = m.get("dp_world_size") == dp_size and m.get("zero_stage") == zero_stage
    replicated = m.get("zero_stage") == 0 == zero_stage and m.get("precision") == "fp32" == precision
    if same_layout or replicated:
        return ResumePlan(ref, ref.root, universal=False)
    return ResumePlan(ref, ref.root / UNIVERSAL, universal=True)


def ensure_universal(ref: CheckpointRef) -> Path:
    """Convert a tag to a universal checkpoint once (rank 0 only); returns its folder."""
    out_root = ref.root / UNIVERSAL
    out = out_root / ref.tag
    if (out / MARKER).is_file():
        return out
    src_stage = ref.meta.get("zero_stage")
    if src_stage == 0:
        raise CheckpointError(
            f"{ref.path}: a ZeRO-0 {ref.meta.get('precision')} checkpoint cannot be resharded; resume with the same "
            f"data-parallel size ({ref.meta.get('dp_world_size')}) and precision, or train with ZeRO 1-3 (or ZeRO-0 fp32)"
        )
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{ref.tag}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ref.path),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise CheckpointError(f"converting {ref.path} to a universal checkpoint failed:\n{tail}")
    (out_root / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; we pass tags
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    write_json(out / MARKER, {"source": ref.tag, "time": time.time(), "files": _file_sizes(out)})
    return out


def restore_optimizer_hparams(engine: Any, group_hparams: list[dict[str, Any]]) -> None:
    """Undo two DeepSpeed universal-load defects (0.19): every param group gets group 0's
    hyper-parameters (weight decay on norms/embeddings), and torch AdamW's per-parameter `step`
    tensors end up shared, so each optimizer step advances the count once per group."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for g, saved in zip(base.param_groups, group_hparams):
        for k, v in saved.items():
            if k != "lr":  # the trainer sets lr every step
                g[k] = v
    for st in base.state.values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].clone()


# -- loading weights without an engine (export, evaluation) ---------------------------------
def resolve_tag(run_or_ckpt: str | Path, tag: str | None = None) -> CheckpointRef:
    """A run folder (newest complete tag, or `tag`), its checkpoints/ folder, or a tag folder."""
    p = Path(run_or_ckpt)
    if read_complete(p) is not None and step_of(p.name) is not None:
        return CheckpointRef(p, step_of(p.name) or 0, read_complete(p) or {})
    run = p.parent if p.name == CHECKPOINTS else p
    if tag is not None:
        d = checkpoints_dir(run) / tag
        meta = read_complete(d)
        if meta is None:
            raise CheckpointError(f"{d}: not a complete checkpoint (missing, partial, or damaged)")
        return CheckpointRef(d, step_of(tag) or 0, meta)
    ref = newest_complete(run)
    if ref is None:
        raise CheckpointError(f"{run}: no complete checkpoint in {checkpoints_dir(run)}")
    return ref


def consolidated_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a tag, whatever its ZeRO stage (zero_to_fp32 for
    partitioned states; ZeRO-0 from the model-states file). A tensor-parallel tag holds one
    set of files per TP rank (mp_rank_XX): each is consolidated, then the shards are merged."""
    tp = int(ref.meta.get("tensor_parallel", 1))
    if tp > 1:
        from megamor.parallel.tensor_parallel import merge_shards

        return merge_shards([_tp_rank_state_dict(ref, r) for r in range(tp)])
    return _tp_rank_state_dict(ref, 0)


def _tp_rank_state_dict(ref: CheckpointRef, tp_rank: int) -> dict[str, torch.Tensor]:
    mp = f"mp_rank_{tp_rank:02d}"
    optim = sorted(ref.path.glob(f"*{mp}_optim_states.pt"))
    if optim and ref.meta.get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        if not any(ref.path.glob("*mp_rank_01_optim_states.pt")):  # no tensor parallelism
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
        else:
            # zero_to_fp32 reads only mp_rank_00 files: show it this rank's files alone, under that name.
            import tempfile

            with tempfile.TemporaryDirectory(prefix=".tp-merge-", dir=ref.root) as tmp:
                view = Path(tmp) / ref.tag
                view.mkdir()
                for f in [ref.path / f"{mp}_model_states.pt", *optim]:
                    (view / f.name.replace(mp, "mp_rank_00")).symlink_to(f.resolve())
                sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=ref.tag)
    else:
        f = ref.path / f"{mp}_model_states.pt"
        if not f.is_file():
            raise CheckpointError(f"{ref.path}: no model states file {f.name}")
        sd = torch.load(f, map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().float().clone() for k, v in sd.items()}


def experiment_of(ref: CheckpointRef):
    from megamor.train.config import load_experiment

    cfg_file = ref.path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{ref.path}: no {CONFIG_FILE}")
    return load_experiment([cfg_file])


def load_model_from_run(run_dir: str | Path, tag: str | None = None, device: str | torch.device = "cpu"):
    """(MoRLM in eval mode with fp32 weights, its ModelConfig) from a run folder or tag folder,
    any ZeRO stage. No process group needed."""
    from megamor.model import MoRLM
    
    ref = resolve_tag(run_dir, tag)
    cfg = experiment_of(ref).model
    model = MoRLM(cfg)
    sd = consolidated_state_dict(ref)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{ref.path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), cfg
