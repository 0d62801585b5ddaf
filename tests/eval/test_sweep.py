"""Sweeps: every checkpoint x task once, a rerun recomputes nothing and rewrites table + plots,
new or changed checkpoints are the only new work, job-array mode, clear errors."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

from megamor.cli import BadInput
from megamor.env import repo_root
from megamor.eval.sweep import Sweep, SweepConfig, discover
from megamor.runs.layout import CheckpointError
from megamor.testing.scripts import load_evals_script


def _read_csv(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def save(model, path, step, scale=0.0):
    sd = {k: v + scale * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "config": dataclasses.asdict(model.cfg), "meta": {"step": step, "tokens": step * 4096}}, path)


@pytest.fixture
def runs(tmp_path, mor_model, spm_path):
    torch.manual_seed(0)
    a, b = tmp_path / "runs" / "mor_a", tmp_path / "runs" / "mor_b"
    save(mor_model, a / "checkpoints" / "step_10.pt", 10, 0.05)
    save(mor_model, a / "checkpoints" / "step_20.pt", 20, 0.0)
    save(mor_model, b / "step_15.pt", 15, 0.02)
    for r in (a, b):
        (r / "tokenizer.model").write_bytes(spm_path.read_bytes())
    text = tmp_path / "tiny.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 10)
    return a, b, text


def test_sweep_caches_and_reports(runs, tmp_path, data_dir):
    a, b, text = runs
    cfg = SweepConfig(tasks=["piqa"], ppl={"tiny": str(text)}, limit=8, batch_size=8, data_dir=str(data_dir))
    out = tmp_path / "sweep"
    ckpts = discover([a, b])
    assert [(c.run, c.step) for c in ckpts] == [("mor_a", 10), ("mor_a", 20), ("mor_b", 15)]

    s = Sweep(cfg, out)
    s.run(ckpts, progress=False)
    assert (s.computed, s.reused, s.models_loaded) == (6, 0, 3)
    rep = s.report(ckpts)
    assert rep["rows"] == 3 * (3 + 3) and not rep["missing"]  # piqa: acc/acc_norm/acc_bytes; ppl: 3 metrics
    rows = _read_csv(out / "results.csv")
    acc = {(r["run"], r["step"]): float(r["value"]) for r in rows if r["metric"] == "acc"}
    assert set(acc) == {("mor_a", "10"), ("mor_a", "20"), ("mor_b", "15")}
    assert all(r["tokens"] and r["flops"] for r in rows)
    assert "| mor_a | 20 |" in (out / "results.md").read_text()
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "piqa_acc.png" in pngs and "ppl_tiny_bits_per_byte.png" in pngs

    # a rerun: no model loaded, nothing computed, the table and plots written again
    for p in [out / "results.csv", out / "results.md", *(out / "plots").glob("*.png")]:
        p.unlink()
    s2 = Sweep(cfg, out)
    s2.run(ckpts, progress=False)
    assert (s2.computed, s2.reused, s2.models_loaded) == (0, 6, 0)
    s2.report(ckpts)
    assert (out / "results.csv").is_file() and (out / "plots" / "piqa_acc.png").is_file()
    assert _read_csv(out / "results.csv") == rows

    # a new checkpoint, and a rewritten one: only they are evaluated
    save(_model(a), a / "checkpoints" / "step_30.pt", 30)
    st = (a / "checkpoints" / "step_10.pt").stat()
    os.utime(a / "checkpoints" / "step_10.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s3 = Sweep(cfg, out)
    s3.run(discover([a, b]), progress=False)
    assert (s3.computed, s3.reused, s3.models_loaded) == (4, 4, 2)

    # a changed task setting is new work too
    s4 = Sweep(dataclasses.replace(cfg, limit=4), out)
    s4.run(discover([b]), progress=False)
    assert s4.computed == 1 and s4.reused == 1


def _model(run):
    from megamor.runs.load import load_model

    return load_model(run / "checkpoints" / "step_20.pt")


def load_cli():
    return load_evals_script("sweep")


def test_job_array_mode_and_report_only(runs, tmp_path, data_dir, capsys):
    a, b, _text = runs
    cli = load_cli()
    args = [str(a), str(b), "--out", str(tmp_path / "sw"), "--tasks", "winogrande", "--limit", "4", "--data-dir", str(data_dir), "--no-progress"]
    assert cli.main(args + ["--list"]) == {"checkpoints": 3}
    assert capsys.readouterr().out.splitlines()[0].startswith("0 ")
    for i in range(3):  # what the array tasks do
        assert cli.main(args + ["--index", str(i)])["computed"] == 1
    assert not (tmp_path / "sw" / "results.csv").exists()
    rep = cli.main(args + ["--report-only"])
    assert rep["rows"] == 3 and rep["missing"] == [] and "computed" not in rep
    with pytest.raises(BadInput, match="--index 3 out of range: 3 checkpoints"):  # one line, exit 2 from the tool
        cli.main(args + ["--index", "3"])


def test_sweep_errors(tmp_path):
    empty = tmp_path / "run_empty"
    (empty / "global_step5").mkdir(parents=True)
    (empty / "global_step5" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        discover([empty])
    with pytest.raises(CheckpointError, match="not found"):
        discover([tmp_path / "nope"])


@contextlib.contextmanager
def _partition_state(cluster, **states: str):
    """Partitions of the session's cluster set to these states (INACTIVE: refuses submissions;
    DRAIN: refuses new ones, runs those queued) for the test, UP again after it."""
    def update(name: str, state: str) -> None:
        subprocess.run(["scontrol", "update", f"PartitionName={name}", f"State={state}"], env=cluster.env, check=True)

    try:
        for name, state in states.items():
            update(name, state)
        yield update
    finally:
        for name in states:
            update(name, "UP")


@pytest.mark.launch
def test_slurm_job_array(slurm_cluster, runs, tmp_path, data_dir):
    """slurm/eval_sweep.sbatch on a real local SLURM cluster: 3 array tasks + the report job, in
    the array's partition (the default one takes no jobs here: the report job must not go there)."""
    a, b, _ = runs
    out = tmp_path / "sw"
    args = [str(a), str(b), "--out", str(out), "--tasks", "winogrande", "--limit", "4", "--data-dir", str(data_dir)]
    listing = subprocess.run([sys.executable, "evals/sweep.py", *args, "--list"], capture_output=True, text=True, cwd=repo_root(), check=True)
    n = len(listing.stdout.splitlines())
    assert n == 3
    env = {"PYTHON": sys.executable, "MEGAMOR_REPORT_LOG": str(tmp_path / "report.out"), "OMP_NUM_THREADS": "1"}
    with _partition_state(slurm_cluster, debug="INACTIVE"):
        job = slurm_cluster.sbatch([f"--array=0-{n - 1}", "--partition=high", f"--output={tmp_path}/eval-%a.out",
                                    "slurm/eval_sweep.sbatch", *args], env=env, cwd=repo_root())
        _wait_for_report(slurm_cluster, job, tmp_path)
    rows = _read_csv(out / "results.csv")
    assert sorted((r["run"], r["step"]) for r in rows) == [("mor_a", "10"), ("mor_a", "20"), ("mor_b", "15")]
    for i in range(3):
        assert "array task" in (tmp_path / f"eval-{i}.out").read_text()
    report_job = (tmp_path / "eval-0.out").read_text().split("report job: ")[1].split()[0]
    state = slurm_cluster.job_state(int(report_job))
    assert state.get("Partition") == "high" and state.get("TimeLimit") == "00:30:00", state  # not the default's


@pytest.mark.launch
def test_slurm_report_job_refused_is_a_warning_and_task_0_evaluates(slurm_cluster, runs, tmp_path, data_dir):
    a, b, _ = runs
    args = [str(a), str(b), "--out", str(tmp_path / "sw"), "--tasks", "winogrande", "--limit", "4", "--data-dir",
            str(data_dir)]
    env = {"PYTHON": sys.executable, "MEGAMOR_REPORT_LOG": str(tmp_path / "report.out"), "OMP_NUM_THREADS": "1"}
    with _partition_state(slurm_cluster, debug="INACTIVE") as update:
        job = slurm_cluster.sbatch(["--array=0-0", "--partition=high", f"--output={tmp_path}/eval-%a.out",
                                    "slurm/eval_sweep.sbatch", *args], env=env, cwd=repo_root())
        update("high", "DRAIN")  # the queued task still runs; the report job it submits is refused
        try:
            state = slurm_cluster.wait(job, timeout=300)
        finally:
            update("high", "UP")
    log = (tmp_path / "eval-0.out").read_text()
    assert state == "COMPLETED", log
    assert "eval_sweep.sbatch: warning: the report job could not be submitted" in log and "array task 0" in log
    assert not (tmp_path / "report.out").exists()


def _wait_for_report(slurm_cluster, job, tmp_path) -> None:
    deadline = time.time() + 300
    report = tmp_path / "report.out"
    while not (report.is_file() and '"rows"' in report.read_text()):  # the report job's final summary
        task0 = tmp_path / "eval-0.out"
        if time.time() > deadline or (task0.is_file() and "submission failed" in task0.read_text()):
            logs = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
            raise AssertionError(f"no report; job {job}\n{logs}\n{slurm_cluster.log_tail()}")
        time.sleep(1)


def test_discover_names_the_tags_it_skips(tmp_path, capsys):
    """A tag without its COMPLETE marker and a quarantined tag are left out, one stderr line each."""
    from megamor.runs import integrity
    from tests.eval.test_checkpoint import training_run
    from tests.model.helpers import mor

    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"a tokenizer")
    run = training_run(tmp_path, mor(), tok, steps=(10, 20, 30))
    ck = run / "checkpoints"
    (ck / "step_00000020" / "COMPLETE").unlink()
    integrity.quarantine(ck / "step_00000010", "mp_rank_00_model_states.pt does not match its content hash")
    assert [c.step for c in discover([run])] == [30]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sweep: skipping {ck / 'step_00000020'}: {integrity.UNFINISHED}",
                   (f"sweep: skipping {ck / 'quarantine' / 'step_00000010'}: quarantined "
                    "(mp_rank_00_model_states.pt does not match its content hash)")]


def test_discover_lists_a_checkpoint_reached_twice_once(runs):
    """Issue: `evals/sweep.py RUN RUN` wrote every row twice (discover did not de-duplicate)."""
    a, b, _ = runs
    found = discover([a, b, a, a / "checkpoints" / "step_10.pt", b / "step_15.pt"])
    assert [(c.run, c.step) for c in found] == [(c.run, c.step) for c in discover([a, b])]
    assert len({c.path.resolve() for c in found}) == len(found) == 3


def test_report_tables_are_written_atomically(tmp_path, monkeypatch):
    """Issue: results.csv was opened in place, so a writer that failed (or was killed) part-way
    left a truncated table where the previous one was."""
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "results.csv").write_text("the previous table\n")

    def fail(self, rows):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)
    with pytest.raises(OSError, match="disk full"):
        Sweep(SweepConfig(tasks=[]), out).report([], plots=False)
    assert (out / "results.csv").read_text() == "the previous table\n"
    monkeypatch.undo()
    Sweep(SweepConfig(tasks=[]), out).report([], plots=False)
    assert (out / "results.csv").read_text().startswith("run,step,tokens") and (out / "results.md").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md"]  # no temp files left
