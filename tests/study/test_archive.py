"""Results kept beside the report (megamor.study.archive): where they go, that a kept result
counts the run as done only for the run it was made for (same overrides, same tokenizer), and
that anything else is a configuration error naming the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megamor.config import ConfigError
from megamor.env import repo_root
from megamor.study import archive
from megamor.study.config import load_study
from megamor.study.plan import RunSpec, plan_runs
from megamor.study.run import is_done, load_result


def _runs(tmp: Path, *extra: str) -> list[RunSpec]:
    """The scaling study's runs of seed 1 (15: planning every run's config costs ~0.2 s a run)."""
    study = load_study("configs/studies/scaling_cpu.yaml", [f"out_dir={tmp}/out", f"report_dir={tmp}/report", "seeds=[1]",
                                                            *extra])
    return plan_runs(study, tmp / "shards", tmp / "tok")


@pytest.fixture
def tokenizer(tmp_path: Path) -> Path:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(b"a sentencepiece model")
    return tok


def test_kept_results_live_in_the_report_folder_by_budget(tmp_path):
    runs = _runs(tmp_path)
    assert runs[0].kept_path == tmp_path / "report" / "run_results" / "1x" / "vanilla-s1.json"
    assert len({r.kept_path for r in runs}) == len(runs)  # one file per run
    single = plan_runs(load_study("configs/studies/small_cpu.yaml", [f"report_dir={tmp_path}/r"]), tmp_path, tmp_path)
    assert single[0].kept_path == tmp_path / "r" / "run_results" / f"{single[0].variant}-s{single[0].seed}.json"


def test_a_kept_result_makes_the_run_done_without_its_folder(tmp_path, tokenizer):
    run = _runs(tmp_path)[2]
    assert not is_done(run)
    archive.save(run, {"run": run.name, "variant": run.variant, "val_loss": 4.5}, tokenizer)
    assert is_done(run) and not run.run_dir.exists()
    res = load_result(run)
    assert res["val_loss"] == 4.5 and res["budget"] == "1x" and "identity" not in res
    kept = json.loads(run.kept_path.read_text())["identity"]
    assert not any(o.startswith(("run_dir=", "data.train=", "data.tokenizer=")) for o in kept["overrides"])
    assert "model_config=configs/model/33m/mor_expert_3.yaml" in kept["overrides"]
    archive.check(run, tokenizer)  # the same run: accepted


def test_a_kept_result_from_other_settings_is_refused(tmp_path, tokenizer):
    run = _runs(tmp_path)[2]
    archive.save(run, {"val_loss": 4.5}, tokenizer)
    changed = _runs(tmp_path, "overrides=[optim.lr=1.0e-3]")[2]  # the study file changed since
    with pytest.raises(ConfigError) as e:
        archive.check(changed, tokenizer)
    assert str(run.kept_path) in str(e.value) and "optim.lr=1.0e-3" in str(e.value)

    (tokenizer / "tokenizer.model").write_bytes(b"another tokenizer")  # the data were prepared differently
    with pytest.raises(ConfigError, match="another tokenizer"):
        archive.check(run, tokenizer)


def test_a_damaged_or_unidentified_kept_result_is_refused(tmp_path, tokenizer):
    run = _runs(tmp_path)[0]
    run.kept_path.parent.mkdir(parents=True)
    run.kept_path.write_text('{"val_loss": 4.5}')
    with pytest.raises(ConfigError, match="no identity record"):
        archive.check(run, tokenizer)
    run.kept_path.write_text('{"val_loss": 4.')
    with pytest.raises(ConfigError, match="not valid JSON"):
        archive.check(run, tokenizer)
    with pytest.raises(ConfigError, match="not valid JSON"):
        archive.load(run)
    run.kept_path.write_text('[4.5]')  # valid JSON, not a result: a clear error, not an AttributeError
    for read in (lambda: archive.check(run, tokenizer), lambda: archive.load(run)):
        with pytest.raises(ConfigError, match="not a JSON object") as e:
            read()
        assert str(run.kept_path) in str(e.value)


def test_the_study_command_refuses_a_mismatched_kept_result_in_one_line(tmp_path, tokenizer):
    """Exit 2 before any work, naming the file."""
    runs = _runs(tmp_path)
    (tmp_path / "shards").mkdir()
    archive.save(runs[0], {"val_loss": 4.5}, tokenizer)
    kept = json.loads(runs[0].kept_path.read_text())
    kept["identity"]["overrides"].append("optim.lr=9.0")
    runs[0].kept_path.write_text(json.dumps(kept))
    cmd = [sys.executable, "-m", "megamor.study", "configs/studies/scaling_cpu.yaml", f"out_dir={tmp_path}/out",
           f"report_dir={tmp_path}/report", "seeds=[1]", "data.text=[]", f"data.shards={tmp_path}/shards", f"data.tokenizer={tokenizer}",
           "--plan"]
    r = subprocess.run(cmd, cwd=repo_root(), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(runs[0].kept_path) in lines[0] and "optim.lr=9.0" in lines[0]


def test_report_with_a_truncated_kept_result_and_no_run_folders_is_one_line(tmp_path, tokenizer, capsys):
    """`--report` reads the kept results only when writing the report: a damaged one is still one
    line naming the file, exit 2, and no report is written over the committed one."""
    from megamor.study.__main__ import main

    runs = _runs(tmp_path)
    archive.save(runs[1], {"run": runs[1].name, "val_loss": 4.5}, tokenizer)
    runs[1].kept_path.write_text(runs[1].kept_path.read_text()[:40])  # cut, as a bad copy or merge leaves it
    rc = main(["configs/studies/scaling_cpu.yaml", f"out_dir={tmp_path}/out", f"report_dir={tmp_path}/report", "seeds=[1]",
               "data.text=[]", f"data.shards={tmp_path}/shards", f"data.tokenizer={tokenizer}", "--report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("megamor.study: configuration error:") and str(runs[1].kept_path) in err[0]
    assert "not valid JSON" in err[0]
    assert not (tmp_path / "out").exists() and not list((tmp_path / "report").glob("*.md"))


@pytest.mark.parametrize("name", ["scaling_cpu", "token_rule_cpu"])
def test_committed_kept_results_are_the_runs_their_study_plans_today(name, tmp_path):
    """A committed study's kept results count its runs as done (`--report` rebuilds the committed
    report from them): each must still be the run the study file plans, same overrides. A study
    edit that changes what a run trains without changing its overrides (a shipped config's
    default, say) needs the study to pin the old value and the records to say so."""
    study = load_study(f"configs/studies/{name}.yaml", [f"out_dir={tmp_path}/out"])
    runs = plan_runs(study, tmp_path / "shards", tmp_path / "tok")
    kept = [r for r in runs if r.kept_path.is_file()]
    if name == "scaling_cpu":
        assert len(kept) == len(runs) == 45
    for r in kept:
        record = json.loads(r.kept_path.read_text())["identity"]
        assert record["overrides"] == archive.identity_overrides(r), r.kept_path


# -- the run folder carries the run's identity (a changed study never reuses it silently) ----------

def _shards(tmp: Path, digest: str = "a" * 64) -> Path:
    """A shards folder whose manifest lists one shard per split (what the fingerprint reads)."""
    shards = tmp / "shards"
    shards.mkdir(exist_ok=True)
    splits = {s: {"shards": [{"file": f"{s}-00000.npy", "sha256": digest, "docs_sha256": "d" * 64}]} for s in ("train", "valid")}
    (shards / "manifest.json").write_text(json.dumps({"format": "megamor-shards", "splits": splits}))
    return shards


def _study_args(tmp: Path, tokenizer: Path, *extra: str) -> list[str]:
    return ["configs/studies/scaling_cpu.yaml", f"out_dir={tmp}/out", f"report_dir={tmp}/report", "seeds=[1]",
            "data.text=[]", f"data.shards={tmp}/shards", f"data.tokenizer={tokenizer}", *extra]


def _finished_run_folder(run: RunSpec, tokenizer: Path, study=None, shards: Path | None = None) -> None:
    """The run folder a study leaves behind: its identity file and its result (with identity)."""
    run.run_dir.mkdir(parents=True)
    ident = {"overrides": archive.identity_overrides(run), "tokenizer_sha256": archive.tokenizer_sha256(tokenizer)}
    if shards is not None:
        ident["shards_sha256"] = archive.shards_sha256(shards)
    (run.run_dir / "study_identity.json").write_text(json.dumps(ident))
    res = {"run": run.name, "variant": run.variant, "seed": run.seed, "val_loss": 4.5, "router": "none",
           "identity": {**ident, **({"eval": archive.eval_settings(study)} if study is not None else {})}}
    run.result_path.write_text(json.dumps(res))


def test_a_run_folder_trained_with_other_settings_is_refused_not_reused(tmp_path, tokenizer, capsys):
    """Issue: a changed study counted an old run folder's result as done and kept it with the new
    overrides (`overrides=[optim.lr=1e-3] report_dir=NEW`: exit 0, NEW's kept copy saying 1e-3)."""
    from megamor.study.__main__ import main

    shards = _shards(tmp_path)
    study = load_study(*_study_args(tmp_path, tokenizer)[:1], _study_args(tmp_path, tokenizer)[1:])
    old = plan_runs(study, shards, tokenizer)[0]
    _finished_run_folder(old, tokenizer)  # as the unfixed code can be tested too: overrides and tokenizer only
    rc = main(_study_args(tmp_path, tokenizer, "overrides=[optim.lr=1.0e-3]", f"report_dir={tmp_path}/new", "--index", "0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(old.run_dir) in err[0] and "optim.lr=1.0e-3" in err[0]
    assert not (tmp_path / "new" / "run_results").exists()  # nothing kept under the new settings

    # the same check on the checkpoints alone (trained, not yet evaluated): no resume, no evaluation
    old.result_path.unlink()
    changed = _runs(tmp_path, "overrides=[optim.lr=1.0e-3]")[0]
    with pytest.raises(ConfigError) as e:
        archive.check(changed, tokenizer)
    assert str(old.run_dir / "study_identity.json") in str(e.value) and "optim.lr=1.0e-3" in str(e.value)
    archive.check(old, tokenizer)  # the run it was made for: accepted


def test_report_checks_the_identity_too(tmp_path, tokenizer, capsys):
    """`--report` used to skip the check and report a changed study's old results as the new ones."""
    from megamor.study.__main__ import main

    shards = _shards(tmp_path)
    runs = plan_runs(load_study(_study_args(tmp_path, tokenizer)[0], _study_args(tmp_path, tokenizer)[1:]), shards, tokenizer)
    archive.save(runs[0], {"run": runs[0].name, "variant": runs[0].variant, "seed": 1, "val_loss": 4.5, "flops": 8e12,
                           "tokens": 10**6}, tokenizer)
    rc = main(_study_args(tmp_path, tokenizer, "overrides=[optim.lr=1.0e-3]", "--report"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(runs[0].kept_path) in err[0] and "optim.lr=1.0e-3" in err[0], err
    assert not list((tmp_path / "report").glob("*.md"))
    archive.check(runs[0], tokenizer)  # unchanged: accepted


def test_run_folders_from_before_identities_are_trusted(tmp_path, tokenizer):
    run = _runs(tmp_path)[0]
    run.run_dir.mkdir(parents=True)
    run.result_path.write_text(json.dumps({"run": run.name, "variant": run.variant, "val_loss": 4.5}))
    archive.check(run, tokenizer)
    assert load_result(run)["val_loss"] == 4.5


@pytest.mark.parametrize("change", [["eval.val_max_batches=5"], ["eval.fewshot_tasks=[piqa]"], ["shards"]])
def test_a_result_made_with_other_evaluation_settings_or_shards_is_refused(tmp_path, tokenizer, capsys, change):
    """Issue: the evaluation settings and the data were not part of the identity: changing
    eval.val_max_batches or eval.fewshot_tasks, or preparing other shards, left every run done."""
    from megamor.study.__main__ import main

    _shards(tmp_path)
    study = load_study(_study_args(tmp_path, tokenizer)[0], _study_args(tmp_path, tokenizer)[1:])
    run = plan_runs(study, tmp_path / "shards", tokenizer)[0]
    ev = {"val_max_batches": 20, "val_batch_size": 8, "fewshot_tasks": [], "fewshot_limit": 100, "num_fewshot": 0}
    ident = {"overrides": archive.identity_overrides(run), "tokenizer_sha256": archive.tokenizer_sha256(tokenizer),
             "eval": ev}
    if change == ["shards"]:
        ident["shards_sha256"] = "0" * 64  # the run was trained on other shards than the manifest lists now
        change = []
    run.kept_path.parent.mkdir(parents=True)
    run.kept_path.write_text(json.dumps({"run": run.name, "variant": run.variant, "seed": 1, "val_loss": 4.5, "router": "none",
                                         "identity": ident}))
    rc = main(_study_args(tmp_path, tokenizer, *change, "--index", "0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(run.kept_path) in err[0], err
    assert (change[0].split("=")[0] if change else "other shards") in err[0]


def test_committed_style_kept_results_without_eval_or_shards_still_load(tmp_path, tokenizer):
    run = _runs(tmp_path)[0]
    run.kept_path.parent.mkdir(parents=True)
    ident = {"overrides": archive.identity_overrides(run), "tokenizer_sha256": archive.tokenizer_sha256(tokenizer)}
    run.kept_path.write_text(json.dumps({"val_loss": 4.5, "identity": ident}))
    study = load_study("configs/studies/scaling_cpu.yaml", [f"out_dir={tmp_path}/out", f"report_dir={tmp_path}/report",
                                                           "seeds=[1]", "eval.val_max_batches=3"])
    archive.check(run, tokenizer, study, _shards(tmp_path))
