"""The run folder: its format and every way to read it. train/ and eval/ build on this layer;
it imports only model/, parallel/, data/ and the top-level helpers (megamor.config/env).

A run folder as the trainer writes it (`run_dir`, default runs/<name>/):

    config.yaml                  the resolved experiment config of the latest launch
    metrics.jsonl                one JSON record per log line (megamor.train.callbacks.metrics_file)
    wandb_id, wandb/             the W&B run id kept across restarts, W&B's offline files
    trainer.lock                 held while a trainer runs in the folder (megamor.train.runlock)
    tokenizer/                   a copy of the tokenizer (tokenizer.model, tokenizer_info.json; or tokenizer.json + configs)
    checkpoints/
        step_00000500/           one DeepSpeed tag (save.CheckpointManager)
            mp_rank_00_model_states.pt       model (+ ZeRO-0 optimizer) states, one per TP rank
            *zero_pp_rank_*_optim_states.pt  ZeRO 1-3 optimizer partitions, one per DP rank
            trainer_state.pt     step, tokens, data-loader position, RNG states, W&B id
            experiment.yaml      the resolved experiment config this tag was trained with
            COMPLETE             JSON: step, tokens, DP/TP size, ZeRO stage, precision, every
                                 file's size and xxh3-128 hash. Written last, atomically: a tag
                                 without it does not exist (integrity.py).
        latest                   the newest complete tag (DeepSpeed's convention, for its tools)
        universal/step_00000500/ a universal-checkpoint conversion, made on demand (resume.py)
        quarantine/step_00000400/ a tag that failed validation, moved here untouched,
        quarantine/step_00000400.json  with why and when
    export/                      `python -m megamor.export`: megamor.pt (+ Hugging Face files)

Modules:
    layout.py        names of the folders and files, tag <-> step, CheckpointRef, errors
    integrity.py     the COMPLETE marker, content hashes, quarantine
    tags.py          the complete tags of a run, resolve a run / tag folder to one tag
    safe_load.py     weights-only loading (also inside DeepSpeed), safe_universal.py for ds_to_universal
    save.py          writing tags (hashed marker, keep-last-K), save_errors.py for failed writes
    resume.py        which tag to resume and how (direct or universal conversion)
    consolidate.py   the full fp32 state dict of a tag: ZeRO-3 consolidation, TP shard merging
    load.py          load_model(source) for every source kind; find.py lists what a folder holds
"""
