"""`python -m megamor.eval.depth_log`: CSV and plot from metrics.jsonl or a depth CSV; bad input
is one line, exit 2. (Against a real run's metrics.jsonl: tests/train/test_logging_sinks_run.py.)"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from megamor.cli import run_main
from megamor.eval.depth_log import TOOL, main
from megamor.train.depth_csv import read_csv, write_csv


def png_ok(path) -> bool:
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG" and im.size[0] > 100


def write_metrics(run, rows) -> None:
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_csv_and_plot_from_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, [{"step": 5, "train/loss": 3.0, "router/depth_hist/counts": [10, 20, 30]},
                        {"step": 5, "val/loss": 3.1},
                        {"step": 10, "train/loss": 2.9, "router/depth_hist/counts": [5, 5, 50]}])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 15, "router/depth_h')  # a torn last line (a killed writer)
    assert main([str(run), "--csv", str(tmp_path / "d.csv")]) == 0
    assert read_csv(tmp_path / "d.csv") == {5: [10.0, 20.0, 30.0], 10: [5.0, 5.0, 50.0]}
    assert (tmp_path / "d.csv").read_text().splitlines()[1:4] == ["5,0,10,0.166667", "5,1,20,0.333333", "5,2,30,0.500000"]
    assert png_ok(run / "depth_hist.png")
    assert "2 histograms (steps 5..10, depths 0..2)" in capsys.readouterr().out


def test_plot_from_a_depth_csv(tmp_path):
    write_csv(tmp_path / "depth.csv", [(1, [1, 2]), (2, [2, 1]), (3, [0, 3])])
    assert main([str(tmp_path / "depth.csv"), "--plot", str(tmp_path / "p" / "out.png")]) == 0
    assert png_ok(tmp_path / "p" / "out.png")


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing", ["missing", "no such run folder"]),
    (lambda d: d, ["no metrics.jsonl"]),
    (lambda d: write_metrics(d / "dense", [{"step": 1, "train/loss": 3.0}]) or d / "dense", ["no depth histograms"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, make, words):
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main([str(make(tmp_path))]), tool=TOOL, results_on_stdout=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"{TOOL}: error: ") and all(w in err[0] for w in words), err
