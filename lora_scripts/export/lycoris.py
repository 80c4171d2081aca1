"""The LyCORIS network types in files, as LyCORIS (`network_module = lycoris.kohya`) writes them and
A1111/Forge and ComfyUI apply them: the tensors of each type, their shapes, and the weight update they make.

Keys of one module (after its kohya name, e.g. `lora_unet_down_blocks_0_resnets_0_conv1`):

  LoHa   .hada_w1_a [out, r]  .hada_w1_b [r, in·kh·kw]  .hada_w2_a  .hada_w2_b  .alpha
         ΔW = (alpha / r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), reshaped to the layer's weight
  LoKr   .lokr_w1 [a, c], or .lokr_w1_a [a, r] + .lokr_w1_b [r, c]
         .lokr_w2 [b, d(, kh, kw)], or .lokr_w2_a [b, r] + .lokr_w2_b [r, d·kh·kw]     .alpha
         ΔW = scale · kron(w1, w2) (out = a·b, in = c·d); scale = alpha / r when a factor is a product of two,
         else 1 (all three loaders ignore alpha then)
  DoRA   a LoRA's .lora_down.weight / .lora_up.weight / .alpha, and .dora_scale [1, in(, 1, 1)]: a magnitude
         per input channel (LyCORIS' dora_wd, wd_on_output=False): W' = (W + ΔW) · dora_scale / ‖W + ΔW‖,
         the norm taken per input channel over the output rows (and the kernel). A1111 normalises only this
         way and ComfyUI applies its other axis with the original weight's norm, so this axis is the one whose
         file means the same in every UI (and LyCORIS).

The formulas here are the single definition of what a file means: the file tests compare each UI's patched
weight with them and with the trained network, and `generate`, merge and inspect apply them.
"""

from __future__ import annotations

import math

import torch

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
FACTOR_KEYS = {"loha": LOHA_KEYS, "lokr": LOKR_KEYS}
DORA_KEY = "dora_scale"
# What the file calls each type (inspect, messages) and LyCORIS' `algo` for it (ss_network_args).
TYPE_NAMES = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}

# LyCORIS keys of what neither training nor generation applies, with what to call it in a message.
UNSUPPORTED_SUFFIXES = {
    ".hada_t1": "LyCORIS LoHa with Tucker decomposition (use_tucker)",
    ".lokr_t2": "LyCORIS LoKr with Tucker decomposition (use_tucker)",
    ".lora_mid.weight": "LyCORIS LoCon with Tucker decomposition (lora_mid)",
    ".diff": "LyCORIS full-weight difference",
    ".on_input": "LyCORIS IA3",
    ".oft_blocks": "LyCORIS OFT",
    ".oft_diag": "LyCORIS OFT",
    ".a1.weight": "LyCORIS GLoRA",
    ".scalar": "LyCORIS with use_scalar",
    ".lora_magnitude_vector": "diffusers/peft DoRA (a magnitude per output channel)",
}


def factor_kind(names: set[str]) -> str | None:
    """ "loha" or "lokr" for a module holding those tensors (by suffix, without its dot), else None."""
    for kind, keys in FACTOR_KEYS.items():
        if names & set(keys):
            return kind
    return None


def factors_complete(kind: str, factors: dict[str, torch.Tensor]) -> bool:
    """Whether a module's tensors are all its type needs."""
    if kind == "loha":
        return all(k in factors for k in LOHA_KEYS)
    has = set(factors)
    return ("lokr_w1" in has or {"lokr_w1_a", "lokr_w1_b"} <= has) and (
        "lokr_w2" in has or {"lokr_w2_a", "lokr_w2_b"} <= has
    )


def factors_rank(kind: str, factors: dict[str, torch.Tensor]) -> int | None:
    """The rank r of a LoHa, or of the decomposed factors of a LoKr (None: neither factor is decomposed)."""
    if kind == "loha":
        return int(factors["hada_w1_b"].shape[0])
    if "lokr_w2_b" in factors:
        return int(factors["lokr_w2_b"].shape[0])
    if "lokr_w1_b" in factors:
        return int(factors["lokr_w1_b"].shape[0])
    return None


def factors_scale(kind: str, factors: dict[str, torch.Tensor], alpha: float | None) -> float:
    """The update's scale: alpha / r (alpha = r when the file has none); a LoKr without a decomposed factor
    is applied at 1 whatever its alpha, as LyCORIS, A1111 and ComfyUI do."""
    rank = factors_rank(kind, factors)
    if rank is None:
        return 1.0
    return (float(rank) if alpha is None else alpha) / rank


def _lokr_parts(factors: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        return factors[name].to(dtype)

    w1 = get("lokr_w1") if "lokr_w1" in factors else get("lokr_w1_a") @ get("lokr_w1_b")
    w2 = get("lokr_w2") if "lokr_w2" in factors else get("lokr_w2_a") @ get("lokr_w2_b")
    return w1, w2


def factors_shape(kind: str, factors: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(out, in·kh·kw) of the update a module's factors make, or None when they do not chain."""
    try:
        if kind == "loha":
            w1a, w1b, w2a, w2b = (factors[k] for k in LOHA_KEYS)
            if w1a.dim() != 2 or w1b.dim() != 2 or w1a.shape[1] != w1b.shape[0]:
                return None
            if w2a.shape != w1a.shape or w2b.shape != w1b.shape:
                return None
            return int(w1a.shape[0]), int(w1b.shape[1])
        w1, w2 = _lokr_parts({k: v.to("meta") for k, v in factors.items()}, torch.float32)
    except (KeyError, RuntimeError):
        return None
    if w1.dim() != 2:
        return None
    return int(w1.shape[0] * w2.shape[0]), int(w1.shape[1] * math.prod(w2.shape[1:]))


def factors_update(
    kind: str,
    factors: dict[str, torch.Tensor],
    alpha: float | None,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The update ΔW of a LoHa or LoKr module, in the layer weight's `shape`, computed in `dtype`."""
    scale = factors_scale(kind, factors, alpha)
    if kind == "loha":
        w1a, w1b, w2a, w2b = (factors[k].to(dtype) for k in LOHA_KEYS)
        return ((w1a @ w1b) * (w2a @ w2b) * scale).reshape(shape)
    w1, w2 = _lokr_parts(factors, dtype)
    if w2.dim() == 4:  # a conv's full second factor keeps its kernel: kron over [a, c, 1, 1] ⊗ [b, d, kh, kw]
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * scale).reshape(shape)


def dora_weight(weight: torch.Tensor, update: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """The weight a DoRA module makes of `weight` [out, in(, kh, kw)] and its (scaled) `update`: their sum
    rescaled per input channel to the magnitude `dora_scale` [1, in(, 1, 1)], in float32."""
    merged = weight.float() + update.float()
    return merged * (dora_scale.float().reshape(input_norms(merged).shape) / input_norms(merged))


def input_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input channel's weights, over the outputs (and the kernel): [1, in(, 1, 1)]."""
    per_input = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return per_input.reshape(1, weight.shape[1], *([1] * (weight.dim() - 2)))


def dora_scale_shape(weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The file shape of a dora_scale for a layer weight of `weight_shape`: [1, in(, 1, 1)]."""
    return (1, weight_shape[1], *([1] * (len(weight_shape) - 2)))
