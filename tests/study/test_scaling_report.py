"""The report of a study with several budgets: per-budget paired differences and their change
from the first budget, checked against numbers computed here. A real tiny two-budget study, its
report built from its own runs, is trained in tests/study/test_study_runs.py (by two study
processes sharing its runs)."""

from __future__ import annotations

import math

import pytest

from megamor.study.config import StudyBudgetConfig, StudyConfig, VariantConfig
from megamor.study.scaling import (
    budgets_table,
    compute_multipliers,
    corr_over_training_table,
    exponent_table,
    gap_table,
    loss_table,
    multiplier_table,
    paired_gaps,
    scaling_exponents,
)


def _study() -> StudyConfig:
    return StudyConfig(name="t", experiment="e.yaml", seeds=[1, 2, 3], reference="ref",
                       budgets=[StudyBudgetConfig(name="1x", flops=1e12),
                                StudyBudgetConfig(name="3x", flops=3e12, overrides=["model.d_model=256"]),
                                StudyBudgetConfig(name="9x", flops=9e12, variants=["ref", "a"])],
                       variants=[VariantConfig(name=n, model_config="m.yaml") for n in ("ref", "a", "b")])


SEED = {1: 0.0, 2: 0.3, 3: -0.2}  # what a seed does to every variant alike
LEVEL = {"1x": 5.0, "3x": 4.5, "9x": 4.0}
# "a" is 0.05 below ref at 1x, 0.15 at 3x, 0.30 at 9x (its gap grows); "b" +0.02 at 1x and 3x
GAP = {("1x", "a"): -0.05, ("3x", "a"): -0.15, ("9x", "a"): -0.30, ("1x", "b"): 0.02, ("3x", "b"): 0.02,
       ("1x", "ref"): 0.0, ("3x", "ref"): 0.0, ("9x", "ref"): 0.0}


def _results(skip: set[tuple[str, str, int]] = frozenset()) -> list[dict]:
    return [{"run": f"{v}@{b}-s{s}", "budget": b, "variant": v, "seed": s, "flops": LEVEL[b] * 1e12,
             "val_loss": LEVEL[b] + g + SEED[s]} for (b, v), g in GAP.items() for s in SEED if (b, v, s) not in skip]


def _row(text: str, name: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_paired_gaps_per_budget_and_their_change_from_the_first_budget():
    study = _study()
    gaps = paired_gaps(study, _results())
    assert gaps[("9x", "a")] == pytest.approx({1: -0.30, 2: -0.30, 3: -0.30})
    assert ("9x", "b") not in gaps and ("1x", "ref") not in gaps
    a = _row(gap_table(study, _results()), "a")
    # 1x, 3x, 9x gaps, then 3x minus 1x, 9x minus 3x and 9x minus 1x, seed by seed
    table = gap_table(study, _results())
    assert "| 3x minus 1x | 9x minus 3x | 9x minus 1x |" in table
    assert a == ["-0.0500 ± 0.0000 (3/3 lower)", "-0.1500 ± 0.0000 (3/3 lower)", "-0.3000 ± 0.0000 (3/3 lower)",
                 "-0.1000 ± 0.0000 (n=3)", "-0.1500 ± 0.0000 (n=3)", "-0.2500 ± 0.0000 (n=3)"]
    assert _row(table, "b") == ["+0.0200 ± 0.0000 (0/3 lower)"] * 2 + ["–", "+0.0000 ± 0.0000 (n=3)", "–", "–"]  # noqa: RUF001


def test_a_seed_missing_at_one_budget_is_left_out_of_the_change_only_there():
    study = _study()
    results = _results(skip={("3x", "ref", 2)})  # seed 2 of the reference at 3x not finished
    a = _row(gap_table(study, results), "a")
    assert a[1] == "-0.1500 ± 0.0000 (2/2 lower)" and a[3] == "-0.1000 ± 0.0000 (n=2)"
    assert a[4] == "-0.1500 ± 0.0000 (n=2)" and a[5].endswith("(n=3)")  # 9x minus 3x lacks seed 2; 9x minus 1x has it
    cells = _row(loss_table(study, results), "ref")
    assert cells[1] == "4.4000 ± 0.1414 (n=2)"  # seeds 1 and 3: 4.5 and 4.3
    assert _row(loss_table(study, results), "b")[2] == "not run"
    pending = ["ref@3x-s2"]
    row = _row(budgets_table(study, results, pending), "3x")
    assert row[-2:] == ["8", "1"] and "`model.d_model=256`" in row


def test_the_slope_of_log_loss_on_log_flops_is_fitted_per_seed_and_paired_with_the_reference():
    study = _study()
    exponent = {"ref": -0.10, "a": -0.15, "b": -0.08}  # loss = A x seed factor x C^exponent
    seed_factor = {1: 1.0, 2: 1.1, 3: 0.95}
    flops = {"1x": 1e12, "3x": 3e12, "9x": 9e12}
    results = [{"budget": b, "variant": v, "seed": s, "flops": flops[b] * (1.0 + 0.01 * s),
                "val_loss": 5.0 * seed_factor[s] * (flops[b] * (1.0 + 0.01 * s) / 1e12) ** exponent[v]}
               for v in exponent for b in flops for s in seed_factor if not (v == "b" and b == "9x")]
    slopes = scaling_exponents(study, results)
    for v, e in exponent.items():  # a pure power law: every seed's slope is its exponent, however the seed shifts it
        assert [o for o, _ in slopes[v].values()] == pytest.approx([e] * 3)
        assert [r for _, r in slopes[v].values()] == pytest.approx([exponent["ref"]] * 3)
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]]
            for ln in exponent_table(study, results).splitlines()[2:]}
    assert rows["ref"] == ["1x, 3x, 9x", "3", "-0.1000 ± 0.0000", "(reference)", ""]
    assert rows["a"] == ["1x, 3x, 9x", "3", "-0.1500 ± 0.0000", "-0.0500 ± 0.0000", "3/3"]
    assert rows["b"] == ["1x, 3x", "3", "-0.0800 ± 0.0000", "+0.0200 ± 0.0000", "0/3"]  # b is not run at 9x

    # a seed missing one of a variant's budgets is left out of that variant (and of the pairing)
    gone = [r for r in results if (r["budget"], r["variant"], r["seed"]) not in {("9x", "a", 2), ("3x", "ref", 3)}]
    slopes = scaling_exponents(study, gone)
    assert sorted(slopes["a"]) == [1, 3] and sorted(slopes["ref"]) == [1, 2]
    assert slopes["a"][3][1] != slopes["a"][3][1]  # nan: the reference lacks 3x in seed 3
    row = next(ln for ln in exponent_table(study, gone).splitlines() if ln.startswith("| a |"))
    assert row.split("|")[3].strip() == "2" and row.split("|")[5].strip() == "-0.0500" and row.split("|")[6].strip() == "1/1"
    assert "No variant" in exponent_table(study, [r for r in results if r["budget"] == "1x"])


def test_compute_to_match_the_reference_interpolates_each_variant_in_log_flops():
    study = _study()
    # loss falls 0.3 per 3x of FLOPs (straight in log FLOPs); "a" sits 0.2 above ref at every budget, so it needs
    # 3^(0.2/0.3) = 2.08x ref's FLOPs; "b" (1x and 3x only) 0.15 below: 3^(-0.5) = 0.577x
    offset = {"ref": 0.0, "a": 0.2, "b": -0.15}
    flops = {"1x": 1e12, "3x": 3e12, "9x": 9e12}
    results = [{"budget": bud, "variant": v, "seed": s, "flops": c,
                "val_loss": 5.0 - 0.3 * math.log(c / 1e12, 3) + offset[v] + 0.01 * (s - 2)}
               for v in offset for bud, c in flops.items() for s in (1, 2, 3) if not (v == "b" and bud == "9x")]
    mult = compute_multipliers(study, results)
    assert set(mult) == {(bud, "a") for bud in flops} | {("1x", "b"), ("3x", "b")}
    for bud in flops:
        assert mult[(bud, "a")][0] == pytest.approx(3 ** (2 / 3))
        assert mult[(bud, "a")][1] == (bud == "9x")  # a reaches ref's 9x loss only past its own 9x point
    assert mult[("1x", "b")] == (pytest.approx(3 ** -0.5), True) and mult[("3x", "b")] == (pytest.approx(3 ** -0.5), False)
    assert _row(multiplier_table(study, results), "a") == ["2.08x", "2.08x", "2.08x (extrapolated)"]
    assert _row(multiplier_table(study, results), "b") == ["0.58x (extrapolated)", "0.58x", "–"]  # noqa: RUF001

    # a curve that does not fall where it must be read gives no number
    flat = [r for r in results if r["variant"] != "a"] + [
        {"budget": bud, "variant": "a", "seed": 1, "flops": c, "val_loss": 5.0} for bud, c in flops.items()]
    assert _row(multiplier_table(study, flat), "a") == ["–", "–", "–"]  # noqa: RUF001
    assert "No variant" in multiplier_table(study, [r for r in results if r["budget"] == "1x"])


def test_corr_over_training_is_read_at_fractions_of_each_run():
    study = _study()
    logged = (0.1, 0.2, 0.27, 0.5, 0.74, 1.0)  # fractions of the run with a validation: 25% reads 0.27, 75% 0.74

    def curve(flops: float, slope: float) -> list[list[float]]:  # corr = slope x fraction of the run
        return [[flops * f, slope * f] for f in logged]
    results = [{"budget": "1x", "variant": "a", "seed": s, "corr_curve": curve(1e12, 0.1 * s)} for s in (1, 2, 3)]
    results += [{"budget": "3x", "variant": "a", "seed": 1, "corr_curve": curve(3e12, 0.5)},
                {"budget": "1x", "variant": "ref", "seed": 1, "corr_curve": []},  # not routed: no row
                {"budget": "3x", "variant": "b", "seed": 1, "corr_curve": [[1e12, float("nan")]]}]
    text = corr_over_training_table(study, results)
    rows = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): [c.strip() for c in ln.strip("|").split("|")[2:]]
            for ln in text.splitlines()[2:]}
    assert set(rows) == {("a", "1x"), ("a", "3x")}
    # 1x: the seeds' slopes 0.1, 0.2, 0.3: mean 0.2 x fraction, sd 0.1 x fraction
    assert rows[("a", "1x")] == ["3", "+0.020 ± 0.010", "+0.054 ± 0.027", "+0.100 ± 0.050", "+0.148 ± 0.074",
                                 "+0.200 ± 0.100"]
    assert rows[("a", "3x")] == ["1", "+0.050", "+0.135", "+0.250", "+0.370", "+0.500"]  # fractions of 3x's own FLOPs
    assert "No routed run" in corr_over_training_table(study, [])
