"""Downstream accuracy during training (`eval.tasks`): HellaSwag, ARC, ... at the eval cadence.

The same scoring as the offline harness (megamor.eval.harness: zero-shot, EOS prefix, its
request encoding and per-doc metrics, a Scorer with causal routing), on the first
`eval.task_limit` examples of each task. Example i goes to data-parallel rank i % dp; every
rank sums its per-example metric values and the sums are all-reduced over the DP group, so
`eval/<task>/acc` equals the single-process (and offline) number. The ranks of a TP group
score the same examples, as they read the same batches in validation.

ZeRO-3 with several data-parallel ranks scores a plain copy of the model (`plain_model`, built
once, outside any zero.Init, with no ZeRO hooks). ZeRO-3 gathers each module's parameters
collectively when the module runs, and causal routing skips a recursion step that no token of a
batch passes, so ranks scoring different examples on the engine's module would gather different
modules and hang. Instead, at each evaluation every rank re-partitions all parameters (the
engine's `empty_partition_cache`: validation's forwards leave different ones gathered on
different ranks, and GatheredParameters gathers only the partitioned ones), then gathers every
parameter, one `deepspeed.zero.GatheredParameters` at a time in the module's own order (the
same collectives on every rank; no modifier rank, so nothing is broadcast back), copies it into
the plain model and scores there without further collectives; the copies are dropped when the
evaluation ends. Memory: during an evaluation each rank holds one whole copy of the weights in
the engine's parameter dtype, on top of its ZeRO-3 shard.
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
                 dp_group: Any = None, print_fn: Callable[[str], None] = print,
                 plain_model: Callable[[], torch.nn.Module] | None = None, release_params: Callable[[], None] | None = None):
        """When `model` is ZeRO-3 partitioned over several DP ranks (see the module docstring):
        `plain_model` builds a hook-free module shaped like it (megamor.train.engine.plain_model) and
        `release_params` re-partitions every parameter (the engine's `empty_partition_cache`)."""
        self.cfg, self.model, self.device = cfg, model, device
        self._plain_factory, self._release, self._plain = plain_model, release_params, None
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
        if self.dp > 1 and zero3_partitioned(self.model):
            return self._run_on_plain_copy(t0)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self._run(self._shares, model, t0)
        finally:
            model.train(was_training)

    def _run_on_plain_copy(self, t0: float) -> dict[str, float]:
        if self._plain_factory is None or self._release is None:
            raise RuntimeError("eval.tasks under ZeRO-3 over several data-parallel ranks needs plain_model and "
                               "release_params")
        if self._plain is None:
            self._plain = self._plain_factory().eval()
        # Validation's forwards (causal routing runs different modules per rank) leave different
        # parameters gathered on different ranks; GatheredParameters gathers only the partitioned
        # ones, so without this the ranks would issue different collectives and hang.
        self._release()
        fill_from_zero3(self._plain, self.model, self.dp_group)
        try:
            assert self._shares is not None
            return self._run(self._shares, self._plain, t0)
        finally:
            drop_weights(self._plain)

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



def zero3_partitioned(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has taken the model's parameters over (they carry a ds_id)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@torch.no_grad()
def fill_from_zero3(plain: torch.nn.Module, model: torch.nn.Module, dp_group: Any = None) -> None:
    """Copy a ZeRO-3 module's whole weights (and buffers) into `plain`, a hook-free module of the
    same structure. Collective: every rank of the ZeRO group must call it at the same point, with
    the same parameters partitioned (release them first). GatheredParameters gathers only the
    parameters that are not already whole on this rank, so the ranks first check that they agree
    on how many those are: a mismatch is an error here rather than a hang in the gathers."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    src, dst = dict(model.named_parameters()), dict(plain.named_parameters())
    if src.keys() != dst.keys():
        raise RuntimeError(f"the plain model's parameters differ from the engine's: {sorted(src.keys() ^ dst.keys())[:5]}")
    partitioned = sum(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in src.values())
    counts = torch.tensor([partitioned, -partitioned], dtype=torch.float64, device=next(iter(src.values())).device)
    pdist.all_reduce_(counts, op=torch.distributed.ReduceOp.MAX, group=dp_group)
    if counts[0].item() != -counts[1].item():
        raise RuntimeError(f"ZeRO-3 ranks disagree on which parameters are gathered ({partitioned} partitioned here, "
                           f"{int(-counts[1].item())}..{int(counts[0].item())} over the group): cannot copy them")
    for name, p in src.items():  # the module's registration order: the same on every rank
        with deepspeed.zero.GatheredParameters([p]):  # no modifier_rank: nothing is broadcast back
            dst[name].data = p.data.detach().clone()
    plain_buffers = dict(plain.named_buffers())
    for name, b in model.named_buffers():  # ZeRO-3 leaves buffers whole (router thresholds, RoPE)
        plain_buffers[name].data = b.detach().clone()  # its dtype too (a bf16 engine casts some)


def drop_weights(plain: torch.nn.Module) -> None:
    """Free the plain copy's weights between evaluations (the next one fills them again)."""
    for p in plain.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
