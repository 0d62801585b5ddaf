"""The study report's tables from given results (no training): mean ± spread over seeds, and
differences from the reference variant paired seed by seed."""

from __future__ import annotations

import math

import pytest

from megamor.study.config import StudyBudgetConfig, StudyConfig, VariantConfig
from megamor.study.report import paired_table, summarize, table


def _study(reference: str | None = None) -> StudyConfig:
    return StudyConfig(name="t", experiment="e.yaml", seeds=[1, 2, 3], reference=reference,
                       variants=[VariantConfig(name=n, model_config="m.yaml") for n in ("base", "a", "b")])


def _result(variant: str, seed: int, loss: float) -> dict:
    return {"run": f"{variant}-s{seed}", "variant": variant, "seed": seed, "val_loss": loss, "val_loss_causal": loss + 0.01}


# seed effects (+0.0, +0.3, -0.2) shared by every variant; "a" is 0.05 lower than base in every seed
SEED = {1: 0.0, 2: 0.3, 3: -0.2}
RESULTS = [_result(v, s, 5.0 + d + SEED[s]) for v, d in (("base", 0.0), ("a", -0.05), ("b", 0.02)) for s in SEED]


def test_paired_differences_cancel_the_seed_effect():
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in paired_table(_study(), RESULTS).splitlines()[2:]}
    assert set(rows) == {"a", "b"}  # the reference itself has no row
    assert "| -0.0500 ± 0.0000 | -0.0500 ± 0.0000 |" in rows["a"] and rows["a"].endswith("| 3/3 |")
    assert "| +0.0200 ± 0.0000 |" in rows["b"] and rows["b"].endswith("| 0/3 |")
    # unpaired, the seed effect swamps the 0.05: the spread over seeds is ~0.25
    m, sd = summarize([r["val_loss"] for r in RESULTS if r["variant"] == "a"])
    assert m == pytest.approx(4.9833, abs=1e-4) and sd > 0.2
    assert "4.9833 ± 0.2517" in table(_study(), RESULTS)


def test_paired_table_uses_the_named_reference_and_only_seeds_both_have():
    partial = [r for r in RESULTS if not (r["variant"] == "b" and r["seed"] == 3)]
    lines = paired_table(_study(reference="b"), partial).splitlines()
    assert lines[0].startswith("| variant - b |")
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in lines[2:]}
    assert set(rows) == {"base", "a"}
    assert "| 2 | -0.0200 ± 0.0000 |" in rows["base"]  # seeds 1 and 2 only
    assert "| 2 | -0.0700 ± 0.0000 |" in rows["a"]
    assert math.isnan(summarize([None, "x"])[0])


def test_every_table_row_has_as_many_cells_as_its_header():
    import re

    results = [{**r, "router_max_abs_logit_run": 12.0, "router_saturated_final": 0.01} for r in RESULTS]
    for text in (table(_study(), results), paired_table(_study(), results)):
        lines = text.strip().splitlines()
        cells = [len(re.findall(r"(?<!\\)\|", ln)) for ln in lines]  # unescaped pipes delimit cells
        assert len(set(cells)) == 1, lines


def test_gate_scales_are_read_from_the_model_and_listed_in_the_report(tmp_path):
    from megamor.model import MoRLM
    from megamor.model.config import ModelConfig, RouterConfig
    from megamor.study.report import write_report
    from megamor.study.run import gate_scales

    def model(learn: bool) -> MoRLM:
        return MoRLM(ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=64,
                                 max_seq_len=16, sharing="middle_cycle", num_recursions=2,
                                 router=RouterConfig(type="expert_choice", learn_alpha=learn)))

    learned = model(True)
    for r, a in zip(learned.routers, (0.3, 0.02)):
        r.scale.alpha.data.fill_(a)
    assert gate_scales(learned) == pytest.approx([0.3, 0.02])
    assert gate_scales(model(False)) is None
    study = _study()
    study.report_dir = str(tmp_path)
    study.budget.tokens = 1000
    results = [{**r, "gate_scales": [0.3, 0.02] if r["variant"] == "a" else None} for r in RESULTS]
    text = write_report(study, results, [], "cmd").read_text()
    assert "- a-s1: 0.300 / 0.020" in text and "base-s1:" not in text


def test_causal_thresholds_are_read_from_the_model_and_listed_in_the_report(tmp_path):
    from megamor.model import MoRLM
    from megamor.model.config import ModelConfig, RouterConfig
    from megamor.study.report import write_report
    from megamor.study.run import causal_thresholds

    m = MoRLM(ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=16,
                          sharing="middle_cycle", num_recursions=2, router=RouterConfig(type="expert_choice")))
    m.routers[1].threshold.fill_(-1.25)
    assert causal_thresholds(m) == [-1.25]  # routed steps only (step 1 runs every token)
    study = _study()
    study.report_dir = str(tmp_path)
    study.budget.tokens = 1000
    results = [{**r, "causal_thresholds": [-1.25] if r["variant"] == "b" else None} for r in RESULTS]
    text = write_report(study, results, [], "cmd").read_text()
    assert "- b-s2: -1.25" in text and "a-s1: -" not in text


@pytest.mark.parametrize("convention", ["exact", "paper"])
def test_the_report_names_the_flops_convention_of_its_budget(tmp_path, convention):
    from megamor.study.report import write_report
    from megamor.study.scaling import budgets_table

    study = _study()
    study.report_dir = str(tmp_path)
    study.budget.flops = 16.5e18
    study.flops.convention = convention
    text = write_report(study, RESULTS, [], "cmd").read_text()
    assert f"Budget: 1.65e+19 FLOPs (forward, {convention} convention) per run" in text
    several = StudyConfig(name="s", experiment="e.yaml", variants=study.variants, budgets=[StudyBudgetConfig(name="1x", flops=1e12)])
    several.flops.convention = convention
    assert f"| 1x | 1e+12 FLOPs (forward, {convention} convention) |" in budgets_table(several, [], [])


def test_non_finite_results_are_not_counted_but_shown():
    """Issue: summarize dropped a NaN loss from the mean while the tables counted it ("3" seeds
    over a mean of 2)."""
    from megamor.study.scaling import gap_table, loss_table

    bad = [{**r, "val_loss": math.nan} if (r["variant"], r["seed"]) == ("base", 3) else r for r in RESULTS]
    row = next(ln for ln in table(_study(), bad).splitlines() if ln.startswith("| base |"))
    assert row.startswith("| base | 2 (+1 non-finite) |")
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in paired_table(_study(), bad).splitlines()[2:]}
    assert rows["a"].startswith("| a | 2 (+1 non-finite) |") and rows["a"].endswith("| 2/2 |")

    scaling = StudyConfig(name="t", experiment="e.yaml", seeds=[1, 2, 3], budgets=[StudyBudgetConfig(name="1x", flops=1e12)],
                          variants=_study().variants)
    sbad = [{**r, "budget": "1x", "flops": 1e12} for r in bad]
    assert "(n=2 (+1 non-finite))" in loss_table(scaling, sbad)
    assert "(2/2 lower)" in gap_table(scaling, sbad)  # paired gaps hold the finite differences only


def test_paired_table_gives_the_95_percent_interval_of_the_loss_difference():
    """The interval is mean +- t(0.975, n-1) sd / sqrt(n), t checked against scipy's; one seed: none."""
    from scipy import stats

    from megamor.study.report import ci95, t975

    for df in (1, 2, 3, 7, 30, 31, 50, 200):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=2e-4), df
    diffs = {1: -0.05, 2: -0.02, 3: -0.11}  # "a" - base per seed
    noisy = [_result("base", s, 5.0 + SEED[s]) for s in SEED] + [_result("a", s, 5.0 + SEED[s] + d) for s, d in diffs.items()]
    xs = list(diffs.values())
    sd = stats.tstd(xs)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    lo, hi = ci95(xs)
    assert (lo, hi) == pytest.approx((sum(xs) / 3 - half, sum(xs) / 3 + half), abs=1e-4)  # t to 3 decimals
    row = paired_table(_study(), noisy).splitlines()[2]
    assert f"| [{lo:+.4f}, {hi:+.4f}] | 3/3 |" in row, row
    one = [r for r in noisy if r["seed"] == 1]
    assert "| – | 1/1 |" in paired_table(_study(), one).splitlines()[2]  # noqa: RUF001
