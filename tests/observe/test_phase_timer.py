"""Phase timers: per-step means that add up, and the straggler across real gloo ranks."""

from __future__ import annotations

import time

import pytest
import torch

from megamor.observe.phase_timer import PHASES, PhaseTimer
from megamor.testing.distributed import run_distributed

CPU = torch.device("cpu")


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_window_gives_per_step_means_that_add_up():
    t = PhaseTimer(CPU)
    t0 = time.perf_counter()
    for _ in range(3):
        with t.phase("data"):
            _spin(0.01)
        for _ in range(2):  # two micro-batches
            with t.phase("forward"):
                _spin(0.01)
            with t.phase("backward"):
                _spin(0.02)
        with t.phase("optimizer"):
            pass
        t.step_done()
    with t.phase("checkpoint"):
        _spin(0.03)
    w = t.window()
    wall = time.perf_counter() - t0
    assert set(w) == {f"time/{p}" for p in PHASES} | {"time/step", "time/other"}
    assert all(v >= 0 for v in w.values())
    # lower bounds are what the busy-waits guarantee; the total is the window's wall time per step
    assert w["time/data"] >= 0.01 and w["time/forward"] >= 0.02 and w["time/backward"] >= 0.04
    assert w["time/checkpoint"] >= 0.01 and w["time/eval"] == 0.0
    assert sum(w[f"time/{p}"] for p in PHASES) <= w["time/step"] * (1 + 1e-9) <= wall / 3 * (1 + 1e-9)
    assert abs(sum(w[f"time/{p}"] for p in PHASES) + w["time/other"] - w["time/step"]) < 1e-9
    # the next window starts empty
    t.step_done()
    w2 = t.window()
    assert w2["time/forward"] == 0.0 and w2["time/step"] < w["time/step"]


def test_single_process_has_no_straggler():
    t = PhaseTimer(CPU)
    with t.phase("forward"):
        _spin(0.01)
    t.step_done()
    t.window()
    s = t.straggler()
    assert s["time/straggler_ratio"] == 1.0 and s["time/straggler_rank"] == 0 and s["time/straggler_s"] >= 0.01


def _ranks(rank: int, world: int, slow: int, out) -> None:
    t = PhaseTimer(CPU)
    for _ in range(2):
        with t.phase("forward"):
            _spin(0.6 if rank == slow else 0.01)  # a wide margin: another test may share the cores
        with t.phase("backward"):  # a collective: the fast ranks wait here for the slow one
            torch.distributed.barrier()
        t.step_done()
    w = t.window()
    s = t.straggler(rank, world)
    torch.save({**w, **s}, f"{out}/rank{rank}.pt")


@pytest.mark.launch
def test_straggler_is_the_slow_rank_not_the_waiting_ones(tmp_path):
    run_distributed(_ranks, world_size=3, args=(1, str(tmp_path)))
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    assert all(r["time/straggler_rank"] == 1 for r in res)  # every rank agrees
    assert res[0]["time/straggler_ratio"] > 3  # 0.6 s against 0.01 s of forward
    # what the step time alone could not tell: the waiting ranks' backward holds the difference
    assert res[0]["time/backward"] > res[1]["time/backward"]
