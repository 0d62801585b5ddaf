"""One part in its own process: `python -m megamor.gpu_check.child --part NAME --rows FILE ...`.

Started by `runner`; writes the part's records to --rows as JSON lines (a meta record first),
and leaves the time limit to the parent, which kills the whole process group at --deadline.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path

from megamor.cli import ArgumentParser
from megamor.gpu_check.common import META, Context, Record, device_description
from megamor.gpu_check.parts import BY_NAME

MARGIN_S = 3.0  # the part plans to finish this long before the parent's kill


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m megamor.gpu_check.child")
    p.add_argument("--part", required=True, choices=sorted(BY_NAME))
    p.add_argument("--rows", type=Path, required=True)
    p.add_argument("--deadline", type=float, required=True, help="time.time() at which the parent kills this part")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--compile-backend", default=None)
    a = p.parse_args(argv)
    import torch

    if a.device.startswith("cpu"):
        torch.set_flush_denormal(True)  # denormals make CPU timings erratic
        if a.tiny:  # toy shapes gain nothing from threads, and on a shared CPU idle threads spin
            torch.set_num_threads(1)
    ctx = Context(a.part, a.tiny, a.device, a.deadline - MARGIN_S, a.rows, a.peak_tflops, a.compile_backend)
    cuda = torch.version.cuda if ctx.on_gpu else None
    ctx.emit(Record(META, a.part, "meta", data={
        "device": device_description(ctx.device), "torch": torch.__version__, "cuda": cuda,
        "python": platform.python_version(), "started": time.time()}))
    module, func, *arg = BY_NAME[a.part].target.split(":")
    getattr(importlib.import_module(module), func)(ctx, *arg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
