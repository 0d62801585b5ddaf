"""TensorBoard and the depth CSV on a real short 2-process run killed after its checkpoint and
resumed: rank 0 alone writes them; read back with TensorBoard's own reader, every scalar and depth histogram of metrics.jsonl is
there once, at its step, with its value; the CSV holds every step once and its rows sum to the
histograms of metrics.jsonl; `megamor.eval.depth_log` extracts those and plots them."""

from __future__ import annotations

import math

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megamor.eval.depth_log import main as depth_log
from megamor.train.depth_csv import read_csv
from tests.train.helpers import assert_ok, launch

pytestmark = pytest.mark.launch

STEPS, CKPT, KILL = 10, 4, 7
COMMON = [f"trainer.max_steps={STEPS}", "trainer.activation_checkpointing=false", f"checkpoint.every_steps={CKPT}",
          f"eval.every_steps={CKPT}", "eval.max_batches=1", "logging.every_steps=2", "logging.tensorboard=true",
          "logging.depth_hist_csv=depth/hist.csv", "logging.depth_hist_every=1"]
HIST = "router/depth_hist"


def read_tb(run_dir) -> EventAccumulator:
    return EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}).Reload()


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sinks") / "run"
    killed = launch(tiny_config, run_dir, COMMON, nproc=2, env={"MEGAMOR_FAULTS": f"sigkill_after_step={KILL}"})
    assert killed.rc != 0, killed.output[-3000:]
    # The killed run logged steps after its last checkpoint (4): they are on disk.
    assert [e.step for e in read_tb(run_dir).Scalars("train/loss")] == [2, 4, 6]
    assert max(read_csv(run_dir / "depth" / "hist.csv")) == KILL
    resumed = launch(tiny_config, run_dir, COMMON, nproc=2)
    assert_ok(resumed)
    assert f"resumed from step {CKPT}" in resumed.output
    assert len(list((run_dir / "tensorboard").iterdir())) == 2  # one event file per start: rank 0's
    return resumed


def test_tensorboard_holds_every_logged_scalar_once(run):
    """metrics.jsonl writes a non-finite value as null; W&B and TensorBoard get the NaN itself
    (a value that was never measured, None, none of them gets)."""
    acc = read_tb(run.run_dir)
    expected: dict[str, list[tuple[int, float | None]]] = {}
    for r in run.records():
        for k, v in r.items():
            if k not in ("step", "time") and not k.endswith("/counts"):
                expected.setdefault(k, []).append((r["step"], v))
    assert set(acc.Tags()["scalars"]) == {k for k, points in expected.items() if any(v is not None for _, v in points)}
    for k in acc.Tags()["scalars"]:
        got = [(e.step, e.value) for e in acc.Scalars(k)]
        steps = [s for s, _ in got]
        assert len(steps) == len(set(steps)), (k, steps)  # every step once: none left from the killed run
        logged = dict(expected[k])
        assert set(steps) <= set(logged), (k, steps)
        for s, x in got:
            want = logged[s]
            assert (not math.isfinite(x)) if want is None else math.isclose(x, want, rel_tol=1e-6, abs_tol=1e-30), (k, s)
        assert all(s in steps for s, v in expected[k] if v is not None), k
    assert [s for s, _ in expected["train/loss"]] == [2, 4, 6, 8, 10]
    assert [s for s, _ in expected["val/loss"]] == [4, 8, 10]
    assert any(k.startswith("train/router_health/r2/") for k in expected)  # the router health series


def test_tensorboard_depth_histograms_equal_metrics_jsonl(run):
    hists = read_tb(run.run_dir).Histograms(HIST)
    logged = {r["step"]: r[f"{HIST}/counts"] for r in run.records() if f"{HIST}/counts" in r}
    assert [h.step for h in hists] == sorted(logged) == [2, 4, 6, 8, 10]
    for h in hists:
        assert list(h.histogram_value.bucket) == logged[h.step]
        assert list(h.histogram_value.bucket_limit) == [0.5, 1.5, 2.5]


def test_depth_csv_every_step_once_summing_to_the_logged_windows(run):
    path = run.run_dir / "depth" / "hist.csv"
    steps = [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]]
    assert steps == [s for s in range(1, STEPS + 1) for _ in range(3)]  # depths 0..2, no step twice
    per_step = read_csv(path)
    prev = 0
    for r in run.records():
        if f"{HIST}/counts" in r:
            window = [per_step[s] for s in range(prev + 1, r["step"] + 1)]
            assert [sum(c) for c in zip(*window)] == r[f"{HIST}/counts"], r["step"]
            prev = r["step"]


def test_depth_log_extracts_metrics_jsonl_and_plots(run, tmp_path):
    out = tmp_path / "depth.csv"
    assert depth_log([str(run.run_dir), "--csv", str(out), "--plot", str(tmp_path / "depth.png")]) == 0
    logged = {r["step"]: [float(x) for x in r[f"{HIST}/counts"]] for r in run.records() if f"{HIST}/counts" in r}
    assert read_csv(out) == logged
    with Image.open(tmp_path / "depth.png") as im:
        im.verify()
        assert im.format == "PNG"
