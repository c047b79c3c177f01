"""`loramux train`: LoRA supervised fine-tuning with TRL's SFTTrainer, on the CPU by default.

The run folder `runs/<run-name>/` holds the trainer's checkpoints (so an interrupted run resumes
where it stopped) and, at the end, `final/`: the adapter in safetensors, an `adapter_config.json`
whose `base_model_name_or_path` is the base model's *name* (the service compares names, not
local paths) and `loramux.json` (kind, labels, base checksum, dataset fingerprint, metrics).

One CPU-specific change to the trainer: the loss is computed from the hidden states of the
labelled positions only. TRL's fused LM head scores every position when there is no Triton (CPU),
and with a 49k vocabulary that projection is most of the step for a router whose answer is one
token; selecting the positions first gives the same loss for a fraction of the work.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from service.base_model import BaseModelInfo, resolve_base_model
from service.prompts import prompt_ids
from service.settings import Settings
from service.tool_calls import detect_call_format
from training.data.chats import DatasetError
from training.data.dataset_files import DatasetSplits, answer_labels, load_splits
from training.train.calibration import calibrate
from training.train.metadata import build_metadata, write_metadata
from training.train.preprocess import LengthReport, VisionCollator, to_hf_dataset, tokenize_records
from training.train.schedule import TrainingPlan, plan_training
from training.train.validation import RoutingValidation

log = logging.getLogger(__name__)

Kind = Literal["router", "task"]
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """Every knob of a run; the CPU defaults train a useful adapter in minutes on 2 cores."""

    kind: Kind
    dataset: Path
    run_name: str
    runs_dir: Path | None = None  # default: <adapter_root>/runs
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    learning_rate: float | None = None  # None: ROUTER_LR / TASK_LR
    epochs: float | None = None  # None: derived from the dataset (training.train.schedule)
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    early_stopping: bool = True  # routers: validate, keep the best weights, stop when it stops improving
    calibrate: bool = True  # routers: fit the confidence temperature on the validation split
    val_examples: int = 400  # routers: validation examples scored (a seeded sample when more)
    max_length: int = 256
    seed: int = 0
    save_steps: int = 50
    logging_steps: int = 10
    eval_examples: int = 64  # val examples for the end-of-training loss (0: skip)
    resume: bool = True
    overwrite: bool = False
    progress: bool = True  # one progress line for the run (training.train.trainer_progress)
    progress_label: str = ""  # that line's label (default: the run name)
    # bfloat16: autocast over float32 weights. Measured on this AMX CPU it is not faster for these small
    # LoRA runs (forward 20% faster, backward slower: demo expert 1.75 vs 1.64 s/step), so float32 stays
    precision: Literal["float32", "bfloat16"] = "float32"
    description: str = ""
    init_adapter: Path | None = None  # warm start from these LoRA weights (its rank and targets win)
    extra: dict[str, Any] = field(default_factory=dict)  # further SFTConfig fields (experiments)

    def training_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["dataset"] = str(self.dataset)
        data["runs_dir"] = str(self.runs_dir) if self.runs_dir else None
        data["target_modules"] = list(self.target_modules)
        data["init_adapter"] = str(self.init_adapter) if self.init_adapter else None
        for key in ("resume", "overwrite", "progress", "progress_label", "extra"):
            data.pop(key)
        return data


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    metadata: dict[str, Any]
    seconds: float
    length_report: LengthReport
    plan: TrainingPlan | None = None


ROUTER_LR = 2e-3
TASK_LR = 1e-3


class TrainError(RuntimeError):
    """A run cannot start (bad options, finished run in the way)."""


def _label_of_router(record: Any) -> str:
    from service.prompts import message_text

    return message_text(record.messages[-1]["content"]).strip()


def router_labels(splits: DatasetSplits) -> list[str]:
    labels = splits.card.get("labels")
    if isinstance(labels, list) and labels:
        return [str(x) for x in labels]
    return answer_labels(splits.train)


def _check_router_data(splits: DatasetSplits, labels: list[str]) -> None:
    allowed = set(labels)
    for record in splits.train:
        answer = _label_of_router(record)
        if answer not in allowed:
            raise DatasetError(record.path, record.line, f"router answer {answer!r} is not one of the labels {labels}")
    if len(labels) < 2:
        raise DatasetError(splits.path, None, f"a router needs at least two labels, found {labels}")


def _loss_trainer_class() -> type:
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class LabelledPositionsSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss projects only the labelled positions through the LM head."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            mode = "train" if model.training else "eval"
            causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
            backbone = getattr(causal_lm, causal_lm.base_model_prefix)
            extra = {k: inputs[k] for k in ("position_ids", "pixel_values", "image_grid_thw") if k in inputs}
            labels = inputs["labels"][:, 1:]
            mask = labels != -100
            # the backbone is called directly, past the model's forward that accelerate wrapped in
            # autocast for mixed precision: enter it here, or bf16 training silently runs in float32
            with self.accelerator.autocast():
                hidden = backbone(
                    input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False,
                    **extra,
                ).last_hidden_state
                logits = causal_lm.get_output_embeddings()(hidden[:, :-1][mask])
            logits = logits.float()
            targets = labels[mask]
            total = F.cross_entropy(logits, targets, reduction="sum")
            count = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = total / torch.as_tensor(count).clamp(min=1)
            with torch.no_grad():
                correct = (logits.argmax(-1) == targets).sum().item()
                self._metrics[mode]["mean_token_accuracy"].append(correct / max(1, targets.numel()))
            if return_outputs:
                from transformers.modeling_outputs import CausalLMOutput

                return loss, CausalLMOutput(loss=loss, logits=logits)
            return loss

    return LabelledPositionsSFTTrainer


def train_adapter(config: TrainConfig, settings: Settings | None = None, base: BaseModelInfo | None = None
                  ) -> TrainResult:
    """Train one LoRA adapter and write `runs/<run_name>/final/`; see the module docstring."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from service.base_model import load_base_model
    from service.engine.vision import VisionInputs
    from training.train.trainer_progress import TRAINER_PRINTERS, TrainerProgress

    started = time.perf_counter()
    settings = settings or Settings()
    base = base or resolve_base_model(settings.base_model, settings.cache_dir, settings.base_model_name)
    runs_dir = (config.runs_dir or settings.adapter_root / "runs").resolve()
    if not config.run_name or "/" in config.run_name or config.run_name.startswith("."):
        raise TrainError(f"run name {config.run_name!r} must be a plain folder name")
    run_dir = runs_dir / config.run_name
    final_dir = run_dir / "final"
    if final_dir.exists():
        if not config.overwrite:
            raise TrainError(f"{final_dir} exists: this run finished; pick another --run-name or pass --overwrite")
        shutil.rmtree(run_dir)

    splits = load_splits(config.dataset, seed=config.seed)
    labels: list[str] | None = None
    if config.kind == "router":
        labels = router_labels(splits)
        _check_router_data(splits, labels)
        label_of = _label_of_router
    else:
        label_of = None

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(config.seed)
    # near-zero LoRA gradients once the loss is small are subnormal floats, which x86 CPUs compute
    # many times slower (a router step went from 4 s to 12 s mid-run); flushing them changes nothing
    # that matters numerically
    torch.set_flush_denormal(True)
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    mixed_bf16 = config.precision == "bfloat16"
    model = load_base_model(base.path, dtype)
    # vision-language base: chats are expanded with the serving engine's image code (same positions)
    vision = VisionInputs.for_model(base.path, model)

    # how this expert writes a call, from its answers: the prompts render earlier calls the same way
    call_format = detect_call_format(str(r.messages[-1].get("content", "")) for r in splits.train)
    train_items, report = tokenize_records(tokenizer, splits.train, config.max_length, label_of, vision, call_format)
    if not train_items:
        raise DatasetError(splits.path, None, f"every training example is longer than max_length={config.max_length}")
    log.info("length filter: %s", report.summary())
    val_items, _ = tokenize_records(tokenizer, splits.val[: config.eval_examples], config.max_length, label_of,
                                    vision, call_format)
    validation = _routing_validation(config, splits, labels, tokenizer, vision) if labels else None
    plan = plan_training(len(train_items), config.batch_size, config.grad_accum, config.kind, config.epochs,
                         config.max_steps, can_validate=validation is not None)
    log.info("training plan: %s", plan.why)
    learning_rate = config.learning_rate or (ROUTER_LR if config.kind == "router" else TASK_LR)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora) if config.init_adapter is None else _warm_start(model, config.init_adapter)

    args = SFTConfig(
        output_dir=str(run_dir),
        learning_rate=learning_rate,
        max_steps=plan.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_length,
        report_to="none",
        disable_tqdm=True,  # its bar and printed dictionaries are replaced by TrainerProgress
        bf16=dtype == torch.bfloat16 or mixed_bf16,
        use_cpu=not on_gpu,
        dataloader_pin_memory=on_gpu,
        train_sampling_strategy="group_by_length",
        gradient_checkpointing=False,
        shuffle_dataset=False,
        eval_strategy="no",
        remove_unused_columns=vision is None,  # pixels and MRoPE positions go to the collator
        **config.extra,
    )
    trainer_class = _loss_trainer_class()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=to_hf_dataset(train_items),
        eval_dataset=to_hf_dataset(val_items) if val_items else None,
        processing_class=tokenizer,
        data_collator=VisionCollator(tokenizer.pad_token_id) if vision is not None else None,
    )
    for printer in TRAINER_PRINTERS:
        trainer.remove_callback(printer)
    if config.progress:
        trainer.add_callback(TrainerProgress(config.progress_label or f"train {config.run_name}"))
    if validation is not None:
        if config.early_stopping:
            validation.every, validation.patience = plan.eval_every, plan.patience
        else:  # calibration only: one validation, of the last step
            validation.every, validation.patience = plan.max_steps, 0
        trainer.add_callback(validation)
    resume = config.resume and any(run_dir.glob("checkpoint-*"))
    output = trainer.train(resume_from_checkpoint=True if resume else None)
    metrics: dict[str, Any] = {
        "train_loss": round(float(output.training_loss), 5),
        "steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0.0), 3),
        "train_examples": len(train_items),
        "resumed": bool(resume),
    }
    accuracy = [h["mean_token_accuracy"] for h in trainer.state.log_history if "mean_token_accuracy" in h]
    if accuracy:
        metrics["train_token_accuracy"] = round(float(accuracy[-1]), 4)
    calibration: dict[str, Any] | None = None
    if validation is not None:
        validation.restore_best(trainer.model)
        best = validation.best or validation.validate(trainer.model, metrics["steps"])
        metrics.update({k: v for k, v in validation.summary().items() if k != "validations"})
        metrics["val_accuracy"] = best.accuracy
        if config.calibrate:
            calibration = calibrate(best.scores, validation.gold)
            log.info("calibration: temperature %.3f, validation ECE %.4f -> %.4f", calibration["temperature"],
                     calibration["val_ece_before"], calibration["val_ece_after"])
    if val_items and validation is None:  # routers: the validation above already measured the val split
        evaluated = trainer.evaluate()
        metrics["val_loss"] = round(float(evaluated.get("eval_loss", float("nan"))), 5)

    tmp_final = run_dir / "final.tmp"
    if tmp_final.exists():
        shutil.rmtree(tmp_final)
    trainer.model.save_pretrained(str(tmp_final), safe_serialization=True)
    _set_base_model_name(tmp_final, base.name)
    seconds = time.perf_counter() - started
    metrics["train_seconds"] = round(seconds, 1)
    card = splits.card
    metadata = build_metadata(
        kind=config.kind,
        name=config.run_name,
        base_name=base.name,
        base_sha256=base.sha256,
        dataset={"path": str(splits.path), "fingerprint": splits.fingerprint, "counts": splits.counts()},
        training={**config.training_json(), "learning_rate": learning_rate, "plan": plan.to_json(),
                  "validations": validation.summary()["validations"] if validation else []},
        metrics=metrics,
        labels=labels,
        system_prompt=_common_system_prompt(splits) if config.kind == "task" else None,
        tools=_tools(splits) if config.kind == "task" else None,
        tool_call_format=call_format if config.kind == "task" else None,
        tools_in_prompt=any(r.tools for r in splits.train) if config.kind == "task" else None,
        description=config.description or str(card.get("description", ""))[:200],
        preprocessing={"length_filter": report.to_json()},
        calibration=calibration,
    )
    write_metadata(tmp_final, metadata)
    tmp_final.rename(final_dir)
    return TrainResult(run_dir, final_dir, metadata, seconds, report, plan)


def _routing_validation(config: TrainConfig, splits: DatasetSplits, labels: list[str], tokenizer: Any,
                        vision: Any) -> RoutingValidation | None:
    """The router's validation set as (prompt ids, gold label index), scored like serving scores;
    None when there is nothing to validate on (no val split, early stopping and calibration off,
    or chats with images, whose prompts the text-only validation does not expand)."""
    import random

    from service.prompts import answer_tokens

    if not (config.early_stopping or config.calibrate) or not splits.val or vision is not None:
        return None
    records = [r for r in splits.val if _label_of_router(r) in labels]
    if len(records) > config.val_examples:
        records = random.Random(config.seed).sample(records, config.val_examples)
    prompts = [prompt_ids(tokenizer, r.messages[:-1]) for r in records]
    gold = [labels.index(_label_of_router(r)) for r in records]
    answers = [answer_tokens(tokenizer, label) for label in labels]
    return RoutingValidation(prompts, gold, answers, every=0, patience=0)


def _warm_start(model: Any, folder: Path) -> Any:
    """Continue from an existing adapter's weights (onboarding: the router's label set only grew, so
    what it knows about the old experts is kept and only the new one has to be learnt)."""
    from peft import PeftModel

    if not (folder / "adapter_model.safetensors").is_file():
        raise TrainError(f"{folder} has no adapter_model.safetensors to start from")
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True)  # safetensors: checked above


def _set_base_model_name(folder: Path, name: str) -> None:
    """peft writes the local folder it loaded from; the service checks the model's name."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _common_system_prompt(splits: DatasetSplits) -> str | None:
    """The system prompt every training chat shares, if one does: the service supplies it to callers
    that send none. Chats with varying system prompts (e.g. the calendar's clock) record None."""
    if "system_prompt" in splits.card:
        value = splits.card["system_prompt"]
        return value if isinstance(value, str) else None
    prompts = {
        r.messages[0]["content"] if r.messages[0].get("role") == "system" else None for r in splits.train
    }
    if len(prompts) == 1:
        value = prompts.pop()
        return value if isinstance(value, str) else None
    return None


def _tools(splits: DatasetSplits) -> list[str]:
    tools = splits.card.get("tools")
    if isinstance(tools, list) and tools:
        return [str(t) for t in tools]
    from training.data.tool_calls import parse_tool_call

    names = set()
    for record in splits.train:
        call = parse_tool_call(str(record.messages[-1].get("content", "")))
        if call is not None:
            names.add(call["name"])
    return sorted(names)
