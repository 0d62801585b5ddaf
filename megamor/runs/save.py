"""Writing a checkpoint tag: DeepSpeed's shards, then a COMPLETE marker with every file's hash.

Every rank calls CheckpointManager.save. The shards are written and flushed to stable storage,
the ranks hash the files they wrote, and rank 0 writes experiment.yaml and then the marker,
atomically: a save killed at any moment leaves a tag without a marker, which is never resumed
and is quarantined by the next save (never deleted). Pruning (keep_last) deletes only
complete tags. A failed write on any rank raises CheckpointSaveError on every rank.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megamor.parallel import dist as pdist
from megamor.runs import integrity
from megamor.runs.integrity import check_tag, file_sizes, quarantine, warn
from megamor.runs.layout import (
    CONFIG_FILE,
    MARKER,
    UNIVERSAL,
    CheckpointError,
    QuarantineError,
    checkpoints_dir,
    os_error_line,
    step_of,
    tag_dirs,
    tag_for,
)
from megamor.runs.save_errors import CheckpointSaveError, os_error_in, python_file_saves
from megamor.runs.tags import newest_complete
from megamor.utils.atomic import atomic_open, fsync_path, write_json

# What ds_to_universal needs in the client state of a ZeRO-1/2 checkpoint (no TP/PP here).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def _remove_tag(path: Path) -> None:
    """Only for complete tags beyond keep_last. Marker first, so a deletion cut short never
    leaves something that looks complete."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


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
             extra_files: dict[str, Any] | None = None, good_up_to: int | None = None) -> Path:
        """Every rank calls this. `client_state` goes into DeepSpeed's checkpoint (plus every
        rank's RNG states); `extra_files` (name -> object) are torch.saved by rank 0 beside it.
        A failed write (disk full, ...) raises CheckpointSaveError on every rank: no marker, no
        pruning, the previous tags stay. `good_up_to`: the state saved may be damaged (steps
        after it were non-finite), so pruning keeps the newest complete tag at or before this
        step beyond keep_last (see prune)."""
        tag = tag_for(step)
        path = self.root / tag
        rank, world = pdist.rank(), pdist.world_size()
        def clear_place() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # left by an earlier attempt (killed mid-save): keep it aside, not delete
                quarantine(path, f"found in place of a new save of step {step} (an earlier attempt's)")

        self._agree(lambda: clear_place() if rank == 0 else None, path)  # a full disk: every rank hears of it
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
        self._agree(lambda: self._commit(path, tag, step, config_yaml, meta, hashes, good_up_to) if rank == 0 else None,
                    path)
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
                hashes: dict[str, str], good_up_to: int | None = None) -> None:
        with atomic_open(path / CONFIG_FILE, "w") as f:
            f.write(config_yaml)
        hashes = {**hashes, CONFIG_FILE: integrity.hash_file(path / CONFIG_FILE)}
        sizes = file_sizes(path)
        missing = sorted(set(sizes) - set(hashes))
        if missing:
            raise CheckpointError(f"{path}: files appeared while saving: {missing}")
        write_json(path / MARKER, {**meta, "step": step, "time": time.time(), **integrity.marker_payload(sizes, hashes)})
        integrity.write_latest(self.root, tag)
        self.prune(keep=path, good_up_to=good_up_to)

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

    def prune(self, keep: Path, good_up_to: int | None = None) -> None:
        """Rank 0, after a save: delete complete tags beyond the newest K; quarantine tags that
        are not complete (a save killed midway), never delete them. With `good_up_to` (a save
        made during a non-finite streak: every step since that one was skipped) the newest
        complete tag at or before that step is the last one known good: it is kept whatever K."""
        complete, broken = [], []
        for d in tag_dirs(self.root):
            if d == keep:
                continue
            meta, why = check_tag(d, "size")
            (complete if meta is not None else broken).append((d, why))
        n_delete = max(0, len(complete) + 1 - self.keep_last)  # + the tag just saved
        good = [d for d, _ in complete if (step_of(d.name) or 0) <= good_up_to] if good_up_to is not None else []
        for d, _ in complete[:n_delete]:
            if good and d == good[-1]:
                warn(f"checkpoint {d.name} kept beyond checkpoint.keep_last={self.keep_last}: it is the newest from "
                     f"before the non-finite steps that ended in {keep.name}")
                continue
            _remove_tag(d)
            shutil.rmtree(self.root / UNIVERSAL / d.name, ignore_errors=True)
        for d, why in broken:
            try:
                dest = quarantine(d, why or "failed validation")
            except QuarantineError as e:  # the new tag is complete: only the tidying failed (left for later)
                warn(f"checkpoint {d.name}: {why}; left in place: {e}")
                continue
            warn(f"checkpoint {d.name}: {why}; moved to {dest}")


def _fsync_tree(folder: Path) -> None:
    """Flush the tag's files to stable storage before the marker can claim they exist (a
    machine crash must not leave a marker over data still in the page cache). Every rank
    runs it: each flushes what its own node wrote."""
    for p in folder.rglob("*"):
        if p.is_file():
            fsync_path(p)
