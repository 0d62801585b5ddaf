"""Runs you can trust (issue 8): a run folder is never silently replaced or deleted, a damaged
tag is caught by its content hashes and kept aside, overflowing steps are counted and abort,
no checkpoint file can run code, a full disk is named. Real runs (`python -m megamor.train`,
tiny ZeRO-1 fp32 config), real files, a real size-limited filesystem.

Each way the trainer meets a run folder (resume, refuse with exit 2, start over) is launched
once; the byte-level variations (which file is damaged, which tags lost their markers) are
checked in this process against the run-folder layer the trainer calls first
(`megamor.runs.resume.find_resumable`, the weights-only loader), on copies of the same runs.

The shared starting point: a run of 8 planned steps killed after step 7, holding step_4 and
step_6 (checkpoint every 2, keep_last 2) and metrics up to step 7.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megamor.env import repo_root
from megamor.runs.integrity import MARKER, QUARANTINE, check_tag, owner, quarantined
from megamor.runs.layout import CHECKPOINTS, NoValidCheckpointError, tag_for
from megamor.runs.resume import ensure_universal, find_resumable
from megamor.runs.safe_load import UnsafeCheckpointError, safe_torch_load
from megamor.runs.safe_load import load as safe_load
from megamor.runs.tags import list_complete, resolve_tag
from megamor.testing.distributed import run_distributed
from megamor.testing.scripts import load_evals_script
from megamor.testing.tmpfs import mounted_tmpfs
from tests.train.helpers import Run, assert_ok, launch
from tests.train.trust_helpers import FILE_KINDS, flip_tensor_byte, plant_payload

pytestmark = pytest.mark.launch  # every test here starts from a trained run folder

COMMON = ["trainer.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=2", "eval.at_end=false"]


@pytest.fixture(scope="module")
def base(tiny_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trust") / "base"
    killed = launch(tiny_config, run_dir, COMMON, env={"MEGAMOR_FAULTS": "sigkill_after_step=7"})
    assert killed.rc != 0 and max(killed.losses()) == 7
    assert [c.step for c in list_complete(run_dir)] == [4, 6]
    return run_dir


@pytest.fixture(scope="module")
def resumed_at_4(base, tiny_config) -> dict[int, float]:
    """Losses of steps 5-8 of a run resumed from step_4 on purpose (step_6 taken out by hand)."""
    run_dir = copy_run(base, "on_purpose")
    shutil.move(str(run_dir / CHECKPOINTS / tag_for(6)), str(run_dir.parent / "step6_taken_out"))
    run = launch(tiny_config, run_dir, COMMON)
    assert_ok(run)
    assert "resumed from step 4" in run.output
    return {s: run.losses()[s] for s in range(5, 9)}


def copy_run(base: Path, name: str) -> Path:
    dst = base.parent / name
    shutil.copytree(base, dst)
    return dst


def files_of(tag: Path) -> set[str]:
    return {p.name for p in tag.iterdir()}


def train_rows(run: Run) -> list[int]:
    return [r["step"] for r in run.records() if "train/loss" in r]


# -- what was seen 1: no tag validates -> refuse, keep everything ------------------------------
def test_no_valid_tag_refuses_names_each_and_keeps_their_files(base, tiny_config):
    run_dir = copy_run(base, "none_valid")
    ck = run_dir / CHECKPOINTS
    (ck / tag_for(6) / MARKER).unlink()
    with open(ck / tag_for(4) / FILE_KINDS["optim"], "r+b") as f:  # truncated
        f.truncate(1000)
    before = {t: files_of(ck / tag_for(t)) for t in (4, 6)}
    metrics_before = (run_dir / "metrics.jsonl").read_text()

    refused = launch(tiny_config, run_dir, COMMON)
    assert refused.rc == 2, refused.output[-3000:]
    line = next(ln for ln in refused.output.splitlines() if "no checkpoint validates" in ln)
    assert line.startswith("megamor.train:") and "checkpoint.resume=false" in line
    assert f"{tag_for(6)} (no COMPLETE marker" in line
    assert f"{tag_for(4)} ({FILE_KINDS['optim']} has 1000 bytes" in line
    assert "Traceback" not in refused.output
    for t in (4, 6):  # quarantined with every file, nothing deleted
        assert files_of(ck / QUARANTINE / tag_for(t)) == before[t]
        assert not (ck / tag_for(t)).exists()
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # no step 1 written again

    # The same command again: still refused (what the trainer's start decides, in this process).
    with pytest.raises(NoValidCheckpointError, match="quarantined earlier"):
        find_resumable(run_dir, "hash")

    fresh = launch(tiny_config, run_dir, [*COMMON, "checkpoint.resume=false"])  # starting over on purpose
    assert_ok(fresh)
    assert "resumed from" not in fresh.output
    assert train_rows(fresh) == list(range(1, 9))  # one row per step, the old run's rows set aside
    assert [c.step for c in list_complete(run_dir)] == [6, 8]
    assert {files_of(ck / QUARANTINE / tag_for(t)) == before[t] for t in (4, 6)} == {True}


def test_killed_during_the_first_save_starts_over_and_keeps_the_partial_tag(tiny_config, tmp_path):
    """A job killed in its very first save (a SLURM requeue's usual case) has nothing to resume:
    the rerun starts from step 0 by itself (the old code refused until checkpoint.resume=false).
    The partial tag of a start-over never counts against the next start: a rerun killed in its
    own first save again still starts from step 0 (the sole tag is that run's first save)."""
    run_dir = tmp_path / "first_save"
    env = {"MEGAMOR_FAULTS": "sigkill_during_save=2"}
    killed = launch(tiny_config, run_dir, COMMON, env=env)
    assert killed.rc != 0 and list_complete(run_dir) == []
    partial = files_of(run_dir / CHECKPOINTS / tag_for(2))
    assert partial and MARKER not in partial

    again = launch(tiny_config, run_dir, COMMON, env=env)  # starts over, then killed in its first save
    assert again.rc != 0 and "no save ever finished in this run folder" in again.output
    assert "resumed from" not in again.output

    rerun = launch(tiny_config, run_dir, COMMON)
    assert_ok(rerun)
    assert "no save ever finished in this run folder" in rerun.output and "resumed from" not in rerun.output
    assert train_rows(rerun) == list(range(1, 9))  # each step once: the killed attempts' rows are cut back
    quarantined = run_dir / CHECKPOINTS / QUARANTINE
    assert files_of(quarantined / tag_for(2)) == partial  # kept, not deleted
    assert {p.name for p in quarantined.iterdir() if p.is_dir()} == {tag_for(2), f"{tag_for(2)}.1"}
    assert [c.step for c in list_complete(run_dir)] == [6, 8]


def test_every_marker_lost_refuses_instead_of_starting_over(base, capsys):
    """Issue 17: tags that all lack their marker (deleted, or lost in a copy) are not a failed
    first save. The old code took them for one and trained from step 0 with exit 0; now the
    run refuses (exit 2, as test_no_valid_tag_refuses_names_each_and_keeps_their_files shows
    for a launched run) like any folder whose tags fail, and the rerun keeps refusing."""
    run_dir = copy_run(base, "every_marker_lost")
    ck = run_dir / CHECKPOINTS
    for t in (4, 6):
        (ck / tag_for(t) / MARKER).unlink()
    before = {t: files_of(ck / tag_for(t)) for t in (4, 6)}
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    for attempt in ("first", "again"):
        with pytest.raises(NoValidCheckpointError) as refused:
            find_resumable(run_dir, "hash")
        line = str(refused.value)
        assert "no checkpoint validates" in line and "checkpoint.resume=false" in line, (attempt, line)
        assert f"{tag_for(4)} (no COMPLETE marker" in line and f"{tag_for(6)} (no COMPLETE marker" in line, line
        assert "no save ever finished" not in line + capsys.readouterr().err
        assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # nothing trained
    assert {t: files_of(ck / QUARANTINE / tag_for(t)) for t in (4, 6)} == before


def test_older_tag_without_marker_refuses_when_the_newest_save_was_killed(base, capsys):
    """A folder whose newest tag is a killed save is a fresh start only if that was the first
    save: here step_4 completed (its marker lost since) and step_6 is a save killed half-way
    (no marker, a file missing), so the run refuses (old code: step 0)."""
    run_dir = copy_run(base, "older_tag")
    ck = run_dir / CHECKPOINTS
    (ck / tag_for(4) / MARKER).unlink()
    (ck / tag_for(6) / MARKER).unlink()
    (ck / tag_for(6) / FILE_KINDS["trainer"]).unlink()  # the killed save never wrote it
    with pytest.raises(NoValidCheckpointError, match="refusing to start over"):
        find_resumable(run_dir, "hash")
    assert "no save ever finished" not in capsys.readouterr().err
    assert not list_complete(run_dir) and (ck / QUARANTINE / tag_for(4)).is_dir()


# -- what was seen 2: a same-size corruption is caught by the hash ------------------------------
def test_same_size_corruption_is_caught_by_hash_and_resumes_the_previous_tag(base, tiny_config, resumed_at_4):
    run_dir = copy_run(base, "flipped_run")
    victim = run_dir / CHECKPOINTS / tag_for(6) / FILE_KINDS["optim"]
    flip_tensor_byte(victim)
    damaged = victim.read_bytes()
    run = launch(tiny_config, run_dir, COMMON)
    assert_ok(run)
    assert f"{FILE_KINDS['optim']} does not match its content hash" in run.output
    assert "resumed from step 4" in run.output
    assert {s: run.losses()[s] for s in range(5, 9)} == resumed_at_4  # as if resumed there on purpose
    assert (run_dir / CHECKPOINTS / QUARANTINE / tag_for(6) / FILE_KINDS["optim"]).read_bytes() == damaged


@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_same_size_corruption_of_each_file_is_caught_by_hash(base, kind, capsys):
    """Every kind of file: the trainer's first step on the folder picks step_4 and keeps the
    damaged step_6 aside (the launched resume above shows what follows from step_4)."""
    run_dir = copy_run(base, f"flipped_{kind}")
    victim = run_dir / CHECKPOINTS / tag_for(6) / FILE_KINDS[kind]
    flip_tensor_byte(victim)
    damaged = victim.read_bytes()
    ref = find_resumable(run_dir, "hash")
    assert ref is not None and ref.step == 4
    assert f"{FILE_KINDS[kind]} does not match its content hash" in capsys.readouterr().err
    assert (run_dir / CHECKPOINTS / QUARANTINE / tag_for(6) / FILE_KINDS[kind]).read_bytes() == damaged


def test_size_only_verification_is_available(base, tiny_config):
    run_dir = copy_run(base, "flipped_size_only")
    flip_tensor_byte(run_dir / CHECKPOINTS / tag_for(6) / FILE_KINDS["trainer"])
    assert check_tag(run_dir / CHECKPOINTS / tag_for(6), "size")[0] is not None
    assert check_tag(run_dir / CHECKPOINTS / tag_for(6), "hash")[0] is None


# -- what was seen 2 (cont.): overflowing steps are counted and abort ---------------------------
@pytest.mark.parametrize("stage", [1, 0])  # 1: DeepSpeed's own overflow skip; 0: megamor's guard
def test_every_step_overflowing_exits_1_naming_the_last_good_checkpoint(tiny_config, tmp_path, stage):
    run = launch(tiny_config, tmp_path / "overflow", [*COMMON, f"deepspeed.zero_stage={stage}",
                                                      "trainer.max_consecutive_nonfinite=3"],
                 env={"MEGAMOR_FAULTS": "inf_grad_at_step=3:8"})
    assert run.rc == 1, run.output[-3000:]
    assert "3 non-finite steps in a row (steps 3-5, last: non-finite gradients); aborting" in run.output
    assert f"newest checkpoint from before these steps is {tmp_path / 'overflow' / CHECKPOINTS / tag_for(2)}" in run.output
    rows = [r for r in run.records() if "train/loss" in r]
    # steps 1-4 logged, then the aborted window (step 5) logged before exiting (Trainer._log_partial)
    assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1, 2, 3]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [c.step for c in list_complete(run.run_dir)] == [2]  # step 4 (mid-streak) was not saved over it


# -- what was seen 3: no checkpoint file runs code -------------------------------------------------
def test_planted_payload_is_refused_on_resume(base, tiny_config):
    run_dir = copy_run(base, "payload_run")
    sentinel = run_dir.parent / "pwned_resume_run"
    plant_payload(run_dir / CHECKPOINTS / tag_for(6) / FILE_KINDS["optim"], sentinel)  # loaded inside DeepSpeed
    run = launch(tiny_config, run_dir, COMMON)
    assert run.rc == 2, run.output[-3000:]
    assert f"{FILE_KINDS['optim']}: refused to load" in run.output
    assert not sentinel.exists()


@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_planted_payload_in_each_file_is_refused_by_the_resume_loaders(base, kind):
    """The re-signed tag validates; loading any of its files the way the trainer's resume does
    (DeepSpeed's torch.load under safe_torch_load, the trainer state through safe_load) refuses."""
    run_dir = copy_run(base, f"payload_{kind}")
    sentinel = run_dir.parent / f"pwned_resume_{kind}"
    path = run_dir / CHECKPOINTS / tag_for(6) / FILE_KINDS[kind]
    plant_payload(path, sentinel)
    assert find_resumable(run_dir, "hash").step == 6
    with pytest.raises(UnsafeCheckpointError, match=f"{FILE_KINDS[kind]}: refused to load"), safe_torch_load():
        torch.load(path, map_location="cpu", weights_only=False)  # as DeepSpeed calls it
    with pytest.raises(UnsafeCheckpointError, match=f"{FILE_KINDS[kind]}: refused to load"):
        safe_load(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("kind", ["model", "optim"])
def test_planted_payload_is_refused_by_export_conversion_and_evaluation(base, kind, capfd):
    """The tools' own entry points, in this process (their exit codes: what `python -m ...`
    exits with, via SystemExit; tests/test_cli.py walks the processes' bad-input exits)."""
    from megamor.eval.cli import run_main
    from megamor.export import main as export_main

    run_dir = copy_run(base, f"payload_tools_{kind}")
    sentinel = run_dir.parent / f"pwned_tools_{kind}"
    plant_payload(run_dir / CHECKPOINTS / tag_for(6) / FILE_KINDS[kind], sentinel)
    assert export_main([str(run_dir)]) == 2
    err = capfd.readouterr().err
    assert f"{FILE_KINDS[kind]}: refused to load" in err, err[-2000:]

    perplexity = load_evals_script("perplexity")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exited:
            run_main(lambda: perplexity.main(["--checkpoint", str(run_dir), "--text", str(repo_root() / "README.md"),
                                              "--max-docs", "1", "--no-progress"]))
    finally:
        torch.set_num_threads(threads)  # the tool sets this process's threads
    err = capfd.readouterr().err
    assert exited.value.code == 2 and "refused to load" in err, err[-2000:]
    with pytest.raises(UnsafeCheckpointError, match=f"{FILE_KINDS[kind]}: refused to load"):
        ensure_universal(resolve_tag(run_dir))  # ds_to_universal, through megamor's safe wrapper
    assert not sentinel.exists()


# -- disk full during a save -----------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A real 6 MiB tmpfs: room for two tiny tags, not three."""
    with mounted_tmpfs(tmp_path / "small_fs", "6m") as mnt:
        yield mnt


def test_disk_full_during_save_names_the_file_and_keeps_previous_tags(tiny_config, small_fs):
    run = launch(tiny_config, small_fs / "run", COMMON)
    assert run.rc == 1, run.output[-3000:]
    line = next(ln for ln in run.output.splitlines() if "No space left" in ln)
    assert line.startswith("megamor.train: ") and f"saving {tag_for(6)} failed: {small_fs / 'run' / CHECKPOINTS / tag_for(6)}/" in line
    assert "No space left on device (ENOSPC)" in line and "previous checkpoints are kept" in line
    assert "Traceback" not in run.output
    ck = small_fs / "run" / CHECKPOINTS
    assert [c.step for c in list_complete(small_fs / "run")] == [2, 4]  # nothing pruned
    assert all(check_tag(ck / tag_for(s), "hash")[0] is not None for s in (2, 4))
    assert not (ck / tag_for(6) / MARKER).exists()


# -- two processes: each rank hashes its own shards ----------------------------------------------
def _find_resumable_rank(rank: int, world: int, run_dir: str, out: str) -> None:
    ref = find_resumable(run_dir, "hash")  # the trainer's first collective on the folder
    Path(out, f"rank{rank}").write_text(str(ref.step if ref is not None else None))


def test_two_process_corrupted_rank1_shard_is_caught(tiny_config, tmp_path):
    """A 2-rank run's tag: rank 1 hashes the shards it wrote, finds the damage and every rank
    agrees on step_4 (in a real gloo group of 2, as the trainer's start runs it)."""
    run_dir = tmp_path / "two"
    killed = launch(tiny_config, run_dir, COMMON, nproc=2, env={"MEGAMOR_FAULTS": "sigkill_after_step=7"})
    assert killed.rc != 0 and [c.step for c in list_complete(run_dir)] == [4, 6]
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert owner(shard, 2) == 1  # hashed by rank 1, not rank 0
    flip_tensor_byte(run_dir / CHECKPOINTS / tag_for(6) / shard)
    run_distributed(_find_resumable_rank, world_size=2, args=(str(run_dir), str(tmp_path)))
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["4", "4"]
    assert (run_dir / CHECKPOINTS / QUARANTINE / tag_for(6) / shard).is_file()
    [(name, reason)] = quarantined(run_dir / CHECKPOINTS)
    assert name == tag_for(6) and f"{shard} does not match its content hash" in reason
