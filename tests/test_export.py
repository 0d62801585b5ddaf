"""`python -m megamor.export` into a folder that holds files: refused unless --overwrite, which
replaces the folder whole (written beside it, swapped in): old files never sit beside new ones.
In-process, on a run folder written by megamor's CheckpointManager (ZeRO-0 layout)."""

from __future__ import annotations

import pytest
import torch

from megamor.export import load_exported, main
from megamor.utils import atomic
from tests.eval.test_checkpoint import training_run
from tests.model.helpers import mor


@pytest.fixture
def run(tmp_path):
    return training_run(tmp_path, mor(), tmp_path / "no_tokenizer.model", steps=(10,))  # weights only


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_non_empty_target_is_refused_then_replaced_whole_with_overwrite(run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old_notes.txt").write_text("the user's")
    (out / "model.safetensors").write_bytes(b"an older export")

    assert main([str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"megamor.export: {out}: is not empty (2 entries") and "--overwrite" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "old_notes.txt"]  # untouched
    assert (out / "model.safetensors").read_bytes() == b"an older export"

    assert main([str(run), "--out", str(out), "--overwrite"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "old_notes.txt" not in names and {"megamor.pt", "model.safetensors", "config.json"} <= set(names)
    model, _ = load_exported(out)
    assert torch.equal(model.embed_tokens.weight, mor().embed_tokens.weight)
    assert hidden(tmp_path) == []  # neither the temp folder nor the replaced one is left behind


def test_an_empty_or_new_target_needs_no_overwrite_and_a_file_is_refused(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(run), "--out", str(tmp_path / "empty")]) == 0
    assert main([str(run), "--out", str(tmp_path / "new" / "deeper")]) == 0
    assert (tmp_path / "new" / "deeper" / "megamor.pt").is_file()
    (tmp_path / "a_file").write_text("x")
    capsys.readouterr()
    assert main([str(run), "--out", str(tmp_path / "a_file"), "--overwrite"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([str(run)]) == 0 and main([str(run)]) == 2  # the default RUN/export/<tag> too


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_swaps_whole_folders(tmp_path, monkeypatch, exchange):
    final, tmp = tmp_path / "final", tmp_path / ".final.tmp"
    final.mkdir()
    (final / "old").write_text("old")
    tmp.mkdir()
    (tmp / "new").write_text("new")
    if not exchange:  # the path taken where the kernel or filesystem lacks RENAME_EXCHANGE
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    atomic.replace_dir(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["final"]
