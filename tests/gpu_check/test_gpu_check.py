"""`python -m megamor.gpu_check --tiny` as CI runs it: a real process per part, the real models,
the markdown and JSON reports read back.

One tiny run serves two tests: every part and check is present, the parity checks pass (CUDA-only
ones are skipped with their reason), and a part given a time limit it cannot meet (train_1_7b,
0.5 s: less than importing torch takes) is cut, reported as timed out, and the part after it
still runs. The compile parity part uses the aot_eager backend here (dynamo + AOTAutograd, no
code generation): inductor on the CPU is exercised by tests/train/test_compile.py, and its
cold compile alone would take this test's whole CI minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megamor.env import repo_root
from megamor.gpu_check.parts import PARTS

CUT = "train_1_7b"  # cut by its time limit; "decode" runs after it
CUDA_ONLY = ("flash-attn vs sdpa logits", "CUDA-graph static engine", "CUDA-graph depth-wise engine")


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megamor.gpu_check", *args], cwd=repo_root(), env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.md"
    proc = _run(["--tiny", "--compile-backend", "aot_eager", "--limit", f"{CUT}=0.5", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text(), json.loads(out.with_suffix(".json").read_text())


@pytest.mark.launch
def test_tiny_run_reports_every_part_and_parity_passes(tiny):
    text, res = tiny
    parts = {p["part"]: p for p in res["parts"]}
    assert list(parts) == [p.name for p in PARTS]
    for name, p in parts.items():
        if name != CUT:  # "ok" also means the part wrote exactly the checks parts.py lists
            assert (p["outcome"], p["note"]) == ("ok", "ok"), p
    recs = [r for r in res["records"] if r["kind"] in ("parity", "speed")]
    expected = [n for p in PARTS for n in p.names(False)]
    assert sorted(r["name"] for r in recs) == sorted(expected)  # each check once
    parity = [r for r in recs if r["kind"] == "parity"]
    for r in parity:
        if r["name"].startswith(CUDA_ONLY):
            assert r["status"] == "skipped" and "CUDA" in r["note"], r
        else:
            assert r["status"] == "pass", r
    assert sum(r["status"] == "pass" for r in parity) == 13  # 3 compiled-vs-eager, 6 + 2 depth-wise engine, 1 docmask, 1 bf16
    for r in recs:
        if r["kind"] == "speed" and r["part"] != CUT:
            assert r["status"] == "n/a on CPU" and r["figure"] and r["target"].startswith((">=", "<=")), r
    # The markdown carries every check with its figure and target, and says where it ran.
    for r in recs:
        assert r["name"] in text and r["target"] in text
    assert "- device: CPU" in text and "- commit: " in text and "--tiny" in text and "**PASS** (exit 0)" in text
    mfu = [r for r in res["records"] if r["kind"] == "measure" and "mfu" in r["data"]]
    assert mfu and all(0 < r["data"]["mfu"] <= 1 for r in mfu)


@pytest.mark.launch
def test_part_over_its_limit_is_cut_and_the_run_goes_on(tiny):
    text, res = tiny
    parts = {p["part"]: p for p in res["parts"]}
    assert parts[CUT]["outcome"] == "timed out" and parts[CUT]["note"] == "timed out after 0.5 s"
    cut = [r for r in res["records"] if r["part"] == CUT]
    assert {r["name"] for r in cut} == set(PARTS[[p.name for p in PARTS].index(CUT)].names(False))
    assert all(r["status"] == "timed out" and r["note"] == "timed out after 0.5 s" for r in cut)
    assert parts["decode"]["outcome"] == "ok"  # the next part ran
    assert "| train_1_7b | speed | timed out |" in text


@pytest.mark.launch
def test_a_parity_part_cut_fails_the_run(tmp_path):
    out = tmp_path / "r.md"
    proc = _run(["--tiny", "--only", "flash", "--limit", "flash=0.3", "--out", str(out)], timeout=120)
    assert proc.returncode == 1, proc.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["status"] for r in res["records"]] == ["timed out", "timed out"]
    assert "**FAIL** (exit 1)" in out.read_text()


@pytest.mark.parametrize("args,says", [
    (["--only", "flash,nope"], "--only: unknown part 'nope'"),
    (["--limit", "flash=abc"], "seconds must be a positive number"),
    (["--limit", "nope=3"], "expected PART=SECONDS"),
    (["--out", "report.txt"], "give a .md path"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, args, says):
    """In-process (the exit code of `python -m megamor.gpu_check` itself: tests/test_cli.py's walk)."""
    from megamor.gpu_check.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["--tiny", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("megamor.gpu_check: error: ") and says in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, no report.txt


def test_part_limits_take_unused_time_but_never_the_later_parts_or_past_the_budget():
    from megamor.gpu_check.runner import part_limit

    assert part_limit(60, left=470, later=410, fixed=False) == 60  # on schedule: its own limit
    assert part_limit(60, left=500, later=410, fixed=False) == 90  # earlier parts finished early
    assert part_limit(60, left=500, later=410, fixed=True) == 60  # --limit: exactly that
    assert part_limit(60, left=440, later=410, fixed=False) == 60  # behind: later parts squeezed, not this one
    assert part_limit(60, left=40, later=0, fixed=False) == 40  # never past the run's budget
    # The GPU limits fit the 9 minutes the whole run may take.
    assert sum(p.limit_gpu for p in PARTS) <= 9 * 60 - 10
