"""The step profiler on a real model: one Chrome trace with the phase and recursion ranges of
the chosen steps only; nothing installed when off; the model unchanged by it."""

from __future__ import annotations

import json

import torch

from megamor.model import ModelConfig, MoRLM, RouterConfig
from megamor.observe.profiler import StepProfiler, instrument_recursions, trace_path, traces

CPU = torch.device("cpu")


def _model() -> MoRLM:
    torch.manual_seed(0)
    return MoRLM(ModelConfig(vocab_size=128, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=16,
                             sharing="middle_cycle", num_recursions=2, router=RouterConfig(type="expert_choice")))


def _train(model: MoRLM, prof: StepProfiler, steps: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for n in range(1, steps + 1):
        prof.begin_step(n)
        with prof.phase("data"):
            batch = x.clone()
        with prof.phase("forward"):
            out = model(batch, targets=batch, return_logits=False)
        with prof.phase("backward"):
            (out.loss + out.aux_loss).backward()
        with prof.phase("optimizer"):
            opt.step()
            opt.zero_grad()
        losses.append(float(out.loss.detach()))
        prof.end_step(n)
    return losses


def _names(path) -> set[str]:
    events = json.loads(path.read_text())["traceEvents"]
    return {e.get("name", "") for e in events}


def test_trace_of_steps_two_to_three(tmp_path):
    m = _model()
    prof = StepProfiler(tmp_path, 0, [2, 3], memory=True, device=CPU, model=m)
    losses = _train(m, prof, 4)
    assert prof.written == [trace_path(tmp_path, 0, 2, 3)]
    names = _names(trace_path(tmp_path, 0, 2, 3))
    assert {"step_2", "step_3", "data", "forward", "backward", "optimizer", "mor/recursion_1", "mor/recursion_2"} <= names
    assert "step_1" not in names and "step_4" not in names
    assert m.recursion_hook is None  # the hook is gone after the range
    assert [p.name for p in (tmp_path / "profile").iterdir()] == ["rank0.steps2-3.pt.trace.json"]  # no temp file left
    # profiling changes nothing the model computes
    assert losses == _train(_model(), StepProfiler(tmp_path / "off", 0, [], False, CPU), 4)


def test_off_installs_nothing(tmp_path):
    m = _model()
    prof = StepProfiler(tmp_path, 0, [], memory=False, device=CPU, model=m)
    a, b = prof.phase("forward"), prof.phase("backward")
    assert a is b and not prof.active
    _train(m, prof, 2)
    assert prof.close() == [] and not (tmp_path / "profile").exists() and m.recursion_hook is None


def test_close_mid_range_writes_what_was_recorded(tmp_path):
    m = _model()
    prof = StepProfiler(tmp_path, 3, [1, 10], memory=False, device=CPU, model=m)
    _train(m, prof, 2)  # stopped after 2 of the 10 steps
    prof.begin_step(3)  # and in the middle of a step
    assert prof.active
    prof.close()
    names = _names(trace_path(tmp_path, 3, 1, 3))  # named by the steps it holds
    assert {"step_1", "step_2", "step_3", "forward"} <= names
    assert prof.close() == [trace_path(tmp_path, 3, 1, 3)]  # idempotent


def test_a_restart_inside_the_range_never_overwrites_a_trace(tmp_path):
    """Issue 32: a run stopped inside [a, b] and resumed rewrote rank0.pt.trace.json with the
    resumed steps only. Each (re)start now writes its own file, the same range twice included."""
    m = _model()
    first = StepProfiler(tmp_path, 0, [2, 400], memory=False, device=CPU, model=m)
    _train(m, first, 4)  # stopped after step 4 (a signal): steps 2-4 recorded
    first.close()
    kept = trace_path(tmp_path, 0, 2, 4).read_bytes()
    resumed = StepProfiler(tmp_path, 0, [2, 400], memory=False, device=CPU, model=m)
    for n in (3, 4, 5):  # resumed from a checkpoint of step 2
        resumed.begin_step(n)
        resumed.end_step(n)
    resumed.close()
    again = StepProfiler(tmp_path, 0, [2, 400], memory=False, device=CPU, model=m)
    _train(m, again, 4)  # started over: the same range as the first run
    again.close()
    assert traces(tmp_path, 0) == [trace_path(tmp_path, 0, 2, 4), tmp_path / "profile" / "rank0.steps2-4.2.pt.trace.json",
                                   trace_path(tmp_path, 0, 3, 5)]
    assert trace_path(tmp_path, 0, 2, 4).read_bytes() == kept
    assert {"step_3", "step_4", "step_5"} <= _names(trace_path(tmp_path, 0, 3, 5))
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == sorted(p.name for p in traces(tmp_path, 0))


def test_recursion_ranges_are_removable_and_leave_outputs_alone():
    m = _model()
    x = torch.randint(0, 128, (2, 16))
    ref = m(x).logits
    restore = instrument_recursions(m)
    assert m.recursion_hook is not None
    assert torch.equal(m(x).logits, ref)
    restore()
    assert m.recursion_hook is None
