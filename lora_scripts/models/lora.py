"""Attach peft LoRA adapters to a component, with a clear error for target names that match nothing."""

from __future__ import annotations

from peft import LoraConfig
from torch import nn

from lora_scripts.errors import UserError

# Layer types peft's LoRA can wrap and that sd-scripts' LoRA targets.
_ADAPTABLE = (nn.Linear, nn.Conv2d)


def adaptable_module_names(module: nn.Module) -> list[str]:
    """Dotted paths of every Linear/Conv2d in `module`."""
    return [name for name, child in module.named_modules() if isinstance(child, _ADAPTABLE) and name]


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of strings: the full path or a dotted suffix of it.
    return name == target or name.endswith("." + target)


def check_targets(module: nn.Module, targets: list[str], *, key: str, component: str) -> None:
    """Raise UserError naming each entry of `targets` that matches no Linear/Conv2d of `module`."""
    names = adaptable_module_names(module)
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        examples = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})[:12]
        raise UserError(
            [
                f"{key}: '{t}' matches no layer of the {component}; use layer names such as "
                f"{', '.join(examples)}."
                for t in missing
            ]
        )


def add_lora_adapter(module: nn.Module, targets: list[str], rank: int, alpha: float) -> int:
    """Wrap the target layers of `module` with LoRA (peft's default init: A Kaiming-uniform, B zero, as
    sd-scripts), freeze everything else, and return the number of trainable parameters."""
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    module.add_adapter(config)
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
