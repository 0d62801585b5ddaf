"""Resuming a run: which tag, validated how, loaded directly or through a universal conversion.

A run killed at any moment resumes from the newest tag whose COMPLETE marker is present and
whose files still have the recorded sizes and hashes (`checkpoint.verify`). A tag that fails is
quarantined, never deleted, and the previous one is tried; when tags exist and none validates
the trainer refuses to start over on its own (NoValidCheckpointError, exit 2). The one
exception is a folder where no save ever finished (integrity.never_completed).

Changing the data-parallel size on resume: ZeRO 1/2/3 optimizer state is partitioned per
rank, so the newest tag is converted to a DeepSpeed universal checkpoint (ds_to_universal,
once, by rank 0, weights-only: safe_universal.py) and loaded with `load_universal`. ZeRO-0 in
fp32 keeps the whole optimizer state in the model-states file and loads at any DP size
directly. Changing the ZeRO stage is attempted through the universal path as well.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megamor.parallel import dist as pdist
from megamor.runs import integrity
from megamor.runs.integrity import check_tag, file_sizes, quarantine, warn
from megamor.runs.layout import (
    MARKER,
    TRAINER_STATE,
    UNIVERSAL,
    CheckpointError,
    CheckpointRef,
    NoValidCheckpointError,
    QuarantineError,
    checkpoints_dir,
    os_error_line,
    step_of,
    tag_dirs,
)
from megamor.runs.safe_load import UnsafeCheckpointError, safe_torch_load
from megamor.runs.safe_load import load as safe_load
from megamor.runs.safe_universal import PROG as SAFE_UNIVERSAL
from megamor.runs.tags import newest_complete
from megamor.utils.atomic import write_json


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


def universal_refusal(ref: CheckpointRef, dp_size: int, zero_stage: int, precision: str) -> str | None:
    """Why `ref` cannot be loaded at this layout, or None. A tag that needs a universal conversion
    loads only into ZeRO 1-3 (DeepSpeed's ZeRO-0 has no universal load: it failed after the
    conversion), and a ZeRO-0 tag cannot be converted at all."""
    if not plan_for(ref, dp_size, zero_stage, precision).universal:
        return None
    m = ref.meta
    then = f"ZeRO-{m.get('zero_stage')} {m.get('precision')} with data-parallel size {m.get('dp_world_size')}"
    if m.get("zero_stage") == 0:
        return (f"{ref.path} was saved with {then}, which cannot be resharded: use that data-parallel size and "
                "precision, or ZeRO-0 fp32")
    if zero_stage == 0:
        return (f"is 0 but {ref.path} was saved with {then}: another layout loads through a universal checkpoint, "
                "which ZeRO-0 cannot load; use deepspeed.zero_stage 1-3, or the checkpoint's own layout")
    return None


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
    unless the folder's only tag is a first save that never finished (integrity.never_completed):
    then None, a fresh start. Raises QuarantineError on every rank when a failed tag cannot be
    set aside (a disk still full): nothing moved, nothing resumed."""
    root = checkpoints_dir(run_dir)
    rank, world = pdist.rank(), pdist.world_size()
    rejected: list[str] = []
    reasons: list[str] = []

    def reject(tag_dir: Path, why: str) -> None:
        reasons.append(why)
        rejected.append(_reject(tag_dir, why))

    def newest_by_size() -> CheckpointRef | None:
        for d in reversed(tag_dirs(root)):
            meta, why = check_tag(d, "size")
            if meta is not None:
                return CheckpointRef(d, step_of(d.name) or 0, meta)
            reject(d, why or "failed validation")
        return None

    while True:
        ref = _rank0(newest_by_size)
        if ref is None:
            break
        if verify != "hash":
            return ref
        names = [n for n in sorted(ref.meta["files"]) if integrity.owner(n, world) == rank]
        whys = [w for w in pdist.all_gather_object(integrity.check_hashes(ref.path, ref.meta, names)) if w]
        if not whys:
            return ref
        _rank0(functools.partial(reject, ref.path, whys[0]))
    message = _rank0(lambda: _verdict(root, rejected, reasons))
    if message:
        raise NoValidCheckpointError(message)
    return None


def _rank0(fn: Callable[[], Any]) -> Any:
    """fn's result on rank 0, broadcast; a QuarantineError there (a disk still full) is raised on
    every rank, so none waits in a collective for a rank that stopped."""
    result, error = None, None
    if pdist.rank() == 0:
        try:
            result = fn()
        except QuarantineError as e:
            error = str(e)
    result, error = pdist.broadcast_object((result, error))
    if error:
        raise QuarantineError(error)
    return result


def _verdict(root: Path, rejected: list[str], reasons: list[str]) -> str | None:
    """Rank 0, no tag validated: None to start from step 0 (nothing ever finished here), else
    the refusal naming every failed tag."""
    if integrity.never_completed(root, reasons):
        integrity.mark_started_over(root)
        if rejected:
            warn(f"{root}: no save ever finished in this run folder ({'; '.join(rejected)}): starting from step 0; "
                 f"the partial tags are kept in {integrity.quarantine_dir(root)}")
        return None
    now = {r.split(" ")[0] for r in rejected}
    earlier = [f"{name} ({rec.get('reason', 'reason unknown')})" for name, rec in integrity.quarantine_records(root)
               if name not in now and not rec.get(integrity.STARTED_OVER)]
    if not (rejected or earlier):
        return None
    return (f"{root}: no checkpoint validates, refusing to start over on top of it: "
            + "; ".join(rejected + [f"quarantined earlier: {e}" for e in earlier])
            + f". The failed tags are kept in {integrity.quarantine_dir(root)}. To start over on purpose, rerun "
              "with checkpoint.resume=false (or use another run_dir)")


def _reject(tag_dir: Path, why: str) -> str:
    """Rank 0: quarantine a tag that failed validation, warn, and describe it."""
    dest = quarantine(tag_dir, why)
    warn(f"checkpoint {tag_dir.name} failed validation: {why}; moved to {dest} (not deleted); trying the previous one")
    return f"{tag_dir.name} ({why})"


RUN_LOGS = "run_logs"  # checkpoints/quarantine/run_logs[.N]/: an earlier run's logs, set aside at a restart


def set_aside_for_restart(run_dir: str | Path, logs: Sequence[Path] = ()) -> list[Path]:
    """Rank 0, checkpoint.resume=false: move the existing tags to quarantine/ so the new run's
    tags never mix with (or prune) the old run's, and the old run's per-run logs (`logs`: those
    a fresh start would cut back or reuse, e.g. metrics.jsonl, the W&B id, TensorBoard event
    files) with them, into quarantine/run_logs[.N]/ (a record beside it, as for a tag)."""
    moved = []
    for d in tag_dirs(checkpoints_dir(run_dir)):
        moved.append(quarantine(d, integrity.SET_ASIDE))
    if moved:
        warn(f"checkpoint.resume=false: {len(moved)} existing checkpoint(s) moved to {moved[0].parent} (not deleted)")
    present = [Path(p) for p in logs if Path(p).exists()]
    if present:
        dest = _set_aside_logs(checkpoints_dir(run_dir), present, [m.name for m in moved])
        warn(f"checkpoint.resume=false: the earlier run's {', '.join(p.name for p in present)} moved to {dest} "
             "(not deleted); this run starts them afresh")
    return moved


def _set_aside_logs(ckpt_root: Path, paths: list[Path], tags: list[str]) -> Path:
    """Move `paths` into a new quarantine/run_logs[.N]/ folder, its record written first (as
    integrity.quarantine does); each move a rename. Raises QuarantineError when that fails."""
    qdir = integrity.quarantine_dir(ckpt_root)
    dest = qdir / RUN_LOGS
    try:
        qdir.mkdir(parents=True, exist_ok=True)
        n = 1
        while dest.exists() or dest.with_name(dest.name + ".json").exists():
            dest = qdir / f"{RUN_LOGS}.{n}"
            n += 1
        write_json(qdir / f"{dest.name}.json", {"tag": None, "reason": integrity.SET_ASIDE, "time": time.time(),
                                                 "moved_from": [str(p) for p in paths], "tags_set_aside": tags})
        dest.mkdir()
        for p in paths:
            try:
                os.replace(p, dest / p.name)
            except OSError as e:
                if e.errno != errno.EXDEV:  # another filesystem (an absolute logging path): copied, then removed
                    raise
                shutil.move(str(p), str(dest / p.name))
    except OSError as e:
        raise QuarantineError(f"cannot set aside the earlier run's logs ({', '.join(p.name for p in paths)}) in "
                              f"{dest}: {os_error_line(e, qdir)}; free space (or fix the folder's permissions) and "
                              "rerun") from None
    return dest


class ConversionStopped(Exception):
    """A stop signal reached the trainer during a universal conversion: the conversion was
    ended and its partial output removed (the next start redoes it)."""


def ensure_universal(ref: CheckpointRef, out_root: Path | None = None,
                     should_stop: Callable[[], bool] | None = None) -> Path:
    """Convert a tag to a universal checkpoint once (rank 0 only); returns its folder. out_root:
    where the conversion goes (default checkpoints/universal/ beside the tag; a mid-training
    phase puts it in its own run folder and leaves the source run's untouched).

    The converter runs in a session of its own, so a signal to the trainer's process group
    (Ctrl-C, `kill -- -PGID`) reaches only the trainer; `should_stop()` (the trainer's stop
    request) is polled while it runs: when true the converter is ended, its partial output
    removed and ConversionStopped raised (the trainer exits 75; the next start converts again)."""
    out_root = out_root if out_root is not None else ref.root / UNIVERSAL
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
    cmd = [sys.executable, "-m", SAFE_UNIVERSAL, "--input_folder", str(ref.path),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    r = _run_converter(cmd, tmp, out_root, should_stop)
    if r is None:
        raise ConversionStopped(f"the universal conversion of {ref.path} was stopped; its partial output was removed")
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        if r.returncode == 2 and "refused to load" in tail:
            raise UnsafeCheckpointError(tail.splitlines()[-1].removeprefix(f"{SAFE_UNIVERSAL}: "))
        # Killed by a signal, its output ends wherever the kill found it (even "*** Done!"): not shown.
        shown = f"; its last output:\n{tail}" if tail and r.returncode > 0 else ""
        raise CheckpointError(f"converting {ref.path} to a universal checkpoint failed: {exit_status(r.returncode)}"
                              f"{shown}")
    (out_root / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; we pass tags
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    names = integrity.tag_files(out)
    write_json(out / MARKER, {"source": ref.tag, "time": time.time(),
                              **integrity.marker_payload(file_sizes(out), {n: integrity.hash_file(out / n) for n in names})})
    return out


def convert_on_rank0(ref: CheckpointRef, out_root: Path | None = None,
                     should_stop: Callable[[], bool] | None = None) -> None:
    """Every rank: rank 0 runs ensure_universal, the others wait; its failure is raised on every
    rank alike (UnsafeCheckpointError, CheckpointError, or ConversionStopped on a stop)."""
    error = None
    if pdist.rank() == 0:
        try:
            ensure_universal(ref, out_root, should_stop)
        except UnsafeCheckpointError as e:
            error = ("unsafe", str(e))
        except CheckpointError as e:
            error = ("checkpoint", str(e))
        except ConversionStopped as e:
            error = ("stopped", str(e))
    error = pdist.broadcast_object(error)
    if error:
        kind = {"unsafe": UnsafeCheckpointError, "checkpoint": CheckpointError, "stopped": ConversionStopped}[error[0]]
        raise kind(error[1])


def _run_converter(cmd: list[str], tmp: Path, out_root: Path,
                   should_stop: Callable[[], bool] | None) -> subprocess.CompletedProcess | None:
    """Run the converter in its own session; None when `should_stop()` turned true first (the
    converter ended: SIGTERM to its session, SIGKILL after 10 s; `tmp`, its output, removed).
    Any exception here (a second Ctrl-C's KeyboardInterrupt) ends it too."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    done = False
    try:
        while True:
            try:
                out, err = p.communicate(timeout=0.5)
                if p.returncode < 0 and should_stop is not None and should_stop():
                    # a group signal that reached it while it was being started (before its setsid)
                    return None
                done = True
                return subprocess.CompletedProcess(cmd, p.returncode, out, err)
            except subprocess.TimeoutExpired:
                if should_stop is not None and should_stop():
                    return None
    finally:
        if not done:
            _end_session(p)
            shutil.rmtree(tmp, ignore_errors=True)  # only the converter wrote there
            (out_root / "latest_universal").unlink(missing_ok=True)  # its pointer, if it got that far


def _end_session(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.communicate(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def exit_status(returncode: int) -> str:
    """How a subprocess ended: a signal by name (a negative return code), else the code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by signal {name} (return code {returncode})"
    return f"exited with return code {returncode}"


def load_engine_state(engine: Any, plan: ResumePlan, group_hparams: list[dict[str, Any]], state_dir: Path) -> dict:
    """Load `plan`'s tag into the DeepSpeed engine (weights and optimizer, not its scheduler),
    mend the optimizer's hyper-parameters, and return the trainer state saved in `state_dir`
    (the tag itself on a resume; the source tag when a phase loads a universal conversion)."""
    with safe_torch_load():  # DeepSpeed unpickles with weights_only=False itself
        load_path, _ = engine.load_checkpoint(str(plan.load_dir), tag=plan.tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {plan.load_dir / plan.tag}")
    restore_optimizer_hparams(engine, group_hparams)
    return safe_load(Path(state_dir) / TRAINER_STATE, map_location="cpu")


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
