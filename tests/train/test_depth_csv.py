"""The depth-histogram CSV sink in-process: the cadence, a resume that cuts the file back (no
duplicate rows, a torn last line dropped), and the reader."""

from __future__ import annotations

import torch

from megamor.train.depth_csv import HEADER, DepthCsvSink, cut_back_csv, read_csv


def run(path, start: int, steps: range, every: int, max_steps: int, kill: bool = False) -> None:
    sink = DepthCsvSink(path, lambda s: s % every == 0 or s == max_steps, start)
    for s in steps:
        sink.on_step(s, None if s == 3 else torch.tensor([float(s), 1.0, 2.0]))  # step 3: skipped
    if not kill:
        sink.close()


def test_rows_sum_the_steps_since_the_previous_rows(tmp_path):
    path = tmp_path / "d.csv"
    run(path, 0, range(1, 8), every=2, max_steps=7)
    text = path.read_text()
    assert text.startswith(HEADER) and text.count(HEADER) == 1
    assert read_csv(path) == {2: [3.0, 2.0, 4.0], 4: [4.0, 1.0, 2.0], 6: [11.0, 2.0, 4.0], 7: [7.0, 1.0, 2.0]}
    assert "6,0,11,0.647059\n" in text


def test_resume_cuts_back_to_the_checkpoint_no_duplicate_rows(tmp_path):
    path = tmp_path / "d.csv"
    run(path, 0, range(1, 8), every=1, max_steps=10, kill=True)  # killed after step 7; checkpoint at 4
    with open(path, "a") as f:
        f.write("8,0,3")  # a torn row group
    run(path, 4, range(5, 11), every=1, max_steps=10)
    lines = path.read_text().splitlines()
    assert lines[0] + "\n" == HEADER and lines.count(lines[0]) == 1
    steps = [int(line.split(",")[0]) for line in lines[1:]]
    assert steps == [s for s in range(1, 11) if s != 3 for _ in range(3)]
    assert not list(tmp_path.glob(".*tmp*"))  # the cut-back's temp file renamed


def test_cut_back_keeps_a_file_that_needs_nothing_cut(tmp_path):
    path = tmp_path / "d.csv"
    run(path, 0, range(1, 3), every=1, max_steps=2)
    before = path.read_text()
    assert cut_back_csv(path, 2) == 0 and path.read_text() == before
    assert cut_back_csv(path, 1) == 3 and read_csv(path) == {1: [1.0, 1.0, 2.0]}
