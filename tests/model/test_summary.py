"""`python -m megamor.model.summary`: FLOPs per token in either convention, and tokens and steps at
a budget, for every paper config; bad input is one line and exit 2."""

from __future__ import annotations

import pytest

from megamor.model.summary import main

SIZES = ("135m", "360m", "730m", "1_7b")


def _rows(out: str) -> dict[str, list[str]]:
    return {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.split() and "/" in ln.split()[0]}


def test_paper_convention_prints_flops_tokens_and_steps_for_every_paper_config(capsys):
    assert main(["--convention", "paper", "--budget", "16.5e18"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    for size in SIZES:  # every paper size, every variant kind
        for v in ("vanilla", "recursive_3", "mor_expert_3", "mor_expert_3_paper", "mor_token_3"):
            assert f"{size}/{v}" in rows, (size, v)
    # the paper's 360M numbers: 833.6M FLOPs/token and 19.79B tokens (9,438 steps) for vanilla; 29.70B for MoR-3
    assert rows["360m/vanilla"][3:] == ["0.8336", "40960", "19.79B", "9438"]
    assert rows["360m/mor_expert_3"][-2:] == ["29.70B", "14160"]
    assert rows["360m/mor_expert_2"][-2:] == ["26.46B", "12619"]
    assert "paper convention" in out and "at 1.65e+19 forward FLOPs, 1024 x 2048 tokens per step" in out


def test_exact_stays_the_default(capsys):
    assert main(["configs/model/360m/vanilla.yaml"]) == 0
    out = capsys.readouterr().out
    assert _rows(out)["360m/vanilla"][3] == "0.8494"  # megamor's count: with the LM head, GQA's K/V at size
    assert "exact convention" in out and "tokens" not in out.splitlines()[0]


@pytest.mark.parametrize("argv,says", [
    (["--convention", "kaplan"], "--convention"),
    (["--budget", "-1"], "--budget"),
    (["configs/model/360m/nope.yaml"], "nope.yaml"),
    (["--seq-len", "0"], "--seq-len"),  # a division by zero, then nonsense when negative
    (["--seq-len", "-4"], "--seq-len"),
    (["--batch-size", "0", "--budget", "1e18"], "--batch-size"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, says):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith(("usage", " "))]
    assert len(err) == 1 and says in err[0], err
