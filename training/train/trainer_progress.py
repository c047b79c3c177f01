"""The trainer's steps as one progress line (step k of n, the loss, time spent and left).

transformers' Trainer reports through callbacks: with its tqdm bar off it prints every log as a raw
dictionary (`PrinterCallback`), with it on it draws a bar of its own and prints the dictionaries
anyway. Neither says which adapter of a demo is training. This callback replaces both with
`training.progress.Progress`, labelled by the caller (`[3/9] expert timer`), so a person sees one
line per stage and a log file gets a line per tenth.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from training.progress import Progress

TRAINER_PRINTERS = (PrinterCallback, ProgressCallback)  # what the trainer installs on its own


class TrainerProgress(TrainerCallback):
    """`trainer.add_callback(TrainerProgress("[3/9] expert timer"))` after removing `TRAINER_PRINTERS`."""

    def __init__(self, description: str, bar: bool | None = None):
        self.description = description
        self.bar = bar
        self.loss: float | None = None
        self.progress: Progress | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress = Progress(self.description, state.max_steps, bar=self.bar).__enter__()
        if state.global_step:  # resumed from a checkpoint
            self.progress.update(state.global_step, "resumed")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        loss = (logs or {}).get("loss")
        if isinstance(loss, int | float) and math.isfinite(loss):
            self.loss = float(loss)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(state.global_step, "" if self.loss is None else f"loss {self.loss:.3f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
            self.progress = None
