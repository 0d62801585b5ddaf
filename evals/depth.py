#!/usr/bin/env python
"""Per-token recursion depth of a MoR model: coloured terminal output, HTML, statistics, plots.

    python evals/depth.py --checkpoint run/ --tokenizer tok.model --text "The cat sat on the mat."
    python evals/depth.py --checkpoint run/ --file ../shared/data/wikitext-2-raw/wiki.valid.raw \
        --max-tokens 20000 --html depth.html --plots depth/ --json depth/stats.json --quiet
"""

from __future__ import annotations

import argparse
import json

from megamor.cli import ArgumentParser, BadInput, positive_int, results, use_colour
from megamor.eval.cli import add_identity_arg, default_device, run_main, set_threads, tokenizer_for, write_text
from megamor.eval.identity import check_identity
from megamor.eval.text_input import read_text, require_text


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--device", default=None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to analyse (repeatable)")
    src.add_argument("--file", nargs="+", help="text files (one text per file)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="per text")
    p.add_argument("--max-length", type=positive_int, default=None, help="window length (default: the model's max_seq_len)")
    add_identity_arg(p)
    p.add_argument("--html", help="write an HTML rendering here")
    p.add_argument("--plots", help="folder for depth_histogram.png, depth_vs_frequency.png, depth_vs_loss.png")
    p.add_argument("--json", help="write statistics (and per-token traces with --per-token) here")
    p.add_argument("--per-token", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no per-token text (coloured on a terminal, plain when redirected)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    if a.text and any(not t.strip() for t in a.text):
        raise BadInput("--text: an empty text (nothing to analyse)")
    texts = a.text or [require_text(f, read_text(f)) for f in a.file]
    from megamor.eval.depth import depth_statistics, render_html, render_terminal, trace_depth, write_depth_plots
    from megamor.runs.load import load_model_and_meta

    set_threads()
    model, meta = load_model_and_meta(a.checkpoint, device=default_device(a.device))
    tok = tokenizer_for(a.checkpoint, a.tokenizer)
    check_identity(meta, a.checkpoint, tok, allow_mismatch=a.allow_tokenizer_mismatch)
    traces = [trace_depth(model, tok, t, max_length=a.max_length, max_tokens=a.max_tokens) for t in texts]
    if not a.quiet:
        for tr in traces:
            results().write(render_terminal(tr, colour=use_colour()))  # plain text when redirected
    stats = depth_statistics(traces)
    payload = {"stats": stats.to_dict()}
    if a.per_token:
        payload["traces"] = [t.to_dict() for t in traces]
    if a.html:
        write_text(a.html, render_html(traces))
    if a.plots:
        payload["plots"] = [str(p) for p in write_depth_plots(stats, a.plots)]
    if a.json:
        write_text(a.json, json.dumps(payload, indent=2))
    print(json.dumps({k: v for k, v in stats.to_dict().items() if k not in ("freq_bins", "loss_bins")}, indent=2),
          file=results(), flush=True)
    return payload


if __name__ == "__main__":
    run_main(main)
