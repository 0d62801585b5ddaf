"""Downstream accuracy during training (`eval.tasks`): HellaSwag, ARC, ... at the eval cadence.

The same scoring as the offline harness (megamor.eval.harness: zero-shot, EOS prefix, its
request encoding and per-doc metrics, a Scorer with causal routing), on the first
`eval.task_limit` examples of each task. Example i goes to data-parallel rank i % dp; every
rank sums its per-example metric values and the sums are all-reduced over the DP group, so
`eval/<task>/acc` equals the single-process (and offline) number. The ranks of a TP group
score the same examples, as they read the same batches in validation.

ZeRO-3 with several data-parallel ranks is refused at launch (preflight.check_task_files):
it gathers each module's parameters collectively when the module runs, and causal routing
skips a recursion step that no token of a batch passes, so ranks scoring different examples
gather different modules and hang (DeepSpeed's module trace, checked across ranks, drifts
apart the same way). Scoring a plain copy gathered once per evaluation is the likely way out;
a first try of it still hung and is not in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megamor.eval.harness import encode_pair, score_docs
from megamor.eval.scoring import Scorer, model_max_length
from megamor.eval.tasks import Doc, Task, get_task
from megamor.parallel import dist as pdist
from megamor.train.config import ExperimentConfig


@dataclass
class _Share:
    task: Task
    n_total: int  # examples over all ranks
    docs: list[Doc]  # this rank's
    pairs: list[tuple[list[int], list[int]]]  # their requests, encoded


class DownstreamEval:
    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module, device: torch.device, dp_rank: int, dp: int,
                 dp_group: Any = None, print_fn: Callable[[str], None] = print):
        self.cfg, self.model, self.device = cfg, model, device
        self.dp_rank, self.dp, self.dp_group, self.print = dp_rank, dp, dp_group, print_fn
        self._shares: list[_Share] | None = None  # read and encoded once, at the first eval

    def _prepare(self) -> list[_Share]:
        from megamor.eval.tokenizer import load_tokenizer

        tok = load_tokenizer(str(self.cfg.data.tokenizer))
        self.pad_id = tok.eos_id
        shares = []
        for name in self.cfg.eval.tasks:
            task = get_task(name)
            docs = task.load()[: self.cfg.eval.task_limit]
            mine = docs[self.dp_rank :: self.dp]
            pairs = [encode_pair(tok, c, x, tok.eos_id) for d in mine for c, x in task.requests(d, "")]
            shares.append(_Share(task, len(docs), mine, pairs))
        return shares

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        if not self.cfg.eval.tasks:
            return {}
        if self._shares is None:
            self._shares = self._prepare()
        t0 = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self._run(self._shares, model, t0)
        finally:
            model.train(was_training)

    def _run(self, shares: list[_Share], model: torch.nn.Module, t0: float) -> dict[str, float]:
        scorer = Scorer(model, batch_size=self.cfg.eval_micro_batch_size, max_length=model_max_length(model),
                        device=self.device, pad_id=self.pad_id)
        sums = []
        for s in shares:
            lls = scorer.loglikelihood(s.pairs, desc=s.task.name) if s.pairs else []
            per, _ = score_docs(s.task, s.docs, [""] * len(s.docs), lls)
            sums.append([math.fsum(per[m]) for m in s.task.metrics])
        flat = torch.tensor([x for row in sums for x in row], dtype=torch.float64, device=self.device)
        pdist.all_reduce_(flat, group=self.dp_group)
        results: dict[str, float] = {}
        values = iter(flat.tolist())
        for s in shares:
            for m in s.task.metrics:
                mean = next(values) / max(s.n_total, 1)
                results[f"eval/{s.task.name}/{m}"] = math.exp(-mean) if m == "perplexity" else mean
        seconds = time.perf_counter() - t0
        n = sum(s.n_total for s in shares)
        results["eval/downstream_seconds"] = seconds
        results["eval/downstream_examples"] = float(n)
        self.print(f"downstream eval: {n} examples ({', '.join(f'{s.task.name} {s.n_total}' for s in shares)}) "
                   f"in {seconds:.1f}s over {self.dp} rank(s)")
        return results

