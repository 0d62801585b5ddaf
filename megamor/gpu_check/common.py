"""What every part shares: the records it writes, its context (form, device, deadline), and
model building from `configs/model/<size>/<variant>.yaml` (with toy overrides under --tiny).

A part appends one JSON line per record to its rows file as soon as the record is known, so
the parent still has every finished record when it has to kill the part at its time limit.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megamor.env import repo_root

# Record kinds: a parity or speed check (a row of the report's tables), a measurement (the raw
# figures behind the speed checks), and meta (device and versions, written first by each part).
PARITY, SPEED, MEASURE, META = "parity", "speed", "measure", "meta"

# Statuses. Parity: pass / fail / skipped. Speed: met / short against the GPU target, n/a on CPU.
# Either: error (the check raised), timed out (the part was cut at its limit before the check).
PASS, FAIL, SKIPPED, MET, SHORT, NA_CPU, ERROR, TIMED_OUT = (
    "pass", "fail", "skipped", "met", "short", "n/a on CPU", "error", "timed out")

# The toy shape of --tiny (every size): the same layer shape as tests/train/test_compile.py's
# model, so CI compiles that one inductor graph once for both.
TINY_OVERRIDES = ["vocab_size=512", "d_model=32", "n_heads=2", "n_kv_heads=1", "d_ff=64", "n_layers=8",
                  "max_seq_len=256"]


@dataclass
class Record:
    kind: str
    part: str
    name: str
    status: str = ""
    figure: str = ""
    target: str = ""
    note: str = ""
    value: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Context:
    """What a part runs with. `deadline` is the time.time() at which the parent cuts the part."""

    part: str
    tiny: bool
    device_name: str  # "cuda" or "cpu"
    deadline: float
    rows_path: Path
    peak_tflops: float | None = None  # --peak-tflops; None: the device's own (datasheet / timed matmul)
    compile_backend: str | None = None  # --compile-backend for the compile parity part (None: inductor)
    emitted: set[str] = field(default_factory=set)  # names of the records written so far

    @property
    def device(self):
        import torch

        return torch.device(self.device_name)

    @property
    def on_gpu(self) -> bool:
        return self.device_name.startswith("cuda")

    def left(self) -> float:
        return self.deadline - time.time()

    def emit(self, rec: Record) -> Record:
        rec.part = self.part
        self.emitted.add(rec.name)
        with open(self.rows_path, "a") as f:
            f.write(rec.to_json() + "\n")
            f.flush()
        return rec

    def check(self, kind: str, name: str, status: str, figure: str = "", target: str = "", note: str = "",
              value: float | None = None, **data: Any) -> Record:
        return self.emit(Record(kind, self.part, name, status, figure, target, note, value, data))

    def speed(self, name: str, value: float | None, figure: str, target: str, met: bool | None, note: str = "",
              **data: Any) -> Record:
        """A speed check: met/short against its target on a GPU, n/a on a CPU (figure still shown)."""
        status = NA_CPU if not self.on_gpu else (MET if met else SHORT)
        return self.check(SPEED, name, status, figure, target, note, value, **data)


def read_records(path: Path) -> list[Record]:
    """Every complete JSON line of a rows file (a line cut short by a kill is dropped)."""
    out: list[Record] = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(Record.from_dict(json.loads(line)))
        except (ValueError, TypeError):
            continue
    return out


def model_config(size: str, variant: str, tiny: bool, overrides: list[str] | None = None):
    """configs/model/<size>/<variant>.yaml; --tiny shrinks it to TINY_OVERRIDES (same variant)."""
    from megamor.model import load_model_config  # lazy, as torch here: the parent (runner, report) stays torch-free

    path = repo_root() / "configs" / "model" / size / f"{variant}.yaml"
    return load_model_config(path, overrides=(TINY_OVERRIDES if tiny else []) + list(overrides or []))


def build_model(cfg, device, dtype=None, seed: int = 0):
    import torch  # lazy (see model_config)

    from megamor.model import MoRLM

    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: a 1.7B model's init on the host takes long
        model = MoRLM(cfg)
    return model.to(dtype=dtype) if dtype is not None else model


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_description(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}".replace("|", "/")
