"""The complete tags of a run folder, and resolving a run / checkpoints / tag folder to one tag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megamor.runs.integrity import check_tag
from megamor.runs.layout import CHECKPOINTS, CheckpointError, CheckpointRef, checkpoints_dir, step_of, tag_dirs, tag_for


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


def tags_line(run_dir: str | Path) -> str:
    """`has step_..., ...` (the newest four complete tags), for a message about a missing tag."""
    tags = [d.name for d in tag_dirs(checkpoints_dir(run_dir)) if check_tag(d, "size")[0] is not None]
    return f"has {', '.join(tags[-4:])}" if tags else "has no complete checkpoint"


def newest_complete(run_dir: str | Path) -> CheckpointRef | None:
    found = list_complete(run_dir)
    return found[-1] if found else None


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
            step = step_of(tag)  # step_99 names step_00000099
            d = checkpoints_dir(run) / (tag_for(step) if step is not None else tag)
            if not d.is_dir():
                raise CheckpointError(f"{run}: no checkpoint {tag} in {checkpoints_dir(run)} ({tags_line(run)})")
    meta, why = check_tag(d, verify)
    if meta is None:
        raise CheckpointError(f"{d}: not a usable checkpoint: {why or 'missing'}")
    return CheckpointRef(d, step_of(d.name) or 0, meta)
