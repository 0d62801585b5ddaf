"""The TensorBoard sink, read back with TensorBoard's own reader (EventAccumulator): scalars,
the depth histogram, a resume that hides the killed run's points after its checkpoint, and the
one-line refusal when the package is missing."""

from __future__ import annotations

import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megamor.train.__main__ import main
from megamor.train.signals import EXIT_CONFIG
from megamor.train.tensorboard_sink import TENSORBOARD_DIR, TensorBoardSink, histogram_summary

EDGES = [-0.5, 0.5, 1.5, 2.5]


def read(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "histograms": 0})
    return acc.Reload()


def write(run_dir, start: int, steps: range, offset: float) -> None:
    sink = TensorBoardSink(run_dir, start)
    for s in steps:
        sink.log(s, {"train/loss": offset + s, "train/router_health/r1/logit_max_abs": 2.0 * s, "train/grad_norm": None,
                     "train/skipped_steps": 0, "note": "text"},
                 {"router/depth_hist": ([s, 10, 0], EDGES)})
    sink.close()


def test_scalars_and_depth_histogram_read_back(tmp_path):
    write(tmp_path, 0, range(1, 4), 0.0)
    acc = read(tmp_path)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/router_health/r1/logit_max_abs", "train/skipped_steps"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    hist = acc.Histograms("router/depth_hist")
    assert [h.step for h in hist] == [1, 2, 3]
    h = hist[1].histogram_value
    assert list(h.bucket) == [2.0, 10.0, 0.0] and list(h.bucket_limit) == [0.5, 1.5, 2.5]
    assert (h.min, h.max, h.num, h.sum) == (0.0, 1.0, 12.0, 10.0)


def test_resume_continues_without_duplicate_points(tmp_path):
    """The killed run logged steps 1-7 after a checkpoint at 4; the resumed run logs 5-10 again
    (other values). TensorBoard shows each step once, the resumed run's values after step 4."""
    write(tmp_path, 0, range(1, 8), 0.0)
    write(tmp_path, 4, range(5, 11), 100.0)
    acc = read(tmp_path)
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(s, float(s)) for s in range(1, 5)] + [(s, 100.0 + s) for s in range(5, 11)]
    assert [e.step for e in acc.Scalars("train/router_health/r1/logit_max_abs")] == list(range(1, 11))
    assert [h.step for h in acc.Histograms("router/depth_hist")] == list(range(1, 11))


def test_empty_histogram_is_skipped():
    assert histogram_summary([0, 0], [-0.5, 0.5, 1.5]) is None


def test_missing_package_is_one_line_exit_2(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    rc = main(["--config", str(tiny_config), f"run_dir={tmp_path / 'run'}", "logging.tensorboard=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_CONFIG and len(err) == 1, err
    assert "logging.tensorboard" in err[0] and "pip install 'megamor[tensorboard]'" in err[0], err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, key", [("logging.depth_hist_every=0", "logging.depth_hist_every"),
                                           ("logging.depth_hist_csv=' '", "logging.depth_hist_csv")])
def test_bad_depth_log_keys_name_themselves(tiny_config, tmp_path, capsys, override, key):
    rc = main(["--config", str(tiny_config), f"run_dir={tmp_path / 'run'}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_CONFIG and len(err) == 1 and key in err[0], err
