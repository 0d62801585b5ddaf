"""The demo's run folder: another --steps keeps the finished run and trains beside it."""

from __future__ import annotations

import pytest

from megamor.demo import choose_run_dir, main


def _run_of(folder, steps: int) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"name: demo\ntrainer:\n  max_steps: {steps}\n")


def test_same_length_resumes_in_place_another_goes_beside(tmp_path, capsys):
    assert choose_run_dir(tmp_path, 300) == tmp_path / "run"  # nothing yet
    _run_of(tmp_path / "run", 300)
    assert choose_run_dir(tmp_path, 300) == tmp_path / "run"  # resume / re-sample
    assert choose_run_dir(tmp_path, 100) == tmp_path / "run-100"
    said = capsys.readouterr().out
    assert f"{tmp_path / 'run'} holds a 300-step run, kept: this 100-step run trains in {tmp_path / 'run-100'}" in said
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_bad_steps_is_one_line_exit_2_and_deletes_nothing(tmp_path, capsys, monkeypatch):
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):  # restored afterwards (main fills them in)
        monkeypatch.setenv(name, {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}[name])
    _run_of(tmp_path / "run", 300)
    assert main(["--out", str(tmp_path), "--steps", "0", "--fresh"]) == 2
    assert capsys.readouterr().err == "megamor.demo: --steps must be a positive number of steps, got 0\n"
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_no_workers_is_refused_before_any_step(tmp_path, capsys):
    """--workers 0 failed at step 3 of 4, after the corpus and the tokenizer were made."""
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--workers: must be >= 1" in err[0], err
    assert not any(tmp_path.iterdir())
