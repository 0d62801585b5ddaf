"""The loop's callbacks: the dispatcher's order, `trainer.callbacks` checked at the door (one
line naming the key, exit 2), and a user callback added from the config on a real run seeing
every hook in order, its record_metric landing in metrics.jsonl, and as a sink getting the
records metrics.jsonl gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megamor.config import ConfigError
from megamor.env import repo_root
from megamor.runs.layout import tag_for
from megamor.train.callbacks import Callback, Callbacks
from megamor.train.config import load_experiment
from tests.train.helpers import assert_ok, launch

DEMO = str(repo_root() / "configs" / "experiments" / "demo.yaml")
OK = ["data.train=[x]", "trainer.max_steps=10"]


class _Note(Callback):
    def __init__(self, name: str, seen: list, fail: bool = False):
        self.name, self.seen, self.fail = name, seen, fail

    def before_step(self, step: int) -> None:
        self.seen.append((self.name, step))

    def close(self) -> None:
        self.seen.append((self.name, "close"))
        if self.fail:
            raise RuntimeError(f"{self.name} failed to close")


def test_hooks_run_in_list_order_and_every_close_runs_when_one_fails():
    seen: list = []
    cbs = Callbacks([_Note("a", seen, fail=True), _Note("b", seen)])
    cbs.before_step(3)
    with pytest.raises(RuntimeError, match="a failed"):
        cbs.close()
    assert seen == [("a", 3), ("b", 3), ("a", "close"), ("b", "close")]


def test_a_callback_from_the_config_is_checked_and_kept(tmp_path):
    f = tmp_path / "cb.yaml"
    f.write_text("trainer:\n  callbacks:\n    - megamor.train.callbacks:Callback\n"
                 "    - {target: 'tests.train.hook_recorder:HookRecorder', kwargs: {path: x}}\n")
    cfg = load_experiment([DEMO, str(f)], OK)
    assert cfg.trainer.callbacks == ["megamor.train.callbacks:Callback",
                                     {"target": "tests.train.hook_recorder:HookRecorder", "kwargs": {"path": "x"}}]


@pytest.mark.parametrize("entry, says", [
    ("no_such_module_xyz:Cb", "cannot import module 'no_such_module_xyz'"),
    ("tests.train.hook_recorder:Missing", "has no 'Missing'"),
    ("tests.train.hook_recorder:NotACallback", "is not a subclass of megamor.train.callbacks.Callback"),
    ("tests.train.hook_recorder", "must be 'module:Class'"),
])
def test_a_bad_callback_entry_names_the_key(entry, says):
    with pytest.raises(ConfigError) as e:
        load_experiment([DEMO], [*OK, f"trainer.callbacks=[{entry}]"])
    assert str(e.value).startswith("config key 'trainer.callbacks[0]': ") and says in str(e.value), str(e.value)


def test_a_stored_config_loads_without_its_callback_modules(tmp_path):
    """A run folder's config.yaml names the callbacks it ran with; reading it later (resume
    checks, evaluation) must not need their modules, only the form of the entries."""
    from megamor.train.config import load_stored_experiment, to_yaml

    cfg = load_experiment([DEMO], OK)
    text = to_yaml(cfg).replace("callbacks: []", "callbacks:\n  - gone_module_xyz:Cb")
    assert "gone_module_xyz" in text
    (tmp_path / "config.yaml").write_text(text)
    assert load_stored_experiment(tmp_path / "config.yaml").trainer.callbacks == ["gone_module_xyz:Cb"]
    (tmp_path / "bad.yaml").write_text(text.replace("- gone_module_xyz:Cb", "- 3"))
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\[0\]"):
        load_stored_experiment(tmp_path / "bad.yaml")


def test_bad_kwargs_and_the_cli_exit_2_with_one_line(tmp_path, capsys):
    from megamor.train.__main__ import main

    f = tmp_path / "cb.yaml"
    f.write_text("trainer:\n  callbacks:\n    - {target: 'tests.train.hook_recorder:HookRecorder', kwargs: {path: x, nope: 1}}\n")
    assert main(["--config", DEMO, "--config", str(f), "--print-config", *OK]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "config key 'trainer.callbacks[0]'" in err[0] and "nope" in err[0], err


@pytest.mark.launch
def test_a_user_callback_sees_the_hooks_in_order_and_its_metric_is_logged(tiny_config, tmp_path):
    """4 steps of 4 micro-batches, logging every 2, a checkpoint every 2, validation at the end."""
    notes = tmp_path / "hooks.jsonl"
    extra = tmp_path / "cb.yaml"
    extra.write_text("trainer:\n  callbacks:\n"
                     f"    - {{target: 'tests.train.hook_recorder:HookRecorder', kwargs: {{path: '{notes}', tag: mine}}}}\n")
    run = launch(tiny_config, tmp_path / "run", ["--config", str(extra), "trainer.max_steps=4", "logging.every_steps=2",
                                                 "checkpoint.every_steps=2", "eval.max_batches=1"])
    assert_ok(run)
    hooks = [tuple(json.loads(line)) for line in notes.read_text().splitlines()]
    expected: list[tuple] = [("setup", 0), ("fit_start",)]
    for step in range(1, 5):
        expected += [("before_step", step), *(h for i in range(4) for h in (("before_forward", step, i),
                                                                                ("after_backward", step, i))),
                     ("before_optimizer_step", step), ("after_step", step)]
        if step % 2 == 0:  # a log window, then the checkpoint cadence, then step_end of the user's callback
            expected += [("log_window", step, True), ("log_metrics", step, "train"), ("during_save", step), ("after_save", step, tag_for(step)),
                         ("step_end", step)]
        else:
            expected += [("step_end", step)]
    expected += [("log_metrics", 4, "val"), ("fit_end", 4), ("close",)]  # eval.at_end, in the cadence's fit_end
    assert hooks == expected
    logged = {r["step"]: r["user/mine_steps"] for r in run.records() if "user/mine_steps" in r}
    assert logged == {2: 2, 4: 4}
    # the user's sink got what metrics.jsonl got: the same records, keys in the same order
    mine = [json.loads(line) for line in Path(f"{notes}.records").read_text().splitlines()]
    written = [{"step": r["step"], "keys": [k for k in r if k not in ("step", "time") and not k.endswith("/counts")],
                "histograms": sorted(k[:-len("/counts")] for k in r if k.endswith("/counts"))} for r in run.records()]
    assert mine == written and len(mine) == 3


@pytest.mark.launch
def test_a_checkpoint_due_after_a_non_finite_step_is_deferred_with_one_line(tiny_config, tmp_path):
    run = launch(tiny_config, tmp_path / "run", ["trainer.max_steps=4", "checkpoint.every_steps=2", "eval.at_end=false"],
                 env={"MEGAMOR_FAULTS": "nan_loss_at_step=2"})
    assert_ok(run)
    assert "step 2: checkpoint deferred (1 non-finite steps in a row)" in run.output, run.output[-3000:]
    assert not (run.run_dir / "checkpoints" / tag_for(2)).exists() and (run.run_dir / "checkpoints" / tag_for(4)).exists()
