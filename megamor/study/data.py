"""The study's data, prepared once: a tokenizer and train/valid shards from raw text.

Runs the same data_prep commands a user would (printed as they run); each step is skipped
when its output exists, so rerunning a study costs nothing here. Study processes started
together take turns (a lock on OUT/data/.prepare.lock): the first prepares, the others reuse. Text files with an extension
the readers do not know (WikiText's .raw) are linked in as .txt.

The settings the data are prepared with (data.text, vocab_size, tokenizer_kind, valid_fraction,
txt_mode) are written to OUT/data/settings.json before preparing; a later run of the study
with other ones is a configuration error naming data.<key> (the prepared data would silently
be reused otherwise). Data prepared before that file existed are trusted.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from megamor.config import ConfigError
from megamor.data.tokenizer import HF_FILE, MODEL_FILE
from megamor.env import repo_root
from megamor.parallel.orphan import child_follows_parent
from megamor.study.config import StudyConfig
from megamor.utils.atomic import write_json

KNOWN = (".txt", ".jsonl", ".gz", ".zst", ".parquet")
SETTINGS = "settings.json"  # OUT/data/: the settings the data were prepared with
SETTINGS_KEYS = ("text", "vocab_size", "tokenizer_kind", "valid_fraction", "txt_mode")


def data_paths(study: StudyConfig) -> tuple[Path, Path]:
    """(shards, tokenizer) folders the runs train on."""
    d = study.data
    if d.shards:
        return Path(d.shards).resolve(), Path(d.tokenizer or "").resolve()
    root = study.out_path.resolve() / "data"
    return root / "shards", root / "tokenizer"


def is_prepared(study: StudyConfig) -> bool:
    shards, tok = data_paths(study)
    if study.data.shards:
        return (shards / "manifest.json").is_file() and tok.exists()
    return (shards / "manifest.json").is_file() and _tokenizer_file(tok, study.data.tokenizer_kind).is_file()


def data_settings(study: StudyConfig) -> dict:
    d = study.data
    return {k: (list(getattr(d, k)) if k == "text" else getattr(d, k)) for k in SETTINGS_KEYS}


def check_settings(study: StudyConfig) -> None:
    """ConfigError naming data.<key> when OUT/data was prepared with other settings than the
    study's (nothing to check with ready shards, or without a settings file)."""
    if study.data.shards:
        return
    path = data_paths(study)[0].parent / SETTINGS
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"not valid JSON ({e}); move {path.parent} away to prepare the data again") from None
    if not isinstance(old, dict):
        raise ConfigError(str(path), f"is not a JSON object; move {path.parent} away to prepare the data again")
    now = data_settings(study)
    for k in SETTINGS_KEYS:
        if k in old and old[k] != now[k]:
            raise ConfigError(f"data.{k}", f"is {now[k]!r}, but the study's data in {path.parent} were prepared with "
                                           f"{old[k]!r} ({path}): restore it, or move {path.parent} (and the runs "
                                           "trained on it) away to prepare the data again")


def _text_folder(study: StudyConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(study.data.text):
        src = Path(os.path.expandvars(item)).expanduser()
        if not src.exists():
            raise ConfigError(f"data.text[{i}]", f"not found: {item}")
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
        for f in files:
            if f.name.upper().startswith(("LICENSE", "README")):
                continue
            name = f.name if f.name.endswith(KNOWN) else f"{f.stem}.txt"
            link = folder / f"{i:02d}_{name}"
            if not link.exists():
                link.symlink_to(f.resolve())
    return folder


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    r = subprocess.run(cmd, cwd=repo_root(), check=False, preexec_fn=child_follows_parent())
    if r.returncode != 0:
        raise RuntimeError(f"data preparation failed (exit {r.returncode}): {' '.join(cmd)}")


def prepare(study: StudyConfig) -> tuple[Path, Path]:
    shards, tok = data_paths(study)
    if study.data.shards:
        for p, what in ((shards / "manifest.json", "data.shards"), (tok, "data.tokenizer")):
            if not p.exists():
                raise ConfigError(what, f"not found: {p}")
        return shards, tok
    # Several study processes may start at once: one prepares, the others wait, then find it done.
    shards.parent.mkdir(parents=True, exist_ok=True)
    with open(shards.parent / ".prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _prepare_text(study, shards, tok)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _tokenizer_file(tok: Path, kind: str) -> Path:
    """The file whose presence means the study's tokenizer of `kind` is trained."""
    return tok / (HF_FILE if kind == "hf-bpe" else MODEL_FILE)


def _prepare_text(study: StudyConfig, shards: Path, tok: Path) -> tuple[Path, Path]:
    d = study.data
    py = sys.executable
    trained = _tokenizer_file(tok, d.tokenizer_kind)
    check_settings(study)
    settings = shards.parent / SETTINGS
    if not settings.is_file() and not trained.is_file() and not (shards / "manifest.json").is_file():
        write_json(settings, data_settings(study))  # before preparing: what these data are (none yet: nothing trusted)
    if not trained.is_file() or not (shards / "manifest.json").is_file():
        text = _text_folder(study, shards.parent / "text")
    if not trained.is_file():
        _run([py, "data_prep/train_tokenizer.py", str(text), "--out", str(tok), "--vocab-size", str(d.vocab_size),
              "--kind", d.tokenizer_kind, "--txt-mode", d.txt_mode, "--num-threads", "1"])
    if not (shards / "manifest.json").is_file():
        _run([py, "data_prep/tokenize_and_shard.py", str(text), "--tokenizer", str(tok), "--out", str(shards),
              "--workers", "1", "--txt-mode", d.txt_mode, "--valid-fraction", str(d.valid_fraction), "--no-progress"])
    return shards, tok
