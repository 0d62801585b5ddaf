"""A behaviour fingerprint of the MoR routing paths, stored before the routing refactor
(issue 28) and compared exactly after it: a few training steps of tiny expert- and
token-choice models (losses, aux losses, depths, thresholds, balancing bias), causal
evaluation logits, router agreement counts, and decoding outputs (generate, the engine's
dynamic and static steps).

    PYTHONPATH=OLD_SOURCE:. python -m tests.model.routing_reference   # rewrites routing_reference.json

(taken with OLD_SOURCE = `git archive bb14d0e megamor`, the code before the refactor)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megamor.inference import engine_generate
from megamor.model.router_health import agreement_counts
from tests.model.helpers import mor

try:
    from megamor.inference.generate import generate
except ImportError:  # the code the reference was taken from (decoding then lived in megamor.model)
    from megamor.model.generate import generate

PATH = Path(__file__).with_name("routing_reference.json")
VARIANTS = {
    # The soft gate, explicitly: the reference was taken when it was the dataclass default.
    "expert": {"router_type": "expert_choice", "router": {"type": "expert_choice", "gate_straight_through": False}},
    "expert_st_alpha_mlp": {"router_type": "expert_choice", "kv_mode": "shared", "router": {
        "type": "expert_choice", "gate_straight_through": True, "learn_alpha": True, "network": "mlp",
        "activation": "tanh", "capacity": [1.0, 0.5, 0.25]}},
    "token": {"router_type": "token_choice", "sharing": "cycle"},
    "token_loss_free": {"router_type": "token_choice", "sharing": "cycle", "router": {"type": "token_choice", "balancing": "loss_free"}},
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [3, 4, 5], [17], [40, 41, 42, 43, 44, 45]]


def _floats(t: torch.Tensor) -> list:
    return t.detach().double().flatten().tolist()


def fingerprint(name: str) -> dict:
    model = mor(seed=3, **VARIANTS[name])
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    out: dict = {"train": []}
    model.train()
    for _ in range(3):
        x = torch.randint(1, 200, (2, 33), generator=g)
        o = model(x[:, :-1], targets=x[:, 1:], return_logits=False)
        (o.loss + o.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        model.update_loss_free_bias()
        out["train"].append({"loss": o.loss.item(), "aux_loss": o.aux_loss.item(),
                             "aux": {k: v.item() for k, v in sorted(o.aux_losses.items())},
                             "depth": o.stats.depth.flatten().tolist(), "routed": o.stats.routed.tolist()})
    th = model.router_thresholds()
    out["thresholds"] = _floats(th) if th is not None else None
    out["bias"] = _floats(model.depth_router.bias) if model.depth_router is not None else None
    model.eval()
    with torch.no_grad():
        x = torch.randint(1, 200, (2, 24), generator=g)
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[1, :9] = False
        for key, kw in (("causal", {}), ("causal_padded", {"attention_mask": mask})):
            o = model(x, causal_routing=True, **kw)
            out[key] = {"logits_last": _floats(o.logits[:, -1, :8]), "logits_sum": o.logits.double().sum().item(),
                        "depth": o.stats.depth.flatten().tolist()}
        model.record_router = True
        o = model(x, causal_routing=False)
        model.record_router = False
        out["topk_eval"] = {"logits_sum": o.logits.double().sum().item(), "depth": o.stats.depth.flatten().tolist(),
                            "agreement": [[r] + agreement_counts(lg, c, s, model.routers[r].threshold).tolist()
                                          for r, lg, c, s in o.stats.get("router_trace", [])]}
    # Decoding, on the trained model and on a fresh one (whose routers still split tokens).
    fresh = mor(seed=5, **VARIANTS[name]).eval()
    for prefix, m in (("", model), ("fresh_", fresh)):
        out.update(decode_outputs(m, prefix))
    return out


@torch.no_grad()
def decode_outputs(model, prefix: str) -> dict:
    out = {}
    for key, kw in (("greedy", {}), ("sampled", {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 4}),
                    ("nocache", {"use_cache": False})):
        gen = generate(model, PROMPTS, 8, **kw)
        out[f"{prefix}generate_{key}"] = {"tokens": gen.tokens, "depths": gen.depths, "prompt_depths": gen.prompt_depths}
    for static in (False, True):
        gen = engine_generate(model, PROMPTS, 8, max_batch=2, static=static)
        out[f"{prefix}engine_{'static' if static else 'dynamic'}"] = {"tokens": gen.tokens, "depths": gen.depths,
                                                                      "prompt_depths": gen.prompt_depths}
    return out


def compute() -> dict:
    torch.set_num_threads(1)  # the stored numbers were taken at one thread
    return {name: fingerprint(name) for name in VARIANTS}


if __name__ == "__main__":
    data = compute()
    PATH.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(data[k], sort_keys=True)}" for k in sorted(data)) + "\n}\n")
    print(PATH)
