"""A finished run's result, kept beside the report (REPORT/run_results/[<budget>/]<variant>-s<seed>.json)
so that a study outlives its run folders.

Run folders are big (checkpoints) and live outside git; the report folder is small and is
committed. A long study spread over several sessions or machines, each of which may start
with no run folders, therefore counts a run as done when either its run folder's
`study_result.json` or its copy here exists, and never trains it again.

A copy is trusted only for the run it was made for: it records the run's experiment overrides
(without the paths of this machine's data and run folder) and the SHA-256 of the tokenizer
the run was trained with. A copy whose record differs from the run the study would train now
(the study file changed, or the data were prepared differently) is a configuration error
naming the file; it is never overwritten or ignored silently. The base experiment and model
files are recorded by name, not content: change those and the kept results no longer say what
they trained (start a new study name or a new report folder instead).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megamor.config import ConfigError
from megamor.utils.atomic import write_json

if TYPE_CHECKING:  # plan imports torch; the study's `--help` and this module do not need it
    from megamor.study.plan import RunSpec

# overrides that name this machine's folders, not what the run is
_LOCAL_KEYS = ("run_dir=", "data.train=", "data.valid=", "data.tokenizer=")


def identity_overrides(run: RunSpec) -> list[str]:
    return [o for o in run.overrides if not o.startswith(_LOCAL_KEYS)]


def tokenizer_sha256(tokenizer: Path) -> str:
    model = tokenizer / "tokenizer.model" if tokenizer.is_dir() else tokenizer
    return hashlib.sha256(model.read_bytes()).hexdigest()


def identity(run: RunSpec, tokenizer: Path) -> dict[str, Any]:
    return {"overrides": identity_overrides(run), "tokenizer_sha256": tokenizer_sha256(tokenizer)}


def save(run: RunSpec, result: dict[str, Any], tokenizer: Path) -> Path:
    """Keep a copy of `result` (atomic), with the run's identity."""
    path = run.kept_path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**result, "identity": identity(run, tokenizer)})
    return path


def _read(run: RunSpec) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """(result, identity record) of `run`'s kept copy, None when there is none; damaged JSON
    or anything but a JSON object is a ConfigError naming the file."""
    path = run.kept_path
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"not valid JSON ({e}); restore it from git or delete it to train the run again") from None
    if not isinstance(record, dict):
        raise ConfigError(str(path), "is not a JSON object; restore it from git or delete it to train the run again")
    identity = record.pop("identity", None)
    return record, identity


def load(run: RunSpec) -> dict[str, Any] | None:
    """The kept result of `run`, or None when there is none."""
    kept = _read(run)
    return kept[0] if kept is not None else None


def check(run: RunSpec, tokenizer: Path) -> None:
    """Raise ConfigError when `run` has a kept result made for a different run."""
    path = run.kept_path
    found = _read(run)
    if found is None:
        return
    kept = found[1]
    now = identity(run, tokenizer)
    if not isinstance(kept, dict):
        raise ConfigError(str(path), "has no identity record: it cannot be matched to the run it claims to be")
    if kept.get("overrides") != now["overrides"]:
        old, new = set(kept.get("overrides") or []), set(now["overrides"])
        diff = sorted(old ^ new)[:4]
        raise ConfigError(str(path), f"was trained with other settings than run {run.name} now has ({', '.join(diff)}); "
                                     "restore the study file or move the file away to train the run again")
    if kept.get("tokenizer_sha256") != now["tokenizer_sha256"]:
        raise ConfigError(str(path), f"run {run.name} was trained with another tokenizer (SHA-256 "
                                     f"{str(kept.get('tokenizer_sha256'))[:12]}..., now {now['tokenizer_sha256'][:12]}...); "
                                     "restore that tokenizer or move the file away to train the run again")
