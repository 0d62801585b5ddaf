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

The run folder carries the same identity: `RUN/study_identity.json` (written before training
starts: overrides, tokenizer and shards) and the `identity` of `RUN/study_result.json` (that
and the evaluation settings). `check` compares both files and the kept copy with the run the
study would train now, so a changed study never reuses a checkpoint or a result made with
other settings. Records compare on the keys they have: kept copies and run folders written
before a key was recorded (or before run folders had an identity at all) are trusted as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megamor.config import ConfigError
from megamor.utils.atomic import write_json

if TYPE_CHECKING:  # plan imports torch; the study's `--help` and this module do not need it
    from megamor.study.config import StudyConfig
    from megamor.study.plan import RunSpec

# overrides that name this machine's folders, not what the run is
_LOCAL_KEYS = ("run_dir=", "data.train=", "data.valid=", "data.tokenizer=")
IDENTITY_FILE = "study_identity.json"  # RUN/: the identity of what the run folder trains
# the study's evaluation settings that change a run's result (not paths or plot switches)
EVAL_KEYS = ("val_max_batches", "val_batch_size", "fewshot_tasks", "fewshot_limit", "num_fewshot")


def identity_overrides(run: RunSpec) -> list[str]:
    return [o for o in run.overrides if not o.startswith(_LOCAL_KEYS)]


def tokenizer_sha256(tokenizer: Path) -> str:
    model = tokenizer / "tokenizer.model" if tokenizer.is_dir() else tokenizer
    return hashlib.sha256(model.read_bytes()).hexdigest()


def _tokenizer_file(tokenizer: Path) -> Path | None:
    """The file `tokenizer_sha256` hashes, None when there is none (data not prepared here)."""
    if tokenizer.is_file():
        return tokenizer
    model = tokenizer / "tokenizer.model"
    return model if model.is_file() else None


def shards_sha256(shards: Path) -> str | None:
    """A fingerprint of the shards, the same on every machine: SHA-256 over the manifest's
    per-shard (and per-docs-file) SHA-256 values, split by split; None without a manifest."""
    manifest = shards / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        splits = json.loads(manifest.read_text())["splits"]
        parts = [f"{name}:{sh.get('sha256')}:{sh.get('docs_sha256')}" for name in sorted(splits)
                 for sh in splits[name]["shards"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(str(manifest), f"not a readable shards manifest ({type(e).__name__}: {e})") from None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def eval_settings(study: StudyConfig) -> dict[str, Any]:
    ev = study.eval
    return {k: (list(getattr(ev, k)) if k == "fewshot_tasks" else getattr(ev, k)) for k in EVAL_KEYS}


def identity(run: RunSpec, tokenizer: Path, study: StudyConfig | None = None, shards: Path | None = None,
             evaluation: bool = True) -> dict[str, Any]:
    """The run's identity: its overrides, its tokenizer's SHA-256 (when the tokenizer is here),
    the shards' fingerprint (`shards`, when prepared) and, with `study` and `evaluation`, the
    evaluation settings of its result."""
    out: dict[str, Any] = {"overrides": identity_overrides(run)}
    if _tokenizer_file(tokenizer) is not None:
        out["tokenizer_sha256"] = tokenizer_sha256(tokenizer)
    fp = shards_sha256(shards) if shards is not None else None
    if fp is not None:
        out["shards_sha256"] = fp
    if study is not None and evaluation:
        out["eval"] = eval_settings(study)
    return out


def save(run: RunSpec, result: dict[str, Any], tokenizer: Path, study: StudyConfig | None = None,
         shards: Path | None = None) -> Path:
    """Keep a copy of `result` (atomic), with the run's identity."""
    path = run.kept_path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**result, "identity": identity(run, tokenizer, study, shards)})
    return path


def write_run_identity(run: RunSpec, tokenizer: Path, study: StudyConfig | None = None, shards: Path | None = None) -> None:
    """RUN/study_identity.json (atomic): what the run folder's checkpoints are trained with."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.run_dir / IDENTITY_FILE, identity(run, tokenizer, study, shards, evaluation=False))


def _read(run: RunSpec) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """(result, identity record) of `run`'s kept copy, None when there is none; damaged JSON
    or anything but a JSON object is a ConfigError naming the file."""
    record = _read_json(run.kept_path, "restore it from git or delete it to train the run again")
    if record is None:
        return None
    identity = record.pop("identity", None)
    return record, identity


def load(run: RunSpec) -> dict[str, Any] | None:
    """The kept result of `run`, or None when there is none."""
    kept = _read(run)
    return kept[0] if kept is not None else None


def _read_json(path: Path, remedy: str = "move the run folder away to train the run again") -> dict[str, Any] | None:
    """A JSON object, None when the file is absent; damaged: a ConfigError naming it and `remedy`."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"not valid JSON ({e}); {remedy}") from None
    if not isinstance(record, dict):
        raise ConfigError(str(path), f"is not a JSON object; {remedy}")
    return record


def _compare(path: Path, run: RunSpec, kept: dict[str, Any], now: dict[str, Any], remedy: str) -> None:
    """ConfigError naming `path` and the settings that differ, on the keys both records have."""
    if kept.get("overrides") != now["overrides"]:
        old, new = set(kept.get("overrides") or []), set(now["overrides"])
        diff = sorted(old ^ new)[:4]
        raise ConfigError(str(path), f"was trained with other settings than run {run.name} now has ({', '.join(diff)}); "
                                     f"restore the study file or {remedy}")
    if "tokenizer_sha256" in kept and "tokenizer_sha256" in now and kept["tokenizer_sha256"] != now["tokenizer_sha256"]:
        raise ConfigError(str(path), f"run {run.name} was trained with another tokenizer (SHA-256 "
                                     f"{str(kept.get('tokenizer_sha256'))[:12]}..., now {now['tokenizer_sha256'][:12]}...); "
                                     f"restore that tokenizer or {remedy}")
    if "shards_sha256" in kept and "shards_sha256" in now and kept["shards_sha256"] != now["shards_sha256"]:
        raise ConfigError(str(path), f"run {run.name} was trained on other shards (fingerprint "
                                     f"{str(kept['shards_sha256'])[:12]}..., now {now['shards_sha256'][:12]}...); "
                                     f"restore those shards or {remedy}")
    if isinstance(kept.get("eval"), dict) and "eval" in now:
        diff = [f"eval.{k}={kept['eval'][k]!r}, now {now['eval'][k]!r}" for k in EVAL_KEYS
                if k in kept["eval"] and k in now["eval"] and kept["eval"][k] != now["eval"][k]]
        if diff:
            raise ConfigError(str(path), f"run {run.name} was evaluated with other settings ({'; '.join(diff)}); "
                                         f"restore the study file or {remedy}")


def check(run: RunSpec, tokenizer: Path, study: StudyConfig | None = None, shards: Path | None = None) -> None:
    """Raise ConfigError when `run` has a kept result, or a run folder, made for a different run.

    Checked: the kept copy beside the report, RUN/study_identity.json (the checkpoints) and the
    identity in RUN/study_result.json (the result, with its evaluation settings). A run folder
    from before run folders had an identity has neither and is trusted, as it always was."""
    now = identity(run, tokenizer, study, shards)
    found = _read(run)
    if found is not None:
        if not isinstance(found[1], dict):
            raise ConfigError(str(run.kept_path), "has no identity record: it cannot be matched to the run it claims to be")
        _compare(run.kept_path, run, found[1], now, "move the file away to train the run again")
    folder = _read_json(run.run_dir / IDENTITY_FILE)
    if folder is not None:
        _compare(run.run_dir / IDENTITY_FILE, run, folder, now, f"move the run folder {run.run_dir} away to train the run again")
    result = _read_json(run.result_path)
    if result is not None and isinstance(result.get("identity"), dict):
        remedy = f"move {run.result_path} away to evaluate the run again (or its run folder to train it again)"
        _compare(run.result_path, run, result["identity"], now, remedy)
