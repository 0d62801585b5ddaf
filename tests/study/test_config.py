"""A bad study file stops before anything runs: one line naming the key, exit code 2.

Checked in-process through the command's main(argv) (the exit code of `python -m megamor.study`
itself is covered by tests/test_cli.py's walk of every entry point)."""

from __future__ import annotations

import pytest

from megamor.env import repo_root
from tests.study.conftest import write_study


@pytest.mark.parametrize("override,key", [
    ("budget.flop=1e9", "budget.flop"),  # unknown key
    ("budget.tokens=1000", "budget.flops"),  # both budgets
    ("seeds=[1,1]", "seeds"),
    ("model_config: configs/model/33m/vanilla.yaml", "model_config"),  # (edited in the file: a missing file)
    ("variants=5", "variants"),  # an override of the wrong shape
    ("reference=nope", "reference"),  # not a variant
    ("budget.flops=null", "budget.flops"),  # no budget at all
    ("flops.convention=kaplan", "flops.convention"),  # not exact or paper
    ("data.tokenizer_kind=wordpiece", "data.tokenizer_kind"),  # not a kind train_tokenizer makes
])
def test_bad_study_config_exits_2_naming_the_key(tmp_path, monkeypatch, capsys, override, key):
    _check_exits_2(tmp_path, monkeypatch, capsys, override, key, budgets=None)


BIG = "flops: 8000000000.0"  # the second budget's, as write_study writes it


@pytest.mark.parametrize("old,new,override,key", [  # an edit of the study file and/or an override
    ("", "", "budget.flops=1e9", "budgets"),  # `budget` and `budgets` both
    ("name: small", "name: a/b", "", "budgets[0].name"),
    (BIG, "flops: -1", "", "budgets[1].flops"),
    (BIG + ", ", "", "", "budgets[1].flops"),  # neither flops nor tokens
    (BIG, BIG + ", tokens: 100", "", "budgets[1].flops"),  # both
    ("variants: [vanilla, mor2]", "variants: [vanilla, nope]", "", "budgets[1].variants"),
    ("variants: [vanilla, mor2]", "variants: []", "", "budgets[1].variants"),
    ("name: big", "name: small", "", "budgets"),  # duplicate names: their runs would share folders
    ("name: big", "name: big, count: training", "", "budgets"),  # one FLOPs axis for the report
    ("[model.d_model=96", "[d_model", "", "budgets[1].overrides"),
    ("model.d_model=96", "model.d_modl=96", "", "model.d_modl"),  # an experiment key that does not exist
    ("variants: [vanilla, mor2]", "variants: [vanilla]", "reference=mor2", "reference"),  # not trained at `big`
])
def test_bad_budgets_exit_2_naming_the_key(tmp_path, monkeypatch, capsys, old, new, override, key):
    _check_exits_2(tmp_path, monkeypatch, capsys, override, key, budgets=8.0e9, edit=(old, new))


def _check_exits_2(tmp_path, monkeypatch, capsys, override, key, budgets, edit=("", "")):
    from megamor.study.__main__ import main

    cfg = write_study(tmp_path, tmp_path / "text.raw", budgets=budgets)
    if edit[0]:
        assert edit[0] in cfg.read_text()
        cfg.write_text(cfg.read_text().replace(edit[0], edit[1], 1))
    (tmp_path / "text.raw").write_text("Some text.\n\nMore text here.\n" * 200)
    if override.startswith("model_config:"):
        cfg.write_text(cfg.read_text().replace(override.split(": ")[1], "configs/model/33m/nope.yaml"))
        override = "seeds=[7]"
    monkeypatch.chdir(repo_root())
    rc = main([str(cfg), *override.split(), "--plan"])
    out, err = capsys.readouterr()
    assert rc == 2, out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("megamor.study: configuration error") and f"'{key}'" in lines[0], err
    assert not any(tmp_path.glob("**/shards")), "nothing prepared before the configuration was checked"


def test_unknown_fewshot_task_is_refused_before_any_run_in_one_line(tmp_path):
    """Issue: eval.fewshot_tasks=[nosuchtask] was found only at evaluation, after training
    (a traceback, exit 1)."""
    import subprocess
    import sys

    from megamor.config import ConfigError
    from megamor.env import repo_root
    from megamor.study.config import load_study

    with pytest.raises(ConfigError) as e:
        load_study("configs/studies/small_cpu.yaml", ["eval.fewshot_tasks=[piqa,nosuchtask]"])
    assert e.value.key == "eval.fewshot_tasks" and "nosuchtask" in str(e.value)
    load_study("configs/studies/small_cpu.yaml", ["eval.fewshot_tasks=[piqa,paper]"])  # tasks and suites: accepted
    r = subprocess.run([sys.executable, "-m", "megamor.study", "configs/studies/small_cpu.yaml", f"out_dir={tmp_path}/o",
                        "eval.fewshot_tasks=[nosuchtask]", "--plan"], cwd=repo_root(), capture_output=True, text=True,
                       timeout=300, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "eval.fewshot_tasks" in lines[0] and "nosuchtask" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()  # nothing prepared


def test_overrides_may_follow_the_options():
    """As in megamor.train and megamor.plan: `--plan out_dir=...` is an override, not an error;
    `--sbatch` still takes the rest of the line."""
    from megamor.study.__main__ import parse_args

    a = parse_args(["s.yaml", "seeds=[1]", "--plan", "out_dir=/tmp/x"])
    assert a.plan and a.overrides == ["seeds=[1]", "out_dir=/tmp/x"]
    a = parse_args(["s.yaml", "--submit", "out_dir=/tmp/x", "--sbatch", "--partition=gpu", "-t", "60"])
    assert a.submit and a.overrides == ["out_dir=/tmp/x"] and a.sbatch == ["--partition=gpu", "-t", "60"]
