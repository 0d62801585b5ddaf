"""The model's typed configuration and the checks that reject impossible shapes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf

from megamor.config import ConfigError, key, load_config

SHARING = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTERS = ("none", "expert_choice", "token_choice")
KV_MODES = ("recursion_wise", "shared")


@dataclass
class RouterConfig:
    type: str = "none"  # none | expert_choice | token_choice
    # Expert choice: fraction of each sequence's tokens kept at recursion step r (non-increasing).
    # None means the paper's default (N_r - r) / N_r.
    capacity: list[float] | None = None
    activation: str = "sigmoid"  # sigmoid | tanh (gate = alpha * activation(router logit))
    alpha: float | None = None  # None: 0.1 for expert choice, 1.0 for token choice
    network: str = "linear"  # linear | mlp
    mlp_hidden: int = 0  # hidden width of the mlp router; 0 means d_model // 4
    # Expert choice: BCE(selected) so a threshold decides causally. megamor's default router
    # (0.01, label smoothing 0.1, fixed alpha) keeps the logits bounded; the paper's is
    # 0.001 with hard targets and a fixed alpha (configs/model/*/mor_expert_N_paper.yaml).
    aux_bce_coef: float = 0.01
    z_loss_coef: float = 0.0  # router z-loss (squared logits) coefficient
    # Expert choice: BCE targets eps / 1-eps instead of 0 / 1, so the BCE no longer pulls the
    # logits to +-inf (0.0 is the paper's; see evals/results/router.md).
    bce_label_smoothing: float = 0.1
    # Expert choice: also train the BCE at steps with capacity 1 (every candidate selected:
    # an all-ones target that the causal routing never uses). True is the paper's behaviour.
    bce_full_capacity_steps: bool = True
    # Expert choice: the gate's scale alpha becomes a learned scalar per step (initialised to
    # alpha), so the LM can ask for a larger update without saturating the sigmoid. Off by
    # default: trained longer, the LM shrinks the deeper steps' alphas towards 0, switching
    # the recursion off (evals/results/study_small_cpu/findings.md).
    learn_alpha: bool = False
    # Expert choice: the gate's forward value is alpha for every selected token (what the
    # paper's saturated sigmoid gives its positive tokens), its gradient that of
    # alpha * activation(logit), so the router still learns from the LM loss (straight-through).
    # On: it beat both the soft gate and the paper's settings
    # (evals/results/study_small_cpu/findings.md). Other routers ignore it (validate sets it
    # false). A stored config written before this default changed keeps its soft gate
    # (STORED_DEFAULTS below).
    gate_straight_through: bool = True
    # Expert choice at evaluation and decoding: a token runs step r when its logit exceeds the
    # router's threshold. learn_threshold: the threshold tracks training's top-k boundary (the
    # logit midway between each sequence's k-th and (k+1)-th token, averaged; an EMA with this
    # momentum per micro-batch, averaged over ranks every step), starting from
    # logit(causal_threshold). Off, it stays at logit(causal_threshold): the paper's
    # sigmoid > 0.5. It cannot change training (a buffer, no gradient). Short memory on
    # purpose: the router's logits keep moving to the end of a run, and 0.99 (~50 steps of memory
    # in the CPU studies) left the final threshold up to 0.4 above the final weights' boundary
    # (evals/results/study_small_cpu/findings.md).
    causal_threshold: float = 0.5
    learn_threshold: bool = True  # the causal threshold tracks training's top-k boundary (see causal_threshold)
    threshold_momentum: float = 0.9  # EMA momentum of the learned threshold, per micro-batch
    balancing: str = "loss"  # token choice: loss | loss_free
    balance_coef: float = 0.1  # token choice, balancing=loss
    bias_update_rate: float = 0.001  # token choice, balancing=loss_free

    def validate(self, path: str) -> None:
        if self.type not in ROUTERS:
            raise ConfigError(key(path, "type"), f"must be one of {ROUTERS}, got {self.type!r}")
        if self.activation not in ("sigmoid", "tanh"):
            raise ConfigError(key(path, "activation"), f"must be sigmoid or tanh, got {self.activation!r}")
        if self.network not in ("linear", "mlp"):
            raise ConfigError(key(path, "network"), f"must be linear or mlp, got {self.network!r}")
        if self.balancing not in ("loss", "loss_free"):
            raise ConfigError(key(path, "balancing"), f"must be loss or loss_free, got {self.balancing!r}")
        if self.capacity is not None:
            caps = list(self.capacity)
            if any(not (0.0 < c <= 1.0) for c in caps):
                raise ConfigError(key(path, "capacity"), f"each capacity must be in (0, 1], got {caps}")
            if any(b > a for a, b in itertools.pairwise(caps)):
                raise ConfigError(key(path, "capacity"), f"capacities must be non-increasing, got {caps}")
        if not (0.0 <= self.bce_label_smoothing < 0.5):
            raise ConfigError(key(path, "bce_label_smoothing"), f"must be in [0, 0.5), got {self.bce_label_smoothing}")
        if not (0.0 < self.causal_threshold < 1.0):
            raise ConfigError(key(path, "causal_threshold"), "must be in (0, 1)")
        if not (0.0 <= self.threshold_momentum < 1.0):
            raise ConfigError(key(path, "threshold_momentum"), f"must be in [0, 1), got {self.threshold_momentum}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(key(path, "alpha"), "must be positive")
        if self.type != "expert_choice":
            self.gate_straight_through = False  # expert choice only; one value for every other router

    @property
    def gate_scale(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return 0.1 if self.type == "expert_choice" else 1.0


@dataclass
class ModelConfig:
    vocab_size: int = 8192  # embedding rows; at least the tokenizer's vocabulary
    d_model: int = 512  # hidden width
    n_layers: int = 8  # layers of the virtual (unrolled) stack
    n_heads: int = 8  # attention heads (d_model / n_heads must be even for RoPE)
    n_kv_heads: int = 8  # key/value heads (grouped-query attention when < n_heads)
    d_ff: int = 1536  # SwiGLU feed-forward width
    max_seq_len: int = 2048  # longest context (RoPE tables, KV caches)
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = True  # the output head shares the embedding matrix
    init_std: float = 0.02  # std of the normal weight initialisation
    sharing: str = "none"  # none | cycle | sequence | middle_cycle | middle_sequence
    num_recursions: int = 1  # recursion steps N_r of the shared block (1 with sharing none)
    router: RouterConfig = field(default_factory=RouterConfig)
    kv_mode: str = "recursion_wise"  # recursion_wise | shared (recursive KV sharing)

    # Keys older configs (and run folders) may hold that nothing reads any more.
    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "attn_impl": "attention always goes through scaled_dot_product_attention (flash-attn when installed on a GPU)"}

    def validate(self, path: str = "") -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(key(path, name), "must be positive")
        if self.d_model % self.n_heads:
            raise ConfigError(key(path, "n_heads"), f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(key(path, "n_heads"), "head dim d_model/n_heads must be even (RoPE)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(key(path, "n_kv_heads"), f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.sharing not in SHARING:
            raise ConfigError(key(path, "sharing"), f"must be one of {SHARING}, got {self.sharing!r}")
        if self.kv_mode not in KV_MODES:
            raise ConfigError(key(path, "kv_mode"), f"must be one of {KV_MODES}, got {self.kv_mode!r}")
        nr = self.num_recursions
        if nr < 1:
            raise ConfigError(key(path, "num_recursions"), "must be >= 1")
        if self.sharing == "none" and nr != 1:
            raise ConfigError(key(path, "num_recursions"), "sharing 'none' needs num_recursions 1")
        if self.sharing != "none":
            if nr < 2:
                raise ConfigError(key(path, "num_recursions"), f"sharing {self.sharing!r} needs num_recursions >= 2")
            middle = self.n_layers - 2 if self.sharing.startswith("middle") else self.n_layers
            if middle <= 0 or middle % nr:
                what = "n_layers - 2" if self.sharing.startswith("middle") else "n_layers"
                raise ConfigError(
                    key(path, "n_layers"),
                    f"{what} = {middle} must be a positive multiple of num_recursions {nr} for sharing {self.sharing!r}",
                )
        r = self.router
        if r.type != "none" and self.sharing == "none":
            raise ConfigError(key(path, "router.type"), f"router {r.type!r} needs a sharing strategy with num_recursions >= 2")
        if r.capacity is not None and r.type == "expert_choice" and len(r.capacity) != nr:
            raise ConfigError(key(path, "router.capacity"), f"needs {nr} entries (one per recursion), got {len(r.capacity)}")
        if self.kv_mode == "shared" and self.sharing not in ("cycle", "middle_cycle"):
            raise ConfigError(key(path, "kv_mode"), "recursive KV sharing needs sharing cycle or middle_cycle")

    # -- derived shape -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_unique_layers(self) -> int:
        if self.sharing == "none":
            return self.n_layers
        if self.sharing.startswith("middle"):
            return 2 + (self.n_layers - 2) // self.num_recursions
        return self.n_layers // self.num_recursions

    @property
    def capacities(self) -> list[float]:
        nr = self.num_recursions
        if self.router.capacity is not None:
            return [float(c) for c in self.router.capacity]
        return [(nr - r) / nr for r in range(nr)]

    def layer_plan(self) -> tuple[list[int], list[list[int]], list[int]]:
        """Physical layer index of every virtual layer, as (prelude, recursion steps, coda).

        The middle of the virtual stack is cut into num_recursions equal contiguous steps;
        a router (if any) decides per step which tokens run it. For cycle sharing each step is
        the same block of physical layers; for sequence sharing each physical layer is
        repeated num_recursions times in a row (so a step is a contiguous slice of that).
        """
        L, nr = self.n_layers, self.num_recursions
        if self.sharing == "none":
            return list(range(L)), [], []
        middle_only = self.sharing.startswith("middle")
        first = 1 if middle_only else 0
        m = L - 2 if middle_only else L
        base = m // nr
        if self.sharing.endswith("cycle"):
            virtual = [first + (i % base) for i in range(m)]
        else:  # sequence
            virtual = [first + (i // nr) for i in range(m)]
        steps = [virtual[r * m // nr : (r + 1) * m // nr] for r in range(nr)]
        if middle_only:
            return [0], steps, [first + base]
        return [], steps, []


# Code defaults that changed. A config megamor stored (a run folder's or checkpoint tag's
# experiment.yaml, a megamor.pt, an export) holds every key the code had when it was written:
# one without a key below was written before the default changed and keeps the value it was
# trained with. User-written YAML gets today's defaults.
STORED_DEFAULTS: dict[str, Any] = {"router.gate_straight_through": False}


def with_stored_defaults(model: Any) -> Any:
    """A stored model config (dict or node) with the keys of STORED_DEFAULTS it lacks filled in."""
    node = OmegaConf.create(OmegaConf.to_container(model, resolve=False) if OmegaConf.is_config(model) else dict(model or {}))
    for dotted, value in STORED_DEFAULTS.items():
        parent, _, leaf = dotted.rpartition(".")
        holder = OmegaConf.select(node, parent, default=None) if parent else node
        if holder is None or (OmegaConf.is_dict(holder) and leaf not in holder):
            OmegaConf.update(node, dotted, value, merge=True)
    return node


def load_model_config(*paths: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    return load_config(ModelConfig, *paths, overrides=overrides or [])
