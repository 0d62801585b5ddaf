"""The bytes a forward pass keeps for its backward pass, measured with saved-tensor hooks.

    with SavedTensorMeter(exclude=model) as m:
        out = model(input_ids, targets=targets, return_logits=False)
    m.bytes        # activation bytes held between this forward and its backward

Every tensor autograd saves goes through the pack hook; the meter keeps a weak reference to
it and, when the context exits (after the forward, before the backward: the peak of what the
graph holds), adds up the storages still alive, each storage once (q, k and v as views of one
projection output count once; a view of a larger buffer counts the whole buffer, since that is
what stays allocated). Parameters are not activations: leaf tensors that require gradients and
any tensor sharing a storage with the excluded module's parameters or buffers are skipped.

Activation checkpointing (torch's non-reentrant `checkpoint`): the checkpoint saves its inputs
through the same hooks, and the tensors its region would save go to the checkpoint's own inner
hooks instead (they are recomputed in the backward), so the meter counts exactly what the
checkpointed forward keeps: the inputs of each checkpointed call plus what runs outside them.
The backward's transient recompute of one region is not part of this figure.

Device-independent (CPU, CUDA: it reads sizes and addresses, never values, so no host sync) and
cheap: one Python call per saved tensor. Meant to be switched on for one micro-batch per log
window. Tensors on the `meta` device have no addresses; the meter is for real tensors.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Self

import torch
from torch import Tensor, nn


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class SavedTensorMeter:
    """Context manager counting the live bytes saved for backward inside it (see the module
    docstring). After exit: `bytes` (int), `by_dtype` ({dtype name: bytes}), `tensors` (how many
    distinct live storages). `enabled=False` makes it a no-op with bytes 0."""

    def __init__(self, exclude: nn.Module | Iterable[Tensor] | None = None, enabled: bool = True):
        self.enabled = enabled
        self._exclude_src = exclude
        self._excluded: set[tuple[str, int]] = set()
        self._saved: list[weakref.ref[Tensor]] = []
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self.bytes = 0
        self.by_dtype: dict[str, int] = {}
        self.tensors = 0

    # -- hooks -----------------------------------------------------------------------------
    def _pack(self, t: Tensor) -> Tensor:
        if (t.is_leaf and t.requires_grad) or t.device.type == "meta" or _storage_key(t) in self._excluded:
            return t
        # A detached alias (same storage, no copy): autograd holds it exactly as long as it holds
        # the saved tensor, and, unlike the tensor itself, it has no grad_fn, so a saved output
        # does not hold its own graph in a reference cycle (a dropped graph is freed at once).
        alias = t.detach()
        self._saved.append(weakref.ref(alias))
        return alias

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> Self:
        if not self.enabled:
            return self
        src = self._exclude_src
        tensors: Iterable[Tensor] = ()
        if isinstance(src, nn.Module):
            tensors = [*src.parameters(), *src.buffers()]
        elif src is not None:
            tensors = list(src)
        self._excluded = {_storage_key(t) for t in tensors if t.device.type != "meta" and t.numel()}
        self._saved = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._hooks is None:
            return
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._tally()

    def _tally(self) -> None:
        storages: dict[tuple[str, int], tuple[int, str]] = {}
        for ref in self._saved:
            t = ref()
            if t is None:  # its graph was dropped during the forward: nothing holds it any more
                continue
            s = t.untyped_storage()
            storages[_storage_key(t)] = (s.nbytes(), str(t.dtype).removeprefix("torch."))
        self._saved = []
        by_dtype: dict[str, int] = defaultdict(int)
        for nbytes, dtype in storages.values():
            by_dtype[dtype] += nbytes
        self.by_dtype = dict(by_dtype)
        self.bytes = sum(by_dtype.values())
        self.tensors = len(storages)


class ActivationPeak:
    """The largest `SavedTensorMeter.bytes` of a log window, for `mem/activation_bytes`.

        peak = ActivationPeak()
        with peak.meter(model, measure=i == 0):   # one micro-batch per window is enough
            out = engine(...)
        record["mem/activation_bytes"] = peak.take()   # None when nothing was measured
    """

    def __init__(self) -> None:
        self._max: int | None = None

    def meter(self, exclude: nn.Module | None, measure: bool = True) -> SavedTensorMeter:
        m = _ReportingMeter(self, exclude, enabled=measure)
        return m

    def add(self, nbytes: int) -> None:
        self._max = nbytes if self._max is None else max(self._max, nbytes)

    def take(self) -> int | None:
        value, self._max = self._max, None
        return value


class _ReportingMeter(SavedTensorMeter):
    def __init__(self, peak: ActivationPeak, exclude: nn.Module | None, enabled: bool):
        super().__init__(exclude, enabled)
        self._peak = peak

    def __exit__(self, *exc: Any) -> None:
        active = self._hooks is not None
        super().__exit__(*exc)
        if active and exc[0] is None:
            self._peak.add(self.bytes)


def measure_forward(model: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, SavedTensorMeter]:
    """(output, meter) of one forward of `model` under a meter that excludes its parameters."""
    with SavedTensorMeter(exclude=model) as m:
        out = model(*args, **kwargs)
    return out, m
