#!/usr/bin/env bash
# The router experiments of evals/results/router.md: the demo-shape MoR-expert-3 shrunk to
# d_model 128 (1.3M parameters), 300 steps of 16 x 128 tokens (lr 3e-3 WSD, bf16), one thread.
# Data: the small CPU study's tokenizer and shards (Gutenberg + WikiText-2), made by
#   python -m megamor.study configs/studies/small_cpu.yaml --plan
#
#   evals/router_runs.sh paper la_lsfull_b1 ...     # runs/router/<name>/ (metrics.jsonl, checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
PY=${PYTHON:-.venv/bin/python}
D=${DATA:-runs/studies/small_cpu/data}
PAPER="model.router.aux_bce_coef=0.001 model.router.bce_label_smoothing=0.0 model.router.learn_alpha=false"
for v in "$@"; do
  case $v in
    paper) O="$PAPER";;                                                          # the paper's settings
    z3) O="$PAPER model.router.z_loss_coef=1e-3";;                              # + z-loss 1e-3
    ls) O="$PAPER model.router.bce_label_smoothing=0.1 model.router.bce_full_capacity_steps=false";;
    z4ls) O="$PAPER model.router.z_loss_coef=1e-4 model.router.bce_label_smoothing=0.1 model.router.bce_full_capacity_steps=false";;
    z3ls_b1) O="$PAPER model.router.bce_label_smoothing=0.1 model.router.aux_bce_coef=0.01 model.router.z_loss_coef=1e-3";;
    lsfull_b1) O="$PAPER model.router.bce_label_smoothing=0.1 model.router.aux_bce_coef=0.01";;
    la_lsfull_b1) O="";;                                                         # megamor's default
    la_z3ls_b1) O="model.router.z_loss_coef=1e-3";;                             # default + z-loss 1e-3
    *) echo "unknown experiment $v" >&2; exit 2;;
  esac
  # shellcheck disable=SC2086
  "$PY" -m megamor.train --config configs/experiments/demo.yaml data.train="[$D/shards]" data.valid="[$D/shards]" \
    data.tokenizer="$D/tokenizer" model.vocab_size=4096 model.d_model=128 model.d_ff=384 data.seq_len=128 \
    model.max_seq_len=128 trainer.max_steps=300 checkpoint.every_steps=0 eval.every_steps=0 eval.max_batches=20 \
    logging.every_steps=25 wandb.mode=disabled trainer.device_tflops_probe=false run_dir="runs/router/$v" $O
done
