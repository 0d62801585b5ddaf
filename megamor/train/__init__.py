"""Training on a DeepSpeed engine: `python -m megamor.train --config X.yaml [key=value ...]`.

    config.py       the experiment schema (model + data + batch/optim/schedule/deepspeed/...)
                    and the checks made before any process group starts
    trainer.py      the loop: global-token loss, router losses, agreement all-reduce, validation
    optim.py        AdamW parameter groups; a step that can be skipped (non-finite loss)
    schedule.py     warmup-stable-decay and cosine, pure functions of the step
    ds_config.py    the DeepSpeed config dict
    checkpoint.py   save with a completeness marker, keep-last-K, resume (universal checkpoints
                    for another DP size), load_model_from_run for evaluation and export
    signals.py      SIGTERM/SIGUSR1 -> save and exit 75; the exit codes
    metrics.py      MoR-aware FLOPs, MFU/HFU, memory, router statistics
    logger.py       console, metrics.jsonl, W&B (run id kept across restarts)
    faults.py       fault injection for crash-safety tests (MEGAMOR_FAULTS)
"""
