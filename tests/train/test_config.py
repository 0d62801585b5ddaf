"""Config loading and every check that must fail before a process group starts."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from megamor.config import ConfigError
from megamor.env import repo_root
from megamor.parallel.env import resolve_launch_env
from megamor.train.__main__ import main
from megamor.train.config import check_world, load_experiment, load_stored_experiment, to_yaml
from megamor.train.ds_config import deepspeed_config
from megamor.train.preflight import preflight
from megamor.train.signals import EXIT_CONFIG
from tests.train.helpers import train_env

EXPERIMENTS = sorted((repo_root() / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_shipped_experiment_configs_load(path):
    cfg = load_experiment([path], ["data.train=[somewhere]"])
    assert cfg.max_steps >= 1
    # One micro-batch per data-parallel rank; each DP rank is parallel.tensor processes.
    ds = deepspeed_config(cfg, world_size=cfg.batch.global_batch_size // cfg.batch.micro_batch_size * cfg.parallel.tensor)
    assert ds["gradient_accumulation_steps"] == 1


def test_model_config_file_then_model_keys_on_top():
    cfg = load_experiment([], ["model_config=configs/model/33m/mor_expert_3.yaml", "model.d_model=256",
                               "trainer.max_steps=10", "data.train=[x]"])
    assert cfg.model.router.type == "expert_choice" and cfg.model.num_recursions == 3
    assert cfg.model.d_model == 256 and cfg.model.n_layers == 8  # file value kept


@pytest.mark.parametrize("override, key", [
    ("bogus=1", "bogus"),
    ("model.not_a_field=3", "model.not_a_field"),
    ("optim.lr=fast", "optim.lr"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("batch.micro_batch_size=3", "batch.global_batch_size"),
    ("schedule.type=linear", "schedule.type"),
    ("model.n_heads=5", "model.n_heads"),
    ("data.seq_len=4096", "data.seq_len"),
    ("trainer.doc_mask_impl=sparse", "trainer.doc_mask_impl"),
    ("deepspeed.config.train_batch_size=4", "deepspeed.config.train_batch_size"),
    # raw keys megamor derives: the merge would override them behind the planner's and ZeRO-3 code's back
    ("deepspeed.config.zero_optimization.stage=3", "deepspeed.config.zero_optimization.stage"),
    ("deepspeed.config.gradient_clipping=0.5", "deepspeed.config.gradient_clipping"),
    ("deepspeed.config.bf16.enabled=false", "deepspeed.config.bf16.enabled"),
    ("deepspeed.config.fp16.enabled=true", "deepspeed.config.fp16.enabled"),
    ("deepspeed.config.scheduler.type=WarmupLR", "deepspeed.config.scheduler"),
    ("deepspeed.config.checkpoint.load_universal=true", "deepspeed.config.checkpoint.load_universal"),
    ("deepspeed.config.bf16=false", "deepspeed.config.bf16"),
    ("deepspeed.config.zero_allow_untested_optimizer=false", "deepspeed.config.zero_allow_untested_optimizer"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_experiment([], ["trainer.max_steps=10", "data.train=[x]", "batch.global_batch_size=8", override])
    assert e.value.key == key, str(e.value)


def test_a_saved_config_with_a_raw_key_megamor_now_owns_still_loads(tmp_path):
    """A run started before `gradient_clipping` joined OWNED_DS_KEYS must still resume and export:
    its tag's experiment.yaml (covered by the tag's hashes) cannot be edited."""
    cfg = load_experiment([], ["trainer.max_steps=10", "data.train=[x]", "batch.global_batch_size=8"])
    cfg.deepspeed.config = {"gradient_clipping": 0.5, "bf16": {"enabled": True}}  # as an older megamor saved it
    saved = tmp_path / "experiment.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_stored_experiment(saved).deepspeed.config["gradient_clipping"] == 0.5
    with pytest.raises(ConfigError) as e:  # given by a user now: refused
        load_experiment([saved])
    assert e.value.key == "deepspeed.config.gradient_clipping"


def test_profile_steps_scalar_suggests_a_list_that_is_accepted():
    """Issue 32: `trainer.profile.steps=5` suggested `[5]`, which was itself rejected."""
    base = ["trainer.max_steps=10", "data.train=[x]", "batch.global_batch_size=8"]
    with pytest.raises(ConfigError) as e:
        load_experiment([], [*base, "trainer.profile.steps=5"])
    assert e.value.key == "trainer.profile.steps" and "trainer.profile.steps=[5]" in str(e.value), str(e.value)
    assert load_experiment([], [*base, "trainer.profile.steps=[5]"]).trainer.profile.steps == [5, 5]
    with pytest.raises(ConfigError, match=r"or \[a\] for step a alone, got \[0, 0\]"):
        load_experiment([], [*base, "trainer.profile.steps=[0]"])


def test_batch_must_divide_over_the_world():
    cfg = load_experiment([], ["trainer.max_steps=10", "data.train=[x]", "batch.global_batch_size=8",
                               "batch.micro_batch_size=2"])
    assert check_world(cfg, 2) == 2
    with pytest.raises(ConfigError) as e:
        check_world(cfg, 3)
    assert e.value.key == "batch.global_batch_size" and "data-parallel size 3" in str(e.value)


def test_missing_data_path_and_small_vocabulary(tiny_config, tmp_path):
    cfg = load_experiment([tiny_config], ["data.train=[/nonexistent/shards]"])
    with pytest.raises(ConfigError) as e:
        preflight(cfg, 1)
    assert e.value.key == "data.train[0]"
    cfg = load_experiment([tiny_config], ["model.vocab_size=100"])
    with pytest.raises(ConfigError) as e:
        preflight(cfg, 1)
    assert e.value.key == "model.vocab_size"


@pytest.mark.parametrize("override, world, key", [
    ("oops=1", "1", "oops"),
    ("batch.micro_batch_size=4", "3", "batch.global_batch_size"),  # 8 % (4 x 3)
    ("data.valid=[/nowhere]", "1", "data.valid[0]"),
])
def test_cli_rejects_bad_config_before_distributed_start(tiny_config, tmp_path, monkeypatch, capsys, override, world, key):
    # WORLD_SIZE=3 with no peers: starting a process group would hang, so returning at all
    # proves the check ran first.
    for k, v in {"RANK": "0", "WORLD_SIZE": world, "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    rc = main(["--config", str(tiny_config), f"run_dir={tmp_path / 'run'}", override])
    assert rc == EXIT_CONFIG
    assert f"config key '{key}'" in capsys.readouterr().err
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()


@pytest.mark.launch
def test_cli_subprocess_exit_code(tiny_config, tmp_path):
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "megamor.train", "--config", str(tiny_config), "trainer.max_step=3"],
                       cwd=repo_root(), env=train_env(tmp_path, {"WORLD_SIZE": "2", "RANK": "0"}), capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "config key 'trainer.max_step'" in r.stderr
    assert time.time() - t < 60


def test_print_config_resolves_everything(tiny_config, capsys):
    assert main(["--config", str(tiny_config), "--print-config", "optim.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.01" in out and "router:" in out


# -- launch environment -------------------------------------------------------------------
def test_srun_variables_map_to_torch_distributed():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu-node7", "PATH": ""}
    le = resolve_launch_env(env)
    assert (le.rank, le.local_rank, le.world_size, le.launcher) == (3, 1, 4, "slurm")
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "gpu-node7" and env["MASTER_PORT"] == str(20000 + 1234)


def test_torchrun_variables_win_and_batch_shell_is_single():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}
    assert resolve_launch_env(env).launcher == "torch"
    # Inside an sbatch script (no srun step): SLURM_PROCID is set but this is one process.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9"}
    le = resolve_launch_env(batch)
    assert (le.world_size, le.launcher) == (1, "single")


def test_resuming_with_another_model_is_refused_before_launch(tiny_config, tmp_path):
    """A run folder holding a checkpoint of another model shape: ConfigError naming the key."""
    from megamor.runs.integrity import MARKER
    from megamor.runs.layout import CONFIG_FILE, tag_for
    from megamor.train.config import to_yaml

    cfg = load_experiment([tiny_config], [f"run_dir={tmp_path}"])
    tag = tmp_path / "checkpoints" / tag_for(5)
    tag.mkdir(parents=True)
    (tag / CONFIG_FILE).write_text(to_yaml(cfg))
    (tag / MARKER).write_text('{"step": 5, "files": {}}')
    preflight(cfg, 1)  # same model: fine
    wider = load_experiment([tiny_config], [f"run_dir={tmp_path}", "model.d_model=128"])
    with pytest.raises(ConfigError) as e:
        preflight(wider, 1)
    assert e.value.key == "model.d_model" and "checkpoint.resume=false" in str(e.value)
    preflight(load_experiment([tiny_config], [f"run_dir={tmp_path}", "model.d_model=128",
                                                        "checkpoint.resume=false"]), 1)


@pytest.mark.parametrize("overrides, world, key, words", [
    (["parallel.tensor=2"], 3, "parallel.tensor", ["2 does not divide the world size 3"]),
    (["parallel.tensor=4"], 4, "model.n_kv_heads", ["2 is not divisible", "parallel.tensor=4"]),
    (["parallel.tensor=2", "model.n_heads=2", "model.n_kv_heads=1"], 2, "model.n_kv_heads", ["1 is not divisible"]),
    (["parallel.tensor=2", "model.vocab_size=513"], 2, "model.vocab_size", ["513 is not divisible", "pad"]),
    (["parallel.tensor=2", "deepspeed.zero_stage=3"], 2, "deepspeed.zero_stage", ["ZeRO-3", "(0, 1, 2)"]),
    (["parallel.tensor=2", "batch.global_batch_size=6", "batch.micro_batch_size=2"], 8, "batch.global_batch_size",
     ["data-parallel size 4", "world 8 / parallel.tensor 2"]),
])
def test_impossible_tensor_parallel_layouts_name_the_numbers(tiny_config, overrides, world, key, words):
    with pytest.raises(ConfigError) as e:
        cfg = load_experiment([tiny_config], overrides)
        preflight(cfg, world)
    assert e.value.key == key, str(e.value)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_tensor_group_must_fit_in_a_node(tiny_config, monkeypatch):
    cfg = load_experiment([tiny_config], ["parallel.tensor=4", "model.n_kv_heads=4"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as e:
        preflight(cfg, 8)
    assert e.value.key == "parallel.tensor" and "4 does not divide the 2 processes per node" in str(e.value)


def test_impossible_layout_exits_2_before_any_process_group(tiny_config, tmp_path, capsys):
    rc = main(["--config", str(tiny_config), f"run_dir={tmp_path / 'run'}", "parallel.tensor=2"])  # one process
    assert rc == EXIT_CONFIG and not dist.is_initialized()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.tensor" in err[0] and "2 does not divide the world size 1" in err[0]


# -- the front door: files, overrides, lists, raw DeepSpeed keys, run length ---------------
@pytest.mark.parametrize("text, reason", [
    ("", "is empty"),
    ("# nothing but a comment\n", "is empty"),
    ("- trainer\n- data\n", "not a list"),
    ("42\n", "not the single value 42"),
])
def test_config_file_must_be_a_mapping(tmp_path, capsys, text, reason):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    rc = main(["--config", str(path), "trainer.max_steps=3", "data.train=[x]"])
    assert rc == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and reason in err, err


@pytest.mark.launch
def test_malformed_override_is_one_line_exit_2(tiny_config, tmp_path):
    r = subprocess.run([sys.executable, "-m", "megamor.train", "--config", str(tiny_config), "data.train=[a"],
                       cwd=repo_root(), env=train_env(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == EXIT_CONFIG, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "config key 'data.train'" in lines[0] and "'data.train=[a'" in lines[0], r.stderr


@pytest.mark.parametrize("override, key, says", [
    ("model.router.capacity=0.5", "model.router.capacity", "must be a list, e.g. model.router.capacity=[0.5]"),
    ("deepspeed.config.zero_optimisation.stage=3", "deepspeed.config.zero_optimisation", "did you mean zero_optimization"),
    ("deepspeed.config.zero_optimization.overlap_com=true", "deepspeed.config.zero_optimization.overlap_com",
     "did you mean overlap_comm"),
    ("deepspeed.config.bf16.enable=true", "deepspeed.config.bf16.enable", "did you mean enabled"),
])
def test_scalar_lists_and_unknown_deepspeed_keys_name_their_key(override, key, says):
    with pytest.raises(ConfigError) as e:
        load_experiment([], ["trainer.max_steps=10", "data.train=[x]", override])
    assert e.value.key == key and says in str(e.value), str(e.value)


def test_known_deepspeed_keys_pass_and_the_check_can_be_skipped():
    base = ["trainer.max_steps=10", "data.train=[x]"]
    load_experiment([], base + ["deepspeed.config.zero_optimization.overlap_comm=true",
                                "deepspeed.config.activation_checkpointing.partition_activations=true"])
    cfg = load_experiment([], base + ["deepspeed.check_keys=false", "deepspeed.config.brand_new_key=1"])
    assert deepspeed_config(cfg, 1)["brand_new_key"] == 1


def test_run_length_override_replaces_the_files_other_length():
    paper = repo_root() / "configs" / "experiments" / "360m.yaml"
    assert load_experiment([paper]).trainer.max_tokens  # the file gives tokens
    cfg = load_experiment([paper], ["trainer.max_steps=40"])
    assert (cfg.trainer.max_steps, cfg.trainer.max_tokens, cfg.max_steps) == (40, None, 40)
    with pytest.raises(ConfigError) as e:  # both on the command line: say what to type
        load_experiment([paper], ["trainer.max_steps=40", "trainer.max_tokens=1000"])
    assert "add trainer.max_tokens=null" in str(e.value)


# -- W&B before launch ----------------------------------------------------------------------
def test_shipped_configs_leave_the_wandb_mode_to_the_environment(monkeypatch):
    for path in EXPERIMENTS:
        cfg = load_experiment([path], ["data.train=[x]"])
        if path.stem in ("demo", "small_cpu"):  # CPU demo / CPU study base: never online, on purpose
            assert cfg.wandb.mode in ("offline", "disabled"), path
            continue
        assert cfg.wandb.mode is None, path
        monkeypatch.setenv("WANDB_MODE", "offline")
        assert cfg.wandb.resolved_mode() == "offline"
    cfg = load_experiment([EXPERIMENTS[0]], ["data.train=[x]", "wandb.mode=disabled"])
    assert cfg.wandb.resolved_mode() == "disabled"  # written explicitly: wins over the environment


@pytest.mark.parametrize("env", ["ofline", "shared"])
def test_an_unknown_wandb_mode_in_the_environment_is_refused(monkeypatch, env):
    """It was read as disabled: a typo in $WANDB_MODE logged nothing, silently."""
    monkeypatch.setenv("WANDB_MODE", env)
    with pytest.raises(ConfigError) as e:
        load_experiment([EXPERIMENTS[0]], ["data.train=[x]"])
    assert e.value.key == "wandb.mode" and repr(env) in str(e.value)
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's alias of offline
    assert load_experiment([EXPERIMENTS[0]], ["data.train=[x]"]).wandb.resolved_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", env)  # a mode written in the config wins: the variable is not read
    assert load_experiment([EXPERIMENTS[0]], ["data.train=[x]", "wandb.mode=disabled"]).wandb.resolved_mode() == "disabled"


def test_online_without_credentials_fails_before_launch(tiny_config, tmp_path, monkeypatch, capsys):
    for k, v in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                 "HOME": str(tmp_path), "NETRC": str(tmp_path / "netrc"), "WANDB_MODE": "online"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("machine example.com login user password secret\n")
    argv = ["--config", str(tiny_config), f"run_dir={tmp_path / 'run'}", "batch.micro_batch_size=1",
            "batch.global_batch_size=3", "wandb.mode=null"]
    assert main(argv) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config key 'wandb.mode'" in err and "api.wandb.ai" in err, err
    assert not dist.is_initialized()
    # `wandb login` (a netrc entry for the server) is enough to pass this check
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    from megamor.train.wandb_setup import credentials_found

    assert credentials_found()


# -- shard folders that do not hold what their manifest says: refused before any process group --
def _damage(shards, how: str) -> None:
    import json

    manifest = shards / "manifest.json"
    m = json.loads(manifest.read_text())
    split = m["splits"]["train"]
    first = shards / split["shards"][0]["file"]
    if how == "truncated_npy":
        first.write_bytes(first.read_bytes()[:-100])
    elif how == "entry_claims_more":  # the split total agrees: only the file is short of it
        split["shards"][0]["tokens"] += 50
        split["tokens"] += 50
    else:  # "split_total": the entries are right, the split's own total is not
        split["tokens"] += 1
    manifest.write_text(json.dumps(m))


@pytest.mark.parametrize("how, words", [
    ("truncated_npy", "train-00000.npy: truncated"),
    ("entry_claims_more", "train-00000.npy: truncated"),
    ("split_total", "split 'train' says"),
])
def test_damaged_shards_exit_2_before_any_process_group(tiny_data, tiny_config, tmp_path, monkeypatch, capsys, how, words):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tiny_data / "shards", shards)
    _damage(shards, how)
    rc = main(["--config", str(tiny_config), f"run_dir={tmp_path / 'run'}", f"data.train=[{shards}]",
               f"data.valid=[{shards}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_CONFIG and len(err) == 1, err
    assert "config key 'data.train[0]'" in err[0] and words in err[0], err[0]
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_a_flop_budget_is_a_run_length_and_overrides_replace_it():
    """budget.flops (+ flops.convention) gives the steps a study's budget gives; trainer.max_steps
    or max_tokens on the command line replaces it; two lengths in one place are refused."""
    from megamor.model.flops import budget_flops_per_token
    from megamor.study.budget import run_budget
    from megamor.study.config import BudgetConfig

    paper = repo_root() / "configs" / "experiments" / "paper" / "360m" / "mor_expert_3.yaml"
    cfg = load_experiment([paper])
    assert (cfg.trainer.max_steps, cfg.trainer.max_tokens, cfg.budget.flops, cfg.flops.convention) == (None, None, 16.5e18, "paper")
    want = run_budget(BudgetConfig(flops=16.5e18), cfg.model, 2048, 1024, "paper").steps
    assert cfg.max_steps == want == 14160  # the released config: 14,161 (the rule gives 14,160.01)
    exact = load_experiment([paper], ["flops.convention=exact"])
    assert exact.max_steps == round(16.5e18 / budget_flops_per_token(exact.model, 2048, "forward") / 2**21) < want
    assert load_experiment([paper], ["budget.count=training"]).max_steps == round(want / 3)
    assert load_experiment([paper], ["trainer.max_steps=400"]).max_steps == 400  # the override clears budget.flops
    assert load_experiment([paper], ["trainer.max_tokens=2097152000"]).max_steps == 1000
    with pytest.raises(ConfigError) as e:
        load_experiment([paper], ["trainer.max_steps=400", "budget.flops=1e18"])
    assert e.value.key == "trainer.max_steps" and "add budget.flops=null" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_experiment([paper], ["budget.flops=null"])
    assert e.value.key == "trainer.max_steps" and "budget.flops=F" in str(e.value)
    for bad, k in (("budget.flops=-1", "budget.flops"), ("budget.count=backward", "budget.count"),
                   ("flops.convention=kaplan", "flops.convention")):
        with pytest.raises(ConfigError) as e:
            load_experiment([paper], [bad])
        assert e.value.key == k, bad
