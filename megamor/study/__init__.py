"""Iso-FLOP studies: `python -m megamor.study configs/studies/X.yaml`.

config   the typed study file (variants, budget, seeds, data, evaluations)
budget   each variant's token budget from its expected FLOPs per token
plan     the runs (variant x seed) with their folders and training overrides
data     tokenizer + shards from raw text, once per study
run      train one run (a real `python -m megamor.train`), evaluate it, write its result
evaluate validation loss (top-k and causal), router agreement, depth analysis, few-shot
report   the markdown table (mean and spread over seeds) and the PNG plots
"""
