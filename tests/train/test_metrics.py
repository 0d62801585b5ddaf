"""Honest MFU: the FLOP count against torch's counter, the CPU peak that a busy machine
cannot talk down, and a printed MFU that never exceeds 100%."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megamor.model import ModelConfig, MoRLM, RouterConfig
from megamor.model.flops import forward_flops
from megamor.train.metrics import PEAK_CACHE_FILE, PEAK_METHOD, PeakFlops, cached_cpu_tflops, cpu_peak_key, step_flops

from .helpers import assert_ok, launch

CPU = torch.device("cpu")


def _plant(folder, precision: str, tflops: float, method: int | None = PEAK_METHOD, threads: int | None = None) -> str:
    """A cache entry as a measurement on a loaded machine leaves it; returns its key."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        k = cpu_peak_key(precision)
    finally:
        torch.set_num_threads(before)
    entry: dict = {"tflops": tflops, "measured": "2026-01-01T00:00:00"}
    if method is not None:
        entry["method"] = method
    (folder / PEAK_CACHE_FILE).write_text(json.dumps({k: entry}))
    return k


def test_step_flops_equal_the_counted_training_flops():
    """The count MFU divides is the work done: 3 x forward of the routed tokens equals what
    FlopCounterMode counts for the forward and backward passes (non-causal: what runs)."""
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                      sharing="middle_cycle", num_recursions=2, router=RouterConfig(type="expert_choice", capacity=[1.0, 0.5]))
    torch.manual_seed(0)
    m = MoRLM(cfg)
    x = torch.randint(0, 256, (2, 64))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = m(x, targets=x, return_logits=False)
        (out.loss + out.aux_loss).backward()
    per_seq = [n / 2 for n in out.stats.routed.tolist()]
    counted = 3 * 2 * forward_flops(cfg, 64, per_seq, causal=False)
    assert abs(counted - counter.get_total_flops()) / counter.get_total_flops() < 0.03
    # what the trainer logs counts only the causal half of attention: never more than ran
    logged = step_flops(cfg, [(2, 64)], [out.stats.routed.float()])
    assert 0.8 * counted < logged < counted


def test_a_stale_low_peak_is_measured_again_and_mfu_stays_below_100(tmp_path):
    """The 515% MFU: a peak measured while other jobs ran, cached for good. A rate above it
    proves it wrong: measured again (once), the cache raised, MFU honest."""
    key = _plant(tmp_path, "fp32", 1e-6)
    peak = PeakFlops.resolve(CPU, "fp32", None, True, tmp_path)
    assert peak.source == "measured" and peak.tflops == 1e-6  # the planted figure is what a run starts with
    said: list[str] = []
    mfu, hfu = peak.utilisation(1e-4, 4 / 3, said.append)
    assert peak.remeasured and peak.tflops > 1e-3  # any real CPU does more than 1 GFLOP/s
    assert mfu == pytest.approx(1e-4 / peak.tflops) and hfu == pytest.approx(mfu * 4 / 3)
    assert len(said) == 1 and "measured again" in said[0]
    stored = json.loads((tmp_path / PEAK_CACHE_FILE).read_text())[key]
    assert stored["tflops"] == peak.tflops and stored["method"] == PEAK_METHOD
    # once per run: a second implausible window clamps instead of measuring again
    mfu2, hfu2 = peak.utilisation(1e6, 1.0, said.append)
    assert (mfu2, hfu2) == (1.0, 1.0) and len(said) == 2 and "at most 100%" in said[1]


def test_a_configured_peak_too_low_is_clamped_with_one_warning(tmp_path):
    peak = PeakFlops.resolve(CPU, "bf16", 2.0, True, tmp_path)
    said: list[str] = []
    assert peak.utilisation(1.0, 4 / 3, said.append) == pytest.approx((0.5, 2 / 3))
    assert said == []
    for _ in range(3):
        assert peak.utilisation(10.0, 4 / 3, said.append) == (1.0, 1.0)
    assert len(said) == 1 and "trainer.peak_tflops" in said[0] and "configured" in said[0]
    assert not (tmp_path / PEAK_CACHE_FILE).exists()  # a configured peak is never measured
    # HFU, not MFU, is what the hardware bounds: MFU 90% with recomputation is 120% HFU
    peak2 = PeakFlops.resolve(CPU, "bf16", 1.0, True, tmp_path)
    mfu, hfu = peak2.utilisation(0.9, 4 / 3)
    assert mfu == pytest.approx(0.9) and hfu == 1.0


def test_cache_keeps_the_best_figure_and_remeasures_old_entries(tmp_path):
    key = _plant(tmp_path, "fp32", 1e6)  # far above any real measurement
    assert cached_cpu_tflops("fp32", tmp_path, remeasure=True) == 1e6  # a busy re-measurement never lowers it
    assert json.loads((tmp_path / PEAK_CACHE_FILE).read_text())[key]["tflops"] == 1e6
    _plant(tmp_path, "fp32", 1e-6, method=None)  # measured by the old one-window method: not trusted
    tf = cached_cpu_tflops("fp32", tmp_path)
    assert tf > 1e-3
    stored = json.loads((tmp_path / PEAK_CACHE_FILE).read_text())[key]
    assert stored["tflops"] == tf and stored["method"] == PEAK_METHOD


@pytest.mark.launch
def test_run_with_a_stale_low_cached_peak_logs_mfu_at_most_100(tiny_config, tmp_path):
    """End to end: a real run whose cache holds a peak a loaded machine measured. Before the
    fix it logged MFU in the thousands of percent on every line."""
    cache = tmp_path / "cache"
    cache.mkdir()
    key = _plant(cache, "fp32", 1e-6, threads=1)  # the run has OMP_NUM_THREADS=1
    run = launch(tiny_config, tmp_path / "run", ["trainer.max_steps=2", "checkpoint.save_final=false", "eval.at_end=false",
                                                 "trainer.device_tflops_probe=true"],
                 env={"MEGAMOR_CACHE_DIR": str(cache)})
    assert_ok(run)
    rows = [r for r in run.records() if "perf/mfu" in r]
    assert len(rows) == 2
    assert all(0 < r["perf/mfu"] <= r["perf/hfu"] <= 1.0 for r in rows), rows
    assert "measured again" in run.output
    assert json.loads((cache / PEAK_CACHE_FILE).read_text())[key]["tflops"] > 1e-3  # the run's own key was raised
