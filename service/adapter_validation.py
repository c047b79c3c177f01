"""Checks an adapter folder before a single weight is loaded.

Modelled on vLLM's `peft_helper.py` and LoRAX's loader: the path must stay inside the adapter
root (no `..`, no symlink escape), the weights must be safetensors (pickle is never loaded), the
PEFT config must be a LoRA whose rank fits and whose target modules exist in the base model, and
it must have been trained on this base model. Each refusal is an `AdapterValidationError` that
names the reason, so a bad adapter is a clear 4xx and never touches the engine; any other error
while validating (an unreadable file, a malformed header) becomes one too.

What is served is plain LoRA: the one form both engines run for many adapters in one batch (the
embedded engine's `grouped_lora`, as peft's `adapter_names`; vLLM's punica kernels). So, besides
the checks above:

- Config fields are type-checked: `r` a positive int (not a bool), `lora_alpha` a positive finite
  number (peft's default 8 when absent), `lora_dropout` a number in [0, 1), `target_modules` a
  non-empty list of non-empty strings or one regex string, `use_rslora`/`fan_in_fan_out`/
  `inference_mode` bools, `exclude_modules` a string or a list of strings.
- Refused, each with its reason: `use_dora: true` (a magnitude vector per layer: neither engine
  serves DoRA in a mixed batch), non-empty `modules_to_save` (whole module
  copies, not low-rank deltas), non-empty `rank_pattern`/`alpha_pattern` (per-module ranks: the
  rank cap, the shape check and vLLM's `max_lora_rank` sizing assume one rank per adapter),
  `bias` other than "none", `lora_bias`, QALoRA, aLoRA, BD-LoRA, `layer_replication`,
  `trainable_token_indices`, `target_parameters`, Megatron and the other variant configs (Arrow,
  VeLoRA, MonteCLoRA, KaSA), and `init_lora_weights` schemes that rewrite the base weights (PiSSA,
  OLoRA, CorDA, LoftQ), none of which both engines serve as a plain LoRA.
- `layers_to_transform`/`layers_pattern` are accepted when well-typed: they only restrict which
  layers carry LoRA, which the weights then show, and both engines load by weight name.
- Weights: every tensor must be a LoRA matrix named `<module>.lora_A.weight` or `.lora_B.weight`,
  2-D, non-empty, floating point, A and B in pairs with inner dimension `r`, on a module
  `target_modules` names, and as wide as that module of the base model (A `[r, in_features]`, B
  `[out_features, r]`: read from the safetensors header, so a wrong width is a 422 here and never
  costs the engine a failed load). Anything else (DoRA magnitudes, embedding LoRA, biases, saved
  modules, 0-d or 3-d tensors) is refused.

A regex `target_modules` must not be able to hang validation, nor peft, which full-matches it
against every module name when it loads the adapter (Python's `re` backtracks and holds the GIL, so
a pathological pattern would freeze the whole server). It is refused when longer than
`MAX_TARGET_REGEX` characters, when it uses backreferences or conditional groups, or when it nests
an unbounded repeat inside another (`(a+)+`, the classic exponential form); what remains is
matched against the base model's module names by Python's own `re` in a child process killed
after `REGEX_BUDGET_S` seconds: a pattern too slow there would be as slow in peft, so it is refused.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from service.base_model import BaseModelInfo, model_class, sha256_file
from service.errors import AdapterValidationError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_JSON_BYTES = 1 << 20  # adapter_config.json / loramux.json: real ones are a few KB
MAX_TENSORS = 20_000
MAX_TARGET_REGEX = 256
REGEX_BUDGET_S = 3.0  # seconds, the child's start-up included (about 20 ms)
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
DEFAULT_LORA_ALPHA = 8  # peft's LoraConfig default
# init_lora_weights values that only set the initial weights (vLLM's list): the saved adapter is a plain LoRA
PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}
# config fields that make it something other than a plain LoRA when set (truthy)
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora) cannot be served in a mixed-adapter batch",
    "modules_to_save": "modules_to_save (full copies of modules) is not served, only LoRA deltas",
    "rank_pattern": "rank_pattern (per-module ranks) is not served; one rank per adapter",
    "alpha_pattern": "alpha_pattern (per-module alphas) is not served; one lora_alpha per adapter",
    "lora_bias": "lora_bias is not served",
    "use_qalora": "QALoRA (use_qalora) is not served",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) is not served",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not served",
    "layer_replication": "layer_replication is not served",
    "trainable_token_indices": "trainable_token_indices (trained embeddings) is not served",
    "target_parameters": "target_parameters (LoRA on parameters) is not served",
    "megatron_config": "Megatron LoRA (megatron_config) is not served",
    "arrow_config": "Arrow routing (arrow_config) is not served",
    "velora_config": "VeLoRA (velora_config) is not served",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not served",
    "kasa_config": "KaSA (kasa_config) is not served",
}
BOOL_FIELDS = ("use_rslora", "fan_in_fan_out", "inference_mode", "use_dora", "lora_bias", "use_qalora")
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight")


@dataclass(frozen=True)
class BaseModules:
    """The base model as an adapter is checked against it: every name a `target_modules` entry may
    match (each module's full name and its last part), and each linear layer's (in_features,
    out_features) by full name, so a LoRA matrix of the wrong width is refused before any engine
    sees it (a failed load costs the engine's thread a pass over every module, between two steps
    of everyone's generation)."""

    names: frozenset[str]
    shapes: Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned about an adapter folder."""

    path: Path  # resolved folder holding adapter_config.json (the `final/` sub-folder when present)
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    sha256: str
    metadata: dict


def resolve_inside_root(path: str | Path, adapter_root: Path) -> Path:
    """Resolve `path` (relative to the root, or absolute) and refuse anything outside the root."""
    raw = Path(path)
    if ".." in raw.parts:
        raise AdapterValidationError(f"adapter path {str(path)!r} contains '..'", param="path")
    root = adapter_root.resolve()
    candidate = raw if raw.is_absolute() else root / raw
    try:
        resolved = candidate.resolve()
        # probe it here: a NUL byte or an over-long name fails in every later filesystem call
        resolved.exists()
    except (OSError, ValueError) as exc:
        log.info("adapter path %r is not usable: %s", str(path), exc)
        raise AdapterValidationError(f"adapter path {str(path)!r} is not a usable path", param="path") from exc
    if not resolved.is_relative_to(root):
        raise AdapterValidationError(
            f"adapter path {str(path)!r} resolves outside the adapter root (LORAMUX_ADAPTER_ROOT)", param="path"
        )
    return resolved


def detect_final(folder: Path) -> Path:
    """The seed's convention: a training run folder holds the adapter in `final/`."""
    if not (folder / ADAPTER_CONFIG).is_file() and (folder / "final" / ADAPTER_CONFIG).is_file():
        return folder / "final"
    return folder


def validate_adapter(
    path: str | Path,
    adapter_root: Path,
    base: BaseModelInfo,
    max_rank: int,
    modules: BaseModules | None = None,
) -> AdapterInfo:
    """Validate the adapter at `path`; every failure, expected or not, is an AdapterValidationError."""
    try:
        return _validate(path, adapter_root, base, max_rank, modules)
    except AdapterValidationError:
        raise
    except OSError as exc:
        raise AdapterValidationError(
            f"adapter files are not readable: {exc.strerror or type(exc).__name__}", param="path"
        ) from exc
    except Exception as exc:  # a bad file must never be a 500 or stop the server
        log.exception("unexpected error validating adapter %s", path)
        raise AdapterValidationError(f"adapter could not be validated ({type(exc).__name__})", param="path") from exc


def _validate(
    path: str | Path,
    adapter_root: Path,
    base: BaseModelInfo,
    max_rank: int,
    modules: BaseModules | None,
) -> AdapterInfo:
    folder = resolve_inside_root(path, adapter_root)
    if folder.is_file():
        if folder.suffix in PICKLE_SUFFIXES:
            raise AdapterValidationError(f"{folder.name}: pickle weights are refused; use safetensors", "path")
        folder = folder.parent
    if not folder.is_dir():
        raise AdapterValidationError(f"adapter folder {str(path)!r} does not exist", param="path")
    folder = detect_final(folder)
    config = _read_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterValidationError(
                f"{folder.name}: only pickle weights ({', '.join(pickles)}); safetensors required", "path"
            )
        raise AdapterValidationError(f"{folder.name}: {ADAPTER_WEIGHTS} is missing", param="path")
    for file in (folder / ADAPTER_CONFIG, weights):
        if not file.resolve().is_relative_to(adapter_root.resolve()):
            raise AdapterValidationError(f"{file.name} is a link leaving the adapter root", param="path")

    rank, alpha, targets = check_config(config, max_rank)
    declared = config.get("base_model_name_or_path")
    declared = declared if isinstance(declared, str) else ""
    if not _same_base(declared, base):
        raise AdapterValidationError(
            f"adapter was trained on {declared or 'an unknown base model'!r}, this service runs {base.name!r}",
            param="path",
        )
    if isinstance(targets, str):
        check_target_regex(targets, None if modules is None else modules.names)
    elif modules is not None:
        missing = [t for t in targets if t not in modules.names]
        if missing:
            raise AdapterValidationError(f"target modules {missing} do not exist in the base model", param="path")
    _check_weights(weights, rank, targets, None if modules is None else modules.shapes)
    metadata = _read_metadata(folder)
    return AdapterInfo(
        path=folder,
        rank=rank,
        alpha=alpha,
        target_modules=(targets,) if isinstance(targets, str) else tuple(targets),
        base_model=base.name,
        sha256=sha256_file(weights),
        metadata=metadata,
    )


def _refuse(message: str) -> AdapterValidationError:
    return AdapterValidationError(message, param="path")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def check_config(config: dict, max_rank: int) -> tuple[int, float, list[str] | str]:
    """Type-check the PEFT config and refuse what is not a plain LoRA. Returns (r, lora_alpha, targets)."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        shown = peft_type if isinstance(peft_type, str) and peft_type else repr(peft_type)
        raise _refuse(f"peft_type is {shown if peft_type is not None else 'missing'}, only LORA is served")
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise _refuse(f"adapter rank {rank!r} is not a positive integer")
    if rank > max_rank:
        raise _refuse(f"adapter rank {rank} exceeds the maximum {max_rank}")
    alpha = config.get("lora_alpha", DEFAULT_LORA_ALPHA)
    if not _is_number(alpha) or alpha <= 0:
        raise _refuse(f"lora_alpha {alpha!r} is not a positive number")
    dropout = config.get("lora_dropout", 0.0)
    if dropout is not None and (not _is_number(dropout) or not 0 <= dropout < 1):
        raise _refuse(f"lora_dropout {dropout!r} is not a number in [0, 1)")
    for name in BOOL_FIELDS:
        value = config.get(name)
        if value is not None and not isinstance(value, bool):
            raise _refuse(f"{name} {value!r} is not true or false")
    for name, reason in UNSUPPORTED_FEATURES.items():
        value = config.get(name)
        if value is not None and value is not False and value != [] and value != {}:
            raise _refuse(f"{reason} ({name}: {_short(value)})")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise _refuse(f"bias {_short(bias)} is not served; only 'none' (bias tensors are not LoRA weights)")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and not (isinstance(init, str) and init.lower() in PLAIN_INITS):
        raise _refuse(f"init_lora_weights {_short(init)} rewrites the base model's weights; convert it to a "
                      "plain LoRA first")
    exclude = config.get("exclude_modules")
    if exclude is not None and not isinstance(exclude, str) and not _is_str_list(exclude):
        raise _refuse("exclude_modules must be a regex or a list of module names")
    layers = config.get("layers_to_transform")
    if layers is not None:
        items = layers if isinstance(layers, list) else [layers]
        if not items or not all(type(i) is int and i >= 0 for i in items):
            raise _refuse(f"layers_to_transform {_short(layers)} is not a layer index or a list of them")
    pattern = config.get("layers_pattern")
    if pattern is not None and not isinstance(pattern, str) and not _is_str_list(pattern):
        raise _refuse("layers_pattern must be a string or a list of strings")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if not targets:
            raise _refuse("target_modules regex is empty")
    elif not _is_str_list(targets) or not targets:
        raise _refuse("target_modules must be a non-empty list of module names or a regex")
    return rank, float(alpha), targets


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- regex target_modules ----------------------------------------------------------------------
def check_target_regex(pattern: str, names: frozenset[str] | None) -> None:
    """Refuse a `target_modules` regex that is invalid, could backtrack without bound, is slower
    than the budget on the base model's module names, or matches none of them."""
    if len(pattern) > MAX_TARGET_REGEX:
        raise _refuse(f"target_modules regex is {len(pattern)} characters; at most {MAX_TARGET_REGEX}")
    try:
        re.compile(pattern)
        from re import _parser  # the parser `re` itself uses: the structure peft's match will run

        parsed = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise _refuse(f"target_modules regex {_short(pattern)} is invalid: {exc}") from None
    problem = _regex_problem(parsed, inside_repeat=False)
    if problem:
        raise _refuse(f"target_modules regex {_short(pattern)} {problem}")
    if names is None:
        return
    matched = _timed_match_count(pattern, sorted(names))
    if not matched:
        raise _refuse(f"target_modules regex {_short(pattern)} matches no module of the base model")


def _regex_problem(items: Any, inside_repeat: bool) -> str | None:
    from re import _constants as c

    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT))
    for op, av in items:
        children: list[Any] = []
        nested = inside_repeat
        if op in (c.GROUPREF, c.GROUPREF_EXISTS):
            return "uses a backreference or a conditional group, which target_modules never needs"
        if op in repeats:
            _, high, body = av
            unbounded = high == c.MAXREPEAT or high > 1
            if unbounded and inside_repeat:
                return "nests a repeat inside a repeat (exponential backtracking); write it without"
            nested = inside_repeat or unbounded
            children = [body]
        elif op == c.SUBPATTERN:
            children = [av[-1]]
        elif op == c.BRANCH:
            children = list(av[1])
        elif op in (c.ASSERT, c.ASSERT_NOT):
            children = [av[1]]
        elif op == getattr(c, "ATOMIC_GROUP", None):
            children = [av]
        for child in children:
            problem = _regex_problem(child, nested)
            if problem:
                return problem
    return None


_MATCH_CHILD = (
    "import json, re, sys\n"
    "data = json.load(sys.stdin)\n"
    "pattern = re.compile(data['pattern'])\n"
    "print(sum(1 for name in data['names'] if pattern.fullmatch(name)))\n"
)


def _timed_match_count(pattern: str, names: list[str], budget_s: float = REGEX_BUDGET_S) -> int:
    """How many `names` the pattern full-matches, computed by Python's own `re` in a child process
    that is killed after `budget_s` (a regex cannot be interrupted in-process: it holds the GIL)."""
    payload = json.dumps({"pattern": pattern, "names": names})
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _MATCH_CHILD], input=payload, capture_output=True,
                              text=True, timeout=budget_s)
    except subprocess.TimeoutExpired:
        raise _refuse(f"target_modules regex {_short(pattern)} takes too long to match the base model's module "
                      "names") from None
    if done.returncode != 0:
        raise _refuse(f"target_modules regex {_short(pattern)} could not be matched")
    return int(done.stdout.strip() or 0)


def modules_of(model: Any) -> BaseModules:
    """A loaded (or meta-device) model's `BaseModules`, read before any adapter wraps it."""
    import torch

    names: set[str] = set()
    shapes: dict[str, tuple[int, int]] = {}
    for full, module in model.named_modules():
        if full:
            names.add(full)
            names.add(full.rsplit(".", 1)[-1])
            if isinstance(module, torch.nn.Linear):
                shapes[full] = (module.in_features, module.out_features)
    return BaseModules(frozenset(names), MappingProxyType(shapes))


def base_modules(base: BaseModelInfo) -> BaseModules:
    """The base model's `BaseModules` without loading its weights (built on the meta device)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.path)
    with torch.device("meta"):
        model = model_class(config).from_config(config)
    return modules_of(model)


def _read_json(file: Path) -> Any:
    if file.stat().st_size > MAX_JSON_BYTES:
        raise AdapterValidationError(f"{file.name} is larger than {MAX_JSON_BYTES} bytes", param="path")
    return json.loads(file.read_text())


def _read_config(folder: Path) -> dict:
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterValidationError(f"{folder.name}: {ADAPTER_CONFIG} is missing", param="path")
    try:
        config = _read_json(file)
    except OSError as exc:
        raise AdapterValidationError(f"{ADAPTER_CONFIG} is not readable: {exc.strerror}", param="path") from exc
    except (ValueError, RecursionError) as exc:
        raise AdapterValidationError(f"{ADAPTER_CONFIG} is not valid JSON: {exc}", param="path") from exc
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{ADAPTER_CONFIG} is not a JSON object", param="path")
    return config


def _read_metadata(folder: Path) -> dict:
    """Training metadata written by `loramux train` (kind, labels, dataset fingerprint), if any."""
    for candidate in (folder / "loramux.json", folder.parent / "loramux.json"):
        try:
            data = _read_json(candidate)
        except (OSError, ValueError, RecursionError, AdapterValidationError):
            continue
        if isinstance(data, dict):
            return data
    return {}


def _same_base(declared: str, base: BaseModelInfo) -> bool:
    if not declared:
        return False
    if declared == base.name:
        return True
    declared_path = Path(declared).expanduser()
    return declared_path.is_dir() and declared_path.resolve() == base.path.resolve()


def _targeted(module: str, targets: list[str] | str) -> bool:
    """Whether peft would put a LoRA on `module` (a weight's module path) for a list of targets:
    the name itself or its last dotted parts. (A regex is checked against the base model instead.)"""
    if isinstance(targets, str):
        return True
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_weights(weights: Path, rank: int, targets: list[str] | str,
                   shapes: Mapping[str, tuple[int, int]] | None) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
            if len(keys) > MAX_TENSORS:
                raise AdapterValidationError(f"{weights.name} holds {len(keys)} tensors; at most {MAX_TENSORS}",
                                             param="path")
            meta = {}
            for key in keys:
                tensor = handle.get_slice(key)
                meta[key] = (tuple(tensor.get_shape()), str(tensor.get_dtype()))
    except AdapterValidationError:
        raise
    except Exception as exc:  # safetensors raises several types for a damaged header
        log.info("%s is not readable as safetensors: %s", weights, exc)
        raise AdapterValidationError(f"{weights.name} is not a readable safetensors file", "path") from exc
    if not keys:
        raise AdapterValidationError(f"{weights.name} holds no LoRA weights", param="path")
    others = [k for k in keys if not LORA_KEY.fullmatch(k)]
    if others:
        shown = ", ".join(repr(k) for k in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise AdapterValidationError(
            f"{weights.name} holds tensors that are not LoRA A/B matrices ({shown}); only plain LoRA is served",
            param="path",
        )
    pairs: dict[str, set[str]] = {}
    for key in keys:
        match = LORA_KEY.fullmatch(key)
        assert match is not None
        module, which = match["module"], match["which"]
        shape, dtype = meta[key]
        if len(shape) != 2 or min(shape) < 1:
            raise AdapterValidationError(f"{key} has shape {list(shape)}; a LoRA matrix is 2-D", param="path")
        if dtype not in FLOAT_DTYPES:
            raise AdapterValidationError(f"{key} has dtype {dtype}; LoRA weights are floating point", param="path")
        inner = shape[0] if which == "A" else shape[1]
        if inner != rank:
            raise AdapterValidationError(f"{key} has rank {inner}, adapter_config says {rank}", param="path")
        short = module.removeprefix("base_model.model.")
        if not _targeted(short, targets):
            raise AdapterValidationError(f"{key} is on a module target_modules does not name", param="path")
        width = None if shapes is None else shapes.get(short)
        if width is not None:  # a module the base does not have by that name is left to the loader
            outer, side = (shape[1], "inputs") if which == "A" else (shape[0], "outputs")
            expected = width[0] if which == "A" else width[1]
            if outer != expected:
                raise AdapterValidationError(
                    f"{key} has shape {list(shape)}; the base model's {short} has {expected} {side}", param="path"
                )
        pairs.setdefault(module, set()).add(which)
    unpaired = sorted(m for m, sides in pairs.items() if sides != {"A", "B"})
    if unpaired:
        raise AdapterValidationError(f"{unpaired[0]} has lora_A or lora_B but not both", param="path")
