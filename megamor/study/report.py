"""The study's report: a markdown table (mean and spread over seeds per variant) and plots.

    report.md                 the table, the budget, the command, runs still pending
    val_loss_vs_flops.png     validation loss (top-k routing) against FLOPs, one line per run
    depth_histograms.png      share of validation tokens at each depth, per variant
    depth_vs_loss.png         mean depth against next-token loss, per variant
    results.json              every run's result
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megamor.study.config import StudyConfig
from megamor.utils.atomic import atomic_open, write_json

COLUMNS = [  # (header, result key, format)
    ("N_r", "num_recursions", "{:.0f}"),
    ("params (non-emb)", "params_non_embedding", "{:,.0f}"),
    ("tokens", "tokens", "{:,.0f}"),
    ("FLOPs", "flops", "{:.3g}"),
    ("val loss (top-k)", "val_loss", "{:.4f}"),
    ("val loss (causal)", "val_loss_causal", "{:.4f}"),
    ("few-shot avg", "fewshot_avg", "{:.4f}"),
    ("mean depth", "mean_depth", "{:.3f}"),
    ("router recall (min step)", "router_recall_min", "{:.3f}"),
    ("router precision (min step)", "router_precision_min", "{:.3f}"),
    ("corr(depth, loss)", "corr_depth_loss", "{:.3f}"),
    ("max \\|logit\\| (training)", "router_max_abs_logit_run", "{:.3g}"),
    ("saturated gates (last step)", "router_saturated_final", "{:.3f}"),
]
SPREAD = {"val_loss", "val_loss_causal", "fewshot_avg", "mean_depth", "router_recall_min", "router_precision_min",
          "corr_depth_loss", "router_max_abs_logit_run", "router_saturated_final"}


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def summarize(values: Sequence[Any]) -> tuple[float, float]:
    """(mean, sample standard deviation; nan with one seed) over the finite values."""
    xs = [v for v in (_num(x) for x in values) if math.isfinite(v)]
    if not xs:
        return math.nan, math.nan
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan)


# Student's t, 97.5th percentile, df 1..30 (two-sided 95%); beyond, the Cornish-Fisher expansion.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def ci95(values: Sequence[Any]) -> tuple[float, float]:
    """95% confidence interval of the mean over the finite values (t, n - 1 degrees of freedom):
    with paired differences, a study's "is it different" at a glance. nan with under two."""
    xs = [v for v in (_num(x) for x in values) if math.isfinite(v)]
    if len(xs) < 2:
        return math.nan, math.nan
    m, half = float(np.mean(xs)), t975(len(xs) - 1) * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))
    return m - half, m + half


def count_label(values: Sequence[Any]) -> str:
    """How many values a mean is over (the finite ones), with the non-finite ones dropped from it
    shown: "2 (+1 non-finite)". A missing value (None: not defined for the run) is not counted."""
    present = [_num(x) for x in values if x is not None]
    n = sum(math.isfinite(v) for v in present)
    bad = len(present) - n
    return f"{n} (+{bad} non-finite)" if bad else str(n)


def _cell(fmt: str, mean: float, sd: float, spread: bool) -> str:
    if not math.isfinite(mean):
        return "–"  # noqa: RUF001  en dash: the "no value" cell of the report
    s = fmt.format(mean)
    return f"{s} ± {fmt.replace('+', '').format(sd)}" if spread and math.isfinite(sd) else s


def table(study: StudyConfig, results: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    head = "| variant | seeds | " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(COLUMNS)]
    for v in study.variants:
        rs = by.get(v.name, [])
        if not rs:
            lines.append(f"| {v.name} | 0 |" + " pending |" * len(COLUMNS))
            continue
        cells = []
        for _, k, fmt in COLUMNS:
            m, sd = summarize([r.get(k) for r in rs])
            cells.append(_cell(fmt, m, sd, k in SPREAD))
        count = count_label([r.get("val_loss") for r in rs])  # the runs the loss means are over
        lines.append(f"| {v.name} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PAIRED = [("val loss (top-k)", "val_loss"), ("val loss (causal)", "val_loss_causal"), ("few-shot avg", "fewshot_avg")]


def paired_table(study: StudyConfig, results: list[dict[str, Any]]) -> str:
    """Each variant minus the reference variant, seed by seed (same seed: same data order and
    validation windows), then mean ± standard deviation of those differences, the 95% confidence
    interval of the top-k loss difference, and how many seeds the variant is lower (better loss) in."""
    ref = study.reference or study.variants[0].name
    val = {(r["variant"], r["seed"]): r for r in results}
    head = f"| variant - {ref} | seeds | " + " | ".join(h for h, _ in PAIRED) + " | 95% CI (top-k) | lower loss (top-k) in |"
    lines = [head, "|---|---:|" + "---:|" * (len(PAIRED) + 2)]
    for v in study.variants:
        if v.name == ref:
            continue
        seeds = [s for s in study.seeds if (v.name, s) in val and (ref, s) in val]
        if not seeds:
            continue
        cells = []
        for _, k in PAIRED:
            diffs = [_num(val[(v.name, s)].get(k)) - _num(val[(ref, s)].get(k)) for s in seeds]
            m, sd = summarize(diffs)
            cells.append(_cell("{:+.4f}", m, sd, True))
        loss_diffs = [_num(val[(v.name, s)].get("val_loss")) - _num(val[(ref, s)].get("val_loss")) for s in seeds]
        lower = sum(d < 0 for d in loss_diffs)  # nan: neither lower nor counted
        n = sum(math.isfinite(d) for d in loss_diffs)
        lo, hi = ci95(loss_diffs)
        cells.append(f"[{lo:+.4f}, {hi:+.4f}]" if math.isfinite(lo) else "–")  # noqa: RUF001  en dash: no value
        lines.append(f"| {v.name} | {count_label(loss_diffs)} | " + " | ".join(cells) + f" | {lower}/{n} |")
    return "\n".join(lines) + "\n"


def _plots(study: StudyConfig, results: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colours = {v.name: f"C{i % 10}" for i, v in enumerate(study.variants)}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in sorted(results, key=lambda r: (r["variant"], r["seed"])):
        curve = r.get("val_curve") or []
        if curve:
            xs, ys = zip(*curve)
            first = r["seed"] == min(x["seed"] for x in results if x["variant"] == r["variant"])
            ax.plot(xs, ys, marker="o", ms=3, color=colours.get(r["variant"]), label=r["variant"] if first else None)
    ax.set_xlabel(f"FLOPs ({study.flops_label})")
    ax.set_ylabel("validation loss (top-k routing)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "val_loss_vs_flops.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    routed = [v.name for v in study.variants if any(r["variant"] == v.name and r.get("depth_counts") for r in results)]
    if routed:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        width = 0.8 / len(routed)
        for i, name in enumerate(routed):
            rs = [r for r in results if r["variant"] == name and r.get("depth_counts")]
            counts = np.sum([np.asarray(r["depth_counts"], dtype=float) for r in rs], axis=0)
            share = counts / max(1.0, counts.sum())
            a1.bar(np.arange(len(share)) + (i - (len(routed) - 1) / 2) * width, share, width, label=name, color=colours[name])
            bins = rs[0].get("depth_loss_bins") or []
            if bins:
                a2.plot([(b["lo"] + b["hi"]) / 2 for b in bins], [b["mean_depth"] for b in bins], marker="o",
                        color=colours[name], label=f"{name} (rho {rs[0].get('corr_depth_loss', math.nan):.2f})")
        a1.set_xlabel("recursion depth")
        a1.set_xticks(range(max(len(r.get("depth_counts") or []) for r in results)))
        a1.set_ylabel("share of validation tokens")
        a1.legend(fontsize=7)
        a2.set_xlabel("next-token loss (nats)")
        a2.set_ylabel("mean depth")
        a2.grid(alpha=0.3)
        a2.legend(fontsize=7)
        a1.set_title("depth histogram (causal routing)", fontsize=9)
        a2.set_title("depth against token loss (first seed)", fontsize=9)
        fig.tight_layout()
        written.append(out / "depth.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(study: StudyConfig, results: list[dict[str, Any]], pending: list[str], command: str) -> Path:
    """The report of a one-budget study; megamor.study.scaling writes that of several budgets
    (it builds on this module's tables, so the caller, megamor.study.__main__, picks one)."""
    if study.budgets:
        raise ValueError(f"study {study.name} has {len(study.budgets)} budgets: use megamor.study.scaling.write_scaling_report")
    out = study.report_path
    out.mkdir(parents=True, exist_ok=True)
    b = study.budget
    budget = f"{b.flops:.3g} FLOPs ({study.flops_label}) per run" if b.flops is not None else f"{b.tokens:,} tokens per run"
    text = [f"# Study `{study.name}`", "", (
            f"Budget: {budget}; seeds {list(study.seeds)}; `±` is the standard "
            "deviation over seeds. Validation loss on the same windows with top-k routing (training's) and causal "
            "routing (evaluation's); router recall/precision: the causal choice against top-k, worst routed step; "
            "corr(depth, loss): Spearman over validation tokens, causal routing; max |logit|: the largest router "
            "logit of any step logged in training; saturated gates: share of candidates with sigmoid within 1e-3 of "
            "0 or 1 at the last logged step (worst recursion step)."), "",
            f"Command: `{command}`", "", table(study, results)]
    if len(study.variants) > 1 and results:
        note = ("Paired by seed (each seed's difference from the reference variant, then mean ± standard deviation "
                "over seeds, and the 95% confidence interval of the mean top-k difference (Student's t); negative: "
                "lower than the reference; an interval holding 0: no difference shown at this many seeds):")
        text += ["", note, "", paired_table(study, results)]
    learned = [r for r in sorted(results, key=lambda r: (r["variant"], r["seed"])) if r.get("gate_scales")]
    if learned:
        text += ["", "Learned gate scales at the end of training (router.learn_alpha; recursion steps 1, 2, ...):", ""]
        text += [f"- {r['run']}: " + " / ".join(f"{a:.3f}" for a in r["gate_scales"]) for r in learned]
    thresholds = [r for r in sorted(results, key=lambda r: (r["variant"], r["seed"])) if r.get("causal_thresholds")]
    if thresholds:
        note = ("Causal thresholds at the end of training (a logit per routed step; 0 is sigmoid 0.5, the fixed "
                "rule; router.learn_threshold tracks training's top-k boundary):")
        text += ["", note, ""]
        text += [f"- {r['run']}: " + " / ".join(f"{a:+.2f}" for a in r["causal_thresholds"]) for r in thresholds]
    if pending:
        text += ["", f"Pending runs: {', '.join(pending)}"]
    plots = _plots(study, results, out) if results else []
    text += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    with atomic_open(out / "report.md", "w") as f:
        f.write("\n".join(text) + "\n")
    write_json(out / "results.json", {"study": study.name, "results": results, "pending": pending})
    return out / "report.md"
