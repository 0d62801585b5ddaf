"""Stop signals in every phase of a real run: set-up, validation (cut short, ranks agree), SIGINT."""

from __future__ import annotations

import signal

import pytest

from megamor.runs.tags import list_complete, newest_complete
from megamor.train.signals import EXIT_PREEMPTED, StopRequest
from tests.train.helpers import launch


def test_second_sigint_abandons_the_save():
    # Start from Python's default handler whatever this process inherited (a job started in the
    # background by a non-interactive shell, or under nohup, inherits SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopRequest().install()
        try:
            signal.raise_signal(signal.SIGINT)
            assert stop.signum == signal.SIGINT
            try:
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("a second SIGINT must interrupt at once")
        finally:
            stop.uninstall()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handler is back
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_uninstall_restores_an_ignored_sigint():
    """Under nohup SIGINT is ignored; after the trainer it must be ignored again."""
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        StopRequest().install().uninstall()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.launch
def test_sigint_on_one_rank_during_validation_saves_and_exits_75(tiny_config, tmp_path):
    """Rank 1 alone gets SIGINT at its 3rd validation batch of step 4 (the whole split, hundreds
    of batches): both ranks agree before the next batch, save step 4 and exit 75, without
    finishing validation or training step 5."""
    run_dir = tmp_path / "run"
    run = launch(tiny_config, run_dir, ["trainer.max_steps=100000", "checkpoint.every_steps=0", "eval.every_steps=4",
                                        "eval.max_batches=null", "eval.causal_routing=false"],
                 nproc=2, env={"MEGAMOR_FAULTS": "signal_at_eval_batch=3:INT,rank=1"}, timeout=240)
    out = run.output
    assert "exitcode  : 75" in out or "exitcode: 75" in out, out[-3000:]
    assert "stop requested (signal on another rank) at step 4 during validation" in out
    assert "KeyboardInterrupt" not in out and "failed:" not in out  # torchrun's own report is its ChildFailedError
    assert [c.step for c in list_complete(run_dir)] == [4]
    assert max(run.losses()) == 4
    assert not any("val/loss" in r for r in run.records())  # validation was cut short, not finished


@pytest.mark.launch
def test_signal_during_setup_stops_before_the_first_step(tiny_config, tmp_path):
    run = launch(tiny_config, tmp_path / "run", ["trainer.max_steps=100000"],
                 env={"MEGAMOR_FAULTS": "signal_at_setup=TERM"}, timeout=240)
    assert run.rc == EXIT_PREEMPTED, run.output[-3000:]
    assert "stop requested (signal 15) at step 0" in run.output
    assert run.losses() == {} and newest_complete(run.run_dir) is None  # nothing trained, nothing to save


def test_exit_file_is_written_only_when_asked(tmp_path, monkeypatch):
    from megamor.train.signals import EXIT_FILE_ENV, write_exit_file

    monkeypatch.delenv(EXIT_FILE_ENV, raising=False)
    write_exit_file(75)  # no file asked for: nothing written anywhere
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(EXIT_FILE_ENV, str(tmp_path / "exit"))
    write_exit_file(75)
    assert (tmp_path / "exit").read_text() == "75\n" and [p.name for p in tmp_path.iterdir()] == ["exit"]


def test_exit_file_keeps_a_failure_over_a_later_75(tmp_path, monkeypatch):
    """A failing rank writes 1; the ranks it cut off may write 75 after it: 1 must stay, or
    slurm/train.sbatch requeues a failure forever. A 75 still replaces a 0 or a 75."""
    from megamor.train.signals import EXIT_FILE_ENV, write_exit_file

    monkeypatch.setenv(EXIT_FILE_ENV, str(tmp_path / "exit"))
    write_exit_file(1)
    write_exit_file(75)
    assert (tmp_path / "exit").read_text() == "1\n"
    write_exit_file(0)
    write_exit_file(75)
    assert (tmp_path / "exit").read_text() == "75\n"
