"""Per-token recursion depth of a MoR model on any text, and what it correlates with.

    traces = [trace_depth(model, tok, text) for text in texts]
    print(render_terminal(traces[0]))            # tokens coloured by depth
    Path("depth.html").write_text(render_html(traces))
    stats = depth_statistics(traces)             # histogram, depth vs frequency, depth vs loss
    write_depth_plots(stats, "plots/")

A token's depth is the number of recursion steps its position ran (0..N_r; `stats.depth`
of the model's forward with causal routing, the evaluation/decoding routing). Its loss is
the NLL of the next token, predicted from that position: the prediction the extra depth
went into. Texts longer than the context are cut into disjoint windows; each window starts
without context (the text's first window starts after EOS, the document-start token).
"""

from __future__ import annotations

import html
import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megamor.model.routing import precision_recall, trace_agreement

from .errors import EvalInputError
from .scoring import model_max_length
from .tokenizer import EvalTokenizer

# Colours per depth: depth 0 (skipped every recursion) to 5+; the terminal uses rich's names.
TERM_COLOURS = ["grey50", "bright_blue", "green", "yellow", "red", "magenta"]
HTML_COLOURS = ["#e0e0e0", "#9ecae1", "#a1d99b", "#fdd49e", "#fc9272", "#c994c7"]
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class DepthTrace:
    ids: np.ndarray  # [n] token ids of the text
    pieces: list[str]  # [n] display strings; "".join(pieces) is the text
    depth: np.ndarray  # [n] recursion steps each token's position ran
    loss: np.ndarray  # [n] NLL (nats) of the next token predicted at each position; nan for the last
    num_recursions: int
    # Expert choice: {step (1-based): [causal & topk, causal, topk] token counts}, the causal
    # choice against a top-k pass over the same windows (megamor.model.routing)
    agreement: dict[int, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"pieces": self.pieces, "ids": self.ids.tolist(), "depth": self.depth.tolist(),
                "loss": [None if math.isnan(x) else round(float(x), 4) for x in self.loss], "num_recursions": self.num_recursions,
                "router_agreement": router_agreement([self])}


def token_strings(tok: EvalTokenizer, ids: Sequence[int]) -> list[str]:
    """Display string per token: sentencepiece pieces with "▁" as a space; a run of byte-fallback
    pieces is decoded together (multi-byte characters) and shown on its first token. A tokenizer
    with its own `token_strings` (Hugging Face byte-level pieces) renders itself."""
    own = getattr(tok, "token_strings", None)
    if own is not None:
        return own(ids)
    piece = getattr(tok, "id_to_piece", None)
    if piece is None:
        return [tok.decode([int(i)]) for i in ids]
    ps = [piece(int(i)) for i in ids]
    out: list[str] = []
    i = 0
    while i < len(ps):
        if _BYTE.fullmatch(ps[i]):
            j, buf = i, bytearray()
            while j < len(ps) and _BYTE.fullmatch(ps[j]):
                buf.append(int(_BYTE.fullmatch(ps[j]).group(1), 16))
                j += 1
            out.append(buf.decode("utf-8", errors="replace"))
            out.extend([""] * (j - i - 1))
            i = j
        else:
            out.append(ps[i].replace("\u2581", " "))
            i += 1
    return out


@torch.no_grad()
def trace_depth(
    model: torch.nn.Module, tok: EvalTokenizer, text: str, max_length: int | None = None, batch_size: int = 8,
    max_tokens: int | None = None,
) -> DepthTrace:
    ids = tok.encode(text)[:max_tokens]
    if not ids:
        raise EvalInputError("empty text: nothing to trace")
    L = max_length or model_max_length(model)
    stream = torch.tensor([tok.eos_id] + ids, dtype=torch.long)
    n = len(stream)
    device = next(model.parameters()).device
    depth = np.zeros(n, dtype=np.int64)
    loss = np.full(n, np.nan, dtype=np.float64)
    starts = list(range(0, n, L))
    agreement: dict[int, list[float]] = {}
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(starts), batch_size):
            chunk = starts[b0 : b0 + batch_size]
            lens = [min(L, n - s) for s in chunk]
            T = max(lens)
            x = torch.full((len(chunk), T), tok.eos_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.bool)
            for r, (s, ln) in enumerate(zip(chunk, lens)):
                x[r, :ln] = stream[s : s + ln]
                mask[r, :ln] = True
            padded = not bool(mask.all())
            out = model(x.to(device), attention_mask=mask.to(device) if padded else None, causal_routing=True)
            _add_agreement(model, x.to(device), mask.to(device) if padded else None, agreement)
            lp = torch.log_softmax(out.logits.float(), -1).cpu()
            d = out.stats.depth.cpu()
            for r, (s, ln) in enumerate(zip(chunk, lens)):
                depth[s : s + ln] = d[r, :ln].numpy()
                m = min(ln, n - 1 - s)  # positions with a next token
                if m > 0:
                    tgt = stream[s + 1 : s + 1 + m]
                    loss[s : s + m] = (-lp[r, torch.arange(m), tgt]).double().numpy()
    finally:
        model.train(was_training)
    nr = int(getattr(getattr(model, "cfg", None), "num_recursions", int(depth.max()) or 1))
    pieces = token_strings(tok, ids)
    if pieces[0].startswith(" ") and not text.startswith(" "):
        pieces[0] = pieces[0][1:]  # sentencepiece's dummy-prefix space
    return DepthTrace(np.asarray(ids, dtype=np.int64), pieces, depth[1:], loss[1:], nr, agreement)


def _add_agreement(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None, acc: dict[int, list[float]]) -> None:
    """Expert choice: a top-k pass over the same windows, counting where the causal choice agrees."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.router.type != "expert_choice" or not hasattr(model, "record_router"):
        return
    model.record_router = True
    try:
        out = model(x, attention_mask=mask, causal_routing=False, return_logits=False)
    finally:
        model.record_router = False
    for r, c in trace_agreement(model.routers, out.stats.get("router_trace", [])).items():
        acc[r + 1] = [a + b for a, b in zip(acc.get(r + 1, [0.0, 0.0, 0.0]), c.tolist())]


def router_agreement(traces: Sequence[DepthTrace]) -> list[dict]:
    """Per routed step: precision and recall of the causal choice against top-k."""
    total: dict[int, list[float]] = {}
    for t in traces:
        for r, c in t.agreement.items():
            total[r] = [a + b for a, b in zip(total.get(r, [0.0, 0.0, 0.0]), c)]
    out = []
    for r in sorted(total):
        precision, recall = precision_recall(total[r])
        out.append({"step": r, "precision": precision, "recall": recall, "topk_tokens": int(total[r][2])})
    return out


# -- rendering -----------------------------------------------------------------------------
def render_terminal(trace: DepthTrace, legend: bool = True, width: int = 100, colour: bool = True) -> str:
    """The text with each token coloured by its depth, as ANSI escapes (for print); colour=False
    (output not a terminal): plain text, each token followed by its depth in brackets."""
    if not colour:
        head = f"depth per token (0-{trace.num_recursions}) in brackets:\n" if legend else ""
        return head + "".join(f"{p}[{int(d)}]" for p, d in zip(trace.pieces, trace.depth)) + "\n"
    from rich.console import Console
    from rich.text import Text

    t = Text()
    for p, d in zip(trace.pieces, trace.depth):
        t.append(p, style=TERM_COLOURS[min(int(d), len(TERM_COLOURS) - 1)])
    console = Console(record=False, force_terminal=True, color_system="256", width=width)
    with console.capture() as cap:
        if legend:
            lg = Text("depth: ")
            for d in range(trace.num_recursions + 1):
                lg.append(f" {d} ", style=f"reverse {TERM_COLOURS[min(d, len(TERM_COLOURS) - 1)]}")
            console.print(lg)
        console.print(t)
    return cap.get()


def render_html(traces: Sequence[DepthTrace], title: str = "MoR recursion depth per token") -> str:
    """A standalone page: each token on its depth's colour, its depth and loss on hover."""
    nr = max(t.num_recursions for t in traces)
    css = "".join(f".d{d}{{background:{HTML_COLOURS[min(d, len(HTML_COLOURS) - 1)]}}}" for d in range(nr + 1))
    legend = " ".join(f'<span class="tok d{d}">depth {d}</span>' for d in range(nr + 1))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        (f"<title>{html.escape(title)}</title>"
         "<style>body{font-family:monospace;max-width:60em;margin:2em auto;line-height:1.7}"
         f".tok{{white-space:pre-wrap;border-radius:2px}}{css}</style></head><body>"),
        f"<h3>{html.escape(title)}</h3><p>{legend}</p>",
    ]
    for tr in traces:
        parts.append("<p>")
        for p, d, ls in zip(tr.pieces, tr.depth, tr.loss):
            tip = f"depth {int(d)}" + ("" if math.isnan(ls) else f", next-token loss {ls:.2f}")
            parts.append(f'<span class="tok d{int(d)}" title="{tip}">{html.escape(p)}</span>')
        parts.append("</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


# -- statistics ----------------------------------------------------------------------------
@dataclass
class DepthStats:
    num_recursions: int
    tokens: int
    depth_counts: list[int]  # tokens at depth 0..N_r
    step_fraction: list[float]  # fraction of tokens that ran recursion step r = 1..N_r
    freq_bins: list[dict] = field(default_factory=list)  # {lo, hi, tokens, mean_depth}: by token frequency
    loss_bins: list[dict] = field(default_factory=list)  # {lo, hi, tokens, mean_depth}: by next-token loss
    corr_depth_logfreq: float = float("nan")  # Spearman
    corr_depth_loss: float = float("nan")
    router_agreement: list[dict] = field(default_factory=list)  # expert choice: causal vs top-k per step

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _bins(x: np.ndarray, depth: np.ndarray, edges: np.ndarray) -> list[dict]:
    out = []
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        sel = (x >= lo) & ((x < hi) if i < len(edges) - 2 else (x <= hi))
        if sel.any():
            out.append({"lo": float(lo), "hi": float(hi), "tokens": int(sel.sum()), "mean_depth": float(depth[sel].mean())})
    return out


def depth_statistics(traces: Sequence[DepthTrace], frequency: Counter | None = None, n_loss_bins: int = 10) -> DepthStats:
    """Depth histogram, fraction per recursion step, and mean depth against token frequency
    (counts over `frequency`, default: over the traced texts) and against next-token loss."""
    nr = max(t.num_recursions for t in traces)
    depth = np.concatenate([t.depth for t in traces])
    ids = np.concatenate([t.ids for t in traces])
    loss = np.concatenate([t.loss for t in traces])
    freq = frequency if frequency is not None else Counter(ids.tolist())
    f = np.array([max(1, freq.get(int(i), 0)) for i in ids], dtype=float)
    counts = np.bincount(depth, minlength=nr + 1)[: nr + 1]
    stats = DepthStats(
        num_recursions=nr,
        tokens=len(depth),
        depth_counts=counts.tolist(),
        step_fraction=[float((depth >= r).mean()) for r in range(1, nr + 1)],
        router_agreement=router_agreement(traces),
    )
    edges = 2.0 ** np.arange(0, math.ceil(math.log2(f.max())) + 2)
    stats.freq_bins = _bins(f, depth, edges)
    stats.corr_depth_logfreq = _spearman(depth.astype(float), np.log(f))
    ok = ~np.isnan(loss)
    if ok.sum() > 0:
        qs = np.unique(np.quantile(loss[ok], np.linspace(0, 1, n_loss_bins + 1)))
        if len(qs) >= 2:
            stats.loss_bins = _bins(loss[ok], depth[ok], qs)
        stats.corr_depth_loss = _spearman(depth[ok].astype(float), loss[ok])
    return stats


def write_depth_plots(stats: DepthStats, folder: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ds = list(range(stats.num_recursions + 1))
    a1.bar(ds, stats.depth_counts, color=[HTML_COLOURS[min(d, len(HTML_COLOURS) - 1)] for d in ds], edgecolor="k")
    a1.set_xlabel("recursion depth")
    a1.set_ylabel("tokens")
    a1.set_xticks(ds)
    steps = list(range(1, stats.num_recursions + 1))
    a2.bar(steps, stats.step_fraction, color="#6baed6", edgecolor="k")
    a2.set_xlabel("recursion step")
    a2.set_ylabel("fraction of tokens that ran it")
    a2.set_xticks(steps)
    a2.set_ylim(0, 1.05)
    fig.suptitle(f"depth histogram ({stats.tokens} tokens)")
    fig.tight_layout()
    out.append(folder / "depth_histogram.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)

    for name, bins, xlabel, corr, logx in (
        ("depth_vs_frequency", stats.freq_bins, "token frequency (count in the text)", stats.corr_depth_logfreq, True),
        ("depth_vs_loss", stats.loss_bins, "next-token loss (nats)", stats.corr_depth_loss, False),
    ):
        if not bins:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        xs = [math.sqrt(b["lo"] * b["hi"]) if logx else (b["lo"] + b["hi"]) / 2 for b in bins]
        ax.plot(xs, [b["mean_depth"] for b in bins], marker="o")
        for x, b in zip(xs, bins):
            ax.annotate(str(b["tokens"]), (x, b["mean_depth"]), fontsize=6, xytext=(0, 4), textcoords="offset points", ha="center")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean depth")
        ax.set_title(f"Spearman rho = {corr:.3f}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append(folder / f"{name}.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out
