"""Few-shot scoring: tasks -> (context, continuation) requests -> log-likelihoods -> metrics.

    from megamor.eval.harness import evaluate, markdown_table
    results = evaluate(scorer, tokenizer, ["hellaswag", "piqa"], num_fewshot=0, limit=100)

Conventions (the same as lm-eval with our adapter, so the two agree exactly):
- a request's tokens are [prefix] + encode(context) + continuation tokens, where the
  continuation tokens are encode(context + continuation) minus the context's tokens, after
  moving the context's trailing whitespace into the continuation; `prefix` is the EOS id
  ("start of a document": training text is documents separated by EOS);
- acc: argmax of the summed log-likelihoods; acc_norm: argmax of log-likelihood divided by
  the choice's length in characters (lm-eval's acc_norm); acc_bytes: divided by its UTF-8
  length in bytes (lm-eval's acc_bytes; equal to acc_norm on ASCII choices);
- k-shot examples are drawn with a seed from the task's few-shot file, or from the eval set
  without the doc itself; each doc's draw depends only on (seed, task, doc index), so a
  `limit` or the order of evaluation never changes which shots a doc gets.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EvalInputError
from .metrics import argmax_first, mean, mean_stderr, perplexity_of_mean_ll, perplexity_stderr
from .paper import routing_label
from .scoring import ContinuationTooLong, Scorer, model_max_length
from .tasks import Doc, Task, get_task
from .tokenizer import EvalTokenizer


def encode_pair(tok: EvalTokenizer, context: str, continuation: str, prefix_id: int | None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lm-eval's boundary rules (see module docstring)."""
    if context == "":  # lm-eval conditions on its prefix token then (hf: BOS, else EOT): every token is scored
        if prefix_id is None:
            bos = getattr(tok, "bos_id", -1)
            prefix_id = bos if bos is not None and bos >= 0 else tok.eos_id
        return [prefix_id], tok.encode(continuation)
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx) :]
    return ([prefix_id] + ctx if prefix_id is not None else ctx), cont


def fewshot_prefix(task: Task, doc_index: int, doc: Doc, pool: Sequence[Doc], k: int, seed: int, same_split: bool) -> str:
    if k <= 0:
        return ""
    rng = random.Random(f"{seed}:{task.name}:{doc_index}")
    candidates = [i for i in range(len(pool)) if not (same_split and pool[i]["_src"] == doc["_src"])]
    chosen = task.fewshot_choice(doc, pool, candidates, k, rng)
    if len(chosen) < k:
        raise EvalInputError(f"{task.name}: {k}-shot needs {k} examples, the few-shot pool has {len(chosen)}"
                             f"{' for ' + doc['_src'] if len(chosen) < len(candidates) else ''}: lower --num-fewshot")
    shots = [pool[i] for i in chosen]
    return "".join(task.fewshot_example(s) + task.fewshot_delimiter for s in shots)


@dataclass
class TaskResult:
    task: str
    n: int
    num_fewshot: int
    seed: int
    metrics: dict[str, float]
    seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    routing: str = "causal"  # the scorer's (megamor.eval.paper.ROUTINGS): "topk" is non-causal

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = {"task": self.task, "n": self.n, "num_fewshot": self.num_fewshot, "seed": self.seed, "metrics": self.metrics, "seconds": round(self.seconds, 3),
             "routing": routing_label(self.routing)}
        if with_samples:
            d["samples"] = self.samples
        return d


def score_docs(task: Task, docs: Sequence[Doc], prefixes: Sequence[str], lls: Sequence[tuple[float, bool]]) -> tuple[dict[str, list[float]], list[dict]]:
    """Per-doc metric values from the flat list of request results (in request order)."""
    per: dict[str, list[float]] = {m: [] for m in task.metrics}
    samples = []
    it = iter(lls)
    for doc, prefix in zip(docs, prefixes):
        res = [next(it) for _ in task.requests(doc, prefix)]
        lp = [r[0] for r in res]
        s: dict[str, Any] = {"src": doc["_src"], "loglikelihoods": lp}
        if task.kind == "loglikelihood":
            per["acc"].append(float(res[0][1]))
            per["perplexity"].append(lp[0])  # aggregated as exp(-mean)
            s.update(greedy=res[0][1])
        else:
            gold = task.doc_to_target(doc)
            pred = argmax_first(lp)
            s.update(gold=gold, pred=pred)
            if "acc" in per:
                per["acc"].append(float(pred == gold))
            if "acc_norm" in per or "acc_bytes" in per:
                choices = task.doc_to_choices(doc)
                if "acc_norm" in per:
                    per["acc_norm"].append(float(argmax_first([x / len(c) for x, c in zip(lp, choices)]) == gold))
                if "acc_bytes" in per:
                    per["acc_bytes"].append(float(argmax_first([x / len(c.encode("utf-8")) for x, c in zip(lp, choices)]) == gold))
        samples.append(s)
    return per, samples


def aggregate(per: dict[str, list[float]]) -> dict[str, float]:
    out = {}
    for m, xs in per.items():
        if m == "perplexity":
            out[m], out[m + "_stderr"] = perplexity_of_mean_ll(xs), perplexity_stderr(xs)
        else:
            out[m], out[m + "_stderr"] = mean(xs), mean_stderr(xs)
    return out


def evaluate_task(
    scorer: Scorer,
    tok: EvalTokenizer,
    task: Task | str,
    *,
    num_fewshot: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    data_dir: Path | None = None,
    add_prefix: bool = True,
    docs: Sequence[Doc] | None = None,
) -> TaskResult:
    task = get_task(task) if isinstance(task, str) else task
    t0 = time.perf_counter()
    all_docs = list(docs) if docs is not None else task.load(data_dir)
    eval_docs = all_docs[:limit] if limit is not None else all_docs
    pool = task.load_fewshot(data_dir) if num_fewshot > 0 else None
    same_split = pool is None
    pool = all_docs if pool is None else pool
    prefixes = [fewshot_prefix(task, i, d, pool, num_fewshot, seed, same_split) for i, d in enumerate(eval_docs)]
    prefix_id = tok.eos_id if add_prefix else None
    pairs, owner = [], []
    for d, p in zip(eval_docs, prefixes):
        for c, x in task.requests(d, p):
            pairs.append(encode_pair(tok, c, x, prefix_id))
            owner.append(d)
    try:
        lls = scorer.loglikelihood(pairs, desc=task.name)
    except ContinuationTooLong as e:
        raise EvalInputError(f"{task.name}: {owner[e.index]['_src']}: {e}; pass a larger --max-length (the model's "
                             f"max_seq_len is {model_max_length(scorer.model)}) or leave {task.name} out") from None
    per, samples = score_docs(task, eval_docs, prefixes, lls)
    return TaskResult(task.name, len(eval_docs), num_fewshot, seed, aggregate(per), time.perf_counter() - t0, samples,
                      routing=getattr(scorer, "routing", "causal"))


def evaluate(
    scorer: Scorer,
    tok: EvalTokenizer,
    tasks: Sequence[Task | str],
    *,
    num_fewshot: int | dict[str, int] = 0,
    seed: int = 1234,
    limit: int | None = None,
    data_dir: Path | None = None,
    add_prefix: bool = True,
) -> dict[str, TaskResult]:
    out = {}
    for t in tasks:
        task = get_task(t) if isinstance(t, str) else t
        k = num_fewshot.get(task.name, 0) if isinstance(num_fewshot, dict) else num_fewshot
        out[task.name] = evaluate_task(scorer, tok, task, num_fewshot=k, seed=seed, limit=limit, data_dir=data_dir, add_prefix=add_prefix)
    return out


def markdown_table(results: dict[str, TaskResult]) -> str:
    """One row per (task, metric); a routing column when any result is not causal."""
    labelled = any(r.routing != "causal" for r in results.values())
    lines = ["| task | n | shots | metric | value | ± stderr |" + (" routing |" if labelled else ""),
             "|---|---:|---:|---|---:|---:|" + ("---|" if labelled else "")]
    for name, r in results.items():
        for m in (k for k in r.metrics if not k.endswith("_stderr")):
            lines.append(f"| {name} | {r.n} | {r.num_fewshot} | {m} | {r.metrics[m]:.4f} | {r.metrics.get(m + '_stderr', float('nan')):.4f} |"
                         + (f" {routing_label(r.routing)} |" if labelled else ""))
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, TaskResult], out: Path, extra: dict | None = None, with_samples: bool = False) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"results": {k: v.to_dict(with_samples) for k, v in results.items()}, **(extra or {})}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(results))
