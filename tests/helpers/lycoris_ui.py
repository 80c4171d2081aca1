"""How AUTOMATIC1111's WebUI, Forge and ComfyUI load and apply one LyCORIS-layout module (LoHa, LoKr, LoRA
with DoRA), ported for tests: which key suffixes of a module each loader consumes (`UI_SUFFIXES`) and the
weight each ends up with after applying it (`patched_weight`).

Ported (the weight math only, line for line where it matters; no code of theirs runs or ships) from:

* AUTOMATIC1111/stable-diffusion-webui v1.10, extensions-builtin/Lora. The stored A1111 versions mix in
  forks (SD.Next, ...), so the files read are the v1.10 copies that Forge vendors verbatim as
  packages_3rdparty/webui_lora_collection/ (Forge commit dfdcbab6; `network.py` there is identical to the
  A1111 v1.10 network.py of the search index, the one with the sd3 `QkvLinear` shape and DoRA):
  - network.py `NetworkModule`: `alpha = w["alpha"].item()`, `scale = w["scale"].item()`,
    `bias = w.get("bias")`, `dora_scale = w.get("dora_scale")`, `dora_norm_dims = len(shape) - 1`;
    `calc_scale()` = `scale` if present, else `alpha / dim` if both set, else 1.0; `finalize_updown`
    reshapes to the 4-D output shape, then to the weight's shape when the sizes match, then
    `updown *= calc_scale()`, then (DoRA) `updown = apply_weight_decompose(updown, orig_weight)`, and
    returns `updown * multiplier()`; `apply_weight_decompose`: `merged = orig + updown`,
    `merged * (dora_scale / ‖merged‖)` with the norm ALWAYS per input channel (transpose(0, 1), norm over
    outputs and kernel), no eps, in `updown`'s dtype, returning `dora_merged - orig`.
  - network_hada.py `NetworkModuleHada` (dim = `hada_w1_b.shape[0]`; `rebuild_conventional(w1a, w1b)` *
    `rebuild_conventional(w2a, w2b)`, or lyco_helpers `make_weight_cp` with `hada_t1`/`hada_t2`; the
    tensors keep the file's dtype).
  - network_lokr.py `NetworkModuleLokr` (dim = `lokr_w1_b.shape[0]`, then `lokr_w2_b.shape[0]`, only when
    present: with neither factor decomposed dim stays None and calc_scale() is 1.0 whatever `alpha` says;
    `make_kron`: `w1` unsqueezed to 4-D when `w2` is 4-D, `torch.kron(w1, w2).reshape(output_shape)`,
    output_shape the weight's for a conv).
  - network_lora.py `NetworkModuleLora` (`lora_up`/`lora_down` copied into nn.Linear / nn.Conv2d modules
    cast to `devices.dtype`, dim = `lora_down.weight.shape[0]`, `rebuild_conventional(up, down)`).
  - networks.py v1.10 `network_apply_weights`:
    `self.weight.copy_((weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))`.
  A1111 consumes a module's keys through these `.w` lookups; it never reports a suffix nobody read (only
  module names that match no layer), so `UI_SUFFIXES["A1111"]` lists what the classes read.
* lllyasviel/stable-diffusion-webui-forge (commit dfdcbab6, 2025-06-26): backend/patcher/lora.py (last
  changed 0ced1d0c) `merge_lora_to_weight` (the weight copied to float32, every factor cast to float32,
  ComfyUI's formulas; `lora` patch: a product that does not reshape to the weight is zero-padded instead
  of dropped; LoHa/LoKr errors are re-raised) and its `weight_decompose` (ComfyUI's, below); `load_lora`
  is packages_3rdparty/webui_lora_collection/lora.py's (first in `lora_collection_priority`), ComfyUI's
  older inline loader without `reshape_weight`.
* comfyanonymous/ComfyUI: comfy/weight_adapter/base.py (commit 9c0cf36c) `weight_decompose`, lora.py
  (6fd406fb) `LoRAAdapter`, loha.py (183b3775) `LoHaAdapter`, lokr.py (e8f3bc5a) `LoKrAdapter`, each
  `load` (its `loaded_keys`) and `calculate_weight`; weight_adapter/__init__.py (dc05edb5) `adapters`;
  comfy/lora.py `load_lora` (the weight_adapter loop: `alpha` and `dora_scale` are consumed for every
  module, then each adapter's `load`; any key of the file left out of `loaded_keys` is logged "lora key not
  loaded"; the stored comfy/lora.py 41444b52 is the older inline loader with the same keys) and
  `calculate_weight`; comfy/model_patcher.py `patch_weight_to_device` runs it on a float32 copy of the
  weight and casts back with comfy/float.py `stochastic_rounding` (a plain `.to()` for fp32/fp16/bf16).
  Per type: alpha/dim is `alpha / lora_down.shape[0]`, `alpha / hada_w1_b.shape[0]`, and for LoKr
  `alpha / dim` with dim the `lokr_w1_b` then `lokr_w2_b` rank, 1.0 when neither factor is decomposed
  (or no alpha). Without DoRA: `W += strength * (alpha/dim) * diff`; with DoRA `weight_decompose`:
  `W_c = W + (alpha/dim) * diff`; if `dora_scale.shape[0] == W.shape[0]` (an output-axis magnitude) the
  norm is that of the ORIGINAL weight per output row, else of `W_c` per input channel; `+ eps`
  (float32's); `W_c *= dora_scale / norm`; `W += strength * (W_c - W)` (`W = W_c` at strength 1).

And the reference the UIs are checked against: KohakuBlueleaf/LyCORIS (commit f49d30d6; the files last
changed 2a1c2944): lycoris/functional/loha.py `diff_weight(w1d, w1u, w2d, w2u, t1, t2, gamma)`
(`gamma * (w1u @ w1d) * (w2u @ w2d)`), lokr.py `diff_weight(w1, w1a, w1b, w2, w2a, w2b, t, gamma)`
(`gamma / rank * kron(w1, w2)`, rank that of w1a, else w2a, else gamma itself: scale 1), and
lycoris/modules/locon.py `LoConModule.apply_weight_decompose` (`W * (m / (‖W‖ + eps))`, per input channel
with `wd_on_out=False`; at multiplier ≠ 1 `W * (mult * (m/‖W‖ - 1) + 1)`).

Where they differ (kept faithful here, each its own):

* The multiplier of a DoRA module: all three UIs interpolate between the original weight and the fully
  decomposed one, `W + mult * (DoRA(W + s·ΔW) - W)`; LyCORIS' own `get_merged_weight` adds the whole
  `s·ΔW` and scales only the rescale, `W + s·ΔW + mult * (DoRA(W + s·ΔW) - W - s·ΔW)`. They agree at 1.
* The norm's eps: ComfyUI and Forge add float32's eps (1.19e-7) to the norm, A1111 adds none (LyCORIS adds
  the weight dtype's).
* An output-axis `dora_scale` ([out, 1], LyCORIS' default `wd_on_out=True`): A1111 still divides by the
  per-INPUT-channel norm of the merged weight (for a Linear the [out, 1] / [1, in] broadcast gives a
  full [out, in] matrix, silently wrong); ComfyUI and Forge divide by the per-output-row norm of the
  ORIGINAL weight, not the merged one. Our input-axis `dora_scale` ([1, in] / [1, in, 1, 1]) means the same
  everywhere, except that ComfyUI and Forge take a layer with ONE output (`weight.shape[0] == 1`) for the
  output-axis case.
* Precision: ComfyUI and Forge compute in float32 and cast the result to the weight's dtype; A1111 computes
  LoRA/DoRA in `devices.dtype` (`webui_dtype` here; fp16 on most GPUs), LoHa/LoKr in the file's dtype, and
  adds in that dtype.
* A product that does not fit the weight: ComfyUI logs an error and leaves the weight alone, Forge pads
  the `lora` product (LoHa/LoKr raise), A1111 raises in `reshape`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

UI = Literal["A1111", "Forge", "ComfyUI"]
UIS: tuple[UI, ...] = ("A1111", "Forge", "ComfyUI")
ModuleType = Literal["LoRA", "DoRA", "LoHa", "LoKr"]

_LORA = frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"})
_HADA = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
_LOKR = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})
# network.py NetworkModule.__init__, for every module type.
_A1111_COMMON = frozenset({"alpha", "scale", "bias", "dora_scale"})
# load_lora: consumed for every module before the type-specific part.
_COMFY_COMMON = frozenset({"alpha", "dora_scale"})

#: Suffixes (after `<module name>.`) of one module that each UI's loader reads, per module type; a key of
#: ours whose suffix is not listed is left over ("lora key not loaded" in ComfyUI / Forge, never read in
#: A1111). DoRA is a LoRA module with `dora_scale`.
UI_SUFFIXES: dict[UI, dict[ModuleType, frozenset[str]]] = {
    "A1111": {
        # network_lora.py also takes `lora_A.weight` / `lora_B.weight`, renamed to up/down.
        "LoRA": _A1111_COMMON | _LORA | {"lora_A.weight", "lora_B.weight"},
        "DoRA": _A1111_COMMON | _LORA | {"lora_A.weight", "lora_B.weight"},
        "LoHa": _A1111_COMMON | _HADA,
        "LoKr": _A1111_COMMON | _LOKR,
    },
    "Forge": {
        "LoRA": _COMFY_COMMON | _LORA,
        "DoRA": _COMFY_COMMON | _LORA,
        "LoHa": _COMFY_COMMON | _HADA,
        "LoKr": _COMFY_COMMON | _LOKR,
    },
    "ComfyUI": {
        # LoRAAdapter.load also consumes `reshape_weight` (a list the weight is zero-padded to).
        "LoRA": _COMFY_COMMON | _LORA | {"reshape_weight"},
        "DoRA": _COMFY_COMMON | _LORA | {"reshape_weight"},
        "LoHa": _COMFY_COMMON | _HADA,
        "LoKr": _COMFY_COMMON | _LOKR,
    },
}


def module_type(tensors: Mapping[str, torch.Tensor]) -> ModuleType:
    """The type A1111's `create_module` order (lora, hada, ..., lokr) and ComfyUI's adapters pick."""
    if "lora_up.weight" in tensors and "lora_down.weight" in tensors:
        return "DoRA" if "dora_scale" in tensors else "LoRA"
    if all(k in tensors for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "LoHa"
    has_1 = "lokr_w1" in tensors or ("lokr_w1_a" in tensors and "lokr_w1_b" in tensors)
    has_2 = "lokr_w2" in tensors or ("lokr_w2_a" in tensors and "lokr_w2_b" in tensors)
    if has_1 and has_2:
        return "LoKr"
    raise ValueError(f"not a LoRA/LoHa/LoKr module: {sorted(tensors)}")


def leftover_suffixes(ui: UI, tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """The suffixes of a module `ui` does not read."""
    return set(tensors) - UI_SUFFIXES[ui][module_type(tensors)]


def patched_weight(
    ui: UI,
    tensors: Mapping[str, torch.Tensor],
    weight: torch.Tensor,
    multiplier: float = 1.0,
    *,
    webui_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The weight `ui` ends up with after applying one module (`tensors` keyed by suffix) to `weight` at
    `multiplier` (A1111's te/unet multiplier, Forge's and ComfyUI's strength). `webui_dtype` is A1111's
    `devices.dtype` (the dtype of its LoRA up/down modules; default: the weight's)."""
    if ui == "A1111":
        return _a1111(tensors, weight, multiplier, webui_dtype or weight.dtype)
    if ui in ("Forge", "ComfyUI"):
        return _comfy(ui, tensors, weight, multiplier)
    raise ValueError(f"unknown UI {ui!r}")


# ---------------------------------------------------------------------------------------------------------
# A1111 (extensions-builtin/Lora, v1.10)
# ---------------------------------------------------------------------------------------------------------


def _make_weight_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:  # lyco_helpers
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _rebuild_conventional(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:  # lyco_helpers
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    return (up @ down).reshape(shape)


def _a1111(tensors: Mapping[str, torch.Tensor], orig: torch.Tensor, multiplier: float, dtype) -> torch.Tensor:
    w = tensors
    alpha = w["alpha"].item() if "alpha" in w else None
    scale = w["scale"].item() if "scale" in w else None
    if w.get("bias") is not None:
        raise NotImplementedError("a module `bias` (network.py finalize_updown) is not ported")
    dora_scale = w.get("dora_scale")
    kind = module_type(w)
    dim = None

    if kind in ("LoRA", "DoRA"):  # network_lora.py
        if "lora_mid.weight" in w:
            raise NotImplementedError("lora_mid (Tucker LoCon) is not ported")
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        # create_module: the tensors become the weights of nn.Linear / nn.Conv2d modules in devices.dtype.
        if orig.dim() == 2:
            up = up.reshape(up.shape[0], -1)
            down = down.reshape(down.shape[0], -1)
        else:
            if down.dim() == 2:
                down = down.reshape(down.shape[0], -1, 1, 1)
            up = up.reshape(up.shape[0], up.shape[1], 1, 1)
        up, down = up.to(dtype), down.to(dtype)
        dim = down.shape[0]
        output_shape = [up.size(0), down.size(1)]
        if down.dim() == 4:
            output_shape += down.shape[2:]
        updown = _rebuild_conventional(up, down, output_shape)
    elif kind == "LoHa":  # network_hada.py
        w1a, w1b, w2a, w2b = (w[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        t1, t2 = w.get("hada_t1"), w.get("hada_t2")
        dim = w1b.shape[0]
        output_shape = [w1a.size(0), w1b.size(1)]
        if t1 is not None:
            output_shape = [w1a.size(1), w1b.size(1)]
            updown1 = _make_weight_cp(t1, w1a, w1b)
            output_shape += t1.shape[2:]
        else:
            if len(w1b.shape) == 4:
                output_shape += w1b.shape[2:]
            updown1 = _rebuild_conventional(w1a, w1b, output_shape)
        if t2 is not None:
            updown2 = _make_weight_cp(t2, w2a, w2b)
        else:
            updown2 = _rebuild_conventional(w2a, w2b, output_shape)
        updown = updown1 * updown2
    else:  # network_lokr.py
        w1, w1a, w1b = w.get("lokr_w1"), w.get("lokr_w1_a"), w.get("lokr_w1_b")
        w2, w2a, w2b, t2 = w.get("lokr_w2"), w.get("lokr_w2_a"), w.get("lokr_w2_b"), w.get("lokr_t2")
        dim = w1b.shape[0] if w1b is not None else dim
        dim = w2b.shape[0] if w2b is not None else dim
        if w1 is None:
            w1 = w1a @ w1b
        if w2 is None:
            w2 = w2a @ w2b if t2 is None else _make_weight_cp(t2, w2a, w2b)
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(orig.shape) == 4:
            output_shape = orig.shape
        if len(w2.shape) == 4:  # make_kron
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)

    # network.py NetworkModule.finalize_updown
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if orig.size().numel() == updown.size().numel():
        updown = updown.reshape(orig.shape)
    if scale is not None:  # calc_scale
        calc_scale = scale
    elif dim is not None and alpha is not None:
        calc_scale = alpha / dim
    else:
        calc_scale = 1.0
    updown = updown * calc_scale
    if dora_scale is not None:  # apply_weight_decompose
        norm_dims = len(orig.shape) - 1
        orig_c = orig.to(updown.dtype)
        merged = updown + orig_c
        merged_norm = (
            merged.transpose(0, 1)
            .reshape(merged.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * norm_dims)
            .transpose(0, 1)
        )
        updown = merged * (dora_scale.to(device=orig.device, dtype=updown.dtype) / merged_norm) - orig_c
    updown = updown * multiplier
    # networks.py network_apply_weights
    return (orig.to(dtype=updown.dtype) + updown).to(dtype=orig.dtype)


# ---------------------------------------------------------------------------------------------------------
# ComfyUI (comfy/weight_adapter) and Forge (backend/patcher/lora.py merge_lora_to_weight)
# ---------------------------------------------------------------------------------------------------------


def _weight_decompose(dora_scale, weight, lora_diff, alpha, strength):  # weight_adapter/base.py
    dora_scale = dora_scale.to(torch.float32)
    lora_diff *= alpha
    weight_calc = weight + lora_diff.type(weight.dtype)
    wd_on_output_axis = dora_scale.shape[0] == weight_calc.shape[0]
    if wd_on_output_axis:
        weight_norm = (
            weight.reshape(weight.shape[0], -1)
            .norm(dim=1, keepdim=True)
            .reshape(weight.shape[0], *[1] * (weight.dim() - 1))
        )
    else:
        weight_norm = (
            weight_calc.transpose(0, 1)
            .reshape(weight_calc.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1))
            .transpose(0, 1)
        )
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc *= (dora_scale / weight_norm).type(weight.dtype)
    if strength != 1.0:
        weight_calc -= weight
        weight += strength * weight_calc
    else:
        weight[:] = weight_calc
    return weight


def _comfy(ui: UI, tensors: Mapping[str, torch.Tensor], orig: torch.Tensor, strength: float) -> torch.Tensor:
    f32 = torch.float32
    weight = orig.to(f32, copy=True)  # model_patcher.patch_weight_to_device / merge_lora_to_weight
    v_alpha = tensors["alpha"].item() if "alpha" in tensors else None  # load_lora
    dora_scale = tensors.get("dora_scale")
    kind = module_type(tensors)

    if kind in ("LoRA", "DoRA"):  # LoRAAdapter.calculate_weight / Forge's "lora" patch
        if "lora_mid.weight" in tensors:
            raise NotImplementedError("lora_mid (Tucker LoCon) is not ported")
        if ui == "ComfyUI" and "reshape_weight" in tensors:
            raise NotImplementedError("reshape_weight is not ported")
        mat1 = tensors["lora_up.weight"].to(f32)
        mat2 = tensors["lora_down.weight"].to(f32)
        alpha = v_alpha / mat2.shape[0] if v_alpha is not None else 1.0
        lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1))
        try:
            lora_diff = lora_diff.reshape(weight.shape)
        except RuntimeError:
            if ui == "ComfyUI":  # logging.error, the weight is left as it is
                return orig.clone()
            # Forge pads the narrower of the two along dim 1 (FluxTools' wider img_in).
            if weight.shape[1] < lora_diff.shape[1]:
                weight = torch.nn.functional.pad(weight, (0, lora_diff.shape[1] - weight.shape[1]))
            elif weight.shape[1] > lora_diff.shape[1]:
                lora_diff = torch.nn.functional.pad(lora_diff, (0, weight.shape[1] - lora_diff.shape[1]))
    elif kind == "LoHa":  # LoHaAdapter.calculate_weight / Forge's "loha" patch
        w1a, w1b, w2a, w2b = (
            tensors[k].to(f32) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        )
        alpha = v_alpha / w1b.shape[0] if v_alpha is not None else 1.0
        if "hada_t1" in tensors:
            t1, t2 = tensors["hada_t1"].to(f32), tensors["hada_t2"].to(f32)
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        else:
            m1 = torch.mm(w1a, w1b)
            m2 = torch.mm(w2a, w2b)
        lora_diff = _fit(ui, m1 * m2, weight)
        if lora_diff is None:
            return orig.clone()
    else:  # LoKrAdapter.calculate_weight / Forge's "lokr" patch
        w1, w2 = tensors.get("lokr_w1"), tensors.get("lokr_w2")
        w1_a, w1_b = tensors.get("lokr_w1_a"), tensors.get("lokr_w1_b")
        w2_a, w2_b, t2 = tensors.get("lokr_w2_a"), tensors.get("lokr_w2_b"), tensors.get("lokr_t2")
        dim = None
        if w1 is None:
            dim = w1_b.shape[0]
            w1 = torch.mm(w1_a.to(f32), w1_b.to(f32))
        else:
            w1 = w1.to(f32)
        if w2 is None:
            dim = w2_b.shape[0]
            if t2 is None:
                w2 = torch.mm(w2_a.to(f32), w2_b.to(f32))
            else:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", t2.to(f32), w2_b.to(f32), w2_a.to(f32))
        else:
            w2 = w2.to(f32)
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = v_alpha / dim if v_alpha is not None and dim is not None else 1.0
        lora_diff = _fit(ui, torch.kron(w1, w2), weight)
        if lora_diff is None:
            return orig.clone()

    if dora_scale is not None:
        weight = _weight_decompose(dora_scale, weight, lora_diff, alpha, strength)
    else:
        weight += ((strength * alpha) * lora_diff).type(weight.dtype)
    return weight.to(orig.dtype)  # comfy.float.stochastic_rounding / Forge's weight_dtype_backup


def _fit(ui: UI, diff: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """`diff.reshape(weight.shape)`; ComfyUI logs a failure and skips the patch (None), Forge raises."""
    try:
        return diff.reshape(weight.shape)
    except RuntimeError:
        if ui == "ComfyUI":
            return None
        raise
