"""Validation loss during training: every validation folder, top-k and causal routing.

Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively):
a rank whose share of batches ran out repeats one and leaves it out of the sums. A stop
signal on any rank ends a long pass (StopRequested) so the trainer can save and exit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megamor.data.loader import build_eval_sets, iter_eval_batches
from megamor.parallel import dist as pdist
from megamor.train.callbacks.hooks import Callbacks
from megamor.train.config import ExperimentConfig
from megamor.train.router_eval import RouterValidation
from megamor.train.signals import StopRequested
from megamor.train.step import to_device


class Validation:
    def __init__(self, cfg: ExperimentConfig, engine: Any, layout: Any, device: torch.device, dp: int, rank: int,
                 callbacks: Callbacks, stop_agreed: Callable[[], bool]):
        self.cfg, self.engine, self.layout, self.device = cfg, engine, layout, device
        self.model = engine.module
        self.dp, self.rank, self.callbacks, self.stop_agreed = dp, rank, callbacks, stop_agreed

    def modes(self) -> list[tuple[str, bool]]:
        """(metric suffix, causal routing) of each pass over the data."""
        modes = [("", False)]
        if self.cfg.eval.causal_routing and self.cfg.model.router.type == "expert_choice":
            modes.append(("_causal", True))
        return modes

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        cfg = self.cfg
        if not cfg.data.valid:
            return {}
        self.engine.eval()
        try:
            results = self._run()
        finally:
            self.engine.train()
        return results

    def _run(self) -> dict[str, float]:
        cfg = self.cfg
        modes = self.modes()
        results: dict[str, float] = {}
        totals = {suffix: [0.0, 0.0] for suffix, _ in modes}
        router_val = RouterValidation(self.model, self.device)
        for idx, es in enumerate(build_eval_sets(cfg.data)):
            label = Path(es.name).name or f"valid{idx}"
            if len(cfg.data.valid) > 1:
                label = f"{idx}_{label}"
            for suffix, causal in modes:
                s, n = self._pass(es.dataset, causal, router_val)
                results[f"val/{label}/loss{suffix}"] = s / max(n, 1.0)
                totals[suffix][0] += s
                totals[suffix][1] += n
        for suffix, (s, n) in totals.items():
            results[f"val/loss{suffix}"] = s / max(n, 1.0)
        # Perplexity of the routing a decoder can run: expert choice's top-k pass sees later
        # tokens of the sequence, so its loss is not a language model's; the causal pass is.
        results["val/ppl"] = math.exp(min(results.get("val/loss_causal", results["val/loss"]), 50.0))
        results.update(router_val.results(group=self.layout.dp_group))
        return results

    def _pass(self, dataset: Any, causal: bool, router_val: RouterValidation) -> tuple[float, float]:
        """(sum of token losses, target tokens) of one validation folder, over the DP group."""
        cfg = self.cfg
        bs = cfg.eval_micro_batch_size
        n_batches = -(-len(dataset) // bs)
        if cfg.eval.max_batches is not None:
            n_batches = min(n_batches, cfg.eval.max_batches)
        rounds = -(-n_batches // self.dp)  # equal forward counts on every rank (ZeRO-3 gathers)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        it = iter_eval_batches(dataset, bs, cfg.eval.max_batches, self.layout.dp_rank, self.dp, cfg.data.document_masking)
        first = None
        router_val.start(causal)
        for _ in range(rounds):
            self.callbacks.before_eval_batch()  # fault injection's signal during validation
            if self.stop_agreed():  # a long validation pass yields to a stop signal
                raise StopRequested
            batch = next(it, None)
            real = batch is not None
            batch = batch if real else first
            if batch is None:  # this rank got no batch at all: any tokens will do
                batch = {"input_ids": torch.zeros(1, cfg.data.seq_len, dtype=torch.long),
                         "targets": torch.zeros(1, cfg.data.seq_len, dtype=torch.long)}
            first = first or batch
            b = to_device(batch, self.device)
            out = self.engine(b["input_ids"], targets=b["targets"], position_ids=b.get("position_ids"),
                              doc_ids=b.get("doc_ids"), causal_routing=causal,
                              return_logits=router_val.wants_logits(causal))
            if real:
                n = float((b["targets"] != -100).sum())
                sums += torch.tensor([float(out.loss) * n, n], dtype=torch.float64, device=self.device)
                router_val.update(out, b["targets"], causal)
        router_val.stop()
        pdist.all_reduce_(sums, group=self.layout.dp_group)  # a TP group's ranks saw the same batches
        s, n = sums.tolist()
        return s, n
