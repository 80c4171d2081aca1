"""Attach peft adapters to a component: what to train (`LoraSpec`), target checks with clear errors, and one
peft config per component that gives 3x3 convs (LoCon) their own rank and alpha: a `LoraConfig` for LoRA,
LoCon and DoRA (the magnitude added by models/dora.py), peft's `LoHaConfig` / `LoKrConfig` for LyCORIS' LoHa
and LoKr (peft's layers are LyCORIS' ported, with its tensor names and formulas: export/lycoris.py)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import ADAPTER_NAME
from lora_scripts.models.dora import add_dora

# Layer types peft's LoRA can wrap and that sd-scripts' LoRA targets.
_ADAPTABLE = (nn.Linear, nn.Conv2d)


NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")
# peft builds a LoKr factor as a product of two rank-r matrices only when r is under half its size; a rank
# above every layer's size keeps both factors full (LyCORIS' full_matrix), at scale alpha / r = 1.
_FULL_MATRIX_RANK = 1 << 20


@dataclass(frozen=True)
class NetworkKind:
    """The adapter type (config `network_type`) and LoKr's options (LyCORIS' `factor`, `full_matrix`)."""

    type: str = "lora"
    lokr_factor: int = -1
    lokr_full_matrix: bool = False

    def __post_init__(self) -> None:
        if self.type not in NETWORK_TYPES:
            raise ValueError(f"NetworkKind.type must be one of {NETWORK_TYPES}, got {self.type!r}")


@dataclass(frozen=True)
class LoraSpec:
    """The shape of the LoRA network: one rank/alpha for Linear and 1x1-conv layers, another for 3x3 convs.

    The update of each layer is `(alpha / rank) * up @ down` (peft's `scaling`), as in sd-scripts.
    """

    rank: int
    alpha: float
    conv_rank: int | None = None  # LoCon: LoRA on the UNet's 3x3 convs too (kohya conv_dim); None = off
    # None = conv_rank. sd-scripts defaults conv_alpha to 1, but our lora_alpha defaults to the rank, and
    # the conv layers follow the same rule so that a bare `conv_rank` gives scale 1 everywhere.
    conv_alpha: float | None = None
    dropout: float = 0.0  # network_dropout, as a probability in [0, 1)
    kind: NetworkKind = NetworkKind()

    def __post_init__(self) -> None:
        # The config schema validates user values; these guard the API itself.
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"LoraSpec needs rank >= 1 and alpha > 0, got {self.rank}, {self.alpha}")
        if self.conv_rank is None and self.conv_alpha is not None:
            raise ValueError("LoraSpec.conv_alpha needs conv_rank")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise ValueError(f"LoraSpec.conv_rank must be >= 1, got {self.conv_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout}")

    @property
    def effective_conv_alpha(self) -> float | None:
        """conv_alpha, defaulting to conv_rank; None without LoCon."""
        if self.conv_rank is None:
            return None
        return float(self.conv_rank if self.conv_alpha is None else self.conv_alpha)


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


def matching_module_names(module: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full paths of the Linear/Conv2d layers of `module` that peft's list rule selects for `targets`."""
    return [n for n in adaptable_module_names(module) if any(_matches(n, t) for t in targets)]


def exact_pattern(name: str) -> str:
    # peft matches rank_pattern/alpha_pattern keys as regexes against `(.*\.)?(key)$`; escaping the dots
    # and anchoring at the start makes each key select exactly one module path.
    return "^" + re.escape(name)


def add_lora_adapter(
    module: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    *,
    conv_targets: Sequence[str] = (),
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    kind: NetworkKind = NetworkKind(),
) -> int:
    """Wrap the target layers of `module` with LoRA (peft's default init: A Kaiming-uniform, B zero, as
    sd-scripts), freeze everything else, and return the number of trainable parameters.

    targets: module names or dotted suffixes (peft's list rule), at `rank`/`alpha`.
    conv_targets: full paths of 3x3 convs adapted at `conv_rank`/`conv_alpha` (default conv_rank), in the same
        peft config through `rank_pattern`/`alpha_pattern`. peft's Conv2d LoRA has lora_A [r, in, kh, kw]
        (the base conv's kernel, stride and padding) and lora_B [out, r, 1, 1]: sd-scripts' LoCon layout.
    dropout: peft's `lora_dropout`, applied to the LoRA branch's input. sd-scripts' `network_dropout` drops
        lora_down's output instead; both are standard dropout regularisation of the LoRA path.
    kind: the adapter type: LoRA / LoCon, DoRA (a LoRA with models/dora.py's magnitude), LoHa or LoKr (peft's
        layers, without Tucker factors, so their tensors are LyCORIS' 2-D ones: export/lycoris.py).
    """
    if conv_targets and conv_rank is None:
        raise ValueError("conv_targets need a conv_rank")
    conv_alpha = float(conv_rank if conv_alpha is None else conv_alpha) if conv_rank is not None else None
    module.requires_grad_(False)
    shape = {
        "target_modules": list(dict.fromkeys([*targets, *conv_targets])),
        "rank_pattern": {exact_pattern(name): conv_rank for name in conv_targets},
        "alpha_pattern": {exact_pattern(name): conv_alpha for name in conv_targets},
    }
    if kind.type == "loha":
        config = LoHaConfig(r=rank, alpha=alpha, init_weights=True, use_effective_conv2d=False, **shape)
    elif kind.type == "lokr":
        if kind.lokr_full_matrix:
            rank = alpha = _FULL_MATRIX_RANK
            shape["rank_pattern"] = shape["alpha_pattern"] = {}
        config = LoKrConfig(
            r=rank,
            alpha=alpha,
            decompose_factor=kind.lokr_factor,
            decompose_both=False,
            use_effective_conv2d=False,
            init_weights=True,
            **shape,
        )
    else:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True, **shape)
    # peft injects the layers itself, for a diffusers model, a transformers model or any nn.Module alike:
    # `add_adapter` of transformers (>= 5.24) refuses peft releases older than one it names, even where
    # that peft injects LoRA correctly, and diffusers' is this same call behind its own version gate.
    inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
    if kind.type == "dora":
        add_dora(module, ADAPTER_NAME)
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def attach_lora_weights(
    module: nn.Module, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], adapter: str
) -> None:
    """Attach adapter `adapter` to `module` holding the given weights, through peft itself.

    weights: module path → (lora_A [r, in(, kh, kw)], lora_B [out, r(, 1, 1)]) with each module's
        `alpha / rank` already folded into lora_B, so peft's scale is 1 (alpha = rank per module).
    Used for a text encoder at generation time: diffusers would go through transformers' `load_adapter`,
    whose release gates and load report we do not want between a user and their LoRA.
    """
    ranks = {path: int(down.shape[0]) for path, (down, _) in weights.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    odd = {exact_pattern(path): rank for path, rank in ranks.items() if rank != common}
    config = LoraConfig(
        r=common, lora_alpha=common, target_modules=sorted(ranks), rank_pattern=odd, alpha_pattern=odd
    )
    inject_adapter_in_model(config, module, adapter_name=adapter)
    state = {}
    for path, (down, up) in weights.items():
        state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = down, up
    result = set_peft_model_state_dict(module, state, adapter_name=adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:  # every key names a layer peft has just wrapped; anything else is a bug of ours
        raise RuntimeError(f"peft did not place {len(unexpected)} LoRA weights, e.g. {unexpected[0]}")


def detach_lora(module: nn.Module, adapter: str) -> None:
    """Remove adapter `adapter` from every peft layer of `module` and from its `peft_config` (which lists the
    adapters diffusers' `get_list_adapters` and `set_adapters` see). The wrappers stay, as diffusers leaves
    them; the other adapters are untouched."""
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.delete_adapter(adapter)
    configs = getattr(module, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter, None)
        if not configs:
            del module.peft_config
