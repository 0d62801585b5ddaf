"""Up-training: recursive/MoR models initialised from a vanilla model (stepwise, average,
lower), from megamor checkpoints and Hugging Face Llama folders, through the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megamor.config import ConfigError
from megamor.convert import convert, layer_sources, target_config
from megamor.model import MoRLM
from megamor.model.hf import llama_config, to_llama_state_dict
from tests.model.helpers import tiny_config


def _vanilla(n_layers: int = 8, seed: int = 0) -> MoRLM:
    torch.manual_seed(seed)
    return MoRLM(tiny_config(n_layers=n_layers)).eval()


def _layer(model: MoRLM, i: int) -> dict[str, torch.Tensor]:
    return model.layers[i].state_dict()


def test_sources_follow_the_paper():
    cfg = target_config(_vanilla().cfg, ["sharing=middle_cycle", "num_recursions=3"])
    # 8 layers: layer 0, then 6 middle layers = 2 shared layers x 3 recursions, then layer 7.
    assert layer_sources(cfg, "stepwise") == {0: [0], 3: [7], 1: [1], 2: [6]}  # the span's first and last
    assert layer_sources(cfg, "lower") == {0: [0], 3: [7], 1: [1], 2: [2]}
    assert layer_sources(cfg, "average") == {0: [0], 3: [7], 1: [1, 3, 5], 2: [2, 4, 6]}
    seq = target_config(_vanilla(6).cfg, ["sharing=sequence", "num_recursions=2"])
    assert layer_sources(seq, "average") == {0: [0, 1], 1: [2, 3], 2: [4, 5]}
    assert layer_sources(seq, "stepwise") == {0: [0], 1: [2], 2: [5]}  # linspace(0, 5, 3) = 0, 2.5 -> 2, 5


def _official_stepwise(n_layers: int, sharing: str, nr: int) -> list[int]:
    """The official selection_initialize's stepwise picks, by its rule: round(linspace(first,
    last, base)) over the shared span (layers 1..L-2 for middle sharing, else 0..L-1)."""
    middle = sharing.startswith("middle")
    first, last = (1, n_layers - 2) if middle else (0, n_layers - 1)
    base = (last - first + 1) // nr
    return [round(float(x)) for x in np.linspace(first, last, base)]


# (n_layers, sharing, N_r): the paper's layouts (360M N_r=2/3/4, 135M and 1.7B N_r=3) and small ones
LAYOUTS = [(32, "middle_cycle", 2), (32, "middle_cycle", 3), (34, "middle_cycle", 4), (32, "middle_sequence", 3),
           (26, "middle_cycle", 3), (24, "cycle", 3), (12, "sequence", 2), (8, "middle_cycle", 3), (6, "sequence", 2)]


@pytest.mark.parametrize("n_layers,sharing,nr", LAYOUTS)
def test_stepwise_picks_the_official_selection(n_layers, sharing, nr):
    cfg = target_config(tiny_config(n_layers=n_layers), [f"sharing={sharing}", f"num_recursions={nr}"])
    steps = cfg.layer_plan()[1]
    shared = list(dict.fromkeys(p for s in steps for p in s))  # in the order the stack first applies them
    picks = [layer_sources(cfg, "stepwise")[p] for p in shared]
    want = _official_stepwise(n_layers, sharing, nr)
    assert picks == [[w] for w in want]
    first, last = (1, n_layers - 2) if sharing.startswith("middle") else (0, n_layers - 1)
    assert picks[0] == [first] and picks[-1] == [last]  # the shared span's ends are kept
    # Before issue 33 stepwise took every N_r-th layer (first + j N_r): never the span's last layer.
    assert want != [first + j * nr for j in range(len(want))]


@pytest.mark.parametrize("strategy", ["stepwise", "average", "lower"])
def test_converted_parameters(strategy):
    src = _vanilla()
    cfg = target_config(src.cfg, ["sharing=middle_cycle", "num_recursions=3", "router.type=expert_choice"])
    out = convert(src, cfg, strategy)
    assert out.cfg.num_recursions == 3 and out.routers is not None
    assert torch.equal(out.embed_tokens.weight, src.embed_tokens.weight)
    assert torch.equal(out.norm.weight, src.norm.weight)
    for name, t in _layer(out, 0).items():
        assert torch.equal(t, _layer(src, 0)[name])
        assert torch.equal(_layer(out, 3)[name], _layer(src, 7)[name])
    name = "self_attn.q_proj.weight"
    want = {"stepwise": (_layer(src, 1)[name], _layer(src, 6)[name]),
            "lower": (_layer(src, 1)[name], _layer(src, 2)[name]),
            "average": ((_layer(src, 1)[name] + _layer(src, 3)[name] + _layer(src, 5)[name]) / 3,
                        (_layer(src, 2)[name] + _layer(src, 4)[name] + _layer(src, 6)[name]) / 3)}[strategy]
    assert torch.allclose(_layer(out, 1)[name], want[0], atol=1e-7, rtol=0)
    assert torch.allclose(_layer(out, 2)[name], want[1], atol=1e-7, rtol=0)
    assert out.num_params() < src.num_params()


def test_cli_from_hf_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = _vanilla()
    hf = transformers.LlamaForCausalLM(llama_config(src.cfg))
    hf.load_state_dict(to_llama_state_dict(src.cfg, src.state_dict()), strict=False)
    hf.save_pretrained(tmp_path / "llama")
    r = subprocess.run([sys.executable, "-m", "megamor.convert", str(tmp_path / "llama"), "--out", str(tmp_path / "mor"),
                        "--init", "lower", "sharing=middle_cycle", "num_recursions=3", "router.type=token_choice"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    from megamor.runs.load import load_model

    mor = load_model(tmp_path / "mor" / "megamor.pt")
    assert mor.cfg.router.type == "token_choice"
    assert torch.equal(mor.layers[2].mlp.up_proj.weight, src.layers[2].mlp.up_proj.weight)
    bad = subprocess.run([sys.executable, "-m", "megamor.convert", str(tmp_path / "llama"), "--out", str(tmp_path / "x"),
                          "sharing=middle_cycle", "num_recursions=4"], capture_output=True, text=True, timeout=300, check=False)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("megamor.convert: configuration error: config key 'model.n_layers'")
    named = subprocess.run([sys.executable, "-m", "megamor.convert", str(tmp_path / "llama"), "--out", str(tmp_path / "y"),
                            "--model-config", "configs/model/33m/mor_expert_3.yaml"],
                           capture_output=True, text=True, timeout=300, check=False)
    last = named.stderr.strip().splitlines()[-1]  # (transformers' loading lines come before it)
    assert named.returncode == 2 and last.startswith("megamor.convert: configuration error: config file ")
    assert "does not fit the source model: vocab_size 8192 (source 211), d_model 512 (source 64)" in last



def test_a_source_megamor_would_compute_differently_or_cannot_read_is_one_line(tmp_path):
    """RoPE scaling and another activation were read as plain RoPE / SwiGLU-silu (the converted
    model computed something else, silently); a damaged config.json or weights file was a
    traceback, exit 1. Now one line naming the file and key, exit 2."""
    import json

    transformers = pytest.importorskip("transformers")
    src = _vanilla()
    hf = transformers.LlamaForCausalLM(llama_config(src.cfg))
    hf.save_pretrained(tmp_path / "llama")
    cases = {"rope": ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling 'linear' is not supported"),
             "gelu": ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
             "nokey": ({"hidden_size": None}, "hidden_size missing or not an integer")}
    for name, (change, message) in cases.items():
        folder = tmp_path / name
        shutil.copytree(tmp_path / "llama", folder)
        info = json.loads((folder / "config.json").read_text())
        info.pop("rope_parameters", None) if name == "rope" else None
        info.update(change)
        (folder / "config.json").write_text(json.dumps(info))
        _refused(folder, tmp_path / f"out-{name}", message)
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "llama", broken)
    (broken / "config.json").write_text("{not json")
    _refused(broken, tmp_path / "out-broken", "config.json: unreadable")
    torn = tmp_path / "torn"
    shutil.copytree(tmp_path / "llama", torn)
    (torn / "model.safetensors").write_bytes(b"\xff" * 64)
    _refused(torn, tmp_path / "out-torn", "cannot load its weights")


def _refused(source, out, message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "megamor.convert", str(source), "--out", str(out), "sharing=cycle",
                        "num_recursions=2"], capture_output=True, text=True, timeout=300, check=False)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert last.startswith("megamor.convert: ") and message in last, last
    assert not out.exists()


def test_target_from_a_named_shipped_config():
    from megamor.config import ConfigFileError
    from megamor.env import repo_root

    shipped = repo_root() / "configs/model/33m/mor_expert_3.yaml"
    src = _vanilla(n_layers=5)
    shape = [f"{k}={getattr(src.cfg, k)}" for k in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff")]
    cfg = target_config(src.cfg, [*shape, "n_layers=5"], model_config=shipped)
    assert cfg.router.gate_straight_through and cfg.router.alpha == 0.1 and cfg.num_recursions == 3
    assert cfg.max_seq_len == 2048  # the named config's, not the source's (RoPE keeps no table)
    with pytest.raises(ConfigFileError) as e:
        target_config(src.cfg, shape, model_config=shipped)  # the config's 8 layers, the source's 5
    assert str(e.value) == (f"config file {shipped}: does not fit the source model: n_layers 8 (source 5); name the "
                            "config of the source's size, or add the overrides n_layers=5")
    with pytest.raises(ConfigFileError, match=r"d_model 512 \(source 64\), .* add the overrides n_layers=5 vocab_size=211 d_model=64"):
        target_config(src.cfg, [], model_config=shipped)


def test_tying_an_untied_source_is_refused():
    """tie_embeddings=true on a source with its own LM head silently dropped that head."""
    torch.manual_seed(0)
    src = MoRLM(tiny_config(n_layers=8, tie_embeddings=False)).eval()
    with pytest.raises(ConfigError) as e:
        target_config(src.cfg, ["sharing=middle_cycle", "num_recursions=3", "tie_embeddings=true"])
    assert e.value.key == "model.tie_embeddings"
    assert not target_config(src.cfg, ["sharing=middle_cycle", "num_recursions=3"]).tie_embeddings
