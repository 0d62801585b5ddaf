"""W&B: an unreachable server falls back to offline logging with a warning (never the network)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from megamor.train.callbacks.console import Console
from megamor.train.callbacks.wandb import WandB
from megamor.train.config import load_experiment


def test_unreachable_server_falls_back_to_offline(tiny_config, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_experiment([tiny_config], ["wandb.mode=online", "wandb.init_timeout=3"])
    # the callbacks as the trainer attaches them (rank 0, a fresh run)
    trainer = SimpleNamespace(cfg=cfg, is_main=True, run_dir=tmp_path, wandb_id="fallback1", step=0,
                              max_steps=cfg.max_steps, resumed=False, exit_code=0)
    trainer.console, sink = Console(), WandB()
    trainer.console.trainer = sink.trainer = trainer
    sink.setup()
    try:
        assert sink.run is not None and sink.run.settings.mode == "offline"
        sink.log_metrics(1, {"train/loss": 1.5}, None)
    finally:
        sink.close()
    err = capsys.readouterr().err
    assert "W&B online start failed" in err and "logging offline" in err
    assert list((tmp_path / "wandb").glob("offline-run-*-fallback1"))
