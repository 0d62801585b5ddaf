"""Replacing a library function while a `with` block runs, safely nested and across threads.

Used where DeepSpeed calls torch itself and offers no hook: loads forced weights-only
(safe_load) and saves routed through Python files so a failed write keeps its errno
(save_errors).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class ReentrantPatch:
    """`module.name` is `replacement` while at least one `active()` block is open."""

    def __init__(self, module: Any, name: str, replacement: Callable[..., Any]):
        self.module, self.name, self.replacement = module, name, replacement
        self.original: Callable[..., Any] = getattr(module, name)
        self._lock = threading.Lock()
        self._depth = 0

    @contextmanager
    def active(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                setattr(self.module, self.name, self.replacement)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    setattr(self.module, self.name, self.original)
