"""oneDNN-packed weights for the engine's linears on a CPU.

At decoding batch sizes torch's default CPU linear (MKL sgemm on the plain [out, in] weight)
costs a large fixed part per call: on the 33m MLP shapes, 11 rows cost 0.66x of 32 rows where
the FLOPs are 0.34x, so the recursion steps that run few rows (MoR's deeper steps) save far less
than their FLOPs. oneDNN's linear on a weight packed once into its blocked layout costs 0.51x
and is faster at every size (evals/results/linear_rows.md; the rest is the weight read itself).

`PackedLinears(model).active()` is a context manager: inside it every `nn.Linear` of the model
(fp32 on a CPU, with at least `MIN_OUT` outputs: a router's 1-output linear is faster unpacked)
runs `torch.ops.mkldnn._linear_pointwise` on its packed weight. The same dot products are summed
in another order, so results differ in the last bits, as MKL's own results do between batch
sizes. A weight changed in place (an optimizer step) or replaced is repacked at its next call;
outside the context the modules are untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

MIN_OUT = 16  # narrower linears (routers) run faster on the plain kernel
BATCH_HINT = 32  # oneDNN picks its blocking for this many rows; it serves other counts as well


def available(model: nn.Module) -> bool:
    """A CPU fp32 model and a torch with oneDNN's linear ops."""
    w = next(model.parameters(), None)
    return (w is not None and w.device.type == "cpu" and w.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinears:
    def __init__(self, model: nn.Module, enabled: bool | None = None):
        """enabled: None = wherever `available(model)`; False = never."""
        self.enabled = available(model) if enabled is None else (enabled and available(model))
        # a linear whose forward someone already replaced (a wrapper, a hook by assignment) is left alone
        self.linears = [m for m in model.modules()
                        if isinstance(m, nn.Linear) and m.out_features >= MIN_OUT and "forward" not in m.__dict__]
        self.repacks = 0  # weights packed so far (each once unless changed)
        self._forwards = [self._packed_forward(m) for m in self.linears] if self.enabled else []

    def _packed_forward(self, lin: nn.Linear) -> Callable[[Tensor], Tensor]:
        state: dict = {"key": None, "w": None}

        def pack() -> Tensor:
            w = lin.weight
            key = (id(w), w.data_ptr(), w._version)  # in-place updates bump _version; a new weight changes id
            if state["key"] != key:
                with torch.no_grad():
                    state["w"] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), BATCH_HINT)
                state["key"] = key
                self.repacks += 1
            return state["w"]

        def forward(x: Tensor) -> Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, pack(), lin.bias, "none", [], "")

        pack()  # at construction: an engine packs once, not inside its first decoding steps
        return forward

    @contextmanager
    def active(self) -> Iterator[None]:
        if not self.enabled or torch.is_grad_enabled():  # packed ops have no backward
            yield
            return
        for lin, fwd in zip(self.linears, self._forwards):
            lin.forward = fwd  # type: ignore[method-assign]
        try:
            yield
        finally:
            for lin in self.linears:
                del lin.forward
