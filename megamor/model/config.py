"""The model's typed configuration and the checks that reject impossible shapes."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf

from megamor.config import ConfigError, key, load_config

SHARING = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTERS = ("none", "expert_choice", "token_choice")
KV_MODES = ("recursion_wise", "shared")
UPDATE_RULES = ("gated_residual", "paper")  # router.token_choice_update, router.expert_choice_update


@dataclass
class RouterConfig:
    type: str = "none"  # none | expert_choice | token_choice
    # Expert choice: fraction of each sequence's tokens kept at recursion step r (non-increasing).
    # None means the paper's default (N_r - r) / N_r.
    capacity: list[float] | None = None
    # Expert choice: gate = alpha * activation(router logit); none: the raw logit, no alpha (the
    # official code's `router_func: null`).
    activation: str = "sigmoid"  # sigmoid | tanh | none
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
    # Token choice: how a token's recursion steps update it. gated_residual (megamor's): every
    # step's residual update gated by the chosen depth's probability, h <- h + g (step(h) - h).
    # paper: Eq. 2 as the official code runs it: steps before the chosen depth ungated,
    # h <- step(h); at the chosen depth the output is H^1 + g * step(h), H^1 the first
    # recursion's input. Which should be mor_token_N's default is not decided (docs/paper.md).
    token_choice_update: str = "gated_residual"
    # Expert choice: how a selected token's recursion step updates it. gated_residual
    # (megamor's): h <- h + g (step(h) - h), the gate scales the step's residual update, and
    # g -> 0 leaves h as it was. paper: Eq. 1 (and the official code), h <- h + g step(h), where
    # step(h) includes the block's own residual: the stream grows by (1 + g) at every step a
    # token runs, and unweighted gating (g = 1) gives h + step(h).
    expert_choice_update: str = "gated_residual"
    # -- the official code's other router knobs (all off, or today's behaviour, by default) --
    # Token choice's depth probabilities: softmax over the N_r depths, or an independent
    # sigmoid per depth (then alpha defaults to 0.1, as the official code's).
    token_func: str = "softmax"  # softmax | sigmoid
    temperature: float = 1.0  # the router sees h / temperature (the official `temp`)
    # weighted: the gate is the router weight; unweighted: the gate is 1 (the router then learns
    # from its auxiliary losses only).
    gating: str = "weighted"  # weighted | unweighted
    # Expert choice: training's capacity falls from 1.0 to its target on a half cosine over the
    # first cap_warmup_step optimizer steps (the official code counts forward calls: the same
    # at gradient accumulation 1). 0: off.
    cap_warmup_step: int = 0
    # Token choice: every token runs every recursion during optimizer steps 1..bal_warmup_step-1
    # (the official code's test `step < bal_warmup_step`); loss-free balancing's bias stays 0
    # meanwhile. 0: off.
    bal_warmup_step: int = 0
    # Expert choice: the BCE over recursion steps: mean (megamor's: one coefficient for any N_r)
    # or sum (the official code's: with it the paper's 0.001 is N_r times a mean's 0.001).
    bce_reduction: str = "mean"  # mean | sum
    # Expert choice: a separate router of the same network trained (BCE, weight 1) on detached
    # hidden states to predict the top-k selection; causal routing (evaluation, decoding) keeps
    # a token when its sigmoid > 0.5. The main router then gets no BCE (the official
    # `sampling: aux_router`).
    aux_router: bool = False
    # The random-router baseline (the official `rand_router`): uniform scores instead of the
    # router (expert choice: top-k of them, gate alpha * score; token choice: the argmax depth),
    # no router losses. Deterministic: a hash of the token's position (in training also its row
    # and the optimizer step: fresh every step, as the official torch.rand); causal expert choice
    # keeps a token at step r with probability c_r / c_(r-1).
    rand_router: bool = False
    # -- regularisers (training only; off by default: 0 adds nothing to the loss) --
    # Router entropy: the loss gains -entropy_coef * the mean routing entropy (nats), so a
    # positive coefficient raises the entropy (softer, less saturated routing) and a negative
    # one lowers it. Expert choice: the Bernoulli entropy of each step's gate probability
    # (sigmoid of the logit; tanh's gate as (1 + tanh) / 2; none: sigmoid of the raw logit),
    # averaged over candidate tokens, then over steps; token choice: the entropy of the depth
    # distribution (softmax over the depth logits). Both from the logits of h / temperature.
    # Logged as train/router_entropy.
    entropy_coef: float = 0.0  # loss -= entropy_coef * mean routing entropy (expert choice: each gate's Bernoulli entropy; token choice: the depth distribution's); positive raises it, negative lowers it; 0: off
    # Token choice: the mean depth to steer compute to, in recursion steps (1..num_recursions).
    # The loss gains target_depth_coef * (E[depth] - target_depth)^2, E[depth] the micro-batch's
    # mean expected depth under the depth distribution (softmax over the depth logits): it has a
    # gradient, and the chosen (argmax) depth logged as router/mean_depth follows it. Logged as
    # train/router_target_depth (the squared gap) and train/router_expected_depth. None: off.
    target_depth: float | None = None  # token choice: the mean depth (recursion steps, 1..num_recursions) to pull the micro-batch's mean expected depth towards; None: off
    target_depth_coef: float = 0.0  # token choice: loss += target_depth_coef * (mean expected depth - target_depth)^2; > 0 exactly when target_depth is set

    def validate(self, path: str) -> None:
        if self.type not in ROUTERS:
            raise ConfigError(key(path, "type"), f"must be one of {ROUTERS}, got {self.type!r}")
        if self.activation not in ("sigmoid", "tanh", "none"):
            raise ConfigError(key(path, "activation"), f"must be sigmoid, tanh or none, got {self.activation!r}")
        for name, allowed in (("token_func", ("softmax", "sigmoid")), ("gating", ("weighted", "unweighted")),
                              ("bce_reduction", ("mean", "sum"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(key(path, name), f"must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ConfigError(key(path, "temperature"), f"must be positive, got {self.temperature}")
        for name in ("cap_warmup_step", "bal_warmup_step"):
            if getattr(self, name) < 0:
                raise ConfigError(key(path, name), "must be >= 0")
        self._validate_regularisers(path)
        if self.aux_router and self.type != "expert_choice":
            raise ConfigError(key(path, "aux_router"), f"applies to expert choice only (router.type is {self.type!r})")
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
        if self.token_choice_update not in UPDATE_RULES:
            raise ConfigError(key(path, "token_choice_update"),
                              f"must be one of {UPDATE_RULES}, got {self.token_choice_update!r}")
        if self.token_choice_update != "gated_residual" and self.type != "token_choice":
            raise ConfigError(key(path, "token_choice_update"), "applies to token choice only")
        if self.expert_choice_update not in UPDATE_RULES:
            raise ConfigError(key(path, "expert_choice_update"),
                              f"must be one of {UPDATE_RULES}, got {self.expert_choice_update!r}")
        if self.expert_choice_update != "gated_residual" and self.type != "expert_choice":
            raise ConfigError(key(path, "expert_choice_update"), f"applies to expert choice only (router.type is {self.type!r})")
        if self.type != "expert_choice":
            self.gate_straight_through = False  # expert choice only; one value for every other router

    def _validate_regularisers(self, path: str) -> None:
        if not math.isfinite(self.entropy_coef):
            raise ConfigError(key(path, "entropy_coef"), f"must be a finite number, got {self.entropy_coef}")
        if self.entropy_coef and (self.type == "none" or self.rand_router):
            raise ConfigError(key(path, "entropy_coef"), "needs a learned router (router.type is "
                              f"{self.type!r}{', rand_router true' if self.rand_router else ''})")
        if not (math.isfinite(self.target_depth_coef) and self.target_depth_coef >= 0):
            raise ConfigError(key(path, "target_depth_coef"), f"must be >= 0, got {self.target_depth_coef}")
        if self.target_depth is None:
            if self.target_depth_coef:
                raise ConfigError(key(path, "target_depth"), "must be set when router.target_depth_coef is "
                                  f"{self.target_depth_coef}")
            return
        if self.type != "token_choice" or self.rand_router:
            raise ConfigError(key(path, "target_depth"), "applies to token choice with a learned router only "
                              f"(router.type is {self.type!r}{', rand_router true' if self.rand_router else ''})")
        if not self.target_depth_coef:
            raise ConfigError(key(path, "target_depth_coef"), "must be > 0 when router.target_depth is set")

    @property
    def gate_scale(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return 0.1 if self.type == "expert_choice" or self.token_func == "sigmoid" else 1.0


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
    # o_proj and down_proj at init_std / sqrt(2 n_layers) (GPT-2's residual scaling; n_layers of
    # the unrolled stack). false: every Linear at init_std (Hugging Face Llama's, the paper's).
    init_scaled_residual: bool = True
    sharing: str = "none"  # none | cycle | sequence | middle_cycle | middle_sequence
    num_recursions: int = 1  # recursion steps N_r of the shared block (1 with sharing none)
    router: RouterConfig = field(default_factory=RouterConfig)
    kv_mode: str = "recursion_wise"  # recursion_wise | shared (recursive KV sharing)
    # -- what some pretrained families add (megamor.adapt wraps Qwen2/Qwen3 checkpoints) --
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    attn_head_dim: int = 0  # width of one attention head; 0: d_model / n_heads (Qwen3 sets its own)

    # Keys older configs (and run folders) may hold that nothing reads any more.
    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "attn_impl": "attention always goes through scaled_dot_product_attention (flash-attn when installed on a GPU)"}

    def validate(self, path: str = "") -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(key(path, name), "must be positive")
        if self.attn_head_dim < 0 or self.attn_head_dim % 2:
            raise ConfigError(key(path, "attn_head_dim"), f"must be 0 (d_model / n_heads) or a positive even number, "
                              f"got {self.attn_head_dim}")
        if not self.attn_head_dim and self.d_model % self.n_heads:
            raise ConfigError(key(path, "n_heads"), f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not self.attn_head_dim and (self.d_model // self.n_heads) % 2:
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
        routed = self.router.type != "none"
        if self.sharing == "none" and nr != 1 and not routed:
            raise ConfigError(key(path, "num_recursions"), "sharing 'none' needs num_recursions 1 (or a router: "
                              "routing over distinct layers)")
        if self.sharing == "none" and nr > 1 and self.n_layers % nr:
            raise ConfigError(key(path, "n_layers"), f"n_layers = {self.n_layers} must be a multiple of num_recursions "
                              f"{nr} to route over {nr} steps of distinct layers (sharing 'none')")
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
        if r.type != "none" and nr < 2:
            raise ConfigError(key(path, "router.type"), f"router {r.type!r} needs a sharing strategy with num_recursions >= 2 "
                              "(or sharing 'none' with num_recursions >= 2: routing over distinct layers)")
        if r.target_depth is not None and not (1.0 <= r.target_depth <= nr):
            raise ConfigError(key(path, "router.target_depth"), f"must be in [1, num_recursions = {nr}] "
                              f"(recursion steps), got {r.target_depth}")
        if r.capacity is not None and r.type == "expert_choice" and len(r.capacity) != nr:
            raise ConfigError(key(path, "router.capacity"), f"needs {nr} entries (one per recursion), got {len(r.capacity)}")
        if self.kv_mode == "shared" and self.sharing not in ("cycle", "middle_cycle"):
            raise ConfigError(key(path, "kv_mode"), "recursive KV sharing needs sharing cycle or middle_cycle")

    # -- derived shape -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

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
        the same block of physical layers (sharing none with a router: N_r steps of distinct
        layers, the mixture-of-depths ablation); for sequence sharing each physical layer is
        repeated num_recursions times in a row (so a step is a contiguous slice of that).
        """
        L, nr = self.n_layers, self.num_recursions
        if self.sharing == "none":
            if nr > 1:  # a router over N_r steps of distinct layers (the mixture-of-depths ablation)
                return [], [list(range(r * L // nr, (r + 1) * L // nr)) for r in range(nr)], []
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


def flat_model_config(cfg: ModelConfig, prefix: str = "model") -> dict[str, object]:
    """Every key of the config by its full dotted path (model.router.alpha: 0.1, ...)."""

    def walk(d: dict, path: str) -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in d.items():
            out.update(walk(v, f"{path}.{k}") if isinstance(v, dict) else {f"{path}.{k}": v})
        return out

    return walk(dataclasses.asdict(cfg), prefix)
