"""Validation routing accuracy during router training: early stopping and the best weights kept.

The router is scored on the validation split the way serving scores it: every candidate's whole
answer (name + end-of-turn) in one forward over the prompt and the names' prefix tree
(`service.engine.scorer.packed_logprobs`, the embedded engine's own code), on the model being trained. The best
validation result (accuracy, then candidate NLL) keeps a copy of the LoRA weights in memory; after
`patience` validations without improvement the run stops, and the best weights are restored before
the adapter is saved. The scores of the best validation are what the calibration temperature is
fitted on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from training.train.calibration import nll

log = logging.getLogger(__name__)


@dataclass
class ValidationResult:
    step: int
    accuracy: float
    nll: float
    scores: list[list[float]] = field(repr=False)

    def better_than(self, other: ValidationResult | None) -> bool:
        """Higher accuracy wins; at equal accuracy a clearly lower NLL (5%) does."""
        if other is None or self.accuracy > other.accuracy:
            return True
        return self.accuracy == other.accuracy and self.nll < other.nll * 0.95


def score_examples(model: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]
                   ) -> list[list[float]]:
    """Every candidate answer's log-probability after every prompt (no gradients, eval mode)."""
    import torch
    from transformers import DynamicCache

    from service.engine.scorer import packed_logprobs

    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                rows.append(packed_logprobs(model, DynamicCache(config=model.config), 0, prompt, answers))
    finally:
        model.train(was_training)
    return rows


def _trainer_callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class RoutingValidation(_trainer_callback_base()):  # type: ignore[misc]
    """A `TrainerCallback`: validate every `every` steps, keep the best weights, stop early."""

    def __init__(self, prompts: Sequence[Sequence[int]], gold: Sequence[int], answers: Sequence[Sequence[int]],
                 every: int, patience: int):
        self.prompts, self.gold, self.answers = list(prompts), list(gold), list(answers)
        self.every, self.patience = every, patience
        self.history: list[ValidationResult] = []
        self.best: ValidationResult | None = None
        self.best_weights: dict[str, Any] | None = None
        self.stopped_early = False
        self.seconds = 0.0

    def validate(self, model: Any, step: int) -> ValidationResult:
        started = time.perf_counter()
        scores = score_examples(model, self.prompts, self.answers)
        predicted = [max(range(len(row)), key=row.__getitem__) for row in scores]
        accuracy = sum(p == g for p, g in zip(predicted, self.gold, strict=True)) / max(1, len(self.gold))
        result = ValidationResult(step, round(accuracy, 5), round(nll(scores, self.gold, 1.0), 5), scores)
        self.history.append(result)
        self.seconds += time.perf_counter() - started
        return result

    def _check(self, model: Any, step: int) -> bool:
        """Validate; True when the run should stop."""
        from peft import get_peft_model_state_dict

        result = self.validate(model, step)
        if result.better_than(self.best):
            self.best = result
            self.best_weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        since = sum(1 for r in self.history if r.step > self.best.step) if self.best else 0
        log.info("step %d: validation routing accuracy %.4f, nll %.4f (best %.4f at step %d)", step,
                 result.accuracy, result.nll, self.best.accuracy if self.best else 0.0,
                 self.best.step if self.best else 0)
        return bool(self.patience) and since >= self.patience

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        step = int(state.global_step)
        last = step >= int(state.max_steps)
        due = model is not None and self.every and (step % self.every == 0 or last)
        if due and self._check(model, step) and not last:
            self.stopped_early = True
            control.should_training_stop = True
        return control

    def restore_best(self, model: Any) -> None:
        """Put the best validation's weights back into `model` (no-op when there were none)."""
        from peft import set_peft_model_state_dict

        if self.best_weights is not None:
            set_peft_model_state_dict(model, self.best_weights)

    def summary(self) -> dict[str, Any]:
        best = self.best
        return {
            "val_examples": len(self.gold),
            "best_step": best.step if best else None,
            "val_accuracy": best.accuracy if best else None,
            "val_nll": best.nll if best else None,
            "stopped_early": self.stopped_early,
            "validations": [{"step": r.step, "accuracy": r.accuracy, "nll": r.nll} for r in self.history],
            "validation_seconds": round(self.seconds, 1),
        }
