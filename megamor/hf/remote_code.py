"""Make an export folder loadable by `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` for MoR models: config.json with an auto_map, plus the python files
next to the weights (model.safetensors, megamor names): the config and modeling files, and a
copy of megamor's routing policy (`megamor/model/routing.py`, torch only), which the modeling
file imports, so the export routes by the very rule megamor trains and decodes with."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from megamor.model import routing
from megamor.model.config import ModelConfig
from megamor.model.routers import routing_settings
from megamor.utils.atomic import write_json

HERE = Path(__file__).parent
# file in the export folder -> its source
FILES = {
    "configuration_megamor.py": HERE / "configuration_megamor.py",
    "modeling_megamor.py": HERE / "modeling_megamor.py",
    "routing.py": Path(routing.__file__),
}
MODEL_TYPE = "megamor"


def hf_config_dict(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["MegamorForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_megamor.MegamorConfig",
            "AutoModelForCausalLM": "modeling_megamor.MegamorForCausalLM",
        },
        "megamor": dataclasses.asdict(cfg),
        "routing": dataclasses.asdict(routing_settings(cfg)),
        "dtype": "float32",
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": False,
        **extra,
    }


def write_remote_code(out_dir: str | Path, cfg: ModelConfig, **extra: Any) -> None:
    """config.json and the modeling files (weights are written by the caller)."""
    out = Path(out_dir)
    for name, source in FILES.items():
        tmp = out / f".{name}.tmp"
        shutil.copyfile(source, tmp)
        tmp.replace(out / name)
    write_json(out / "config.json", hf_config_dict(cfg, **extra))


def hf_weights(sd: dict, cfg) -> dict:
    """The tensors the transformers model holds: a tied lm_head is the embedding, and the
    learned threshold's update count (training state) has no place there."""
    return {k: v for k, v in sd.items()
            if not k.endswith(".threshold_updates") and not (cfg.tie_embeddings and k == "lm_head.weight")}


def save_model_folder(model, out_dir: str | Path) -> Path:
    """An in-memory MoRLM as a transformers-loadable folder (what megamor.export writes for a
    checkpoint): config.json, the modeling files and model.safetensors."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().contiguous() for k, v in hf_weights(model.state_dict(), model.cfg).items()}
    write_remote_code(out, model.cfg)
    tmp = out / ".model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    return out
