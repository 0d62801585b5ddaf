"""Faults of a real `python -m megamor.train` that must end in one line with the documented exit
code (issue 32), end to end: a rerun on a disk still full when a failed tag must be quarantined."""

from __future__ import annotations

import os

import pytest

from megamor.runs.integrity import MARKER, quarantine_dir
from megamor.runs.layout import CHECKPOINTS, tag_for
from megamor.testing.tmpfs import mounted_tmpfs
from tests.runs.test_faults import fill
from tests.train.helpers import launch


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 1 MiB tmpfs (needs root; skipped elsewhere)."""
    with mounted_tmpfs(tmp_path / "tiny_fs", "1m") as mnt:
        yield mnt


@pytest.mark.launch
def test_rerun_on_a_full_disk_that_must_quarantine_is_one_line_exit_1(tiny_config, tiny_fs, tmp_path):
    partial = tiny_fs / "run" / CHECKPOINTS / tag_for(4)  # a save killed midway: no marker
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    filler = fill(tiny_fs)
    os.truncate(filler, filler.stat().st_size - 4096)  # room for the run-folder lock, not for more
    run_link = tmp_path / "run"
    run_link.symlink_to(tiny_fs / "run")  # the run folder on the full disk; the launcher's temp files are not
    run = launch(tiny_config, run_link, ["trainer.max_steps=4"], env={"MEGAMOR_LOCK_HEARTBEAT_S": "600"})
    assert run.rc == 1, run.output[-3000:]
    assert "Traceback" not in run.output, run.output[-3000:]
    lines = [ln for ln in run.output.splitlines() if ln.startswith("megamor.train:")]
    assert len(lines) == 1 and f"cannot set aside {run_link / CHECKPOINTS / tag_for(4)}" in lines[0], lines
    assert "No space left on device (ENOSPC)" in lines[0] and "nothing was moved" in lines[0]
    assert (partial / "mp_rank_00_model_states.pt").read_bytes() == b"half a file"  # where it was, untouched
    assert not (partial / MARKER).exists() and not list(quarantine_dir(partial.parent).glob("*.json"))
