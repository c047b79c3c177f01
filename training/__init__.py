"""loramux training: routing datasets, LoRA SFT, evaluation and registration of adapters.

Every `loramux` training command is a thin shell over a plain function, importable from here
without loading torch until it is called (the Modal deployment calls the same functions):

- `build_task_datasets` (demo experts from home-assistant-intents and ctparse),
- `build_routing_dataset` (`loramux dataset build`),
- `train_adapter` with a `TrainConfig` (`loramux train`),
- `evaluate_router`, `evaluate_expert` (`loramux eval`),
- `register_adapter` (`loramux register`), `list_adapters`, `show_adapter`, `rollback_adapter`,
  `remove_adapter` (`loramux adapters ...`),
- `run_demo` with a `DemoPlan` (`loramux demo`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_task_datasets": "training.data.task_datasets",
    "build_routing_dataset": "training.data.routing_dataset",
    "TrainConfig": "training.train.sft",
    "train_adapter": "training.train.sft",
    "evaluate_router": "training.evaluate.router_and_experts",
    "evaluate_expert": "training.evaluate.router_and_experts",
    "register_adapter": "training.register.commands",
    "list_adapters": "training.register.commands",
    "show_adapter": "training.register.commands",
    "rollback_adapter": "training.register.commands",
    "remove_adapter": "training.register.commands",
    "DemoPlan": "training.demo",
    "run_demo": "training.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
