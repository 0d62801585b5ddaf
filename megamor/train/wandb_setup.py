"""W&B before and at start-up: credentials checked before launch, offline when the server is away.

- `wandb.mode` unset (the default, and in every shipped config): $WANDB_MODE decides, else
  disabled. A mode written in a config or override wins over the environment.
- Online without credentials (no WANDB_API_KEY, no netrc entry for the W&B host) is a
  configuration error before any process starts, instead of a crash ~1 minute into start-up.
- Online but the server cannot be reached within `wandb.init_timeout` seconds: one warning,
  and the run logs offline into RUN/wandb (upload later with `wandb sync`) instead of dying.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from megamor.config import ConfigError

DEFAULT_BASE_URL = "https://api.wandb.ai"


def base_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def credentials_found(env: Mapping[str, str] | None = None) -> bool:
    """An API key in the environment, or a netrc entry for the W&B host (what `wandb login` writes)."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(base_url(env)).hostname or ""
    path = Path(env.get("NETRC") or Path(env.get("HOME") or Path.home()) / ".netrc").expanduser()
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_credentials(mode: str, env: Mapping[str, str] | None = None) -> None:
    if mode == "online" and not credentials_found(env):
        host = urlparse(base_url(env)).hostname
        raise ConfigError("wandb.mode", f"is online but no W&B credentials were found (no WANDB_API_KEY, no netrc "
                                        f"entry for {host}): run `wandb login`, set WANDB_API_KEY, or use "
                                        "wandb.mode=offline")


def init_run(mode: str, init_timeout: float | None, warn: Callable[[str], None], **kwargs: Any) -> Any:
    """wandb.init; online failing to reach the server falls back to offline with a warning."""
    import wandb

    settings = wandb.Settings(init_timeout=init_timeout) if init_timeout is not None else None
    try:
        return wandb.init(mode=mode, settings=settings, **kwargs)
    except Exception as e:
        if mode != "online":
            raise
        why = " ".join(str(e).split())[:200]
        warn(f"WARNING: W&B online start failed ({type(e).__name__}: {why}); logging offline to "
             f"{kwargs.get('dir')}/wandb instead (upload later with `wandb sync`)")
        wandb.teardown()  # the failed attempt still holds the run id in W&B's service process
        return wandb.init(mode="offline", **kwargs)
