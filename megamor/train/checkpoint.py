"""Checkpoints of a run folder: save, find the newest complete one, resume, load a model.

Layout (run_dir/checkpoints/):

    step_00000500/            one DeepSpeed tag (engine.save_checkpoint: model + optimizer
        mp_rank_00_model_states.pt / zero_pp_rank_*   shards, client state)
        experiment.yaml       the resolved experiment config
        COMPLETE              JSON: step, tokens, DP size, ZeRO stage, every file's size and
                              xxh3-128 content hash. Written last, atomically: a tag without
                              it does not exist.
    latest                    the newest complete tag (DeepSpeed's convention, for its tools)
    universal/step_00000500/  a universal-checkpoint conversion, made on demand (DP size change)
    quarantine/step_00000400/ a tag that failed validation, moved here untouched (+ a .json why)

A run killed at any moment therefore resumes from the newest tag whose COMPLETE marker is
present and whose files still have the recorded sizes and hashes (`checkpoint.verify`, see
megamor.train.integrity). A tag that fails is quarantined, never deleted, and the previous one
is tried; when tags exist and none validates the trainer refuses to start over on its own.
Pruning (keep_last) deletes only complete tags. Every load is weights-only (safe_load.py).

Changing the data-parallel size on resume: ZeRO 1/2/3 optimizer state is partitioned per
rank, so the newest tag is converted to a DeepSpeed universal checkpoint (ds_to_universal,
once, by rank 0) and loaded with `load_universal`. ZeRO-0 in fp32 keeps the whole optimizer
state in the model-states file and loads at any DP size directly. Changing the ZeRO stage is
attempted through the universal path as well.
"""

from __future__ import annotations

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
from megamor.train import integrity
from megamor.train.integrity import MARKER, check_tag, quarantine, warn
from megamor.train.safe_load import UnsafeCheckpointError, safe_torch_load
from megamor.train.safe_load import load as safe_load
from megamor.train.save_errors import CheckpointSaveError, os_error_in, os_error_line, python_file_saves

CHECKPOINTS = "checkpoints"
UNIVERSAL = "universal"
CONFIG_FILE = "experiment.yaml"
LATEST = "latest"
TAG_PREFIX = "step_"
# What ds_to_universal needs in the client state of a ZeRO-1/2 checkpoint (no TP/PP here).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


class CheckpointError(RuntimeError):
    pass


class NoValidCheckpointError(CheckpointError):
    """Tags exist but none validates: the trainer refuses rather than start over (exit 2)."""


__all__ = ["MARKER", "CheckpointSaveError", "UnsafeCheckpointError"]


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


def read_complete(tag_dir: Path, verify: str = "size") -> dict[str, Any] | None:
    """The marker's metadata if the tag is complete and intact (sizes; hashes too with
    verify="hash"), else None."""
    return check_tag(tag_dir, verify)[0]


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
    """Only for complete tags beyond keep_last. Marker first, so a deletion cut short never
    leaves something that looks complete."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def tag_dirs(root: Path) -> list[Path]:
    """Every step_* folder of checkpoints/, oldest first."""
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and step_of(d.name) is not None),
                  key=lambda d: step_of(d.name) or 0)


# -- RNG states ---------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Plain types and tensors only (the weights-only loader reads it back)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- saving -------------------------------------------------------------------------------
class CheckpointManager:
    """Saves DeepSpeed tags with a hashed completeness marker, keeps the last K complete ones,
    quarantines partial ones."""

    def __init__(self, run_dir: str | Path, keep_last: int, fault_hook: Any = None):
        self.root = checkpoints_dir(run_dir)
        self.keep_last = keep_last
        self.fault_hook = fault_hook  # testing: called between the shards and the marker

    def save(self, engine: Any, step: int, client_state: dict[str, Any], config_yaml: str, meta: dict[str, Any],
             extra_files: dict[str, Any] | None = None) -> Path:
        """Every rank calls this. `client_state` goes into DeepSpeed's checkpoint (plus every
        rank's RNG states); `extra_files` (name -> object) are torch.saved by rank 0 beside it.
        A failed write (disk full, ...) raises CheckpointSaveError on every rank: no marker, no
        pruning, the previous tags stay."""
        tag = tag_for(step)
        path = self.root / tag
        rank, world = pdist.rank(), pdist.world_size()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # left by an earlier attempt (killed mid-save): keep it aside, not delete
                quarantine(path, f"found in place of a new save of step {step} (an earlier attempt's)")
        pdist.barrier()
        rng = pdist.all_gather_object(rng_state())
        client_state = {**client_state, "rng": rng, **UNIVERSAL_INFO}
        self._agree(lambda: self._write_shards(engine, path, tag, client_state, extra_files, rng, rank), path)
        _fsync_tree(path)
        names = pdist.broadcast_object(integrity.tag_files(path) if rank == 0 else None)
        mine = self._agree(lambda: {n: integrity.hash_file(path / n) for n in names if integrity.owner(n, world) == rank},
                           path, gather=True)
        hashes = {k: v for part in mine for k, v in part.items()}
        if self.fault_hook is not None:
            self.fault_hook(step)
        self._agree(lambda: self._commit(path, tag, step, config_yaml, meta, hashes) if rank == 0 else None, path)
        pdist.barrier()
        return path

    @staticmethod
    def _write_shards(engine: Any, path: Path, tag: str, client_state: dict[str, Any],
                      extra_files: dict[str, Any] | None, rng: list[Any], rank: int) -> None:
        with python_file_saves():
            engine.save_checkpoint(str(path.parent), tag=tag, client_state=client_state, save_latest=False)
        if rank == 0:
            for name, obj in (extra_files or {}).items():
                if isinstance(obj, dict) and "rng" not in obj:
                    obj = {**obj, "rng": rng}
                with atomic_open(path / name, "wb") as f:
                    torch.save(obj, f)

    def _commit(self, path: Path, tag: str, step: int, config_yaml: str, meta: dict[str, Any],
                hashes: dict[str, str]) -> None:
        with atomic_open(path / CONFIG_FILE, "w") as f:
            f.write(config_yaml)
        hashes = {**hashes, CONFIG_FILE: integrity.hash_file(path / CONFIG_FILE)}
        sizes = _file_sizes(path)
        missing = sorted(set(sizes) - set(hashes))
        if missing:
            raise CheckpointError(f"{path}: files appeared while saving: {missing}")
        write_json(path / MARKER, {**meta, "step": step, "time": time.time(), **integrity.marker_payload(sizes, hashes)})
        integrity.write_latest(self.root, tag)
        self.prune(keep=path)

    def _agree(self, fn: Any, path: Path, gather: bool = False) -> Any:
        """Run fn on every rank; an OSError on any rank becomes a CheckpointSaveError on all."""
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - every rank must learn of any rank's failure
            os_err = os_error_in(e)
            error = os_error_line(os_err, path) if os_err else f"{type(e).__name__}: {e}"
        results = pdist.all_gather_object((result, error))
        errors = [e for _, e in results if e]
        if errors:
            newest = newest_complete(self.root.parent)
            kept = f"newest complete checkpoint: {newest.path}" if newest else "no complete checkpoint yet"
            raise CheckpointSaveError(f"saving {path.name} failed: {errors[0]}; the previous checkpoints are kept "
                                      f"({kept}); {path.name} has no COMPLETE marker and is never resumed")
        return [r for r, _ in results] if gather else result

    def prune(self, keep: Path) -> None:
        """Rank 0, after a save: delete complete tags beyond the newest K; quarantine tags that
        are not complete (a save killed midway), never delete them."""
        complete, broken = [], []
        for d in tag_dirs(self.root):
            if d == keep:
                continue
            meta, why = check_tag(d, "size")
            (complete if meta is not None else broken).append((d, why))
        n_delete = max(0, len(complete) + 1 - self.keep_last)  # + the tag just saved
        for d, _ in complete[:n_delete]:
            _remove_tag(d)
            shutil.rmtree(self.root / UNIVERSAL / d.name, ignore_errors=True)
        for d, why in broken:
            dest = quarantine(d, why or "failed validation")
            warn(f"checkpoint {d.name}: {why}; moved to {dest}")


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


def plan_for(ref: CheckpointRef, dp_size: int, zero_stage: int, precision: str) -> ResumePlan:
    """Load the tag directly (same layout, or replicated ZeRO-0 fp32), else through a universal
    conversion."""
    m = ref.meta
    same_layout = m.get("dp_world_size") == dp_size and m.get("zero_stage") == zero_stage
    replicated = m.get("zero_stage") == 0 == zero_stage and m.get("precision") == "fp32" == precision
    if same_layout or replicated:
        return ResumePlan(ref, ref.root, universal=False)
    return ResumePlan(ref, ref.root / UNIVERSAL, universal=True)


def plan_resume(run_dir: str | Path, dp_size: int, zero_stage: int, precision: str) -> ResumePlan | None:
    """How to resume from the newest tag that passes the size check (one process, moves
    nothing), or None. The trainer uses find_resumable, which also checks hashes."""
    ref = newest_complete(run_dir)
    return plan_for(ref, dp_size, zero_stage, precision) if ref is not None else None


def find_resumable(run_dir: str | Path, verify: str) -> CheckpointRef | None:
    """The newest tag that validates, or None when checkpoints/ holds no tag at all. Every rank
    calls it: rank 0 checks markers and sizes and moves failed tags to quarantine/; with
    verify="hash" the ranks share the hashing (each reads the files it would have written).
    Raises NoValidCheckpointError when tags exist (or were quarantined) and none validates,
    unless no save ever finished there (integrity.never_completed): then None, a fresh start."""
    root = checkpoints_dir(run_dir)
    rank, world = pdist.rank(), pdist.world_size()
    rejected: list[str] = []
    reasons: list[str] = []
    while True:
        ref = None
        if rank == 0:
            for d in reversed(tag_dirs(root)):
                meta, why = check_tag(d, "size")
                if meta is not None:
                    ref = CheckpointRef(d, step_of(d.name) or 0, meta)
                    break
                reasons.append(why or "failed validation")
                rejected.append(_reject(d, reasons[-1]))
        ref = pdist.broadcast_object(ref)
        if ref is None:
            break
        if verify != "hash":
            return ref
        names = [n for n in sorted(ref.meta["files"]) if integrity.owner(n, world) == rank]
        whys = [w for w in pdist.all_gather_object(integrity.check_hashes(ref.path, ref.meta, names)) if w]
        if not whys:
            return ref
        if rank == 0:
            reasons.append(whys[0])
            rejected.append(_reject(ref.path, whys[0]))
    message = None
    if rank == 0 and integrity.never_completed(root, reasons):
        if rejected:
            warn(f"{root}: no save ever finished in this run folder ({'; '.join(rejected)}): starting from step 0; "
                 f"the partial tags are kept in {integrity.quarantine_dir(root)}")
    elif rank == 0:
        earlier = [f"{name} ({why})" for name, why in integrity.quarantined(root) if name not in {r.split(" ")[0] for r in rejected}]
        if rejected or earlier:
            message = (f"{root}: no checkpoint validates, refusing to start over on top of it: "
                       + "; ".join(rejected + [f"quarantined earlier: {e}" for e in earlier])
                       + f". The failed tags are kept in {integrity.quarantine_dir(root)}. To start over on purpose, rerun "
                         "with checkpoint.resume=false (or use another run_dir)")
    message = pdist.broadcast_object(message)
    if message:
        raise NoValidCheckpointError(message)
    return None


def _reject(tag_dir: Path, why: str) -> str:
    """Rank 0: quarantine a tag that failed validation, warn, and describe it."""
    dest = quarantine(tag_dir, why)
    warn(f"checkpoint {tag_dir.name} failed validation: {why}; moved to {dest} (not deleted); trying the previous one")
    return f"{tag_dir.name} ({why})"


def set_aside_for_restart(run_dir: str | Path) -> list[Path]:
    """Rank 0, checkpoint.resume=false: move the existing tags to quarantine/ so the new run's
    tags never mix with (or prune) the old run's."""
    moved = []
    for d in tag_dirs(checkpoints_dir(run_dir)):
        moved.append(quarantine(d, integrity.SET_ASIDE))
    if moved:
        warn(f"checkpoint.resume=false: {len(moved)} existing checkpoint(s) moved to {moved[0].parent} (not deleted)")
    return moved


def ensure_universal(ref: CheckpointRef) -> Path:
    """Convert a tag to a universal checkpoint once (rank 0 only); returns its folder."""
    out_root = ref.root / UNIVERSAL
    out = out_root / ref.tag
    if check_tag(out, "hash")[0] is not None:
        return out
    shutil.rmtree(out, ignore_errors=True)  # derived from the tag: a damaged conversion is redone
    src_stage = ref.meta.get("zero_stage")
    if src_stage == 0:
        raise CheckpointError(
            f"{ref.path}: a ZeRO-0 {ref.meta.get('precision')} checkpoint cannot be resharded; resume with the same "
            f"data-parallel size ({ref.meta.get('dp_world_size')}) and precision, or train with ZeRO 1-3 (or ZeRO-0 fp32)"
        )
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{ref.tag}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # Through megamor's wrapper: every torch.load in the conversion is weights-only.
    cmd = [sys.executable, "-m", "megamor.train.safe_universal", "--input_folder", str(ref.path),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        if r.returncode == 2 and "refused to load" in tail:
            raise UnsafeCheckpointError(tail.splitlines()[-1].removeprefix("megamor.train.safe_universal: "))
        raise CheckpointError(f"converting {ref.path} to a universal checkpoint failed:\n{tail}")
    (out_root / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; we pass tags
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    names = integrity.tag_files(out)
    write_json(out / MARKER, {"source": ref.tag, "time": time.time(),
                              **integrity.marker_payload(_file_sizes(out), {n: integrity.hash_file(out / n) for n in names})})
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
def resolve_tag(run_or_ckpt: str | Path, tag: str | None = None, verify: str = "hash") -> CheckpointRef:
    """A run folder (newest complete tag, or `tag`), its checkpoints/ folder, or a tag folder;
    checked (sizes, and content hashes with verify="hash") before anything is loaded."""
    p = Path(run_or_ckpt)
    if step_of(p.name) is not None and p.is_dir():  # a tag folder
        d = p
    else:
        run = p.parent if p.name == CHECKPOINTS else p
        if tag is None:
            ref = newest_complete(run)
            if ref is None:
                raise CheckpointError(f"{run}: no complete checkpoint in {checkpoints_dir(run)}")
            d = ref.path
        else:
            d = checkpoints_dir(run) / tag
    meta, why = check_tag(d, verify)
    if meta is None:
        raise CheckpointError(f"{d}: not a usable checkpoint: {why or 'missing'}")
    return CheckpointRef(d, step_of(d.name) or 0, meta)


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

        with safe_torch_load():  # zero_to_fp32 unpickles with weights_only=False itself
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
        sd = safe_load(f, map_location="cpu")["module"]
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
