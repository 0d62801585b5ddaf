"""W&B: an unreachable server falls back to offline logging with a warning (never the network)."""

from __future__ import annotations

import socket

from megamor.train.config import load_experiment
from megamor.train.logger import RunLogger


def test_unreachable_server_falls_back_to_offline(tiny_config, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_experiment([tiny_config], ["wandb.mode=online", "wandb.init_timeout=3"])
    logger = RunLogger(cfg, tmp_path, True, 0, "fallback1", {})
    try:
        assert logger.wandb is not None and logger.wandb.settings.mode == "offline"
        logger.log(1, {"train/loss": 1.5})
    finally:
        logger.close()
    err = capsys.readouterr().err
    assert "W&B online start failed" in err and "logging offline" in err
    assert list((tmp_path / "wandb").glob("offline-run-*-fallback1"))
