"""Run by test_compile in its own process (it starts a process group): a tiny MoR model on
real DeepSpeed engines, eager and with compiled layers, two optimizer steps each.

    python -m tests.train.compile_engines [backend] [stages, default 1,2]

Prints {"<stage>/<eager|compiled>": [loss, loss]} as JSON on the last line. Stage 3 works too
(`... aot_eager 3`) but dynamo re-traces around ZeRO-3's hooks for ~90 s on this CPU, too long
for the suite."""

from __future__ import annotations

import dataclasses
import json
import sys

import torch


def losses(stage: int, compiled: bool, backend: str) -> list[float]:
    from megamor.train.config import experiment_from_dict
    from megamor.train.engine import build_engine
    from tests.model.helpers import tiny_config

    cfg = tiny_config(sharing="middle_cycle", num_recursions=2, n_layers=4, router={"type": "expert_choice"})
    exp = experiment_from_dict({
        "model": dataclasses.asdict(cfg), "data": {"train": ["unused"], "seq_len": 24},
        "batch": {"global_batch_size": 2, "micro_batch_size": 2},
        # ZeRO-3 with checkpointing does not compile (refused by the config); the others do both.
        "trainer": {"max_steps": 2, "compile": "false", "activation_checkpointing": stage != 3},
        "deepspeed": {"zero_stage": stage, "precision": "fp32",
                      "config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    })
    engine = build_engine(exp, torch.device("cpu"), seed=0, compile_backend=backend if compiled else None).engine
    x = torch.randint(0, cfg.vocab_size, (2, 25), generator=torch.Generator().manual_seed(1))
    out_losses = []
    for _ in range(2):
        out = engine(x[:, :-1], targets=x[:, 1:], return_logits=False)
        engine.backward(out.loss + out.aux_loss)
        engine.step()
        out_losses.append(out.loss.item())
    return out_losses


def main() -> int:
    from megamor.parallel.dist import init_distributed

    init_distributed()
    backend = sys.argv[1] if len(sys.argv) > 1 else "aot_eager"
    stages = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "1,2").split(",")]
    result = {f"{s}/{m}": losses(s, m == "compiled", backend) for s in stages for m in ("eager", "compiled")}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
