"""Optimizers and learning-rate schedules, named and configured as in kohya sd-scripts.

`optimizer_type` takes sd-scripts' `--optimizer_type` names; `optimizer_args` is the YAML form of its
`--optimizer_args "betas=0.9,0.99"` (a mapping of keyword arguments, values typed by YAML). Settings that
cannot work are found by `optimizer_problems` before any model loads; `build_optimizer` and
`build_lr_scheduler` then build what the training loop steps.

Adafactor follows sd-scripts (`get_optimizer` in library/train_util.py): `relative_step` defaults to true,
as in transformers, and then Adafactor picks its own step size from the step count and the parameters' RMS,
so learning_rate and text_encoder_lr are ignored (the optimizer is built with `lr=None`, which transformers
requires) and the only schedule allowed is "constant", which becomes transformers' `AdafactorSchedule` (it
reports the step sizes Adafactor used). Set `relative_step: false` in optimizer_args to use learning_rate and
any lr_scheduler, as with the other optimizers.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from lora_scripts.errors import UserError

log = logging.getLogger(__name__)

OptimizerName = Literal["AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor", "SGD"]


@dataclass(frozen=True)
class _OptimizerSource:
    """Where an optimizer class lives and how a user gets it."""

    module: str  # imported with importlib, so a missing optional package is found before training
    attribute: str  # dotted path inside the module, e.g. "optim.AdamW8bit"
    install: str  # what the user runs when the import fails


_SOURCES: Mapping[str, _OptimizerSource] = MappingProxyType(
    {
        "AdamW": _OptimizerSource("torch.optim", "AdamW", "pip install torch"),
        "AdamW8bit": _OptimizerSource("bitsandbytes", "optim.AdamW8bit", "pip install bitsandbytes"),
        "Lion": _OptimizerSource("lion_pytorch", "Lion", "pip install lion-pytorch"),
        "Prodigy": _OptimizerSource("prodigyopt", "Prodigy", "pip install prodigyopt"),
        "Adafactor": _OptimizerSource("transformers.optimization", "Adafactor", "pip install transformers"),
        "SGD": _OptimizerSource("torch.optim", "SGD", "pip install torch"),
    }
)
OPTIMIZERS: tuple[str, ...] = tuple(_SOURCES)

# Keys of optimizer_args that lora-scripts sets itself, with the config key that sets them.
_RESERVED_ARGS = MappingProxyType(
    {"params": "the LoRA weights being trained", "lr": "learning_rate and text_encoder_lr"}
)
_PRODIGY_MIN_LR = 0.1  # sd-scripts warns below this too: Prodigy scales lr by its own estimate d
_POLYNOMIAL_LR_END = 1e-7  # diffusers' get_polynomial_decay_schedule_with_warmup default


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def canonical_optimizer(name: str) -> str | None:
    """sd-scripts' spelling of `name`, matched without regard to case ('adamw8bit' → 'AdamW8bit'), or None."""
    return next((known for known in OPTIMIZERS if known.lower() == name.strip().lower()), None)


def _load_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of a canonical optimizer name; UserError naming the pip command if it cannot be imported."""
    source = _SOURCES[name]
    try:
        found: Any = importlib.import_module(source.module)
    except ImportError as err:
        raise UserError(
            f"optimizer_type: {name} needs the '{source.module}' package, which is not installed "
            f"({source.install}{', or use optimizer_type: AdamW' if name != 'AdamW' else ''})."
        ) from err
    for part in source.attribute.split("."):
        found = getattr(found, part)
    return found


def _signature(cls: type) -> Mapping[str, inspect.Parameter]:
    """Keyword arguments of `cls.__init__`, without `self`."""
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return params


def _adafactor_relative_step(args: Mapping[str, Any]) -> bool:
    # transformers' Adafactor and sd-scripts both default to relative_step=True.
    return bool(args.get("relative_step", True))


def optimizer_problems(
    name: str,
    args: Mapping[str, Any],
    *,
    lr_scheduler: str,
    learning_rate: float,
    cuda_available: bool,
    text_encoder_lr: float | tuple[float, ...] | None = None,
) -> list[tuple[str, str]]:
    """(config key, problem sentence) for settings that cannot work, found without building anything.

    `text_encoder_lr` is the text encoder's rate when it is trained (None when it is not): Prodigy needs one
    rate for all parameter groups.
    """
    canonical = canonical_optimizer(name)
    if canonical is None:
        close = difflib.get_close_matches(name.lower(), [o.lower() for o in OPTIMIZERS], n=1)
        hint = f" (did you mean '{canonical_optimizer(close[0])}'?)" if close else ""
        return [("optimizer_type", f"'{name}' is not one of {', '.join(OPTIMIZERS)}{hint}")]
    problems: list[tuple[str, str]] = []
    if canonical == "AdamW8bit" and not cuda_available:
        problems.append(
            ("optimizer_type", "AdamW8bit (bitsandbytes) needs a CUDA GPU; use optimizer_type: AdamW here")
        )
    try:
        cls = _load_class(canonical)
    except UserError as err:
        return problems + [("optimizer_type", err.messages[0].removeprefix("optimizer_type: "))]
    except Exception as err:  # e.g. bitsandbytes raising while it looks for its CUDA library
        return problems + [("optimizer_type", f"{canonical}'s package failed to import ({err})")]
    problems += _args_problems(canonical, cls, args)
    problems += _rate_problems(canonical, args, lr_scheduler, learning_rate, text_encoder_lr)
    return problems


def _args_problems(name: str, cls: type, args: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Unknown or reserved keys of optimizer_args, and values written as text where YAML values belong."""
    accepted = _signature(cls)
    problems = []
    for key, value in args.items():
        if key in _RESERVED_ARGS:
            problems.append(
                ("optimizer_args", f"'{key}' is set by {_RESERVED_ARGS[key]}; remove it from optimizer_args")
            )
        elif key not in accepted:
            close = difflib.get_close_matches(str(key), [k for k in accepted if k not in _RESERVED_ARGS], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(("optimizer_args", f"'{key}' is not an argument of {name}{hint}"))
        elif isinstance(value, str) and not isinstance(accepted[key].default, str | type(None)):
            # sd-scripts' command line form ("betas=0.9,0.99") pasted into YAML arrives as text.
            problems.append(
                (
                    "optimizer_args",
                    f"'{key}': '{value}' is text; write it as a YAML value (a number, true/false, or a list "
                    "such as [0.9, 0.99])",
                )
            )
    return problems


def _rate_problems(
    name: str,
    args: Mapping[str, Any],
    lr_scheduler: str,
    learning_rate: float,
    text_encoder_lr: float | tuple[float, ...] | None,
) -> list[tuple[str, str]]:
    problems = []
    if name == "Prodigy":
        if learning_rate < _PRODIGY_MIN_LR:
            problems.append(
                (
                    "learning_rate",
                    f"{learning_rate} is too low for Prodigy, which adapts the step size itself and expects "
                    "about 1.0 (set learning_rate: 1.0)",
                )
            )
        rates = text_encoder_lr if isinstance(text_encoder_lr, tuple) else (text_encoder_lr,)
        if any(rate not in (None, 0, learning_rate) for rate in rates):
            # prodigyopt raises at the first step when groups differ (other than lr 0).
            problems.append(
                (
                    "text_encoder_lr",
                    f"{text_encoder_lr} differs from learning_rate ({learning_rate}); Prodigy needs one "
                    "learning rate for all weights (leave text_encoder_lr out)",
                )
            )
    if name == "Adafactor":
        relative = _adafactor_relative_step(args)
        if relative and lr_scheduler != "constant":
            problems.append(
                (
                    "lr_scheduler",
                    f"'{lr_scheduler}' cannot be used with Adafactor's relative_step, which sets its own "
                    "step size; use lr_scheduler: constant, or set relative_step: false in optimizer_args",
                )
            )
        if not relative and args.get("warmup_init", False):
            problems.append(
                (
                    "optimizer_args",
                    "Adafactor's warmup_init: true needs relative_step: true; remove one of them",
                )
            )
    elif lr_scheduler == "polynomial" and learning_rate <= _POLYNOMIAL_LR_END:
        problems.append(
            (
                "learning_rate",
                f"{learning_rate} must be above {_POLYNOMIAL_LR_END}, where lr_scheduler 'polynomial' ends",
            )
        )
    return problems


def build_optimizer(
    name: str,
    param_groups: list[tuple[list[nn.Parameter], float]],
    *,
    args: Mapping[str, Any],
    weight_decay: float,
    device: torch.device,
) -> torch.optim.Optimizer:
    """The optimizer `name` over (params, lr) groups; groups with no parameters are dropped.

    `args` (optimizer_args) win over everything set here; `weight_decay` (adam_weight_decay) is passed to
    optimizers that take one unless `args` sets it. `device` is where training runs: AdamW is fused on CUDA.
    Call `optimizer_problems` first: a setting the optimizer itself rejects is raised here as UserError.
    """
    canonical = canonical_optimizer(name)
    if canonical is None:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    if canonical == "AdamW8bit" and device.type != "cuda":
        raise UserError(
            "optimizer_type: AdamW8bit (bitsandbytes) needs a CUDA GPU; use optimizer_type: AdamW."
        )
    cls = _load_class(canonical)
    bad_args = _args_problems(canonical, cls, args)
    if bad_args:
        raise UserError([f"{key}: {problem}" for key, problem in bad_args])
    accepted = _signature(cls)
    groups = [{"params": params, "lr": lr} for params, lr in param_groups if params]
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters")
    kwargs: dict[str, Any] = {key: _as_signature_type(accepted[key], value) for key, value in args.items()}
    if "weight_decay" in accepted:
        kwargs.setdefault("weight_decay", weight_decay)
    # Like sd-scripts, the first group's rate is also the optimizer's default: diffusers' polynomial
    # schedule reads optimizer.defaults["lr"].
    kwargs["lr"] = groups[0]["lr"]
    if canonical == "AdamW" and not {"foreach", "fused"} & kwargs.keys():  # torch refuses both together
        kwargs |= _torch_kernel_choice(groups, device)
    elif canonical == "Adafactor" and _adafactor_relative_step(args):
        log.info("Adafactor relative_step: learning_rate and text_encoder_lr are ignored")
        kwargs["lr"] = None  # transformers requires it with relative_step
        groups = [{"params": g["params"]} for g in groups]
    elif canonical == "Prodigy" and len({g["lr"] for g in groups}) > 1:
        raise ValueError("Prodigy needs the same learning rate in every parameter group")
    log.info("Optimizer %s(%s)", canonical, ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "lr"))
    try:
        return cls(groups, **kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"optimizer_args: {canonical} rejected these settings: {err}") from err


def _as_signature_type(param: inspect.Parameter, value: Any) -> Any:
    """YAML lists become tuples where the optimizer expects one (betas, Adafactor's eps)."""
    wants_tuple = isinstance(param.default, tuple) or "tuple" in str(param.annotation).lower()
    return tuple(value) if isinstance(value, list) and wants_tuple else value


def _torch_kernel_choice(groups: list[dict[str, Any]], device: torch.device) -> dict[str, bool]:
    """fused=True on CUDA and CPU (torch has both kernels), else foreach=True: one kernel (or one per tensor
    list) for all parameters instead of several per parameter, which matters for LoRA's hundreds of small
    tensors. On the default CPU bench the fused kernel takes the optimizer phase from 3.1 to 2.1 ms a step."""
    params = [p for g in groups for p in g["params"]]
    fusable_dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    on_device = all(p.device.type == device.type and p.dtype in fusable_dtypes for p in params)
    if device.type in ("cuda", "cpu") and on_device:
        return {"fused": True}
    return {"foreach": True}


def warmup_steps(lr_warmup_steps: int | float, total_steps: int) -> int:
    """Warmup in optimizer updates: an int is a count, a float in (0, 1) a fraction of `total_steps`.

    The fraction is truncated as in sd-scripts (`int(lr_warmup_steps * num_training_steps)` in
    get_scheduler_fix); sd-scripts takes it of the steps already multiplied by the process count, this of the
    updates, so warmup stays a whole number of updates.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if isinstance(lr_warmup_steps, bool):
        raise ValueError("lr_warmup_steps must be a step count or a fraction, not true/false")
    if isinstance(lr_warmup_steps, int):
        if lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be ≥ 0, got {lr_warmup_steps}")
        return lr_warmup_steps
    if not 0 < lr_warmup_steps < 1:
        raise ValueError(
            f"lr_warmup_steps {lr_warmup_steps} is neither a step count (an integer) nor a fraction in (0, 1)"
        )
    return int(lr_warmup_steps * total_steps)


def build_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    num_processes: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedule `name` over `total_steps` optimizer updates, `warmup_steps` of them warming up.

    `num_cycles` is cosine_with_restarts' number of hard restarts; `power` is polynomial's exponent (it
    decays to 1e-7, diffusers' lr_end). An Adafactor with relative_step gets transformers' AdafactorSchedule.
    """
    # Imported here: diffusers and transformers are slow to import, and the config checks import this module.
    from diffusers.optimization import get_scheduler

    if getattr(optimizer, "defaults", {}).get("relative_step"):
        if name != "constant":
            raise ValueError(f"Adafactor with relative_step sets its own step size; lr_scheduler {name!r}")
        from transformers.optimization import AdafactorSchedule

        # Nothing to report before the first update: Adafactor derives the step from its state.
        return AdafactorSchedule(optimizer, initial_lr=0.0)
    # accelerate steps a prepared scheduler once per process per update: scale as diffusers does.
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
        num_cycles=num_cycles,
        power=power,
    )
