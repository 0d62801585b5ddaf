"""A resumed run must keep the learning-rate schedule it was started with, unless asked.

The schedule is a pure function of (settings, total steps), so changing `trainer.max_steps`,
`trainer.max_tokens` (hence the total) or any `schedule.*` key on resume silently rebuilds it:
a finished 40-step WSD run extended to 50 steps jumps from lr 0 at step 40 back to 90% of the
peak at step 41. Such a change is refused before launch unless `schedule.allow_change=true`;
then the schedule is rebuilt for the new settings as if the run had been planned that way
from its first step (warmup and decay recomputed for the new total), and the jump is printed.
"""

from __future__ import annotations

import dataclasses

from megamor.config import ConfigError
from megamor.train.config import ExperimentConfig
from megamor.train.schedule import LRSchedule

IGNORED = ("allow_change",)


def schedule_diffs(now: ExperimentConfig, then: ExperimentConfig) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for each setting that shapes the schedule and changed."""
    diffs: list[tuple[str, object, object]] = []
    if now.max_steps != then.max_steps:
        diffs.append(("trainer.max_steps", then.max_steps, now.max_steps))
    for f in dataclasses.fields(now.schedule):
        a, b = getattr(then.schedule, f.name), getattr(now.schedule, f.name)
        if f.name not in IGNORED and a != b:
            diffs.append((f"schedule.{f.name}", a, b))
    return diffs


def check_schedule_change(now: ExperimentConfig, then: ExperimentConfig, step: int, where: str) -> str | None:
    """None if nothing changed; the note to print if the change is allowed; ConfigError if not."""
    diffs = schedule_diffs(now, then)
    if not diffs:
        return None
    old = LRSchedule.from_config(then.schedule, then.optim.lr, then.max_steps)
    new = LRSchedule.from_config(now.schedule, now.optim.lr, now.max_steps)
    what = ", ".join(f"{k} {a} -> {b}" for k, a, b in diffs)
    effect = (f"the learning rate goes from {old.lr_at(step):.3g} at step {step} to {new.lr_at(step + 1):.3g} at "
              f"step {step + 1} (the old schedule: {old.lr_at(step + 1):.3g}), the schedule rebuilt for "
              f"{now.max_steps} steps")
    if not now.schedule.allow_change:
        raise ConfigError(diffs[0][0], f"the checkpoint to resume ({where}, step {step}) was trained with another "
                                       f"schedule ({what}); with schedule.allow_change=true {effect}. See docs/operations.md, "
                                       "'Extending a run'")
    return f"megamor.train: schedule changed on resume ({what}): {effect}"


def phase_lr_note(now: ExperimentConfig, source: ExperimentConfig, step: int, where: str) -> str:
    """A new phase (trainer.continue_from) takes its own schedule at the source's step: the line
    that says where its learning rate starts against where the source's would have gone on."""
    old = LRSchedule.from_config(source.schedule, source.optim.lr, source.max_steps)
    new = LRSchedule.from_config(now.schedule, now.optim.lr, now.max_steps)
    return (f"megamor.train: phase from {where}: the learning rate goes from {old.lr_at(step):.3g} at step {step} "
            f"(the source's schedule; it would have gone on at {old.lr_at(step + 1):.3g}) to {new.lr_at(step + 1):.3g} "
            f"at step {step + 1} (this phase's {now.schedule.type} schedule over {now.max_steps} steps)")
