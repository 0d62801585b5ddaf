"""`python -m megamor.plan`: the JSON document, the step-time arithmetic, the ranking, and bad
input answered with one line and exit code 2."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from megamor.model.flops import forward_flops
from megamor.plan.__main__ import main
from megamor.plan.hardware import GPUS, GiB
from megamor.train.config import load_experiment

CONFIG = """\
name: plan_tiny
model:
  vocab_size: 512
  d_model: 128
  n_layers: 6
  n_heads: 4
  n_kv_heads: 2
  d_ff: 256
  max_seq_len: 256
  sharing: middle_cycle
  num_recursions: 2
  router: {type: expert_choice}
data: {train: [unused], seq_len: 256}
batch: {global_batch_size: 32, micro_batch_size: 4}
deepspeed: {zero_stage: 1, precision: bf16}
trainer: {max_steps: 10, activation_checkpointing: false}
"""


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(CONFIG)
    return str(p)


def _json(capsys, *argv) -> dict:
    assert main(["--config", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_keys_and_totals(config, capsys):
    doc = _json(capsys, config, "--world", "4", "--gpu", "h200")
    pr = doc["per_rank"]
    for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activation_bytes", "total_bytes"):
        assert pr[k] > 0, k
    assert pr["total_bytes"] == pytest.approx(pr["params_bytes"] + pr["grads_bytes"] + pr["optimizer_bytes"]
                                              + pr["buffers_bytes"] + pr["activation_bytes"] + pr["recompute_bytes"])
    assert doc["fits"] is True and doc["gpu"]["memory_gib"] == 141
    assert doc["layout"] == {"world": 4, "tp": 1, "zero_stage": 1, "micro_batch": 4, "checkpointing": False,
                             "sequence_parallel": False, "dp": 4, "accumulation": 2}
    assert doc["kv_cache"]["bytes_per_rank"] > 0
    assert {"step_s", "tokens_per_day", "dp_traffic_bytes", "tp_traffic_bytes"} <= set(doc["speed"])
    # ZeRO-1 over 4 ranks: a quarter of the 12 optimizer bytes per parameter.
    n = pr["params_on_rank"]
    assert pr["optimizer_bytes"] == pytest.approx(12 * n / 4) and pr["params_bytes"] == pytest.approx(2 * n)


def test_step_time_is_the_flops_over_peak_times_mfu(config, capsys):
    """One GPU, no communication: the step is 3x the forward FLOPs of the global batch over
    peak x MFU (4x with checkpointing); tokens/day follows."""
    exp = load_experiment([config])
    fwd = forward_flops(exp.model, 256)
    doc = _json(capsys, config, "--world", "1", "--gpu-mem-gib", "1000", "--peak-tflops", "100", "--mfu", "0.5")
    assert doc["speed"]["step_s"] == pytest.approx(3 * fwd * 32 / (100e12 * 0.5))
    assert doc["speed"]["tokens_per_day"] == pytest.approx(32 * 256 / doc["speed"]["step_s"] * 86400)
    assert doc["speed"]["dp_traffic_bytes"] == 0 and doc["speed"]["tp_traffic_bytes"] == 0
    ck = _json(capsys, config, "trainer.activation_checkpointing=true", "--world", "1", "--gpu-mem-gib", "1000",
               "--peak-tflops", "100", "--mfu", "0.5")
    assert ck["speed"]["step_s"] == pytest.approx(4 / 3 * doc["speed"]["step_s"])
    assert ck["per_rank"]["activation_bytes"] < doc["per_rank"]["activation_bytes"]


def test_layouts_fit_and_are_ranked(config, capsys):
    doc = _json(capsys, config, "--world", "4", "--gpu", "a100-40")
    layouts = doc["layouts"]
    assert layouts and all(p["fits"] for p in layouts)
    rates = [p["speed"]["tokens_per_day"] for p in layouts]
    assert all(b <= a * 1.01 for a, b in itertools.pairwise(rates))  # best first, to the model's 1% resolution
    assert max(rates) <= rates[0] * 1.01
    assert {p["layout"]["tp"] for p in layouts} == {1, 2}  # 2 KV heads: TP 4 cannot split them
    # A GPU too small for anything: the config's layout does not fit, no layout is offered.
    tiny = _json(capsys, config, "--world", "4", "--gpu-mem-gib", "0.001", "--peak-tflops", "10")
    assert tiny["fits"] is False and tiny["layouts"] == []
    assert tiny["per_rank"]["total_bytes"] > 0.001 * GiB


def test_text_report(config, capsys):
    assert main(["--config", config, "--world", "2", "--gpu", "h100", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "tokens/day" in out and "layouts that fit" in out
    assert f"{GPUS['h100'].memory_gib:g} GiB" in out


@pytest.mark.parametrize("argv, needle", [
    (["--gpu", "v100"], "unknown GPU 'v100'"),
    (["--world", "3", "parallel.tensor=2"], "parallel.tensor"),  # TP 2 does not divide 3 GPUs
    (["--world", "3"], "batch.global_batch_size"),  # 32 sequences do not split over 3 x micro 4
    (["--world", "2", "parallel.tensor=2", "deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
    (["--gpu-mem-gib", "80"], "--peak-tflops"),
    (["--gpu-mem-gib", "nan", "--peak-tflops", "100"], "'--gpu-mem-gib': must be a finite positive number, got nan"),
    (["--gpu-mem-gib", "inf", "--peak-tflops", "100"], "'--gpu-mem-gib': must be a finite positive number, got inf"),
    (["--gpu-mem-gib", "80", "--peak-tflops", "inf"], "'--peak-tflops': must be a finite positive number, got inf"),
    (["--mfu", "1.5"], "--mfu"),
])
def test_bad_input_is_one_line_and_exit_2(config, capsys, argv, needle):
    assert main(["--config", config, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_bad_arguments_are_one_line_too(config, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", config, "--bogus"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "unrecognized arguments" in err


def test_module_entry_point(config):
    """The real `python -m` entry point: JSON on stdout; an unknown GPU on one stderr line, exit 2."""
    ok = subprocess.run([sys.executable, "-m", "megamor.plan", "--config", config, "--world", "2", "--json"],
                        check=False, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "per_rank" in json.loads(ok.stdout)
    bad = subprocess.run([sys.executable, "-m", "megamor.plan", "--config", config, "--gpu", "tpu"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    lines = [line for line in bad.stderr.splitlines() if "megamor.plan" in line]
    assert len(lines) == 1 and "unknown GPU" in lines[0]


def test_the_1_7b_reference_layout(capsys):
    """The shipped 1.7B config on its documented 32 GPUs (TP 2 x DP 16, ZeRO-1): it fits an
    H100, and the parameters per rank agree with megamor.parallel.memory's independent count."""
    from megamor.parallel.memory import param_counts

    doc = _json(capsys, "configs/experiments/1_7b.yaml", "--world", "32", "--gpu", "h100")
    exp = load_experiment(["configs/experiments/1_7b.yaml"])
    sharded, replicated = param_counts(exp.model)
    assert doc["per_rank"]["params_on_rank"] == sharded / 2 + replicated
    assert doc["layout"]["tp"] == 2 and doc["layout"]["dp"] == 16 and doc["fits"]
    assert doc["per_rank"]["optimizer_bytes"] == pytest.approx(12 * (sharded / 2 + replicated) / 16)
    assert doc["layouts"] and doc["speed"]["tokens_per_day"] > 0
