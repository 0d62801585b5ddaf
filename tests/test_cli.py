"""Every command-line entry point (evals/*.py, data_prep/*.py, every `python -m megamor.X`), found
by walking the repository so a new one is covered: a bad argument is one line starting with the
tool's name, exit 2, no traceback. And megamor.cli's stdout handling for machine-readable output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from megamor.env import repo_root

MAIN_GUARD = 'if __name__ == "__main__":'


def entry_points() -> list[tuple[str, list[str]]]:
    """(tool name, command) of every script and module with a __main__ block."""
    root = repo_root()
    found = []
    for folder in ("evals", "data_prep"):
        for f in sorted((root / folder).glob("*.py")):
            if MAIN_GUARD in f.read_text():
                found.append((f.name, [sys.executable, str(f)]))
    for f in sorted((root / "megamor").rglob("*.py")):
        if f.name == "__main__.py" or MAIN_GUARD in f.read_text():
            parts = f.relative_to(root).with_suffix("").parts
            module = ".".join(parts[:-1] if f.name == "__main__.py" else parts)
            found.append((module, [sys.executable, "-m", module]))
    return found


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo_root()), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def problems(tool: str, r: subprocess.CompletedProcess) -> str | None:
    lines = r.stderr.strip().splitlines()
    if r.returncode != 2:
        return f"{tool}: exit {r.returncode}, not 2: {r.stderr[-500:]!r}"
    if len(lines) != 1 or not lines[0].startswith(f"{tool}: ") or "Traceback" in r.stderr:
        return f"{tool}: not one line starting with '{tool}: ': {r.stderr[-500:]!r}"
    return None


def test_the_walk_finds_every_kind_of_entry_point():
    names = {name for name, _ in entry_points()}
    assert {"fewshot.py", "perplexity.py", "train_tokenizer.py", "megamor.train", "megamor.plan", "megamor.study",
            "megamor.convert", "megamor.export", "megamor.config_doc", "megamor.runs.safe_universal"} <= names


@pytest.mark.launch  # runs megamor.train/demo/study with a bad flag (they stop in argument parsing; ~90 s in all)
def test_every_entry_point_answers_a_bad_argument_in_one_line_exit_2():
    points = entry_points()
    with ThreadPoolExecutor(max_workers=4) as pool:  # each fails before loading anything heavy
        results = list(pool.map(lambda p: (p[0], run([*p[1], "--no-such-option-xyz"])), points))
    bad = [msg for tool, r in results if (msg := problems(tool, r))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("args, expected", [
    (["evals/fewshot.py", "--checkpoint", "x", "--tasks", "hellaswg"],
     "fewshot.py: error: --tasks: unknown task 'hellaswg'; did you mean hellaswag?"),
    (["evals/fewshot.py", "--checkpoint", "x", "--task-file", "piqa"], "fewshot.py: error: --task-file 'piqa': expected TASK=PATH"),
    (["evals/sweep.py", "runs/x", "--out", "o", "--tasks", "piqa,arc_esay"], "sweep.py: error: --tasks: unknown task 'arc_esay'"),
    (["evals/perplexity.py", "--checkpoint", "x", "--text", "no/such/file.txt"], "perplexity.py: error: no/such/file.txt: no such file (the text to evaluate is missing)"),
])
def test_known_bad_inputs_of_the_eval_tools(args, expected):
    r = run([sys.executable, *args])
    assert (r.returncode == 2 and r.stderr.strip() == expected) or r.stderr.startswith(expected), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_library_output_on_stdout_goes_to_stderr_and_results_stay_clean(tmp_path):
    """What a library prints (Python or C, straight to file descriptor 1) during a tool's run
    lands on stderr; only `results()` reaches stdout, so `tool > out.json` is valid JSON."""
    script = tmp_path / "tool.py"
    script.write_text(
        "import json, os, sys\n"
        "from megamor.cli import results, run_main\n"
        "def main():\n"
        "    print('[INFO] a library line without a newline', end='')\n"
        "    os.write(1, b'a C-level line\\n')\n"
        "    print(json.dumps({'ok': 1}), file=results())\n"
        "run_main(main)\n")
    r = run([sys.executable, str(script)])
    assert r.returncode == 0 and json.loads(r.stdout) == {"ok": 1}, (r.stdout, r.stderr)
    assert "a library line" in r.stderr and "a C-level line" in r.stderr


def test_use_colour_only_on_a_terminal(monkeypatch):
    import io

    from megamor.cli import use_colour

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(Tty()) and not use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(Tty())


def test_argument_errors_are_one_line_in_process(capsys):
    from megamor.cli import ArgumentParser

    p = ArgumentParser(prog="python -m megamor.something")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megamor.something: error: argument --n: invalid int value")
