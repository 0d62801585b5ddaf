"""Config faults at the trainer's door, in process: one line per mistake and exit 2 before any
process group starts; resume checks that used to fire only after start-up; a run trained with
an old default keeps it."""

from __future__ import annotations

from pathlib import Path

import pytest

from megamor.config import ConfigError
from megamor.env import repo_root
from megamor.runs.layout import CONFIG_FILE, CheckpointRef
from megamor.train.config import load_experiment, to_yaml
from megamor.train.preflight import check_resumable

OK = ["data.train=[x]", "trainer.max_steps=10"]
DEMO = str(repo_root() / "configs" / "experiments" / "demo.yaml")


def train_main(argv: list[str]) -> int:
    from megamor.train.__main__ import main

    return main(argv)


@pytest.mark.parametrize("args, expected", [
    (["model.router=[1,2]"], "config key 'model.router': must be a section of keys"),
    (["trainer=[1]"], "config key 'trainer': must be a section of keys"),
])
def test_train_list_for_a_section_is_one_line_exit_2(args, expected, capsys):
    assert train_main(["--config", DEMO, *args, "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"megamor.train: configuration error: {expected}"), err


def test_train_and_plan_name_a_non_utf8_file_and_a_folder(tmp_path, capsys):
    from megamor.plan.__main__ import main as plan_main

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: \xff\xfe\n")
    for argv, tool in ((["--config", str(bad), "--print-config"], train_main), (["--config", str(bad)], plan_main)):
        assert tool(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"config file {bad}: is not UTF-8 text" in err[0], err
    assert train_main(["--config", str(tmp_path), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a directory" in err[0], err


def test_train_reports_every_mistake_of_a_yaml(tmp_path, capsys):
    f = tmp_path / "x.yaml"
    f.write_text("bogus: 1\nmodel: {routr: 2}\ntrainer: {max_stepz: 3}\n")
    assert train_main(["--config", DEMO, "--config", str(f), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("megamor.train: configuration error: config key '") for line in err)
    assert "did you mean model.router?" in err[0] + err[1] + err[2]


def saved_tag(tmp_path: Path, overrides: list[str], drop: str | None = None) -> CheckpointRef:
    """A checkpoint tag's experiment.yaml as the trainer writes it (optionally without a line,
    as a save from before that key existed)."""
    tag = tmp_path / "run" / "checkpoints" / "step_5"
    tag.mkdir(parents=True)
    text = to_yaml(load_experiment([], overrides))
    if drop:
        text = "".join(line for line in text.splitlines(keepends=True) if drop not in line)
    (tag / CONFIG_FILE).write_text(text)
    return CheckpointRef(tag, 5, {})


def test_a_data_seq_len_or_seed_change_is_refused_before_start_up(tmp_path):
    ref = saved_tag(tmp_path, OK)
    for change in ("data.seq_len=1024", "data.seed=7"):
        with pytest.raises(ConfigError) as e:
            check_resumable(load_experiment([], [*OK, change]), ref)
        assert e.value.key == change.partition("=")[0] and "was trained with" in str(e.value)


EXPERT = [*OK, "model.sharing=cycle", "model.n_layers=4", "model.num_recursions=2", "model.router.type=expert_choice"]


def test_resuming_a_run_saved_before_the_default_changed_keeps_its_soft_gate(tmp_path, capsys):
    ref = saved_tag(tmp_path, EXPERT, drop="gate_straight_through")
    cfg = load_experiment([], EXPERT)  # the user's config leaves the key to its (new) default
    assert cfg.model.router.gate_straight_through is True
    check_resumable(cfg, ref)
    assert cfg.model.router.gate_straight_through is False
    assert "model.router.gate_straight_through is false as the checkpoint to resume" in capsys.readouterr().err
    explicit = load_experiment([], [*EXPERT, "model.router.gate_straight_through=true"])
    with pytest.raises(ConfigError, match="its default changed since that run"):  # set explicitly: refused, as before
        check_resumable(explicit, ref)
