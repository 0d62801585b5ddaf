"""Evaluate one trained run: what the study table and plots need.

- validation loss with top-k routing (training's) and with causal routing (evaluation and
  decoding's), on the same windows;
- router agreement per routed step: precision / recall of the causal choice (sigmoid >
  threshold) against the top-k selection, on the top-k pass;
- depth analysis of the validation tokens under causal routing (megamor.eval.depth): depth
  histogram, depth against next-token loss, Spearman correlation of depth and loss;
- few-shot accuracy (megamor.eval.harness) on local task files, `fewshot_limit` examples each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from megamor.config import ConfigError
from megamor.data.loader import build_eval_batches
from megamor.data.tokenizer import TokenizerMismatchError
from megamor.env import shared_data_dir
from megamor.eval.depth import DepthTrace, depth_statistics, write_depth_plots
from megamor.eval.harness import evaluate
from megamor.eval.identity import check_identity
from megamor.eval.paper import column_values, suite_average
from megamor.eval.scoring import Scorer
from megamor.eval.tasks import expand_suites
from megamor.eval.tokenizer import load_tokenizer
from megamor.model.routing import precision_recall, trace_agreement
from megamor.runs.load import trained_tokenizer_hash
from megamor.runs.tags import newest_complete
from megamor.study.config import StudyEvalConfig
from megamor.train.config import ExperimentConfig


def check_run_identity(exp: ExperimentConfig) -> None:
    """The tokenizer and validation shards of `exp` (what validation and few-shot use) are the
    ones its run's newest checkpoint was trained with: the evaluation entry points' check
    (megamor.eval.identity). A study's config may point at re-prepared data since; ConfigError."""
    ref = newest_complete(exp.run_dir)
    meta = {"tokenizer_hash": trained_tokenizer_hash(ref)} if ref is not None else {}
    tok = load_tokenizer(exp.data.tokenizer) if exp.data.tokenizer else None
    try:
        check_identity(meta, exp.run_dir, tok, exp.data.valid, flag=None)
    except TokenizerMismatchError as e:
        raise ConfigError("data", str(e)) from None


@torch.no_grad()
def validation(model: torch.nn.Module, exp: ExperimentConfig, ev: StudyEvalConfig) -> tuple[dict[str, Any], DepthTrace]:
    """Validation on exp.data; first checks that data and tokenizer against the run's (check_run_identity)."""
    check_run_identity(exp)
    cfg = model.cfg
    nr = len(model.steps)
    is_ec = cfg.router.type == "expert_choice"
    sums = {"topk": [0.0, 0], "causal": [0.0, 0]}
    agree: dict[int, torch.Tensor] = {}
    depths, losses, ids = [], [], []
    model.eval()
    model.record_router = is_ec
    try:
        for batch in build_eval_batches(exp.data, batch_size=ev.val_batch_size, max_batches=ev.val_max_batches):
            x, y = batch["input_ids"], batch["targets"]
            kw = {"position_ids": batch.get("position_ids"), "doc_ids": batch.get("doc_ids")}
            mask = y != -100
            modes = (("topk", False), ("causal", True)) if is_ec else (("causal", True),)  # others are causal already
            for mode, causal in modes:
                out = model(x, **kw, causal_routing=causal)
                tok_loss = F.cross_entropy(out.logits.float().transpose(1, 2), y, ignore_index=-100, reduction="none")
                sums[mode][0] += float(tok_loss[mask].sum())
                sums[mode][1] += int(mask.sum())
                if not causal:
                    for r, c in trace_agreement(model.routers, out.stats.get("router_trace", [])).items():
                        agree[r] = agree.get(r, torch.zeros(3, dtype=torch.float64)) + c
                else:
                    depths.append(out.stats.depth[mask].numpy())
                    losses.append(tok_loss[mask].double().numpy())
                    ids.append(x[mask].numpy())
    finally:
        model.record_router = False
    if not is_ec:
        sums["topk"] = sums["causal"]
    res: dict[str, Any] = {"val_loss": sums["topk"][0] / max(1, sums["topk"][1]),
                           "val_tokens": sums["topk"][1]}
    res["val_loss_causal"] = sums["causal"][0] / max(1, sums["causal"][1]) if is_ec else res["val_loss"]
    steps = []
    for r in sorted(agree):
        p, rec = precision_recall(agree[r])
        steps.append({"step": r + 1, "precision": p, "recall": rec, "causal_tokens": int(agree[r][1]), "topk_tokens": int(agree[r][2])})
    res["router_agreement"] = steps
    res["router_recall_min"] = min((s["recall"] for s in steps), default=float("nan"))
    res["router_precision_min"] = min((s["precision"] for s in steps), default=float("nan"))
    d = np.concatenate(depths) if depths else np.zeros(0, dtype=np.int64)
    trace = DepthTrace(np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64), [], d,
                       np.concatenate(losses) if losses else np.zeros(0), max(nr, 1))
    return res, trace


def depth_analysis(trace: DepthTrace, plots: Path | None) -> dict[str, Any]:
    if not len(trace.depth) or not trace.depth.any():  # vanilla: no recursion steps
        return {}
    stats = depth_statistics([trace])
    if plots is not None:
        write_depth_plots(stats, plots)
    return {"mean_depth": float(trace.depth.mean()), "depth_counts": stats.depth_counts,
            "corr_depth_loss": stats.corr_depth_loss, "corr_depth_logfreq": stats.corr_depth_logfreq,
            "depth_loss_bins": stats.loss_bins}


def fewshot(model: torch.nn.Module, tokenizer_dir: Path, ev: StudyEvalConfig) -> dict[str, Any]:
    if not ev.fewshot_tasks:
        return {}
    tok = load_tokenizer(tokenizer_dir)
    scorer = Scorer(model, batch_size=16, max_batch_tokens=8192, pad_id=tok.eos_id)
    data_dir = Path(ev.fewshot_data_dir) if ev.fewshot_data_dir else shared_data_dir()
    results = evaluate(scorer, tok, expand_suites(ev.fewshot_tasks), num_fewshot=ev.num_fewshot, limit=ev.fewshot_limit, data_dir=data_dir)
    # each task's metric as the paper's released eval (megamor.eval.paper); ARC counts once in the average
    per = {name: {**v, "n": results[name].n} for name, v in column_values(results).items()}
    return {"fewshot": per, "fewshot_avg": suite_average({k: v["value"] for k, v in per.items()})}
