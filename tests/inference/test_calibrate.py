"""Router calibration reaches each step's capacity share; the decode benchmark runs end to end
at tiny size (the same script the GPU run uses)."""

from __future__ import annotations

import pytest
import torch

from megamor.inference.calibrate import calibrate_decoding, calibrate_routers

from .test_engine import _model


@pytest.mark.parametrize("variant", ["mor_expert", "mor_token"])
def test_calibrated_shares_match_capacities(variant):
    model = _model(variant, "recursion_wise")
    caps = model.cfg.capacities
    x = torch.randint(1, 200, (8, 64), generator=torch.Generator().manual_seed(0))
    before = model(x, causal_routing=True).stats.selected_fraction
    got = calibrate_routers(model, x)
    assert max(abs(a - b) for a, b in zip(got, caps)) <= 0.02, (before, got)
    assert got == model(x, causal_routing=True).stats.selected_fraction  # the model itself now routes so
    prompts = x[:, :8].tolist()
    shares = calibrate_decoding(model, prompts, 24)
    assert max(abs(a - b) for a, b in zip(shares, caps)) <= 0.1, shares


def test_bench_decode_runs_at_tiny_size(tmp_path):
    pytest.importorskip("transformers")
    from megamor.benchmarks.decode import main

    d = tmp_path / "tiny"
    d.mkdir()
    base = "vocab_size: 211\nd_model: 64\nn_layers: 8\nn_heads: 4\nn_kv_heads: 2\nd_ff: 128\nmax_seq_len: 128\n"
    (d / "vanilla.yaml").write_text(base)
    (d / "recursive_3.yaml").write_text(base + "sharing: middle_cycle\nnum_recursions: 3\n")
    (d / "mor_expert_3.yaml").write_text("base: recursive_3.yaml\nrouter: {type: expert_choice}\n")
    (d / "mor_token_3.yaml").write_text("base: recursive_3.yaml\nrouter: {type: token_choice}\n")
    out = tmp_path / "decode.md"
    assert main(["--size", str(d), "--device", "cpu", "--batch", "2", "--prompt-len", "4", "--new-tokens", "6",
                 "--out", str(out)]) == 0
    text = out.read_text()
    variants = ("vanilla", "recursive_3", "mor_expert_3", "mor_token_3", "vanilla_eq")
    engines = [f"engine {mode} {v}" for mode in ("static", "dynamic") for v in variants]
    for name in engines + ["HF generate, dynamic cache", "HF generate, static cache", "megamor generate()"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {name}"))
        assert "timed out" not in row and row.split("|")[2].strip() != "-", row
    assert text.count("| 1.00x |") >= 2  # each engine mode's vanilla is its own baseline
