"""`trainer.continue_from`: a mid-training phase starts from another run's weights, Adam
moments and step counter with a new mix, sequence length, batch and schedule; it records what
changed, leaves the source folder untouched, and resumes exactly from its own checkpoints."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamor.config import ConfigError
from megamor.env import repo_root
from megamor.train.config import load_experiment
from megamor.train.schedule import LRSchedule

SOURCE = ["trainer.max_steps=6", "checkpoint.every_steps=3", "schedule.type=constant", "schedule.warmup_steps=2",
          "eval.at_end=false"]
SOURCE_STEP = 6


def phase_overrides(source: Path, hq: Path, shards: Path) -> list[str]:
    """The annealing phase: 4 more steps decaying to 0 (WSD) on a new mix at twice the context
    (model.max_seq_len raised) and half the batch."""
    return [f"trainer.continue_from={source}", "trainer.max_steps=10", f"data.train=[{shards},{hq}]",
            "data.train_weights=[1,3]", "data.seq_len=64", "model.max_seq_len=128", "batch.global_batch_size=4",
            "schedule.type=wsd", "schedule.decay_steps=4", "schedule.warmup_steps=2", "checkpoint.every_steps=2",
            "eval.at_end=false"]


def folder_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- without a launch ------------------------------------------------------------------------
def test_continue_from_and_init_from_are_exclusive(tiny_config, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        load_experiment([tiny_config], [f"trainer.continue_from={tmp_path}", f"trainer.init_from={tmp_path / 'w.pt'}"])
    assert e.value.key == "trainer.continue_from" and "\n" not in str(e.value)
    assert "trainer.init_from are both set" in e.value.reason


def test_changes_list_every_differing_key_but_the_run_identity(tiny_config):
    from megamor.train.phase import config_changes, model_differences

    then = load_experiment([tiny_config], ["trainer.max_steps=6"])
    now = load_experiment([tiny_config], ["name=anneal", "run_dir=x", "trainer.continue_from=y", "trainer.max_steps=10",
                                          "data.seq_len=64", "model.max_seq_len=128", "schedule.decay_steps=4"])
    assert config_changes(then, now) == [
        {"key": "data.seq_len", "old": 32, "new": 64},
        {"key": "model.max_seq_len", "old": 64, "new": 128},
        {"key": "schedule.decay_steps", "old": None, "new": 4},
        {"key": "trainer.max_steps", "old": 6, "new": 10},
    ]
    assert model_differences(then, now) == []  # RoPE is computed per position: a longer context loads
    other = load_experiment([tiny_config], ["model.d_ff=256", "model.router.type=token_choice"])
    assert model_differences(then, other) == ["model.d_ff: 128 in the source, 256 in this run",
                                              "model.router.type: 'expert_choice' in the source, 'token_choice' in this run"]


def test_wsd_decay_steps_override_the_fraction():
    from megamor.train.config import ScheduleConfig

    s = LRSchedule.from_config(ScheduleConfig(type="wsd", warmup_steps=2, decay_steps=4), 1.0, 10)
    assert [s.lr_at(k) for k in range(5, 11)] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]


# -- from a trained source run -----------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tiny_config, tiny_data, tinyshakespeare, tmp_path_factory) -> dict:
    """A 6-step run (constant lr after warmup) with tags 3 and 6; a second shard set made with
    its tokenizer (the high-quality mix of the phase); the source folder's file hashes."""
    from tests.train.helpers import assert_ok, launch

    root = tmp_path_factory.mktemp("phase")
    paragraphs = Path(tinyshakespeare).read_text().split("\n\n")
    (root / "hq.txt").write_text("\n\n".join(paragraphs[::-1][:3000]))  # other documents, other order
    subprocess.run([sys.executable, "data_prep/tokenize_and_shard.py", str(root / "hq.txt"), "--tokenizer",
                    str(tiny_data / "tok"), "--out", str(root / "hq"), "--workers", "1", "--txt-mode", "paragraph",
                    "--valid-fraction", "0.05", "--no-progress"], cwd=repo_root(), check=True, capture_output=True)
    run = launch(tiny_config, root / "src", SOURCE)
    assert_ok(run)
    return {"run": root / "src", "hq": root / "hq", "shards": tiny_data / "shards", "root": root,
            "hash": folder_hash(root / "src"), "config": tiny_config}


def _phase_in_process(rank: int, world: int, config: str, overrides: list[str], source_tag: str, out: str) -> None:
    """One trainer in this process: set up the phase, compare its optimizer with the source
    checkpoint's file before the first step, then train the phase."""
    from megamor.parallel import dist as pdist
    from megamor.runs.safe_load import load as safe_load
    from megamor.train.preflight import preflight
    from megamor.train.trainer import Trainer

    env, device = pdist.init_distributed()
    cfg = load_experiment([config], overrides)
    trainer = Trainer(cfg, env, device, preflight(cfg, world)).setup()
    saved = safe_load(Path(source_tag) / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    zero = trainer.engine.optimizer  # DeepSpeed's ZeRO-1 optimizer around torch.optim.AdamW
    adam = zero.optimizer
    assert isinstance(adam, torch.optim.AdamW)
    for i, group in enumerate(adam.param_groups):
        mine, theirs = adam.state[group["params"][0]], saved["base_optimizer_state"]["state"][i]
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(mine[name], theirs[name]), (i, name)
        assert int(mine["step"]) == SOURCE_STEP
        assert torch.equal(zero.single_partition_of_fp32_groups[i], saved["single_partition_of_fp32_groups"][i])
        assert mine["exp_avg"].abs().sum() > 0  # moments that were trained, not fresh zeros
    start = {"step": trainer.step, "tokens": trainer.tokens}
    rc = trainer.fit()
    trainer.close()
    Path(out).write_text(json.dumps({"start": start, "rc": rc}))


@pytest.mark.launch
def test_phase_starts_from_the_source_moments_and_step_on_a_new_mix_and_context(source, tmp_path):
    from megamor.runs.safe_load import load as safe_load
    from megamor.testing.distributed import run_distributed
    from tests.train.helpers import Run

    run_dir = tmp_path / "anneal"
    overrides = [f"run_dir={run_dir}", *phase_overrides(source["run"], source["hq"], source["shards"])]
    src_tag = source["run"] / "checkpoints" / "step_00000006"
    run_distributed(_phase_in_process, 1, (str(source["config"]), overrides, str(src_tag), str(tmp_path / "out.json")))
    out = json.loads((tmp_path / "out.json").read_text())
    src_state = safe_load(src_tag / "trainer_state.pt")
    assert out == {"start": {"step": SOURCE_STEP, "tokens": src_state["tokens"]}, "rc": 0}

    records = [r for r in Run(run_dir, None).records() if "train/loss" in r]  # type: ignore[arg-type]
    assert [r["step"] for r in records] == [7, 8, 9, 10]
    assert [r["train/lr"] for r in records] == pytest.approx([2.25e-3, 1.5e-3, 0.75e-3, 0.0])  # WSD decay to 0
    # 4 sequences of 64 tokens per step now (the source: 8 x 32), counted on from the source's tokens
    assert [r["train/tokens"] for r in records] == [src_state["tokens"] + 256 * k for k in range(1, 5)]
    end = safe_load(run_dir / "checkpoints" / "step_00000010" / "trainer_state.pt")
    assert end["data"]["seq_len"] == 64 and end["data"]["samples_consumed"] == 16  # the new mix from its sample 0
    assert end["data"]["sources"] == [str(source["shards"]), str(source["hq"])]

    (entry,) = json.loads((run_dir / "phases.json").read_text())["phases"]
    assert entry["source_run"] == str(source["run"].resolve()) and entry["source_tag"] == "step_00000006"
    assert entry["source_step"] == SOURCE_STEP and entry["source_checkpoint_hash"].startswith("xxh3_128:")
    assert entry["data"].startswith("fresh: ")
    changed = {c["key"]: (c["old"], c["new"]) for c in entry["changes"]}
    assert changed["data.seq_len"] == (32, 64) and changed["batch.global_batch_size"] == (8, 4)
    assert changed["schedule.type"] == ("constant", "wsd") and changed["trainer.max_steps"] == (6, 10)
    assert changed["data.train"] == ([str(source["shards"])], [str(source["shards"]), str(source["hq"])])
    assert "trainer.continue_from" not in changed and "run_dir" not in changed
    assert folder_hash(source["run"]) == source["hash"]  # nothing in the source folder changed
    source["losses"] = {r["step"]: r["train/loss"] for r in records}


@pytest.mark.launch
def test_killed_phase_resumes_exactly_from_its_own_checkpoint_at_another_zero_stage(source, tmp_path):
    from tests.train.helpers import assert_ok, launch

    run_dir = tmp_path / "anneal"
    # ZeRO-2 here (the source: ZeRO-1): the source tag loads through a universal conversion,
    # made inside this run folder
    overrides = [*phase_overrides(source["run"], source["hq"], source["shards"]), "deepspeed.zero_stage=2"]
    killed = launch(source["config"], run_dir, overrides, env={"MEGAMOR_FAULTS": "sigkill_after_step=9"})
    assert killed.rc != 0 and max(killed.losses()) == 9
    first = killed.losses()
    phases = (run_dir / "phases.json").read_text()
    resumed = launch(source["config"], run_dir, overrides)
    assert_ok(resumed)
    assert "resumed from step 8" in resumed.output and "new phase from" not in resumed.output
    assert resumed.losses()[9] == first[9]  # the step after the phase's checkpoint, computed twice: bit for bit
    assert sorted(resumed.losses()) == [7, 8, 9, 10]
    if "losses" in source:  # the same phase trained in one go (the test above)
        assert resumed.losses() == pytest.approx(source["losses"], rel=1e-6)
    assert (run_dir / "phases.json").read_text() == phases  # written when the phase started, not on resume
    assert folder_hash(source["run"]) == source["hash"]  # nothing written there, no universal conversion either
    assert (run_dir / "phase_source" / "step_00000006" / "COMPLETE").is_file()


@pytest.mark.launch
def test_a_run_folder_with_checkpoints_refuses_what_its_resume_would_ignore_or_fail_on(source, tmp_path):
    """The source run resumed: another trainer.continue_from was ignored (config.yaml recorded
    it), other parameter groups failed in DeepSpeed minutes in; a moved trainer.init_from file,
    which a resume does not read, refused the requeue."""
    from megamor.train.preflight import check_run_folder

    src = source["run"]

    def check(*overrides: str) -> None:
        check_run_folder(load_experiment([source["config"]], [f"run_dir={src}", *SOURCE, *overrides]), 1)

    with pytest.raises(ConfigError) as e:
        check(f"trainer.continue_from={tmp_path / 'other'}")
    assert e.value.key == "trainer.continue_from" and "already holds checkpoints of its own (not a phase" in e.value.reason
    for override, key in (("trainer.train_only=routers", "trainer.train_only"),
                          ("optim.decay_embeddings=true", "optim.decay_embeddings")):
        with pytest.raises(ConfigError) as e:
            check(override)
        assert e.value.key == key and "the checkpoint to resume" in e.value.reason
    with pytest.raises(ConfigError) as e:  # ZeRO-1 -> ZeRO-0 needs a universal load, which ZeRO-0 lacks
        check("deepspeed.zero_stage=0")
    assert e.value.key == "deepspeed.zero_stage" and "which ZeRO-0 cannot load" in e.value.reason
    check(f"trainer.init_from={tmp_path / 'moved.pt'}")  # not read by a resume: no refusal
    with pytest.raises(ConfigError) as e:  # a fresh run folder reads it
        check_run_folder(load_experiment([source["config"]], [f"run_dir={tmp_path / 'fresh'}", *SOURCE,
                                                              f"trainer.init_from={tmp_path / 'moved.pt'}"]), 1)
    assert e.value.key == "trainer.init_from" and "not found" in e.value.reason
    assert folder_hash(src) == source["hash"]


@pytest.mark.launch
def test_a_phase_says_where_its_learning_rate_starts(source, tmp_path, capsys):
    """A wsd phase's decay set in right after a constant source's peak (with the default
    decay_fraction the rate fell to half the peak at once), and nothing said so."""
    from megamor.train.preflight import check_run_folder

    cfg = load_experiment([source["config"]], [f"run_dir={tmp_path / 'p'}", f"trainer.continue_from={source['run']}",
                                               "trainer.max_steps=10", "schedule.type=wsd", "schedule.warmup_steps=2",
                                               "schedule.decay_steps=4"])
    check_run_folder(cfg, 1)
    src_cfg = load_experiment([source["config"]], [f"run_dir={source['run']}", *SOURCE])
    old = LRSchedule.from_config(src_cfg.schedule, src_cfg.optim.lr, src_cfg.max_steps)
    new = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, 10)
    err = capsys.readouterr().err
    assert (f"the learning rate goes from {old.lr_at(SOURCE_STEP):.3g} at step {SOURCE_STEP} (the source's schedule; it "
            f"would have gone on at {old.lr_at(SOURCE_STEP + 1):.3g}) to {new.lr_at(SOURCE_STEP + 1):.3g} at step "
            f"{SOURCE_STEP + 1} (this phase's wsd schedule over 10 steps)") in err, err
    assert new.lr_at(SOURCE_STEP + 1) < old.lr_at(SOURCE_STEP + 1)  # the decay: a drop the line makes visible


@pytest.mark.launch
def test_bad_sources_are_one_line_with_exit_2(source, tmp_path):
    from megamor.train.preflight import check_run_folder
    from tests.train.helpers import launch

    cfg_file, src = source["config"], source["run"]

    def refused(*overrides: str) -> ConfigError:
        cfg = load_experiment([cfg_file], [f"run_dir={tmp_path / 'p'}", "trainer.max_steps=10", *overrides])
        with pytest.raises(ConfigError) as e:
            check_run_folder(cfg, 1)
        assert "\n" not in str(e.value)
        return e.value

    e = refused(f"trainer.continue_from={src}/step_5")
    assert e.key == "trainer.continue_from"
    assert e.reason == f"{src}/step_5: no checkpoint step_00000005 in {src}/checkpoints (has step_00000003, step_00000006)"
    e = refused(f"trainer.continue_from={tmp_path / 'nope'}")
    assert e.reason == f"{tmp_path / 'nope'}: run folder {tmp_path / 'nope'} not found"
    e = refused(f"trainer.continue_from={src}/step_3", "model.d_ff=256", "model.n_layers=6")
    assert e.reason == (f"{src}/checkpoints/step_00000003 holds a different model: model.n_layers: 4 in the source, "
                        "6 in this run; model.d_ff: 128 in the source, 256 in this run")
    e = refused(f"trainer.continue_from={src}", "trainer.max_steps=6")
    assert e.key == "trainer.max_steps"
    e = refused(f"trainer.continue_from={src}", f"run_dir={src}", "checkpoint.resume=false")
    assert "this run's own folder" in e.reason
    # A phase keeps the set of trained parameters (the optimizer state holds exactly those).
    from megamor.train.phase import check_continue_from, resolve_source

    cfg = load_experiment([cfg_file], [f"run_dir={tmp_path / 'p'}", "trainer.max_steps=10",
                                       f"trainer.continue_from={src}"])
    routers_only = resolve_source(str(src))
    routers_only.config.trainer.train_only = "routers"
    with pytest.raises(ConfigError) as e2:
        check_continue_from(cfg, routers_only)
    assert e2.value.key == "trainer.train_only" and "a phase keeps the trained parameters" in e2.value.reason
    # ... and their groups: decay_embeddings moves the embeddings to the other group (DeepSpeed
    # failed with a parameter-alignment traceback, exit 1)
    assert refused(f"trainer.continue_from={src}", "optim.decay_embeddings=true").key == "optim.decay_embeddings"
    # a phase at ZeRO-0 converted the source, then failed in DeepSpeed's load (exit 1, traceback)
    assert "which ZeRO-0 cannot load" in refused(f"trainer.continue_from={src}", "deepspeed.zero_stage=0").reason
    # a budget counts from step 0, not from the source's step (it trained for the wrong length)
    cfg = load_experiment([cfg_file], [f"run_dir={tmp_path / 'p'}", f"trainer.continue_from={src}", "budget.flops=2e10"])
    with pytest.raises(ConfigError) as e3:
        check_run_folder(cfg, 1)
    assert e3.value.key == "budget.flops" and "give trainer.max_steps (the total)" in e3.value.reason

    run = launch(cfg_file, tmp_path / "p", [f"trainer.continue_from={src}", "trainer.max_steps=10", "model.d_ff=256"])
    assert run.rc == 2 and not list((tmp_path / "p").glob("*"))
    lines = [ln for ln in run.proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].endswith("in this run") and "model.d_ff" in lines[-1] and "trainer.continue_from" in lines[-1]
    assert "Traceback" not in run.output
    assert folder_hash(src) == source["hash"]
