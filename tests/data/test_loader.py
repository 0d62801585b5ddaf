"""The training loader: one global order for any DP size, exact resume, epochs, blending, masking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megamor.data.config import DataConfig
from megamor.data.dataset import PackedDataset, ShardSet
from megamor.data.errors import DataError, DataStateError
from megamor.data.loader import build_eval_batches, build_train_loader

L = 64


def cfg_for(*folders, **kw) -> DataConfig:
    kw.setdefault("seq_len", L)
    return DataConfig(train=[str(f) for f in folders], valid=[str(folders[0])], **kw)


def run_global(cfg: DataConfig, G: int, m: int, D: int, steps: int, state: dict | None = None):
    """Run D ranks in lock step; returns ([G, L] input_ids per global batch, final rank states)."""
    loaders = [build_train_loader(cfg, G, m, r, D) for r in range(D)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(json.loads(json.dumps(state)))
    out = []
    for _ in range(steps):
        parts = []
        for ld in loaders:
            for _ in range(ld.accum_steps):
                b = ld.next_batch()
                assert b["input_ids"].shape == (m, cfg.seq_len) and b["input_ids"].dtype == torch.long
                parts.append(b["input_ids"])
        out.append(torch.cat(parts))
    return out, [ld.state_dict() for ld in loaders]


def test_global_sequence_is_the_same_for_dp_1_2_4(shakespeare_shards):
    cfg = cfg_for(shakespeare_shards)
    ref, _ = run_global(cfg, 8, 8, 1, 6)
    for D, m in ((1, 2), (2, 4), (2, 1), (4, 2), (4, 1)):
        got, _ = run_global(cfg, 8, m, D, 6)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), (D, m)
    assert not torch.equal(ref[0], ref[1])


def test_resume_at_another_dp_size_continues_exactly(shakespeare_shards):
    cfg = cfg_for(shakespeare_shards)
    full, _ = run_global(cfg, 8, 2, 2, 10)
    _, states = run_global(cfg, 8, 2, 2, 4)
    assert all(s == states[0] for s in states)  # every rank holds the same state
    state = states[0]
    assert state["tokens_consumed"] == 4 * 8 * L and state["micro_step"] == 0
    json.dumps(state)
    for D, m in ((1, 8), (1, 1), (4, 2), (4, 1), (2, 4)):
        rest, _ = run_global(cfg, 8, m, D, 6, state)
        assert all(torch.equal(a, b) for a, b in zip(full[4:], rest)), (D, m)
    # Even another global batch size continues sample-exactly.
    rest, _ = run_global(cfg, 4, 2, 2, 12, state)
    assert torch.equal(torch.cat(rest), torch.cat(full[4:]))


def test_mid_batch_state_resumes_only_with_the_same_layout(shakespeare_shards):
    cfg = cfg_for(shakespeare_shards)
    a = build_train_loader(cfg, 8, 2, 0, 2)
    expected = [a.next_batch()["input_ids"] for _ in range(4)]
    b = build_train_loader(cfg, 8, 2, 0, 2)
    b.next_batch()
    state = b.state_dict()
    assert state["micro_step"] == 1 and state["tokens_consumed"] == 0
    c = build_train_loader(cfg, 8, 2, 0, 2)
    c.load_state_dict(state)
    assert all(torch.equal(c.next_batch()["input_ids"], e) for e in expected[1:])
    with pytest.raises(DataStateError, match=r"middle of a global batch|micro-batches into a global batch"):
        build_train_loader(cfg, 8, 4, 0, 2).load_state_dict(state)


def test_epoch_visits_every_window_once(shakespeare_shards):
    cfg = cfg_for(shakespeare_shards)
    ld = build_train_loader(cfg, 16, 16, 0, 1)
    W = ld.samples_per_epoch
    ds = ld.sources[0]
    assert W == len(ds) == (ds.shards.num_tokens - 1) // L
    src, win = ld.order.lookup(np.arange(2 * W))
    assert np.all(src == 0)
    assert np.array_equal(np.sort(win[:W]), np.arange(W))
    assert np.array_equal(np.sort(win[W:]), np.arange(W))
    assert not np.array_equal(win[:W], win[W:])  # a fresh order each epoch
    assert not np.array_equal(win[:W], np.arange(W))  # shuffled
    # The loader's batches are exactly those windows, and targets are inputs shifted by one.
    b = ld.next_batch()
    raw = ds.windows(win[:16])
    assert torch.equal(b["input_ids"], torch.from_numpy(raw[:, :-1]))
    assert torch.equal(b["targets"], torch.from_numpy(raw[:, 1:]))
    stream = ds.shards.tokens(0, ds.shards.num_tokens)
    w0 = int(win[0])
    assert np.array_equal(raw[0], stream[w0 * L : w0 * L + L + 1])


def test_blending_hits_weights_deterministically(shakespeare_shards, frankenstein_shards):
    cfg = cfg_for(shakespeare_shards, frankenstein_shards, shakespeare_shards, train_weights=[0.5, 0.3, 0.2])
    cfg.train_split = "train"
    ld = build_train_loader(cfg, 10, 10, 0, 1)
    src, win = ld.order.lookup(np.arange(10_000))
    share = np.bincount(src, minlength=3) / 10_000
    assert np.all(np.abs(share - [0.5, 0.3, 0.2]) < 0.01), share
    for k in range(3):  # per source: a permutation within each epoch
        w = win[src == k]
        n = len(ld.sources[k])
        assert len(np.unique(w[: min(n, len(w))])) == min(n, len(w))
    again = build_train_loader(cfg, 10, 10, 0, 1)
    for _ in range(5):
        assert torch.equal(ld.next_batch()["input_ids"], again.next_batch()["input_ids"])
    other_seed = build_train_loader(cfg_for(shakespeare_shards, frankenstein_shards, shakespeare_shards,
                                            train_weights=[0.5, 0.3, 0.2], seed=99), 10, 10, 0, 1)
    assert not torch.equal(other_seed.next_batch()["input_ids"], build_train_loader(cfg, 10, 10, 0, 1).next_batch()["input_ids"])
    default = build_train_loader(cfg_for(shakespeare_shards, frankenstein_shards), 10, 10, 0, 1)
    sizes = np.array([len(s) for s in default.sources])
    assert np.allclose(default.order.blend.weights, sizes / sizes.sum())  # default: proportional to size


def test_state_mismatches_are_clear_errors(shakespeare_shards, frankenstein_shards):
    a = build_train_loader(cfg_for(shakespeare_shards), 8, 8, 0, 1)
    a.next_batch()
    state = a.state_dict()
    with pytest.raises(DataStateError, match=r"fingerprint mismatch.*data.train\[0\]"):
        build_train_loader(cfg_for(frankenstein_shards), 8, 8, 0, 1).load_state_dict(state)
    with pytest.raises(DataStateError, match=r"fingerprint mismatch.*1 train sources then, 2 now"):
        build_train_loader(cfg_for(shakespeare_shards, frankenstein_shards), 8, 8, 0, 1).load_state_dict(state)
    with pytest.raises(DataStateError, match=r"data\.seed is 5 but the checkpoint was made with 1234"):
        build_train_loader(cfg_for(shakespeare_shards, seed=5), 8, 8, 0, 1).load_state_dict(state)
    with pytest.raises(DataStateError, match=r"data\.seq_len is 32"):
        build_train_loader(cfg_for(shakespeare_shards, seq_len=32), 8, 8, 0, 1).load_state_dict(state)
    with pytest.raises(DataError, match="multiple of dp_world_size 3"):
        build_train_loader(cfg_for(shakespeare_shards), 8, 2, 0, 3)


def test_document_masking_fields_follow_eos(shakespeare_shards):
    cfg = cfg_for(shakespeare_shards, document_masking=True)
    eos = ShardSet(shakespeare_shards).eos_id
    ld = build_train_loader(cfg, 32, 32, 0, 1)
    b = ld.next_batch()
    x, pos, doc = b["input_ids"], b["position_ids"], b["doc_ids"]
    starts = torch.zeros_like(x, dtype=torch.bool)
    starts[:, 1:] = x[:, :-1] == eos  # a document starts right after an EOS
    assert starts.sum() > 10
    assert torch.all(pos[:, 0] == 0) and torch.all(doc[:, 0] == 0)
    assert torch.equal(pos[:, 1:] == 0, starts[:, 1:])
    assert torch.all((pos[:, 1:] == pos[:, :-1] + 1) | starts[:, 1:])
    assert torch.equal(doc, torch.cumsum(starts.long(), dim=1))
    plain = build_train_loader(cfg_for(shakespeare_shards), 32, 32, 0, 1).next_batch()
    assert set(plain) == {"input_ids", "targets"} and torch.equal(plain["input_ids"], x)


def test_eval_batches_cover_each_window_once(shakespeare_shards):
    cfg = cfg_for(shakespeare_shards)
    ds = PackedDataset(ShardSet(shakespeare_shards, "valid"), L)
    batches = list(build_eval_batches(cfg, batch_size=7))
    got = torch.cat([b["input_ids"] for b in batches])
    assert got.shape[0] == len(ds) and len(ds) > 20
    assert torch.equal(got, torch.from_numpy(ds.windows(np.arange(len(ds)))[:, :-1]))
    ranks = [list(build_eval_batches(cfg, batch_size=7, dp_rank=r, dp_world_size=3)) for r in range(3)]
    assert sum(len(r) for r in ranks) == len(batches)
    assert torch.equal(ranks[1][0]["input_ids"], batches[1]["input_ids"])
    assert len(list(build_eval_batches(cfg, batch_size=7, max_batches=2))) == 2
