# Source of quickstart.ipynb (percent format: `# %%` starts a code cell, `# %% [markdown]` a
# markdown cell written as `# ` comments). Edit here, then run `python notebooks/build.py`.

# %% [markdown]
# # megamor quickstart: a Mixture-of-Recursions model in one minute of CPU
#
# A MoR model is a Llama-style decoder whose middle layers form one shared block applied up to
# N_r times; a router decides, token by token, how many of those recursions each token gets.
# This notebook walks through the whole idea on a laptop CPU:
#
# 1. make the synthetic demo corpus, a tokenizer and token shards,
# 2. build a tiny MoR model from one of the shipped configs,
# 3. train it for a few dozen steps,
# 4. decode with causal routing, recording each token's recursion depth,
# 5. plot the depths.
#
# Everything runs in this process with plain PyTorch. Real runs use the DeepSpeed trainer:
# `make demo` (README) trains this model on the demo corpus; by hand, on the data it prepares:
#
# ```bash
# python -m megamor.train --config configs/experiments/demo.yaml \
#     data.train=[runs/demo/data/shards] data.valid=[runs/demo/data/shards]
# ```

# %%
import os
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from megamor.data.config import DataConfig
from megamor.data.demo_data import prepare_demo_data
from megamor.data.loader import TrainLoader, build_eval_batches
from megamor.data.tokenizer import Tokenizer
from megamor.env import repo_root
from megamor.eval.depth import HTML_COLOURS, token_strings
from megamor.inference.generate import generate
from megamor.model.config import load_model_config
from megamor.model.mor import MoRLM
from megamor.train.config import OptimConfig
from megamor.train.optim import build_optimizer

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
torch.manual_seed(0)
# Everything this notebook writes goes here (reused when it is run again).
OUT = Path(os.environ.get("MEGAMOR_QUICKSTART_DIR") or repo_root() / "runs" / "quickstart")
print("writing to", OUT)

# %% [markdown]
# ## 1. Data: corpus, tokenizer, shards
#
# `prepare_demo_data` runs the same three steps as `make demo` (and `data_prep/`): it writes a
# synthetic corpus (template prose, encyclopedia facts, questions about them, arithmetic,
# number sequences: tokens of very different difficulty), trains a sentencepiece tokenizer on
# it and tokenizes it into memory-mapped shards with a train and a valid split. One megabyte
# keeps it to a couple of seconds.

# %%
data = prepare_demo_data(OUT / "data", mb=1.0, vocab_size=1024, valid_fraction=0.02)
tok = Tokenizer.load(data.tokenizer)
print(tok)
print(data.corpus.read_text().splitlines()[0][:300])

# %% [markdown]
# ## 2. A tiny MoR model from a config
#
# `configs/model/33m/mor_expert_3.yaml` is the paper's best variant: middle-cycle sharing
# (first and last layer unique, the middle shared), 3 recursions, an expert-choice router
# that keeps 3/3, 2/3 and 1/3 of the tokens at recursion steps 1, 2 and 3. Overrides
# (`key=value`, as on the command line) shrink it to CPU size: 5 virtual layers are 1 unique
# layer, 1 shared layer applied 3 times and 1 unique layer.

# %%
cfg = load_model_config(
    repo_root() / "configs/model/33m/mor_expert_3.yaml",
    overrides=[f"vocab_size={tok.vocab_size}", "d_model=128", "n_layers=5", "n_heads=4", "n_kv_heads=2",
               "d_ff=384", "max_seq_len=128"],
)
model = MoRLM(cfg)
prelude, steps, coda = cfg.layer_plan()
print(f"router {cfg.router.type}, {cfg.num_recursions} recursions, capacities {cfg.capacities}")
print(f"physical layers: prelude {prelude}, recursion steps {steps}, coda {coda}")
print(f"{model.num_params() / 1e6:.2f}M parameters")

# %% [markdown]
# ## 3. Train a few steps
#
# `TrainLoader` reads packed 128-token windows from the shards in a deterministic order. Each
# step adds the router's auxiliary loss (`aux_loss`: the BCE that teaches expert choice a
# causal threshold for decoding) to the language-model loss. `stats.mean_depth` is the
# average number of recursion steps a token ran: about 2 here, as the capacities fix it in
# training.
# The validation loss uses causal routing, as decoding does: no token's depth depends on
# later tokens.

# %%
STEPS, BATCH, SEQ = 40, 8, 128
data_cfg = DataConfig(train=[str(data.shards)], valid=[str(data.shards)], seq_len=SEQ)
loader = TrainLoader(data_cfg, global_batch_size=BATCH, micro_batch_size=BATCH, dp_rank=0, dp_world_size=1)
opt = build_optimizer(model, OptimConfig(lr=3e-3), torch.device("cpu"))


@torch.no_grad()
def validation_loss(model: MoRLM, batches: int = 4) -> float:
    model.eval()
    losses = [model(b["input_ids"], targets=b["targets"], causal_routing=True).loss.item()
              for b in build_eval_batches(data_cfg, batch_size=BATCH, max_batches=batches)]
    model.train()
    return sum(losses) / len(losses)


val_before = validation_loss(model)
losses, mean_depths = [], []
t0 = time.time()
model.train()
for step in range(1, STEPS + 1):
    batch = loader.next_batch()
    out = model(batch["input_ids"], targets=batch["targets"], return_logits=False)
    (out.loss + out.aux_loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(out.loss.item())
    mean_depths.append(out.stats.mean_depth)
    if step % 10 == 0 or step == 1:
        print(f"step {step:3d}  loss {losses[-1]:.3f}  mean depth {mean_depths[-1]:.2f}  ({time.time() - t0:.0f}s)")
val_after = validation_loss(model)
print(f"validation loss (causal routing): {val_before:.3f} before training, {val_after:.3f} after")

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(range(1, STEPS + 1), losses)
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats)")
ax.set_title("a tiny MoR model learning the demo corpus")
plt.show()

# %% [markdown]
# ## 4. Decode with per-token depths
#
# `generate` (in `megamor.inference.generate`, not on the model) decodes with recursion-aware KV
# caches and causal routing: each router compares a token's logit with the threshold it
# learned in training, so a token's depth is fixed when it is read. `prompt_depths` are the
# prompt tokens' depths (prefill), `depths` the generated tokens' (the last generated token is
# never fed back, so it has none). A prompt starts with EOS, the document-start token. Below:
# each sample's text, then its tokens as `'piece':depth`.

# %%
PROMPTS = ["Q: What is the capital of", "The sum of 12 and 30 is", "Once upon a time"]
prompt_ids = [[tok.eos_id] + tok.encode(p) for p in PROMPTS]
gen = generate(model, prompt_ids, 30, temperature=0.0, eos_id=tok.eos_id)

samples = []  # (token ids, depth of each) per prompt, without the EOS prefix
for ids, new, depths, p_depths in zip(prompt_ids, gen.tokens, gen.depths, gen.prompt_depths):
    samples.append((ids[1:] + new[: len(depths)], p_depths[1:] + depths))
for ids, depths in samples:
    print(repr(tok.decode(ids)))
    print("  " + " ".join(f"{piece!r}:{d}" for piece, d in zip(token_strings(tok, ids), depths)), "\n")

# %% [markdown]
# ## 5. Plot the depths
#
# Left: how many of the decoded tokens ran 1, 2 or 3 recursion steps. Right: the tokens
# themselves, coloured by depth (the colours of `evals/depth.py`'s HTML view). A trained model
# gives its deepest computation to the tokens that need it; after 40 steps the pattern is only
# beginning (`make demo` trains for 300; `evals/depth.py` analyses a trained model's depths).

# %%
n_rec = cfg.num_recursions
all_depths = [d for _, depths in samples for d in depths]
counts = [all_depths.count(d) for d in range(n_rec + 1)]
colour = [HTML_COLOURS[min(d, len(HTML_COLOURS) - 1)] for d in range(n_rec + 1)]

fig, (hist, text) = plt.subplots(1, 2, figsize=(13, 3.2), gridspec_kw={"width_ratios": [1, 3.2]})
hist.bar(range(n_rec + 1), counts, color=colour, edgecolor="k")
hist.set_xticks(range(n_rec + 1))
hist.set_xlabel("recursion depth")
hist.set_ylabel("tokens")
hist.set_title(f"depth histogram ({len(all_depths)} tokens)")

# Tokens laid out left to right, each advanced by its rendered width, wrapped at the right edge.
renderer = fig.canvas.get_renderer()
box = text.get_window_extent(renderer)
line = 2.0 * 9 * fig.dpi / 72 / box.height  # line height (9 pt text) in axes fractions
x, y = 0.0, 0.92  # below the title
for ids, depths in samples:
    for piece, d in zip(token_strings(tok, ids), depths):
        t = text.text(x, y, piece.replace("\n", "\\n"), transform=text.transAxes, family="monospace", fontsize=9,
                      va="top", bbox={"facecolor": colour[d], "edgecolor": "white", "pad": 1.5})
        width = (t.get_window_extent(renderer).width + 4) / box.width
        if x > 0 and x + width > 1:  # wrap
            x, y = 0.0, y - line
            t.set_position((x, y))
        x += width
    x, y = 0.0, y - 1.6 * line
text.axis("off")
for d in range(n_rec + 1):
    text.scatter([], [], marker="s", s=80, color=colour[d], label=f"depth {d}")
text.legend(loc="upper right", bbox_to_anchor=(1.0, 0.0), ncol=n_rec + 1, fontsize=8, frameon=False)
text.set_title("decoded tokens coloured by recursion depth")
plt.show()

# %% [markdown]
# ## Next
#
# - `make demo`: the same pipeline with the DeepSpeed trainer, checkpoints, validation and an
#   offline W&B run, in a few minutes.
# - `python -m megamor.model.summary configs/model/360m/mor_expert_3.yaml`: parameters, FLOPs and
#   KV-cache size of the real shapes.
# - `python evals/depth.py --checkpoint ... --tokenizer ... --text "..."`: depth traces, histograms
#   and depth-vs-loss plots of a trained model (docs/evaluation.md).
