"""How long to train, derived from the data: the defaults behind `loramux train`.

A fixed step count fits one dataset: sized for the demo's ~2,000 routing examples it is under two
epochs of a user's 350, which is why a router trained with the old defaults reached 81% on real
intent data and 94% with six epochs. Small datasets need many passes and large ones few; so the
plan asks for `target_epochs` passes, at least `min_steps` optimizer steps (a few hundred examples
still see enough updates) and at most `max_steps` (the CPU time budget), validates about once
per epoch, and lets early stopping on validation routing accuracy end the run once it stops
improving (`training.train.validation`). An explicit `--epochs` or `--max-steps` always wins.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TrainingPlan:
    max_steps: int
    epochs: float  # what max_steps amounts to
    steps_per_epoch: int
    eval_every: int  # validation every this many optimizer steps (0: never)
    patience: int  # validations without improvement before stopping (0: never stop early)
    why: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlanDefaults:
    """The knobs of the derivation, per adapter kind."""

    target_epochs: float
    min_steps: int
    max_steps: int
    patience: int
    evals_per_epoch: float = 1.0
    min_eval_every: int = 5


ROUTER = PlanDefaults(target_epochs=8, min_steps=60, max_steps=240, patience=3)
TASK = PlanDefaults(target_epochs=1, min_steps=20, max_steps=400, patience=0)


def plan_training(examples: int, batch_size: int, grad_accum: int = 1, kind: str = "router",
                  epochs: float | None = None, max_steps: int = -1, can_validate: bool = True) -> TrainingPlan:
    """The run's length and validation cadence for `examples` training examples."""
    defaults = ROUTER if kind == "router" else TASK
    per_step = max(1, batch_size * grad_accum)
    steps_per_epoch = max(1, math.ceil(examples / per_step))
    if max_steps and max_steps > 0:
        steps, why = max_steps, f"--max-steps {max_steps} as given"
    elif epochs is not None:
        steps, why = max(1, math.ceil(epochs * steps_per_epoch)), f"--epochs {epochs:g} as given"
    else:
        wanted = math.ceil(defaults.target_epochs * steps_per_epoch)
        steps = min(max(wanted, defaults.min_steps), defaults.max_steps)
        why = (f"{examples} training examples = {steps_per_epoch} steps/epoch at batch {per_step}: "
               f"{defaults.target_epochs:g} epochs = {wanted} steps")
        if steps != wanted:
            bound = "at least" if steps > wanted else "at most"
            why += f", {bound} {steps} steps"
    eval_every = 0
    patience = 0
    if can_validate and kind == "router":
        eval_every = max(defaults.min_eval_every, round(steps_per_epoch / defaults.evals_per_epoch))
        eval_every = min(eval_every, steps)
        patience = defaults.patience
        why += f"; validation every {eval_every} steps, stop after {patience} without improvement, best kept"
    return TrainingPlan(steps, round(steps / steps_per_epoch, 2), steps_per_epoch, eval_every, patience, why)
