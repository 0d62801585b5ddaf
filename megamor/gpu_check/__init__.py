"""GPU acceptance in one command: `python -m megamor.gpu_check` (or `make gpu-check`).

Parity first (flash-attn vs SDPA logits; compiled vs eager loss and gradients; the CUDA-graph
static decoding engine vs `generate()`; bf16 training loss finite and falling), then speed (MFU
of 135M / 360M / 1.7B, realised share of MoR's FLOP saving, token- vs expert-choice step time,
decode tokens/s engine vs Hugging Face), each figure beside its target, in one markdown report.

Every part runs in its own process under its own time limit (`runner`), so a hung kernel or a
compile that runs long is cut, reported as timed out, and the next part runs. `--tiny` runs the
same parts with toy models on a CPU (CI), where CUDA-only checks are skipped with the reason
and targets read "n/a on CPU".
"""
