"""Faults of the run-folder layer that must end in one clear line (issue 32): a disk still full
when a failed tag is quarantined, a killed universal conversion. Real files on a real
size-limited filesystem, a real subprocess killed by a real signal."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from megamor.runs import integrity
from megamor.runs.layout import CheckpointError, CheckpointRef, QuarantineError, tag_for
from megamor.runs.resume import ensure_universal, find_resumable
from megamor.testing.tmpfs import mounted_tmpfs
from tests.runs.test_integrity import real_tag


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 512 KiB tmpfs (needs root; skipped elsewhere)."""
    with mounted_tmpfs(tmp_path / "tiny_fs", "512k") as mnt:
        yield mnt


def fill(fs: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_a_full_disk_during_quarantine_is_one_error_and_moves_nothing(tiny_fs):
    run = tiny_fs / "run"
    real_tag(run, 2)
    broken = real_tag(run, 4)
    (broken / integrity.MARKER).unlink()  # a save that did not finish: to be quarantined
    filler = fill(tiny_fs)

    with pytest.raises(QuarantineError) as e:
        find_resumable(run, "hash")
    msg = str(e.value)
    assert "\n" not in msg and str(broken) in msg and "No space left on device (ENOSPC)" in msg, msg
    assert "nothing was moved" in msg
    assert broken.is_dir() and not (broken / integrity.MARKER).exists()  # left where it was, untouched
    qdir = integrity.quarantine_dir(run / "checkpoints")
    assert not (qdir / tag_for(4)).exists() and not list(qdir.glob("*.json"))  # no tag without its record
    assert not [p for p in qdir.iterdir() if p.name.startswith(".")]  # no temp file left either

    filler.unlink()  # space again: the same rerun quarantines it, with its reason, and resumes step 2
    ref = find_resumable(run, "hash")
    assert ref is not None and ref.step == 2
    assert json.loads((qdir / f"{tag_for(4)}.json").read_text())["reason"] == integrity.UNFINISHED
    assert (qdir / tag_for(4) / "experiment.yaml").is_file()


def test_a_full_disk_when_a_save_finds_an_old_partial_tag_is_a_save_error(tiny_fs):
    from megamor.runs.save import CheckpointManager
    from megamor.runs.save_errors import CheckpointSaveError

    run = tiny_fs / "run"
    real_tag(run, 2)
    old = run / "checkpoints" / tag_for(4)
    old.mkdir()
    (old / "mp_rank_00_model_states.pt").write_bytes(b"half")
    fill(tiny_fs)
    with pytest.raises(CheckpointSaveError, match=r"saving step_00000004 failed: .*No space left on device \(ENOSPC\)"):
        CheckpointManager(run, keep_last=2).save(engine=None, step=4, client_state={}, config_yaml="", meta={})
    assert (old / "mp_rank_00_model_states.pt").read_bytes() == b"half"  # not moved, not deleted


# -- a killed universal conversion ------------------------------------------------------------
def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def test_a_killed_universal_conversion_names_the_signal(tmp_path):
    tag = real_tag(tmp_path, 2)
    ref = CheckpointRef(tag, 2, {**json.loads((tag / integrity.MARKER).read_text()), "zero_stage": 1})
    outcome: dict[str, BaseException] = {}

    def convert() -> None:
        try:
            ensure_universal(ref)
        except BaseException as e:  # noqa: BLE001  handed to the test's thread
            outcome["error"] = e

    t = threading.Thread(target=convert)
    t.start()
    deadline = time.monotonic() + 60
    killed = False
    while t.is_alive() and time.monotonic() < deadline and not killed:
        for pid in _children(os.getpid()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError):  # a child that ended meanwhile
                continue
            if b"megamor.runs.safe_universal" in cmd:
                os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer or a user would
                killed = True
        time.sleep(0.05)
    t.join(60)
    assert killed, "the conversion subprocess was never seen"
    err = outcome.get("error")
    assert isinstance(err, CheckpointError), err
    assert str(err) == f"converting {tag} to a universal checkpoint failed: killed by signal SIGKILL (return code -9)"
    assert not list((tmp_path / "checkpoints" / "universal").glob(".*"))  # its temp folder is removed


# -- a source that is no checkpoint at all ------------------------------------------------------
def test_convert_says_what_a_non_checkpoint_is_not(tmp_path, capsys):
    from megamor.convert import main

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    for source, words in ((folder, "not a checkpoint: neither a run folder"),
                          (folder / "a.txt", "cannot read as a torch checkpoint: not a file written by torch.save")):
        assert main([str(source), "--out", str(tmp_path / "out"), "sharing=middle_cycle", "num_recursions=2"]) == 2  # bad input (megamor.cli)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"megamor.convert: error: {source}: {words}"), err
        assert "to evaluate" not in err[0]
    assert not (tmp_path / "out").exists()


def test_prune_on_a_full_disk_leaves_a_partial_tag_in_place_with_a_warning(tiny_fs, capsys):
    """After a complete save, tidying a partial tag that cannot be quarantined is no save error."""
    from megamor.runs.save import CheckpointManager

    run = tiny_fs / "run"
    real_tag(run, 2)
    partial = run / "checkpoints" / tag_for(3)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    keep = real_tag(run, 4)
    fill(tiny_fs)
    CheckpointManager(run, keep_last=2).prune(keep=keep)
    assert (partial / "mp_rank_00_model_states.pt").read_bytes() == b"half"
    err = capsys.readouterr().err
    assert f"checkpoint {tag_for(3)}: {integrity.UNFINISHED}; left in place: cannot set aside" in err and "ENOSPC" in err
