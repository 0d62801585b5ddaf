"""The DeepSpeed config keys megamor knows, to reject typos in `deepspeed.config` before launch.

DeepSpeed silently ignores keys it does not know (`zero_optimisation: {stage: 3}` trains with
ZeRO-0). megamor checks the raw `deepspeed.config` against DeepSpeed 0.19's top-level keys and,
for the sections DeepSpeed validates with a schema, one level below; an unknown key is a
ConfigError with a "did you mean". `tests/train/test_ds_keys.py` compares these tables with
the installed DeepSpeed, so an upgrade that adds keys shows up there.
`deepspeed.check_keys=false` turns the check off (for a key newer than this table).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from megamor.config import ConfigError

TOP_LEVEL = frozenset([
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "communication_data_type",
    "seq_parallel_communication_data_type", "sparse_gradients", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print", "dump_state",
    "wall_clock_breakdown", "memory_breakdown", "disable_allgather", "disable_python_gc", "dataloader_drop_last",
    "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger",
    "elasticity", "checkpoint", "data_types", "aio", "autotuning", "compression_training", "data_efficiency",
    "curriculum_learning", "sparse_attention", "pipeline", "progressive_layer_drop", "eigenvalue",
    "quantize_training", "nebula", "hybrid_engine", "compile", "tensor_parallel", "timers", "graph_harvesting",
    "use_data_before_expert_parallelism", "use_node_local_storage", "expert_parallel",
    "managed_gradient_accumulation", "log_level", "weight_quantization",
])

# Sections DeepSpeed parses with a pydantic schema: their field names and aliases.
SECTIONS: dict[str, frozenset[str]] = {k: frozenset(v.split()) for k, v in {
    "zero_optimization": """allgather_bucket_size allgather_partitions allgather_sequential compute_grad_norm
        contiguous_gradients cpu_offload cpu_offload_param cpu_offload_use_pin_memory elastic_checkpoint
        enable_sanity_checks gather_16bit_weights_on_model_save ignore_unused_parameters leaf_module legacy_stage1
        load_from_fp32_weights log_trace_cache_warnings max_live_parameters max_reuse_distance memory_efficient_linear
        model_persistence_threshold module_granularity_threshold offload_optimizer offload_param overlap_comm
        override_module_apply param_persistence_threshold parameter_alignment pipeline_loading_checkpoint
        prefetch_bucket_size reduce_bucket_size reduce_scatter round_robin_gradients save_muon_momentum_buffer_in_memory
        stage stage3_allgather_sequential stage3_gather_16bit_weights_on_model_save
        stage3_gather_fp16_weights_on_model_save stage3_max_live_parameters stage3_max_reuse_distance
        stage3_model_persistence_threshold stage3_module_granularity_threshold stage3_param_persistence_threshold
        stage3_prefetch_bucket_size stage3_use_all_reduce_for_fetch_params sub_group_size
        use_all_reduce_for_fetch_params use_multi_rank_bucket_allreduce zenflow zero_hpz_partition_size
        zero_quantized_gradients zero_quantized_nontrainable_weights zero_quantized_weights""",
    "bf16": "bf16_master_weights_and_grads bf16_optimizer_states check_grad_overflow enabled immediate_grad_update",
    "fp16": """auto_cast consecutive_hysteresis enabled fp16_master_weights_and_grads hysteresis initial_scale_power
        loss_scale loss_scale_window min_loss_scale""",
    "comms_logger": "debug enabled prof_all prof_ops verbose",
    "tensorboard": "enabled job_name output_path",
    "wandb": "enabled group project team",
    "csv_monitor": "enabled job_name output_path",
    "comet": "api_key enabled experiment_key experiment_name mode online project samples_log_interval workspace",
    "hybrid_engine": """enable_cuda_graph enabled inference_tp_size max_out_tokens pin_parameters
        release_inference_cache tp_gather_partition_size""",
}.items()}


def _unknown(name: str, known: frozenset[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"{where}.{name}", f"is not a DeepSpeed config key{hint} (deepspeed.check_keys=false skips "
                                          "this check for keys newer than megamor's table)")


def check_deepspeed_keys(config: Mapping[str, Any], where: str = "deepspeed.config") -> None:
    for name, value in config.items():
        if name not in TOP_LEVEL:
            raise _unknown(str(name), TOP_LEVEL, where)
        known = SECTIONS.get(str(name))
        if known is not None and isinstance(value, Mapping):
            for sub in value:
                if sub not in known:
                    raise _unknown(str(sub), known, f"{where}.{name}")


# The ZeRO knobs megamor.plan reads ({field: (DeepSpeed's alias, lower bound)}), checked as DeepSpeed's
# schema reads them so the planner and training accept the same values (the schema fails only
# at engine start, after launch). DeepSpeed drops "auto" (a HF Trainer placeholder) outside
# the HF integration, i.e. the default applies: None here.
ZERO_INTS = {"param_persistence_threshold": ("stage3_param_persistence_threshold", 0),
             "reduce_bucket_size": ("reduce_bucket_size", 1),
             "max_reuse_distance": ("stage3_max_reuse_distance", 0),
             "prefetch_bucket_size": ("stage3_prefetch_bucket_size", 0)}
_TRUE, _FALSE = {"true", "t", "yes", "y", "on", "1"}, {"false", "f", "no", "n", "off", "0"}  # pydantic's


def zero_knobs(config: Mapping[str, Any], where: str = "deepspeed.config") -> dict[str, Any]:
    """{field: value or None (DeepSpeed's default)} for ZERO_INTS and overlap_comm, from a raw
    `deepspeed.config`; ConfigError naming the key for a value DeepSpeed would refuse."""
    z = config.get("zero_optimization")
    sec = f"{where}.zero_optimization"
    if z is None:
        z = {}
    if not isinstance(z, Mapping):  # DeepSpeed reads a bool as the pre-0.3 format (ZeRO-1 or off)
        raise ConfigError(sec, f"must be a section of keys, e.g. {{overlap_comm: true}}, got {z!r} "
                               "(deepspeed.zero_stage sets the stage)")
    out: dict[str, Any] = {}
    for name, (alias, low) in ZERO_INTS.items():
        given = [k for k in dict.fromkeys((alias, name)) if k in z]
        if len(given) > 1:
            raise ConfigError(f"{sec}.{given[1]}", f"repeats {sec}.{given[0]} (the same DeepSpeed setting): keep one")
        out[name] = _int(z[given[0]], f"{sec}.{given[0]}", low) if given else None
    out["overlap_comm"] = _bool(z.get("overlap_comm"), f"{sec}.overlap_comm")
    return out


def _int(value: Any, where: str, low: int) -> int | None:
    if value == "auto":
        return None
    n: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif ((isinstance(value, float) and value.is_integer())  # 5.0e8 in YAML
          or (isinstance(value, str) and value.strip().lstrip("+-").isdigit())):
        n = int(value)
    if n is None:
        raise ConfigError(where, f"must be an integer (elements), e.g. 500000000 or 5.0e8, or auto "
                                 f"(DeepSpeed's default); got {value!r}")
    if n < low:
        raise ConfigError(where, f"must be >= {low}, got {n}")
    return n


def _bool(value: Any, where: str) -> bool | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else ""
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(where, f"must be true or false (or auto: on for ZeRO-3 only), got {value!r}")
