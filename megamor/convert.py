"""python -m megamor.convert SOURCE --out DIR [--init stepwise|average|lower] [--model-config YAML] [key=value ...]

Up-training: builds a recursive or MoR model from a pretrained vanilla model (a megamor run
folder, checkpoint, export folder or megamor.pt, or a Hugging Face Llama folder), initialising
its shared layers as Relaxed Recursive Transformers (Bae et al. 2024) do. The target is the
source's config with the `key=value` model overrides applied (e.g. sharing=middle_cycle
num_recursions=3 router.type=expert_choice), or the shipped model config named by
--model-config (e.g. configs/model/33m/mor_expert_3.yaml, with its router settings) plus the
overrides, checked against the source's shape. Its unrolled stack has the source's n_layers,
so virtual layer i sits where source layer i sat. A shared layer's "tied" source layers are
the virtual positions it is applied at.

    stepwise  the shared layers take source layers spread evenly over the shared span, its first
              and last included (the official selection_initialize: round(linspace(first,
              last, n_shared)), Python's round, half to even)
    average   each shared layer is the mean of its tied source layers
    lower     the j-th shared layer takes source layer j of the shared span (the lowest ones)

Unshared layers (the first/last of middle_* sharing), embeddings, final norm and head are
copied; routers start from megamor's initialisation (seed --seed). Writes DIR/megamor.pt
(+ .json), loadable everywhere a megamor checkpoint is: evaluation, megamor.export, and the
trainer's `trainer.init_from=DIR/megamor.pt` (start training from these weights at step 0).
Exit codes: 0 done, 1 unreadable source, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from megamor.cli import ArgumentParser, report
from megamor.config import ConfigError, ConfigFileError, from_node, merge_sources
from megamor.runs.layout import CheckpointError
from megamor.utils.atomic import atomic_open, write_json

if TYPE_CHECKING:  # torch and the model load after the arguments are parsed (--help answers at once)
    from megamor.model.config import ModelConfig
    from megamor.model.mor import MoRLM

STRATEGIES = ("stepwise", "average", "lower")


def layer_sources(cfg: ModelConfig, strategy: str) -> dict[int, list[int]]:
    """Source layers (of a vanilla stack of cfg.n_layers) each physical layer is built from;
    several mean an average."""
    if strategy not in STRATEGIES:
        raise ConfigError("--init", f"must be one of {STRATEGIES}, got {strategy!r}")
    prelude, steps, coda = cfg.layer_plan()
    virtual = prelude + [p for s in steps for p in s] + coda
    tied: dict[int, list[int]] = {}
    for pos, phys in enumerate(virtual):
        tied.setdefault(phys, []).append(pos)
    out = {p: tied[p] for p in prelude + coda}
    shared = list(dict.fromkeys(p for s in steps for p in s))  # in order of first application
    start = len(prelude)
    for j, phys in enumerate(shared):
        if strategy == "average":
            out[phys] = tied[phys]
        elif strategy == "stepwise":
            out[phys] = [stepwise_picks(start, len(virtual) - len(coda) - 1, len(shared))[j]]
        else:
            out[phys] = [start + j]
    return out


def stepwise_picks(first: int, last: int, n: int) -> list[int]:
    """n source layers spread evenly over first..last, both ends kept (n = 1: the first):
    round(linspace(first, last, n)), rounded half to even as the official code's round() of
    numpy floats does (e.g. 2.5 -> 2)."""
    if n == 1:
        return [first]
    step = (last - first) / (n - 1)  # numpy.linspace's arithmetic, so the halves fall alike
    return [round(i * step + first) for i in range(n - 1)] + [last]


# Keys the copied weights fix: a target that differs in one of them cannot take the source's
# tensors (shapes, tying) or would compute something else with them (RoPE base, norm epsilon).
WEIGHT_KEYS = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff", "tie_embeddings", "rope_theta", "norm_eps")


def target_config(source: ModelConfig, overrides: Sequence[str], model_config: str | Path | None = None) -> ModelConfig:
    from omegaconf import OmegaConf

    from megamor.model.config import ModelConfig

    if model_config is not None:
        cfg = from_node(ModelConfig, merge_sources([model_config], overrides), prefix="model")
        _check_fits(source, cfg, Path(model_config))
        return _check_target(source, cfg)
    node = OmegaConf.merge(OmegaConf.create(dataclasses.asdict(source)), merge_sources([], overrides))
    return _check_target(source, from_node(ModelConfig, node, prefix="model"))


def _check_fits(source: ModelConfig, cfg: ModelConfig, path: Path) -> None:
    """A named config of another size: one line with every differing key and the overrides
    that would make it fit."""
    bad = [k for k in ("n_layers", *WEIGHT_KEYS) if getattr(cfg, k) != getattr(source, k)]
    if bad:
        diff = ", ".join(f"{k} {getattr(cfg, k)!r} (source {getattr(source, k)!r})" for k in bad)
        fix = " ".join(f"{k}={getattr(source, k)}" for k in bad)
        raise ConfigFileError(path, f"does not fit the source model: {diff}; name the config of the source's size, "
                                    f"or add the overrides {fix}")


def _check_target(source: ModelConfig, cfg: ModelConfig) -> ModelConfig:
    if cfg.n_layers != source.n_layers:
        raise ConfigError("model.n_layers", f"the unrolled stack must keep the source's {source.n_layers} layers, got {cfg.n_layers}")
    if cfg.sharing == "none":
        raise ConfigError("model.sharing", "converting needs a sharing strategy (e.g. sharing=middle_cycle num_recursions=3)")
    for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff"):
        if getattr(cfg, name) != getattr(source, name):
            raise ConfigError(f"model.{name}", f"must stay the source's {getattr(source, name)} (layers are copied)")
    if cfg.tie_embeddings and not source.tie_embeddings:  # the source's own LM head would be dropped
        raise ConfigError("model.tie_embeddings", "true would drop the source's separate LM head (it has untied "
                                                  "embeddings): keep tie_embeddings=false")
    return cfg


def convert(source: MoRLM, cfg: ModelConfig, strategy: str, seed: int = 0) -> MoRLM:
    """A new model of config `cfg` initialised from the vanilla `source`."""
    import torch

    with torch.no_grad():
        return _convert(source, cfg, strategy, seed)


def _convert(source: MoRLM, cfg: ModelConfig, strategy: str, seed: int) -> MoRLM:
    import torch

    from megamor.model.mor import MoRLM

    if source.cfg.sharing != "none":
        raise ConfigError("SOURCE", f"the source must be a vanilla model (sharing none), got sharing {source.cfg.sharing!r}")
    torch.manual_seed(seed)
    model = MoRLM(copy.deepcopy(cfg))
    src_layers = source.layers
    for phys, srcs in layer_sources(cfg, strategy).items():
        target = model.layers[phys].state_dict()
        for name in target:
            target[name] = torch.stack([src_layers[s].state_dict()[name].float() for s in srcs]).mean(0)
        model.layers[phys].load_state_dict(target)
    model.embed_tokens.weight.copy_(source.embed_tokens.weight)
    model.norm.weight.copy_(source.norm.weight)
    if not cfg.tie_embeddings:
        model.lm_head.weight.copy_(source.lm_head.weight)
    return model


def save(model: MoRLM, out: Path, **meta) -> Path:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    path = out / "megamor.pt"
    with atomic_open(path, "wb") as f:
        torch.save({"model": sd, "config": dataclasses.asdict(model.cfg), "step": 0, **meta}, f)
    write_json(out / "megamor.pt.json", {"step": 0, **meta})
    return path


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m megamor.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="vanilla model: run folder, checkpoint, export folder, megamor.pt or HF Llama folder")
    p.add_argument("--out", required=True, help="output folder (megamor.pt is written there)")
    p.add_argument("--init", default="stepwise", help=f"shared-layer initialisation: {', '.join(STRATEGIES)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers' initialisation")
    p.add_argument("--model-config", default=None, metavar="YAML",
                   help="target model config (e.g. configs/model/33m/mor_expert_3.yaml); key=value overrides apply on top")
    p.add_argument("overrides", nargs="*", help="target model keys, e.g. sharing=middle_cycle num_recursions=3 router.type=expert_choice")
    args = p.parse_intermixed_args(argv)
    import torch

    from megamor.runs.load import load_model

    try:
        source = load_model(args.source, dtype=torch.float32)
    except CheckpointError as e:  # the source named on the command line: bad input
        report("megamor.convert", e)
        return 2
    try:
        cfg = target_config(source.cfg, args.overrides, args.model_config)
        model = convert(source, cfg, args.init, args.seed)
    except FileNotFoundError as e:  # --model-config names no file
        report("megamor.convert", e)
        return 2
    except ConfigError as e:
        report("megamor.convert", e, "configuration error")
        return 2
    path = save(model, Path(args.out), source=str(args.source), init=args.init)
    print(f"megamor.convert: {args.init} init, {model.num_params() / 1e6:.2f}M unique params "
          f"(source {source.num_params() / 1e6:.2f}M) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
