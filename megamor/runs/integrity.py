"""Is a checkpoint tag intact? Content hashes for the COMPLETE marker, checks, quarantine.

The marker lists every file of a tag with its size and (since issue 8) an xxh3-128 hash of its
bytes. `checkpoint.verify` picks the check made before resuming:
    hash  every file's size and content hash (reads the whole tag once; default)
    size  sizes only (a same-size corruption, e.g. a flipped byte, passes)
A marker written before hashes existed is checked by size.

A tag that fails is never deleted: it is moved to checkpoints/quarantine/<tag> with a
<tag>.json beside it saying why, so a person can inspect or restore it (move it back).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import xxhash

from megamor.runs.layout import LATEST, MARKER, QUARANTINE, UNIVERSAL, QuarantineError, os_error_line
from megamor.utils.atomic import atomic_open, write_json

HASH_NAME = "xxh3_128"
BLOCK = 8 << 20  # streamed in 8 MiB blocks: bounded memory, few syscalls
VERIFY_MODES = ("hash", "size")
UNFINISHED = "no COMPLETE marker (a save that did not finish)"
SET_ASIDE = "set aside: the run was started over with checkpoint.resume=false"
STARTED_OVER = "started_over"  # key of a quarantine record: the run started from step 0 after this tag
_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_")


def hash_file(path: Path) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def tag_files(folder: Path) -> list[str]:
    """The files a marker covers: everything but the marker and hidden (temp) files."""
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.startswith(".")]


def file_sizes(folder: Path) -> dict[str, int]:
    """The marker's file list: every covered file (see tag_files) with its size."""
    return {name: (folder / name).stat().st_size for name in tag_files(folder)}


def owner(name: str, world: int) -> int:
    """The rank that hashes a file: the DP rank in DeepSpeed's name (the rank that wrote it,
    so its bytes are still in that node's page cache), else rank 0."""
    m = _RANK_RE.search(Path(name).name)
    return int(m.group(1)) % world if m else 0


def read_marker(tag_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    marker = tag_dir / MARKER
    if not marker.is_file():
        return None, UNFINISHED
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable COMPLETE marker ({e})"
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return None, "COMPLETE marker without a file list"
    return meta, None


def check_sizes(tag_dir: Path, meta: dict[str, Any]) -> str | None:
    for name, size in meta["files"].items():
        p = tag_dir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, the marker says {size}"
    return None


def check_hashes(tag_dir: Path, meta: dict[str, Any], names: list[str] | None = None) -> str | None:
    """The first file (of `names`, default all) whose content hash differs from the marker's."""
    hashes = meta.get("hashes") or {}
    if meta.get("hash") != HASH_NAME:
        return None  # an older marker: sizes only
    for name in names if names is not None else sorted(hashes):
        if name not in hashes:
            continue
        try:
            got = hash_file(tag_dir / name)
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
        if got != hashes[name]:
            return f"{name} does not match its content hash (corrupted since it was written)"
    return None


def check_tag(tag_dir: Path, verify: str = "size") -> tuple[dict[str, Any] | None, str | None]:
    """(marker metadata, None) for an intact tag, else (None, why not). One process."""
    meta, why = read_marker(tag_dir)
    if meta is None:
        return None, why
    why = check_sizes(tag_dir, meta) or (check_hashes(tag_dir, meta) if verify == "hash" else None)
    return (None, why) if why else (meta, None)


def marker_payload(sizes: dict[str, int], hashes: dict[str, str]) -> dict[str, Any]:
    return {"files": sizes, "hash": HASH_NAME, "hashes": hashes}


# -- quarantine (rank 0 only) ----------------------------------------------------------------
def quarantine_dir(ckpt_root: Path) -> Path:
    return ckpt_root / QUARANTINE


def quarantine(tag_dir: Path, reason: str) -> Path:
    """Move a tag that failed validation out of the way, files untouched; returns where.

    The reason record is written first and the tag moved second, so a tag is never in
    quarantine/ without its record: when either step fails (a disk still full), nothing was
    moved and QuarantineError names the file and the error."""
    qdir = quarantine_dir(tag_dir.parent)
    record = None
    try:
        qdir.mkdir(exist_ok=True)
        dest = qdir / tag_dir.name
        n = 1
        while dest.exists() or dest.with_name(dest.name + ".json").exists():
            dest = qdir / f"{tag_dir.name}.{n}"
            n += 1
        record = qdir / f"{dest.name}.json"
        write_json(record, {"tag": tag_dir.name, "reason": reason, "time": time.time(), "moved_from": str(tag_dir)})
        os.replace(tag_dir, dest)  # a rename: a writer still holding a file open writes into dest
    except OSError as e:
        if record is not None and not dest.exists():
            record.unlink(missing_ok=True)  # the tag did not move: its record must not claim it did
        raise QuarantineError(f"cannot set aside {tag_dir} ({reason}): {os_error_line(e, qdir)}; nothing was moved; "
                              "free space (or fix the folder's permissions) and rerun") from None
    # A universal conversion of this tag is derived from it: regenerated if the tag is restored.
    shutil.rmtree(tag_dir.parent / UNIVERSAL / tag_dir.name, ignore_errors=True)
    latest = tag_dir.parent / LATEST
    if latest.is_file() and latest.read_text().strip() == tag_dir.name:
        latest.unlink()
    return dest


def quarantine_records(ckpt_root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, its .json record) of every quarantined tag (an unreadable record: {})."""
    qdir = quarantine_dir(ckpt_root)
    out = []
    if qdir.is_dir():
        for d in sorted(p for p in qdir.iterdir() if p.is_dir()):
            rec: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads((qdir / f"{d.name}.json").read_text())
                rec = loaded if isinstance(loaded, dict) else {}
            out.append((d.name, rec))
    return out


def quarantined(ckpt_root: Path) -> list[tuple[str, str]]:
    """(folder name, reason) of every quarantined tag."""
    return [(name, rec.get("reason", "reason unknown")) for name, rec in quarantine_records(ckpt_root)]


def never_completed(ckpt_root: Path, reasons: list[str]) -> bool:
    """True when the run folder holds nothing but one first save that never finished (e.g. a
    job killed during its very first save): starting from step 0 then loses nothing, and the
    partial tag stays in quarantine/. `reasons`: why each tag was rejected just now (they are
    in quarantine/ already).

    Counted are the quarantined tags without a marker that were not set aside on purpose nor
    already started over from (mark_started_over). Several such tags (markers lost in a copy
    or deleted; an older tag than the one being saved), a quarantined tag with its marker, or
    any other failure mean saves did finish here: False, the trainer refuses."""
    if not all(r == UNFINISHED for r in reasons):
        return False
    qdir = quarantine_dir(ckpt_root)
    unfinished = 0
    for name, rec in quarantine_records(ckpt_root):
        why = rec.get("reason", "reason unknown")
        if why == SET_ASIDE:
            continue
        if (qdir / name / MARKER).exists():
            return False
        if rec.get(STARTED_OVER):
            continue
        if why != UNFINISHED:
            return False
        unfinished += 1
    return unfinished <= 1


def mark_started_over(ckpt_root: Path) -> None:
    """Rank 0, after never_completed chose a fresh start: record on the partial tag that the run
    started over from it, so it never counts against a later start (see never_completed)."""
    qdir = quarantine_dir(ckpt_root)
    for name, rec in quarantine_records(ckpt_root):
        if rec.get("reason") == UNFINISHED and not rec.get(STARTED_OVER):
            try:
                write_json(qdir / f"{name}.json", {**rec, STARTED_OVER: True})
            except OSError as e:
                raise QuarantineError(f"cannot record the fresh start on {qdir / name}: {os_error_line(e, qdir)}; "
                                      "free space and rerun") from None


def warn(text: str) -> None:
    print(f"megamor: warning: {text}", file=sys.stderr, flush=True)


def write_latest(ckpt_root: Path, tag: str) -> None:
    with atomic_open(ckpt_root / LATEST, "w") as f:
        f.write(tag)
