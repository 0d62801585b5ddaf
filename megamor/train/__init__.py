"""Training on a DeepSpeed engine: `python -m megamor.train --config X.yaml [key=value ...]`.

    config.py       the experiment schema (model + data + batch/optim/schedule/deepspeed/...)
    preflight.py    every check before any process group starts (launch, data, run folder)
    trainer.py      set-up, resume, the loop, checkpoints, stopping
    engine.py       build_engine: model + parallelism + optimizer + DeepSpeed engine, in one place
    callbacks/      the loop's hooks (base.Callback) and its features, one file each: phase
                    timers, straggler, activation memory, profiler, checkpoint/eval cadence,
                    fault injection; user callbacks from trainer.callbacks
    step.py         one optimizer step: global-token loss, router losses, agreement all-reduce
    validation.py   validation loss (top-k and causal routing); step_log.py: log-line metrics
    optim.py        AdamW parameter groups; a step that can be skipped (non-finite loss)
    schedule.py     warmup-stable-decay and cosine, pure functions of the step
    ds_config.py    the DeepSpeed config dict
    (checkpoints: megamor.runs, the run-folder layer below train/: save, integrity,
    quarantine, resume, load_model)
    signals.py      SIGTERM/SIGUSR1 -> save and exit 75; the exit codes
    metrics.py      MoR-aware FLOPs, MFU/HFU, memory, router statistics
    callbacks/      what the loop does beside training, the logging sinks included (console,
                    metrics.jsonl, W&B with its run id kept across restarts, TensorBoard, depth CSV)
    faults.py       the faults MEGAMOR_FAULTS names (callbacks/fault_injection.py injects them)
"""
