"""notebooks/: the committed notebooks are stripped and match their sources; the quickstart runs
top to bottom in a real Jupyter kernel and produces what it says it does."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import nbformat
import pytest

from megamor.env import repo_root

NOTEBOOKS = repo_root() / "notebooks"
QUICKSTART = NOTEBOOKS / "quickstart.ipynb"


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_notebook_is_valid_and_stripped():
    nb = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for c in code:
        assert c.outputs == [], f"{c.id} has outputs"
        assert c.execution_count is None, f"{c.id} has an execution count"
    assert not any(c.cell_type == "markdown" and "attachments" in c for c in nb.cells)


def test_committed_notebook_matches_its_source():
    build = _build_module()
    for name in build.SOURCES:
        target, text = build.build(NOTEBOOKS / name)
        assert target.read_text() == text, f"{target.name} is stale: run python notebooks/build.py"
    assert build.main(["--check"]) == 0


def test_build_parses_cells(tmp_path):
    build = _build_module()
    src = tmp_path / "nb.py"
    src.write_text("# header, not a cell\n\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\nprint(x)\n\n# %%\n")
    assert build.parse(src) == [("markdown", "# Title\n\ntext"), ("code", "x = 1\n\nprint(x)"), ("code", "")]
    assert build.main([str(src)]) == 0
    nb = nbformat.read(tmp_path / "nb.ipynb", as_version=4)
    assert [c.id for c in nb.cells] == ["cell-0", "cell-1", "cell-2"]
    assert build.main([str(src), "--check"]) == 0
    src.write_text(src.read_text() + "y = 2\n")
    assert build.main([str(src), "--check"]) == 1


@pytest.mark.parametrize("body, line, message", [
    ("# %%\nx = 1\n# %% [raw]\nraw\n", 3, "unknown cell kind [raw]"),
    ("# %% [markdown]\n# fine\nnot a comment\n", 3, "must be '# ' comments"),
    ("x = 1\n", 1, "no cells"),
])
def test_build_rejects_bad_source_in_one_line(tmp_path, capsys, body, line, message):
    build = _build_module()
    src = tmp_path / "bad.py"
    src.write_text(body)
    assert build.main([str(src)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src}:{line}: " in err and message in err, err
    assert not (tmp_path / "bad.ipynb").exists()


# Read by the kernel after the notebook's last cell: what the notebook computed.
PROBE = """
import json, sys
print("PROBE " + json.dumps({
    "val_before": val_before, "val_after": val_after, "losses": losses, "num_recursions": cfg.num_recursions,
    "samples": [[list(ids), list(depths)] for ids, depths in samples],
    "prompt_ids": prompt_ids, "gen_tokens": gen.tokens, "torch_file": torch.__file__, "megamor_file": __import__("megamor").__file__,
}))
"""


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _has_image(cell) -> bool:
    return any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in cell.outputs)


@pytest.mark.launch
def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    """Starts a Jupyter kernel (a process) and runs every cell: data, a tiny MoR model trained
    40 steps, decoding with per-token depths, two plots (~40 s on 2 cores)."""
    from nbclient import NotebookClient

    out = tmp_path / "quickstart"
    # The kernel inherits the environment: this checkout's megamor, the inline plot backend.
    monkeypatch.setenv("MEGAMOR_QUICKSTART_DIR", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(repo_root()), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(QUICKSTART, as_version=4)
    n_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [c for c in nb.cells[:n_cells] if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    probe = json.loads(_text(nb.cells[-1]).split("PROBE ", 1)[1])
    assert probe["megamor_file"].startswith(str(repo_root())), probe["megamor_file"]

    # Data written where asked, nothing in the repository.
    assert (out / "data" / "shards" / "manifest.json").is_file()
    # Training learned: the causal-routing validation loss and the training loss went down.
    assert probe["val_after"] < probe["val_before"] - 1.0, (probe["val_before"], probe["val_after"])
    losses = probe["losses"]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    train_cell = next(c for c in code if "validation_loss(model)" in c.source)
    assert "validation loss (causal routing)" in _text(train_cell)

    # Decoding: one depth per shown token, each in 0..N_r, and the recursion really varies.
    n_rec = probe["num_recursions"]
    assert n_rec == 3
    all_depths = []
    for (ids, depths), prompt, new in zip(probe["samples"], probe["prompt_ids"], probe["gen_tokens"]):
        assert ids[: len(prompt) - 1] == prompt[1:] and len(ids) == len(depths)
        assert len(prompt) - 1 + len(new) - 1 <= len(ids) <= len(prompt) - 1 + len(new)
        all_depths += depths
    assert all(0 <= d <= n_rec for d in all_depths)
    assert len(set(all_depths)) > 1, all_depths
    decode_cell = next(c for c in code if "generate(model" in c.source)
    shown = re.findall(r"""['"]:(\d+)(?= |$)""", _text(decode_cell), re.MULTILINE)  # each token printed as 'piece':depth
    assert sorted(map(int, shown)) == sorted(all_depths)

    # Both plots came out as images: the loss curve and the depth histogram + coloured tokens.
    plots = [c for c in code if _has_image(c)]
    assert len(plots) == 2, [c.source[:40] for c in plots]
    assert "depth histogram" in plots[1].source


def test_the_train_command_the_quickstart_suggests_loads():
    """The `python -m megamor.train` line the notebook gives loads as an experiment (demo.yaml
    alone refuses: it has no data paths)."""
    import shlex

    from megamor.train.__main__ import parse_args
    from megamor.train.config import load_experiment

    text = (NOTEBOOKS / "quickstart.py").read_text().replace("\\\n#", " ")
    commands = re.findall(r"python -m megamor\.train ([^`\n]+)", text)
    assert commands
    for line in commands:
        args = parse_args(shlex.split(line))
        assert load_experiment([repo_root() / c for c in args.config], args.overrides).data.train
