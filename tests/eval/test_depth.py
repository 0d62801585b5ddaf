"""Depth analysis: per-token depth and loss against a direct forward pass, renderings, statistics."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamor.eval.depth import depth_statistics, render_html, render_terminal, trace_depth, write_depth_plots
from megamor.testing.scripts import load_evals_script

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak. <b>Café</b> naïve — 日本語."


def test_trace_matches_a_direct_forward(mor_model, tok):
    tr = trace_depth(mor_model, tok, TEXT)
    ids = [tok.eos_id] + tok.encode(TEXT)
    with torch.no_grad():
        out = mor_model(torch.tensor(ids)[None], causal_routing=True)
    assert tr.depth.tolist() == out.stats.depth[0, 1:].tolist()
    ref = F.cross_entropy(out.logits[0, 1:-1].double(), torch.tensor(ids[2:]), reduction="none").numpy()
    np.testing.assert_allclose(tr.loss[:-1], ref, rtol=1e-5)
    assert np.isnan(tr.loss[-1])
    assert "".join(tr.pieces) == TEXT  # pieces (byte-fallback runs merged) reassemble the text
    assert set(tr.depth.tolist()) == {1, 2}  # the trained router sends only some tokens deeper


def test_windows_and_batching_do_not_change_depth(mor_model, tok):
    long = TEXT * 6
    a = trace_depth(mor_model, tok, long, max_length=40, batch_size=1)
    b = trace_depth(mor_model, tok, long, max_length=40, batch_size=8)
    assert len(a.depth) == len(tok.encode(long)) > 120
    assert (a.depth == b.depth).all()
    np.testing.assert_allclose(a.loss, b.loss, atol=1e-4)


def test_renderings(mor_model, tok):
    tr = trace_depth(mor_model, tok, TEXT)
    term = render_terminal(tr, legend=False)
    assert "\x1b[" in term and re.sub(r"\x1b\[[0-9;]*m", "", term).rstrip("\n") == TEXT
    page = render_html([tr])
    spans = re.findall(r'<span class="tok d(\d)" title="depth (\d)[^"]*">', page)
    assert [int(d) for d, _ in spans] == tr.depth.tolist()  # the legend spans have no title
    assert "&lt;" in page and "<b>" not in page  # the text is HTML-escaped


def test_statistics_and_plots(mor_model, tok, tmp_path):
    trs = [trace_depth(mor_model, tok, TEXT), trace_depth(mor_model, tok, TEXT.upper())]
    st = depth_statistics(trs)
    depth = np.concatenate([t.depth for t in trs])
    assert st.tokens == len(depth) and sum(st.depth_counts) == len(depth)
    assert st.step_fraction == pytest.approx([(depth >= r).mean() for r in (1, 2)])
    assert sum(b["tokens"] for b in st.freq_bins) == len(depth)
    assert sum(b["tokens"] for b in st.loss_bins) == sum(int((~np.isnan(t.loss)).sum()) for t in trs)
    means = [b["mean_depth"] for b in st.freq_bins]
    assert all(1 <= m <= 2 for m in means)
    pngs = write_depth_plots(st, tmp_path)
    assert sorted(p.name for p in pngs) == ["depth_histogram.png", "depth_vs_frequency.png", "depth_vs_loss.png"]
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_cli(mor_checkpoint, spm_path, tmp_path, capsys):
    cli = load_evals_script("depth")
    cli.main(["--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), "--text", TEXT, "--html", str(tmp_path / "d.html"),
              "--plots", str(tmp_path / "p"), "--json", str(tmp_path / "s.json"), "--per-token"])
    out = capsys.readouterr().out
    assert "\x1b[" not in out and re.search(r"\S\[\d\]", out)  # not a terminal: plain text, each token's depth in brackets
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["stats"]["num_recursions"] == 2 and "".join(data["traces"][0]["pieces"]) == TEXT
    assert (tmp_path / "d.html").is_file() and (tmp_path / "p" / "depth_histogram.png").is_file()


def test_depth_analysis_reports_router_agreement(mor_model, tok):
    """Expert choice: the trace counts, per routed step, where the causal choice agrees with a
    top-k pass over the same windows; the statistics turn them into precision and recall."""
    from megamor.eval.depth import depth_statistics, trace_depth
    from megamor.model.router_health import agreement_counts

    text = "The quick brown fox jumps over the lazy dog. " * 6
    tr = trace_depth(mor_model, tok, text)
    if mor_model.cfg.router.type != "expert_choice":
        assert tr.agreement == {}
        return
    routed = [r + 1 for r, c in enumerate(mor_model.cfg.capacities) if c < 1.0]
    assert sorted(tr.agreement) == routed
    # the same counts from a direct top-k forward over the one window
    ids = torch.tensor([[tok.eos_id] + tok.encode(text)])
    mor_model.record_router = True
    try:
        out = mor_model(ids, causal_routing=False)
    finally:
        mor_model.record_router = False
    for r, logits, cand, sel in out.stats["router_trace"]:
        assert tr.agreement[r + 1] == agreement_counts(logits, cand, sel, mor_model.routers[r].threshold).tolist()
    stats = depth_statistics([tr])
    assert [a["step"] for a in stats.router_agreement] == routed
    assert all(0.0 <= a["recall"] <= 1.0 for a in stats.router_agreement)
    assert "router_agreement" in tr.to_dict()
