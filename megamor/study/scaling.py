"""The report of a study with several budgets (a scaling study):

    report.md               the budgets; per variant and budget: validation loss, the paired
                            difference from the reference, how that difference changes from the
                            first budget (seed by seed), the slope of log loss on log FLOPs,
                            corr(depth, loss); then each budget's
                            own tables (megamor.study.report's)
    val_loss_vs_flops.png   final validation loss against the budget's FLOPs, one line per
                            variant (mean over seeds, bars: standard deviation)
    <budget>/               each budget's validation curves and depth plots
    results.json            every run's result (with its budget)
"""

from __future__ import annotations

import dataclasses
import math
from itertools import pairwise
from pathlib import Path
from typing import Any

from megamor.study.config import StudyBudgetConfig, StudyConfig, VariantConfig
from megamor.study.report import _cell, _num, _plots, count_label, paired_table, summarize, table
from megamor.utils.atomic import atomic_open, write_json

Results = list[dict[str, Any]]


def budget_view(study: StudyConfig, b: StudyBudgetConfig) -> StudyConfig:
    """The study as if it had only budget `b` (and the variants trained at it)."""
    return dataclasses.replace(study, budgets=[b], variants=study.budget_variants(b))


def _by_budget(study: StudyConfig, results: Results) -> dict[str, Results]:
    return {b.name: [r for r in results if r.get("budget") == b.name] for b in study.run_budgets()}


def _reference(study: StudyConfig) -> str:
    return study.reference or study.variants[0].name


def loss_table(study: StudyConfig, results: Results, key: str = "val_loss", fmt: str = "{:.4f}") -> str:
    """Rows: variants; columns: budgets; cells: mean ± sd over seeds (seeds done)."""
    by = _by_budget(study, results)
    budgets = study.run_budgets()
    lines = ["| variant | " + " | ".join(f"{b.name} ({_flops(b)})" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for v in study.variants:
        cells = []
        for b in budgets:
            if b.variants is not None and v.name not in b.variants:
                cells.append("not run")
                continue
            vals = [r.get(key) for r in by[b.name] if r["variant"] == v.name]
            m, sd = summarize(vals)
            n = sum(math.isfinite(_num(x)) for x in vals)
            cells.append(f"{_cell(fmt, m, sd, True)} (n={count_label(vals)})" if n else ("pending" if not vals else "–"))  # noqa: RUF001
        lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _variant_budgets(study: StudyConfig, v: VariantConfig) -> list[StudyBudgetConfig]:
    return [b for b in study.run_budgets() if b.variants is None or v.name in b.variants]


def _flops(b: StudyBudgetConfig) -> str:
    return f"{b.flops:.3g} FLOPs" if b.flops is not None else f"{b.tokens:,} tokens"


def paired_gaps(study: StudyConfig, results: Results, key: str = "val_loss") -> dict[tuple[str, str], dict[int, float]]:
    """{(budget, variant): {seed: variant minus reference}} for the seeds both have."""
    ref = _reference(study)
    val = {(r.get("budget"), r["variant"], r["seed"]): _num(r.get(key)) for r in results}
    out: dict[tuple[str, str], dict[int, float]] = {}
    for b in study.run_budgets():
        for v in study.budget_variants(b):
            if v.name == ref:
                continue
            gaps = {s: val[(b.name, v.name, s)] - val[(b.name, ref, s)] for s in study.seeds
                    if (b.name, v.name, s) in val and (b.name, ref, s) in val}
            gaps = {s: g for s, g in gaps.items() if math.isfinite(g)}
            if gaps:
                out[(b.name, v.name)] = gaps
    return out


def gap_table(study: StudyConfig, results: Results) -> str:
    """Per variant and budget: the paired difference from the reference (mean ± sd over seeds,
    lower in k/n seeds), and its change from one budget to the next and from the first budget to
    each later one, paired by seed (the same seed gives every budget the same data order; a seed
    missing at either budget is left out). Both changes, because the smallest budget is often
    the noisiest: the step between the two largest is what says whether a gap still grows."""
    ref = _reference(study)
    gaps = paired_gaps(study, results)
    budgets = [b.name for b in study.run_budgets()]
    changes = list(pairwise(budgets)) + [(budgets[0], b) for b in budgets[2:]]
    head = [f"{b}: {{v}} - {ref}" for b in budgets] + [f"{hi} minus {lo}" for lo, hi in changes]
    lines = ["| variant | " + " | ".join(h.format(v="variant") for h in head) + " |", "|---|" + "---:|" * len(head)]
    for v in study.variants:
        if v.name == ref:
            continue
        cells = []
        for b in budgets:
            g = gaps.get((b, v.name))
            if not g:
                cells.append("–")  # noqa: RUF001
                continue
            m, sd = summarize(list(g.values()))
            lower = sum(x < 0 for x in g.values())
            cells.append(f"{_cell('{:+.4f}', m, sd, True)} ({lower}/{len(g)} lower)")  # paired_gaps: finite ones only
        for lo, hi in changes:
            base, g = gaps.get((lo, v.name), {}), gaps.get((hi, v.name), {})
            both = sorted(set(base) & set(g))
            if not both:
                cells.append("–")  # noqa: RUF001
                continue
            m, sd = summarize([g[s] - base[s] for s in both])
            cells.append(f"{_cell('{:+.4f}', m, sd, True)} (n={count_label([g[s] - base[s] for s in both])})")
        if any(c != "–" for c in cells):  # noqa: RUF001
            lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _log_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(loss) on log(FLOPs): the local exponent b of loss ~ C^b."""
    xs = [math.log(c) for c, _ in points]
    ys = [math.log(loss) for _, loss in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else math.nan


def scaling_exponents(study: StudyConfig, results: Results) -> dict[str, dict[int, tuple[float, float]]]:
    """{variant: {seed: (its slope, the reference's slope over the same budgets)}} for the seeds
    that have finished every budget the variant runs at (a slope over fewer budgets measures a
    different stretch of a bending curve, so it is not mixed in). The reference's slope is nan
    where it lacks one of those runs. Variants run at fewer than two budgets have none."""
    ref = _reference(study)
    point = {(r.get("budget"), r["variant"], r["seed"]): (_num(r.get("flops")), _num(r.get("val_loss")))
             for r in results}
    point = {k: (c, loss) for k, (c, loss) in point.items() if c > 0 and loss > 0}  # nan compares False
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for v in study.variants:
        budgets = [b.name for b in _variant_budgets(study, v)]
        if len(budgets) < 2:
            continue
        slopes = {}
        for s in study.seeds:
            if all((b, v.name, s) in point for b in budgets):
                own = _log_slope([point[(b, v.name, s)] for b in budgets])
                have_ref = all((b, ref, s) in point for b in budgets)
                slopes[s] = (own, _log_slope([point[(b, ref, s)] for b in budgets]) if have_ref else math.nan)
        if slopes:
            out[v.name] = slopes
    return out


def exponent_table(study: StudyConfig, results: Results) -> str:
    """Per variant: the slope of log(validation loss) against log(FLOPs) over its budgets (mean ±
    sd over the seeds that finished all of them) and its difference from the reference's slope
    over the same budgets, paired by seed (negative: the loss falls faster with compute than
    the reference's, so the variant's lead grows or its deficit shrinks)."""
    ref = _reference(study)
    slopes = scaling_exponents(study, results)
    lines = [f"| variant | budgets | seeds | slope of log(loss) on log(FLOPs) | slope - {ref}'s, paired | steeper in |",
             "|---|---|---:|---:|---:|---:|"]
    for v in study.variants:
        if v.name not in slopes:
            continue
        per_seed = slopes[v.name]
        budgets = ", ".join(b.name for b in _variant_budgets(study, v))
        own = _cell("{:+.4f}", *summarize([o for o, _ in per_seed.values()]), True)
        diffs = [o - r for o, r in per_seed.values() if math.isfinite(r)]
        if v.name == ref:
            diff, steeper = "(reference)", ""
        elif diffs:
            diff, steeper = _cell("{:+.4f}", *summarize(diffs), True), f"{sum(d < 0 for d in diffs)}/{len(diffs)}"
        else:
            diff, steeper = "–", "–"  # noqa: RUF001
        lines.append(f"| {v.name} | {budgets} | {len(per_seed)} | {own} | {diff} | {steeper} |")
    if len(lines) == 2:
        return "No variant has finished runs at two or more budgets in the same seed yet.\n"
    return "\n".join(lines) + "\n"


def _means(study: StudyConfig, results: Results) -> dict[tuple[str, str], tuple[float, float]]:
    """{(budget, variant): (mean FLOPs, mean validation loss)} over the seeds done."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        if math.isfinite(_num(r.get("val_loss"))) and _num(r.get("flops")) > 0:
            runs.setdefault((r.get("budget"), r["variant"]), []).append(r)
    return {k: (summarize([r["flops"] for r in rs])[0], summarize([r["val_loss"] for r in rs])[0])
            for k, rs in runs.items()}


def _flops_to_reach(curve: list[tuple[float, float]], loss: float) -> tuple[float, bool]:
    """(FLOPs at which `curve`, piecewise linear in log FLOPs, reaches `loss`; whether that lies
    outside the curve, extrapolated along its end segment). nan where that segment does not fall."""
    i = next((k for k in range(len(curve) - 1) if curve[k + 1][1] <= loss), len(curve) - 2)
    (c0, l0), (c1, l1) = curve[i], curve[i + 1]
    if not l1 < l0:
        return math.nan, False
    at = math.exp(math.log(c0) + (l0 - loss) / (l0 - l1) * (math.log(c1) - math.log(c0)))
    return at, not curve[-1][1] <= loss <= curve[0][1]


def compute_multipliers(study: StudyConfig, results: Results) -> dict[tuple[str, str], tuple[float, bool]]:
    """{(budget, variant): (the FLOPs at which the variant's mean loss curve over its budgets
    reaches the reference's mean loss at that budget, over the variant's FLOPs there; whether
    that point is extrapolated)}: how much compute the variant needs to match the reference
    (above 1: more, below 1: less)."""
    ref = _reference(study)
    means = _means(study, results)
    out: dict[tuple[str, str], tuple[float, bool]] = {}
    for v in study.variants:
        budgets = [b.name for b in _variant_budgets(study, v) if (b.name, v.name) in means]
        if v.name == ref or len(budgets) < 2:
            continue
        curve = sorted(means[(b, v.name)] for b in budgets)
        for b in budgets:
            if (b, ref) in means:
                at, extrapolated = _flops_to_reach(curve, means[(b, ref)][1])
                out[(b, v.name)] = (at / means[(b, v.name)][0], extrapolated)
    return out


def multiplier_table(study: StudyConfig, results: Results) -> str:
    """Rows: variants; columns: budgets; cells: compute_multipliers' ratio."""
    mult = compute_multipliers(study, results)
    budgets = [b.name for b in study.run_budgets()]
    lines = ["| variant | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for v in study.variants:
        if not any((b, v.name) in mult for b in budgets):
            continue
        cells = []
        for b in budgets:
            m, extrapolated = mult.get((b, v.name), (math.nan, False))
            cells.append("–" if not math.isfinite(m) else f"{m:.2f}x" + (" (extrapolated)" if extrapolated else ""))  # noqa: RUF001
        lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return "No variant other than the reference has results at two or more budgets yet.\n"
    return "\n".join(lines) + "\n"


CORR_AT = (0.1, 0.25, 0.5, 0.75, 1.0)  # fractions of a run at which its logged corr(depth, loss) is read


def corr_over_training_table(study: StudyConfig, results: Results) -> str:
    """Per routed variant and budget: the trainer's validation corr(depth, loss) at fractions
    of the run (the logged validation nearest each, mean ± sd over seeds)."""
    lines = ["| variant | budget | seeds | " + " | ".join(f"{f:.0%} of training" for f in CORR_AT) + " |",
             "|---|---|---:|" + "---:|" * len(CORR_AT)]
    for b in study.run_budgets():
        for v in study.budget_variants(b):
            curves = [r["corr_curve"] for r in results if r.get("budget") == b.name and r["variant"] == v.name
                      and any(math.isfinite(_num(c)) for _, c in r.get("corr_curve") or [])]
            if not curves:
                continue
            total = b.flops if b.flops is not None else max(x for c in curves for x, _ in c)
            cells = []
            for f in CORR_AT:
                at = [min(c, key=lambda xy, f=f: abs(xy[0] / total - f))[1] for c in curves]
                cells.append(_cell("{:+.3f}", *summarize(at), True))
            lines.append(f"| {v.name} | {b.name} | {len(curves)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "No routed run has a logged corr(depth, loss) yet.\n"


def budgets_table(study: StudyConfig, results: Results, pending: list[str]) -> str:
    by = _by_budget(study, results)
    lines = ["| budget | FLOPs per run | overrides | variants | runs done | pending |", "|---|---:|---|---|---:|---:|"]
    for b in study.run_budgets():
        names = [v.name for v in study.budget_variants(b)]
        n_pending = sum(p.split("@", 1)[-1].rsplit("-s", 1)[0] == b.name for p in pending)
        lines.append(f"| {b.name} | {_flops(b)} ({study.flops_label}) | {' '.join(f'`{o}`' for o in b.overrides) or '–'} | "  # noqa: RUF001
                     f"{', '.join(names)} | {len(by[b.name])} | {n_pending} |")
    return "\n".join(lines) + "\n"


def scaling_plot(study: StudyConfig, results: Results, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by_budget(study, results)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, v in enumerate(study.variants):
        xs, ys, es, ns = [], [], [], []
        for b in study.run_budgets():
            rs = [r for r in by[b.name] if r["variant"] == v.name and math.isfinite(_num(r.get("val_loss")))]
            if not rs:
                continue
            m, sd = summarize([r["val_loss"] for r in rs])
            xs.append(summarize([r["flops"] for r in rs])[0])
            ys.append(m)
            es.append(sd if math.isfinite(sd) else 0.0)
            ns.append(len(rs))
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, color=f"C{i % 10}",
                        label=f"{v.name} (seeds: {'/'.join(map(str, ns))})")
    ax.set_xscale("log")
    ax.set_xlabel(f"FLOPs per run ({study.flops_label})")
    ax.set_ylabel("final validation loss (top-k routing)")
    ax.set_title(f"{study.name}: mean over seeds, bars: standard deviation", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_scaling_report(study: StudyConfig, results: Results, pending: list[str], command: str) -> Path:
    out = study.report_path
    out.mkdir(parents=True, exist_ok=True)
    ref = _reference(study)
    by = _by_budget(study, results)
    text = [f"# Study `{study.name}`", "",
            (f"Budgets (each run trains until it has spent its budget's FLOPs); seeds {list(study.seeds)}; `±` is the "
            "standard deviation over the seeds done (n); validation loss on the same windows for every run of a budget "
            "(top-k routing, training's)."), "", f"Command: `{command}`", "",
            budgets_table(study, results, pending), "",
            "## Validation loss (top-k) per budget", "", loss_table(study, results), "",
            f"## Paired differences from {ref}, per budget", "",
            (f"Each seed's difference from `{ref}` at the same budget, then mean ± standard deviation over seeds "
            "(negative: lower loss than the reference) and how many seeds it is lower in; the last columns: how that "
            "difference changes from one budget to the next and from the first, seed by seed (negative: the variant "
            "gains on the reference as the budget grows)."), "", gap_table(study, results), "",
            "## How fast the loss falls with compute", "",
            ("Each seed's least-squares slope of log(validation loss) against log(FLOPs) over the variant's budgets "
             "(loss ~ C^slope; over seeds that finished all of them), and its difference from the reference's slope over "
             "the same budgets in the same seed: negative means the variant's loss falls faster with compute."), "",
            exponent_table(study, results), "",
            f"### Compute to match {ref}", "",
            (f"The FLOPs at which a variant's loss, interpolated linearly in log FLOPs between the means of its "
             f"budgets, reaches `{ref}`'s mean loss at the budget, over the variant's FLOPs there: how much compute "
             "the variant needs to match the reference (extrapolated: beyond the variant's measured budgets, along "
             "its end segment)."), "", multiplier_table(study, results), "",
            "## corr(depth, loss) per budget", "",
            "Spearman correlation of a validation token's depth (causal routing) with its loss:", "",
            loss_table(study, results, "corr_depth_loss", "{:.3f}"), "",
            "### corr(depth, loss) during training", "",
            ("Pearson correlation of a validation token's depth with its loss, as the trainer logged it at each "
             "validation (causal routing, `eval.max_batches` batches), read at fractions of each run (the nearest "
             "validation): does depth follow difficulty more as a run trains?"), "",
            corr_over_training_table(study, results)]
    if results:
        text += ["", "![val_loss_vs_flops](val_loss_vs_flops.png)"]
    for b in study.run_budgets():
        view, rs = budget_view(study, b), by[b.name]
        text += ["", f"## Budget {b.name}: {_flops(b)} ({study.flops_label}) per run"
                 + (f"; {' '.join(f'`{o}`' for o in b.overrides)}" if b.overrides else ""), ""]
        if not rs:
            text += ["No run of this budget has finished."]
            continue
        text += [table(view, rs), "", paired_table(view, rs)]
        (out / b.name).mkdir(exist_ok=True)
        plots = _plots(view, rs, out / b.name)
        text += [""] + [f"![{b.name} {p.stem}]({b.name}/{p.name})" for p in plots]
    if pending:
        text += ["", f"Pending runs ({len(pending)}): {', '.join(pending)}"]
    if results:
        scaling_plot(study, results, out / "val_loss_vs_flops.png")
    with atomic_open(out / "report.md", "w") as f:
        f.write("\n".join(text) + "\n")
    write_json(out / "results.json", {"study": study.name, "results": results, "pending": pending})
    return out / "report.md"
