"""megamor's table of DeepSpeed config keys agrees with the installed DeepSpeed."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from megamor.train.ds_keys import SECTIONS, TOP_LEVEL

SCHEMAS = {
    "zero_optimization": "deepspeed.runtime.zero.config.DeepSpeedZeroConfig",
    "bf16": "deepspeed.runtime.precision_config.DeepSpeedBF16Config",
    "fp16": "deepspeed.runtime.precision_config.DeepSpeedFP16Config",
    "comms_logger": "deepspeed.comm.config.CommsLoggerConfig",
    "tensorboard": "deepspeed.monitor.config.TensorBoardConfig",
    "wandb": "deepspeed.monitor.config.WandbConfig",
    "csv_monitor": "deepspeed.monitor.config.CSVConfig",
    "comet": "deepspeed.monitor.config.CometConfig",
    "hybrid_engine": "deepspeed.runtime.config.HybridEngineConfig",
}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_section_keys_are_deepspeeds_schema(section):
    module, name = SCHEMAS[section].rsplit(".", 1)
    schema = getattr(importlib.import_module(module), name)
    fields = set(schema.model_fields) | {f.alias for f in schema.model_fields.values() if f.alias}
    assert set(SECTIONS[section]) == fields


def test_every_top_level_key_is_read_by_deepspeed():
    import deepspeed

    source = "\n".join(p.read_text(errors="ignore") for p in Path(deepspeed.__file__).parent.rglob("*.py"))
    quoted = set(re.findall(r"""["'](\w+)["']""", source))
    assert quoted >= TOP_LEVEL, sorted(TOP_LEVEL - quoted)
