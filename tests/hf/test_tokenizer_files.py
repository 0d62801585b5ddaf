"""Export folders carry tokenizer files: `AutoTokenizer.from_pretrained(DIR)` loads them as a
built-in tokenizer class (a folder without the model's config.json: no remote code at all; an
export: trust_remote_code=True for the model's config, as the model needs) and encodes text to
megamor's ids; lm-eval's `hf`
model loads an export and, with the built-in harness's --no-prefix, scores as it does (issue 27)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megamor.data.tokenizer import Tokenizer
from megamor.env import shared_data_dir
from megamor.hf.tokenizer_files import write_tokenizer_files

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared datasets not found at {d}")
    wiki = (d / "wikitext-2-raw" / "wiki.valid.raw").read_text()
    piqa = (d / "piqa" / "valid.jsonl").read_text().splitlines()[:200]
    edge = ["", " ", "\n", "  two leading spaces", "trailing  ", "a\n b\n\n  c", "tab\tand\r\nCRLF", "<s> </s> <unk> <pad>",
            "digits 0123456789 and 3.14159", "naïve café ☃ 日本語 🦀 \u200b zero-width", "▁ the marker itself"]
    return edge + [wiki[i : i + 3000] for i in range(0, 60_000, 3000)] + piqa


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_autotokenizer_encodes_as_megamor(model_type, texts, tmp_path):
    from megamor.data.tokenizer_train import train_tokenizer

    src = shared_data_dir() / "tinyshakespeare" / "input.txt"
    ours = train_tokenizer([str(src)], tmp_path / "tok", vocab_size=800, model_type=model_type, num_threads=1)
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy2(ours.path, export / "tokenizer.model")
    write_tokenizer_files(export, export / "tokenizer.model", model_max_length=512)
    hf = transformers.AutoTokenizer.from_pretrained(export)  # would stop at a trust_remote_code prompt without the files
    assert type(hf).__module__.startswith("transformers.")  # a built-in class, no remote code
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id)
    assert hf.model_max_length == 512 and len(hf) == ours.vocab_size
    specials = {ours.sp.id_to_piece(i) for i in (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id)}
    for t in texts:
        if model_type == "unigram" and any(p in t for p in specials):
            continue  # the documented Unigram difference (megamor/hf/tokenizer_files.py)
        ids = ours.encode(t)
        assert hf.encode(t) == ids, t[:60]
        assert hf.decode(ids) == ours.decode(ids), t[:60]


def test_export_writes_tokenizer_files_and_lm_eval_hf_loads_it(mor_model_and_run, tmp_path, monkeypatch):
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    from megamor.env import repo_root
    from megamor.eval.harness import evaluate_task
    from megamor.eval.scoring import Scorer
    from megamor.eval.tokenizer import load_tokenizer
    from megamor.export import export

    model, run = mor_model_and_run
    out = export(run)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    tok = load_tokenizer(out / "tokenizer.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = (shared_data_dir() / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:5000]
    assert hf_tok.encode(text) == tok.encode(text)

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda *a, **k: None)
    tm = TaskManager(include_path=str(repo_root() / "evals" / "tasks"), include_defaults=False)
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
                                  tasks=["megamor_piqa"], task_manager=tm, limit=6, batch_size=4, device="cpu",
                                  log_samples=True, bootstrap_iters=10, verbosity="ERROR")
    samples = sorted(res["samples"]["megamor_piqa"], key=lambda s: s["doc_id"])
    # lm-eval's hf model adds no prefix; the built-in harness with --no-prefix scores the same requests.
    ours = evaluate_task(Scorer(model, batch_size=4, pad_id=tok.eos_id), tok, "piqa", limit=6, add_prefix=False)
    assert len(samples) == ours.n == 6
    for s, o in zip(samples, ours.samples):
        assert [r[0] for r in s["filtered_resps"]] == pytest.approx(o["loglikelihoods"], abs=1e-4), o["src"]
    assert res["results"]["megamor_piqa"]["acc,none"] == ours.metrics["acc"]


@pytest.fixture(scope="module")
def mor_model_and_run(tmp_path_factory) -> tuple:
    """A small MoR model (random weights) in a run folder as the trainer writes it, with a
    megamor tokenizer that has every piece the model can emit."""
    import torch

    from megamor.data.tokenizer_train import train_tokenizer
    from megamor.model import MoRLM
    from tests.eval.conftest import small_config
    from tests.eval.test_checkpoint import training_run

    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared datasets not found at {d}")
    root = tmp_path_factory.mktemp("hfexport")
    tok: Tokenizer = train_tokenizer([str(d / "tinyshakespeare" / "input.txt")], root / "tok", vocab_size=800, num_threads=1)
    torch.manual_seed(0)
    model = MoRLM(small_config(vocab_size=800)).eval()
    return model, training_run(root, model, Path(tok.path), steps=(100,))


def test_export_copies_a_hugging_face_tokenizer(tmp_path, monkeypatch):
    """A run trained with a Hugging Face tokenizer (a byte-level BPE trained here): its export
    holds tokenizer.json and its configs as they were, AutoTokenizer and lm-eval's `hf` model
    load the folder with trust_remote_code=True only (which the model needs anyway; transformers 5
    reads the model's config before the tokenizer), and the identity it records is the tokenizer's."""
    import json

    import lm_eval
    import lm_eval.evaluator
    import torch
    from lm_eval.tasks import TaskManager

    from megamor.data.tokenizer import load_tokenizer
    from megamor.data.tokenizer_train import train_tokenizer
    from megamor.env import repo_root
    from megamor.eval.harness import evaluate_task
    from megamor.eval.scoring import Scorer
    from megamor.export import export
    from megamor.model import MoRLM
    from tests.eval.conftest import small_config
    from tests.eval.test_checkpoint import training_run

    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared datasets not found at {d}")
    tok = train_tokenizer([str(d / "tinyshakespeare" / "input.txt")], tmp_path / "tok", vocab_size=800, kind="hf-bpe")
    torch.manual_seed(0)
    model = MoRLM(small_config(vocab_size=800)).eval()
    run = training_run(tmp_path, model, tmp_path / "tok", steps=(100,), tokenizer_hash=tok.content_hash)
    out = export(run)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    assert "tokenizer.model" not in {p.name for p in out.iterdir()}
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert load_tokenizer(out).content_hash == tok.content_hash == json.loads((out / "megamor.pt.json").read_text())["tokenizer_hash"]
    from megamor.runs.find import find_tokenizer

    assert find_tokenizer(out) == out / "tokenizer.json"  # what the evals use without --tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert type(hf_tok).__module__.startswith("transformers.")  # a built-in class: no code of ours for the tokenizer
    text = (d / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:5000]
    assert hf_tok.encode(text) == tok.encode(text) and hf_tok.eos_token_id == tok.eos_id

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda *a, **k: None)
    tm = TaskManager(include_path=str(repo_root() / "evals" / "tasks"), include_defaults=False)
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
                                  tasks=["megamor_piqa"], task_manager=tm, limit=4, batch_size=4, device="cpu",
                                  log_samples=True, bootstrap_iters=10, verbosity="ERROR")
    samples = sorted(res["samples"]["megamor_piqa"], key=lambda s: s["doc_id"])
    ours = evaluate_task(Scorer(model, batch_size=4, pad_id=tok.eos_id), tok, "piqa", limit=4, add_prefix=False)
    for s, o in zip(samples, ours.samples):
        assert [r[0] for r in s["filtered_resps"]] == pytest.approx(o["loglikelihoods"], abs=1e-4), o["src"]
