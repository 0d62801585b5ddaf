"""Fixtures for the evaluation tests: a real sentencepiece tokenizer and a small MoR model
(middle-cycle, 2 recursions, expert-choice router) briefly trained on real text, both built
once per session (a few seconds on 2 cores)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import torch

from megamor.env import shared_data_dir
from megamor.eval.tokenizer import SentencePieceTokenizer

VOCAB = 1000
SEQ = 128


@contextlib.contextmanager
def one_thread():
    """The tiny models here run faster on one thread, and much faster when other processes
    share the 2 cores (OpenMP threads then wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="package", autouse=True)
def _eval_tests_single_threaded():
    with one_thread():
        yield


def training_text(data: Path) -> str:
    return (data / "tinyshakespeare" / "input.txt").read_text()[:500_000] + (data / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:500_000]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared datasets not found at {d} (set MEGAMOR_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def spm_path(shared_data: Path, tmp_path_factory) -> Path:
    import sentencepiece as spm

    text = training_text(shared_data)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")),
        model_writer=buf,
        vocab_size=VOCAB,
        model_type="bpe",
        byte_fallback=True,  # no <unk>: every UTF-8 byte is representable
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=2,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="session")
def tok(spm_path: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(spm_path)


def small_config(**over):
    from megamor.model import ModelConfig, RouterConfig

    kw = {
        "vocab_size": VOCAB, "d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192,
        "max_seq_len": 256, "sharing": "middle_cycle", "num_recursions": 2,
        # A strong BCE coefficient so that, after a few dozen steps, the causal threshold
        # router already keeps about the capacity (1/2) at step 2, as a trained model does.
        "router": RouterConfig(type="expert_choice", aux_bce_coef=0.1),
    }
    kw.update(over)
    return ModelConfig(**kw)


def train_briefly(model: torch.nn.Module, ids: torch.Tensor, steps: int, seed: int = 0, batch: int = 8) -> None:
    """A plain AdamW loop on random windows: LM loss + the router's auxiliary losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ix = torch.randint(0, len(ids) - SEQ - 1, (batch,), generator=g)
        x = torch.stack([ids[i : i + SEQ + 1] for i in ix])
        out = model(x[:, :-1], targets=x[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="session")
def train_ids(shared_data: Path, tok: SentencePieceTokenizer) -> torch.Tensor:
    return torch.tensor(tok.encode(training_text(shared_data)[:150_000]))


@pytest.fixture(scope="session")
def mor_model(train_ids: torch.Tensor):
    """The small MoR model after 40 AdamW steps (routers trained with their BCE loss)."""
    from megamor.model import MoRLM

    torch.manual_seed(0)
    model = MoRLM(small_config())
    with one_thread():
        train_briefly(model, train_ids, steps=40)
    return model


@pytest.fixture(scope="session")
def mor_checkpoint(mor_model, tmp_path_factory) -> Path:
    """The model as a consolidated checkpoint file, with the tokenizer beside it."""
    d = tmp_path_factory.mktemp("ckpt")
    path = d / "model.pt"
    torch.save({"model": mor_model.state_dict(), "config": dataclasses.asdict(mor_model.cfg), "step": 40}, path)
    return path
