"""Activation bytes of one training micro-batch: what a forward of `MoRLM` saves for its backward.

Not a rule of thumb: the forward of megamor/model/mor.py is walked symbolically, every tensor
its operations save is entered under a name for its storage (so a tensor saved by two
operations counts once, exactly as `megamor.observe.activation_memory.SavedTensorMeter`
dedupes by storage), and the sum is the figure the meter measures after the forward, before
the backward. What each operation keeps (read from the model code, confirmed with the meter):

- RMSNorm: its input in fp32 (a new fp32 copy when the model runs in bf16; the input itself in
  fp32), the rsqrt [N, 1] fp32, the normalised tensor and the output (in the compute dtype);
- attention: RoPE's cos / sin (fp32 tables shared by every layer that sees the same tokens in
  fp32 runs; a compute-dtype copy per call in bf16), and what SDPA keeps: q, k, v (repeated to
  all query heads by the sdpa path under GQA; flash-attn keeps the KV heads), the output and
  the fp32 log-sum-exp [B, H, N];
  (with data.document_masking, the [B, 1, n, n] boolean mask and SDPA's copy of it);
- SwiGLU: gate, silu(gate), up and their product ([N, d_ff] each);
- recursion steps run on the routed tokens only: the gather's index, the gathered rows, the
  gated update (y - x) and the gate, the padding mask; expert choice keeps k_r = int(c_r T)
  tokens per row; token choice takes the lengths given (default: uniform depths, bucketed as
  the model buckets them, as megamor/model/flops.py assumes);
- routers: their input and a few [B, T] fp32 vectors (logits, sigmoid / softmax, BCE targets);
- the loss: the chunked cross-entropy keeps only its precomputed gradients, grad_h [N, D] and
  grad_w [V, D] fp32; the vocab-parallel one (TP > 1) keeps the fp32 softmax [N, V/TP] and h.

Activation checkpointing (torch non-reentrant, one region per layer application): a region
keeps only its input tensor; the routers, gathers, gates, final norm and loss outside it stay.
This is the forward's figure; the backward adds one region's recompute at a time
(`recompute_bytes`), which the fit check adds on top.

Eager layers: compiled ones (trainer.compile, on by default on CUDA) let the AOT partitioner
recompute cheap element-wise ops instead of saving them, so they keep less (19% less on a tiny
vanilla model with the aot_eager backend): for compiled runs the figure is an upper bound.

Tensor parallelism: q/k/v/out, the MLP and the logits are split over TP; norms, routers and the
residual stream are replicated unless sequence parallelism is on (megamor.parallel.sequence_parallel).
Then the norms' tensors, the residual slices, the gate and the update hold T/TP tokens: the
column-parallel projections keep their input's local slice and all-gather it again in the
backward (Megatron's rule), a routed step's take / put keep only the indices, and the slots are
padded to a multiple of TP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from megamor.model.config import ModelConfig
from megamor.model.mor import bucket_length
from megamor.model.routers import top_k_size

F32, I64, BOOL = 4, 8, 1


@dataclass
class ActivationSpec:
    """The shape of one micro-batch's forward on one rank."""

    micro_batch: int
    seq_len: int
    precision: str = "bf16"  # bf16 | fp32: the dtype DeepSpeed casts the model to
    checkpointing: bool = False
    tp: int = 1
    sequence_parallel: bool = False
    attention: str = "sdpa"  # sdpa (repeats KV heads under GQA) | flash (keeps KV heads)
    # Slots per row of every recursion step (the gathered length); None: expected routing.
    step_lengths: Sequence[int] | None = None
    document_masking: bool = False  # data.document_masking: attention takes a [B, 1, n, n] mask

    @property
    def width(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass
class _Saved:
    """Named storages and their bytes; a name entered twice counts once."""

    bytes_by_name: dict[str, float] = field(default_factory=dict)
    by_part: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, nbytes: float, part: str) -> None:
        if name in self.bytes_by_name:
            return
        self.bytes_by_name[name] = nbytes
        self.by_part[part] = self.by_part.get(part, 0.0) + nbytes

    @property
    def total(self) -> float:
        return sum(self.bytes_by_name.values())


def default_step_lengths(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Gathered slots per row at each recursion step under the planner's routing assumption:
    expert choice's k_r; token choice with uniform depths (bucketed like the model); all
    tokens without a router."""
    steps = cfg.layer_plan()[1]
    nr = len(steps)
    if cfg.router.type == "expert_choice":
        return [top_k_size(c, seq_len) for c in cfg.capacities]
    if cfg.router.type == "token_choice":
        return [seq_len if r == 0 else bucket_length(-(-seq_len * (nr - r) // nr), seq_len) for r in range(nr)]
    return [seq_len] * nr


def observed_step_lengths(cfg: ModelConfig, depth: Sequence[Sequence[int]] | object, seq_len: int) -> list[int]:
    """The gathered slots per row a forward used, from its `stats.depth` [B, T] (what to give
    `ActivationSpec.step_lengths` to compare with a measured forward of token choice)."""
    import torch

    d = torch.as_tensor(depth)
    lengths = default_step_lengths(cfg, seq_len)
    if cfg.router.type == "token_choice":
        for r in range(1, len(lengths)):
            n = int((d > r).sum(1).max())
            lengths[r] = bucket_length(n, seq_len) if n else 0
    return lengths


def _gathered(cfg: ModelConfig, n_steps: int) -> list[bool]:
    """Whether each step gathers (False: every token runs it in place, as in mor.py)."""
    out, everyone = [], True
    for r in range(n_steps):
        if cfg.router.type == "expert_choice" and cfg.capacities[r] < 1.0:
            everyone = False
        if cfg.router.type == "token_choice" and r > 0:
            everyone = False
        out.append(not everyone)
    return out


class _Walk:
    def __init__(self, cfg: ModelConfig, spec: ActivationSpec):
        self.cfg, self.spec, self.s = cfg, spec, _Saved()
        self.w = spec.width
        self.B = spec.micro_batch
        tp = spec.tp
        self.hq, self.hkv, self.ff = cfg.n_heads // tp, cfg.n_kv_heads // tp, cfg.d_ff // tp
        self.sp = tp if spec.sequence_parallel else 1  # replicated token-wise tensors split under SP
        self.app = 0

    # -- pieces --------------------------------------------------------------------------
    def norm(self, x: str, n: int, tag: str, keep_output: bool = True) -> str:
        d, w, s = self.cfg.d_model, self.w, self.s
        tokens = self.B * n / self.sp
        s.add(x if w == F32 else f"{tag}.x32", tokens * d * F32, "norms")
        s.add(f"{tag}.rsqrt", tokens * F32, "norms")
        s.add(f"{tag}.hn", tokens * d * w, "norms")
        y = f"{tag}.y"
        if keep_output:  # what the next projections keep (under SP its slice: they re-gather it backward)
            s.add(y, tokens * d * w, "norms")
        return y

    def attention(self, n: int, rope: str, tag: str, kv_source: tuple[str, int] | None) -> None:
        cfg, w, s, B = self.cfg, self.w, self.s, self.B
        hd = cfg.head_dim
        # RoPE multiplies by cos and sin: fp32 tables shared across layers; bf16 copies per call.
        calls = 1 if kv_source else 2
        for c in range(calls):
            for trig in ("cos", "sin"):
                name = f"{rope}.{trig}" if w == F32 else f"{tag}.rope{c}.{trig}"
                s.add(name, B * n * hd * w, "rope")
        repeat = self.spec.attention == "sdpa" and self.hq != self.hkv
        kv_heads = self.hq if repeat else self.hkv
        s.add(f"{tag}.q", B * n * self.hq * hd * w, "attention")
        if kv_source is None:
            kv_tag, n_kv = tag, n
        else:
            kv_tag, n_kv = kv_source
        for t in ("k", "v"):  # repeat_interleave makes a new tensor per call
            s.add(f"{tag if repeat else kv_tag}.{t}", B * n_kv * kv_heads * hd * w, "attention")
        s.add(f"{tag}.out", B * n * self.hq * hd * w, "attention")
        s.add(f"{tag}.lse", B * n * self.hq * F32, "attention")
        if self.spec.document_masking:  # the boolean mask and SDPA's copy of it (measured: 2 B n^2)
            s.add(f"{tag}.mask", 2 * B * n * n * BOOL, "attention")

    def mlp(self, n: int, tag: str) -> None:
        for t in ("gate", "silu", "up", "prod"):
            self.s.add(f"{tag}.{t}", self.B * n * self.ff * self.w, "mlp")

    def layer(self, x: str, n: int, rope: str, kv_source: tuple[str, int] | None) -> tuple[str, str]:
        """One layer application on n tokens per row; returns (output name, its tag)."""
        tag = f"app{self.app}"
        self.app += 1
        if self.spec.checkpointing:
            self.s.add(x, self.B * n * self.cfg.d_model * self.w / self.sp, "checkpoint inputs")
            return f"{tag}.out_resid", tag
        self.norm(x, n, f"{tag}.n1")
        self.attention(n, rope, tag, kv_source)
        self.norm(f"{tag}.mid", n, f"{tag}.n2")
        self.mlp(n, tag)
        return f"{tag}.out_resid", tag

    # -- the forward ---------------------------------------------------------------------
    def run(self) -> _Saved:
        cfg, spec, s, B, w = self.cfg, self.spec, self.s, self.B, self.w
        T, d, V, tp = spec.seq_len, cfg.d_model, cfg.vocab_size, spec.tp
        prelude, steps, coda = cfg.layer_plan()
        lengths = list(spec.step_lengths) if spec.step_lengths is not None else default_step_lengths(cfg, T)
        if len(lengths) != len(steps):
            raise ValueError(f"step_lengths needs {len(steps)} entries, got {len(lengths)}")
        # Embedding: the ids (vocab-parallel: the shifted ids and the out-of-shard mask).
        if tp == 1:
            s.add("ids", B * T * I64, "embedding")
        else:
            s.add("ids.local", B * T * I64, "embedding")
            s.add("ids.outside", B * T * BOOL, "embedding")
        h = "embed"
        for _ in prelude:
            h, _tag = self.layer(h, T, "rope", None)
        rtype = cfg.router.type
        first_kv: dict[int, tuple[str, int]] = {}
        gathered = _gathered(cfg, len(steps))
        for r, (layer_ids, n) in enumerate(zip(steps, lengths)):
            if rtype == "expert_choice":
                self.expert_router(h, r, T, n if cfg.capacities[r] < 1.0 else None)
            elif rtype == "token_choice" and r == 0:
                self.token_router(h, T)
            if n == 0:  # nobody runs this step: mor.py returns h untouched
                continue
            gate = rtype != "none"
            sp = self.sp
            if gathered[r] and sp > 1:  # SP pads the slots to a multiple of the TP size
                n = -(-n // sp) * sp
            if gathered[r]:
                x, rope = f"step{r}.x", f"step{r}.rope"
                s.add(f"step{r}.idx", B * T * I64, "routing")  # argsort's [B, T], sliced
            else:
                x, rope = h, "rope"
            y = x
            for phys in layer_ids:
                src = first_kv.get(phys) if cfg.kv_mode == "shared" else None
                y, tag = self.layer(y, n, rope, src)
                if cfg.kv_mode == "shared" and src is None:
                    first_kv[phys] = (tag, n)
            gate_src = f"router{r}.gate" if rtype == "expert_choice" else "router.gate"  # [B, T] fp32
            if gate:
                s.add(f"step{r}.update", B * n * d * w / sp, "routing")  # y - x, saved by the gate's mul
                if not gathered[r] and w == F32:  # the fp32 gate itself, unsqueezed
                    s.add(gate_src, B * T * F32 / sp, "routing")
                else:  # its gathered rows / compute-dtype copy
                    s.add(f"step{r}.gate", B * n * w / sp, "routing")
            if gathered[r]:
                # gather keeps its source: the hidden states (under SP only the indices: the
                # gather from the all-gathered stream is an autograd function of its own) and the
                # gate it picks rows from.
                if sp == 1:
                    s.add(h, B * T * d * w, "routing")
                if gate:
                    s.add(gate_src, B * T * F32, "routing")
                s.add(f"step{r}.slots", B * n * BOOL / sp, "routing")
            h = f"step{r}.h"
        for _ in coda:
            h, _tag = self.layer(h, T, "rope", None)
        # Final norm and loss.
        vocab_parallel = tp > 1
        y = self.norm(h, T, "final", keep_output=vocab_parallel)
        N = B * T
        if vocab_parallel:
            s.add("loss.softmax", N * (V // tp) * F32, "loss")
            s.add("loss.local", N * I64, "loss")
            s.add("loss.masks", 2 * N * BOOL, "loss")
        else:
            s.add("loss.grad_h", N * d * w, "loss")
            s.add("loss.grad_w", V * d * F32, "loss")
        del y
        return s

    def expert_router(self, h: str, r: int, T: int, k: int | None) -> None:
        s, B, w, d = self.s, self.B, self.w, self.cfg.d_model
        s.add(h, B * T * d * w / self.sp, "routers")  # the router's linear keeps its input
        if self.cfg.router.network == "mlp":
            hidden = self.cfg.router.mlp_hidden or d // 4
            s.add(f"router{r}.hidden", 2 * B * T * hidden * w, "routers")
        # fp32 logits (a copy in bf16), BCE target and weight, z-loss square (the gate: routing).
        vectors = 3 + (1 if w != F32 else 0)
        s.add(f"router{r}.vectors", vectors * B * T * F32, "routers")
        if k is not None:  # top-k over the masked logits: its indices and the mask
            s.add(f"router{r}.topk", B * (k + 1) * I64 + B * T * BOOL, "routers")

    def token_router(self, h: str, T: int) -> None:
        s, B, w, d, nr = self.s, self.B, self.w, self.cfg.d_model, self.cfg.num_recursions
        s.add(h, B * T * d * w / self.sp, "routers")
        if self.cfg.router.network == "mlp":
            hidden = self.cfg.router.mlp_hidden or d // 4
            s.add("router.hidden", 2 * B * T * hidden * w, "routers")
        # logits (fp32 copy in bf16), softmax, the balance weight / logsumexp terms; the choice.
        s.add("router.vectors", (2 + (1 if w != F32 else 0)) * B * T * nr * F32 + 4 * B * T * F32, "routers")
        s.add("router.choice", B * T * I64, "routers")


def activation_bytes(cfg: ModelConfig, spec: ActivationSpec) -> dict[str, float]:
    """{"total": bytes saved for backward by one micro-batch's forward on one rank, and the
    same split by part (norms, attention, mlp, rope, routing, routers, loss, ...)}."""
    saved = _Walk(cfg, spec).run()
    return {"total": saved.total, **saved.by_part}


def recompute_bytes(cfg: ModelConfig, spec: ActivationSpec) -> float:
    """With checkpointing, the extra bytes the backward holds while one layer application is
    recomputed: that application's saved tensors (the largest, a full-length one)."""
    if not spec.checkpointing:
        return 0.0
    probe = _Walk(cfg, dataclasses.replace(spec, checkpointing=False, step_lengths=None))
    probe.layer("x", spec.seq_len, "rope", None)
    return probe.s.total
