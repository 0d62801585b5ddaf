"""python -m megamor.adapt: writes a loadable model, decodes with a depth trace, refuses bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from megamor.adapt.cli import main
from megamor.env import repo_root
from megamor.model.config import ModelConfig
from megamor.runs.depth_csv import read_csv
from megamor.runs.load import load_model
from tests.adapt.checkpoints import make_checkpoint

pytest.importorskip("transformers")


def test_writes_a_megamor_model_and_its_config(tmp_path, capsys):
    src = make_checkpoint("qwen2", tmp_path / "hf")
    assert main(["--model", str(src), "--out", str(tmp_path / "out"), "--num-recursions", "2", "--no-skip"]) == 0
    model = load_model(tmp_path / "out" / "megamor.pt", dtype=torch.float32)
    assert model.cfg.qkv_bias and model.cfg.capacities == [1.0, 1.0] and model.cfg.router.type == "expert_choice"
    saved = ModelConfig(**{k: v for k, v in yaml.safe_load((tmp_path / "out" / "model.yaml").read_text()).items()
                           if k != "router"})
    assert saved.qkv_bias and saved.sharing == "none" and saved.num_recursions == 2
    assert "wrote" in capsys.readouterr().out


def test_decodes_with_throughput_histogram_and_depth_trace(tmp_path, capsys):
    src = make_checkpoint("mistral", tmp_path / "hf")
    csv = tmp_path / "trace.csv"
    rc = main(["--model", str(src), "--num-recursions", "4", "--generate", "6", "--prompt-ids", "1,2,3",
               "--prompt-ids", "4,5", "--csv", str(csv)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "12 tokens generated at" in out and "tokens/s" in out and "mean depth" in out
    trace = read_csv(csv)
    # one histogram per fed-back generated position (the last token is never fed back), over both prompts
    assert sorted(trace) == [1, 2, 3, 4, 5] and all(len(c) == 5 and sum(c) == 2 for c in trace.values())


def test_no_skip_decodes_at_full_depth(tmp_path, capsys):
    src = make_checkpoint("llama", tmp_path / "hf")
    assert main(["--model", str(src), "--num-recursions", "2", "--no-skip", "--generate", "4",
                 "--prompt-ids", "7,8,9", "--csv", str(tmp_path / "t.csv")]) == 0
    assert all(c == [0, 0, 1] for c in read_csv(tmp_path / "t.csv").values())


def test_unsupported_architecture_is_one_line_exit_2(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    r = subprocess.run([sys.executable, "-m", "megamor.adapt", "--model", str(tmp_path / "gpt2"), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=repo_root(), timeout=120, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        (f"megamor.adapt: error: {tmp_path / 'gpt2' / 'config.json'}: model_type 'gpt2' is not supported; "
        "supported: llama, mistral, qwen2, qwen3")]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--num-recursions", "3"], "--num-recursions 3: must be >= 2 and divide"),
    (["--capacity", "1,0.5"], "--capacity 1.0,0.5: needs 4 entries (one per recursion), got 2"),
    (["--capacity", "1,0.5,0.7,0.2"], "--capacity 1.0,0.5,0.7,0.2: capacities must be non-increasing"),
])
def test_bad_settings_exit_2(tmp_path, capsys, args, needle):
    src = make_checkpoint("llama", tmp_path / "hf")
    assert main(["--model", str(src), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


@pytest.mark.parametrize("n", ["0", "-3"])
def test_generate_needs_a_positive_count(tmp_path, capsys, n):
    """--generate -3 decoded nothing and exited 0."""
    src = make_checkpoint("llama", tmp_path / "hf")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(src), "--generate", n, "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--generate: must be >= 1" in err[0], err
