"""The ported A1111 / Forge / ComfyUI weight math of tests/helpers/lycoris_ui.py, checked on random tensors
against the textbook LoHa, LoKr and DoRA formulas and against LyCORIS' own functional code: what the file
tests of our LoHa/LoKr/DoRA export rely on. The sources each part follows are in the helper's docstring."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.lycoris_ui import UI_SUFFIXES, UIS, leftover_suffixes, module_type, patched_weight

OUT, IN, RANK, ALPHA = 12, 8, 4, 3.0
A, B, C, D = 3, 4, 2, 4  # LoKr: OUT = A * B, IN = C * D
KERNEL = (3, 3)
MULTIPLIERS = (1.0, 0.5)
SHAPES = {"linear": (OUT, IN), "conv3x3": (OUT, IN, *KERNEL)}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _weight(layer: str, seed: int = 0) -> torch.Tensor:
    return _randn(_gen(seed), *SHAPES[layer])


def _k(layer: str) -> int:
    return KERNEL[0] * KERNEL[1] if layer == "conv3x3" else 1


# ---------------------------------------------------------------------------------------------------------
# Modules (tensors keyed by suffix, as our files write them) and their textbook ΔW
# ---------------------------------------------------------------------------------------------------------


def loha_module(layer: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    cols = IN * _k(layer)
    return {
        "hada_w1_a": _randn(g, OUT, RANK),
        "hada_w1_b": _randn(g, RANK, cols),
        "hada_w2_a": _randn(g, OUT, RANK),
        "hada_w2_b": _randn(g, RANK, cols),
        "alpha": torch.tensor(ALPHA),
    }


def loha_delta(m: dict[str, torch.Tensor], shape) -> torch.Tensor:
    scale = m["alpha"].item() / RANK
    return (scale * (m["hada_w1_a"] @ m["hada_w1_b"]) * (m["hada_w2_a"] @ m["hada_w2_b"])).reshape(shape)


LOKR_VARIANTS = ("full", "w2_decomposed", "both_decomposed")


def lokr_module(layer: str, variant: str, seed: int = 2) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    k = _k(layer)
    m: dict[str, torch.Tensor] = {"alpha": torch.tensor(ALPHA)}
    if variant == "both_decomposed":
        m["lokr_w1_a"], m["lokr_w1_b"] = _randn(g, A, RANK), _randn(g, RANK, C)
    else:
        m["lokr_w1"] = _randn(g, A, C)
    if variant == "full":
        m["lokr_w2"] = _randn(g, B, D, *KERNEL) if layer == "conv3x3" else _randn(g, B, D)
    else:
        m["lokr_w2_a"], m["lokr_w2_b"] = _randn(g, B, RANK), _randn(g, RANK, D * k)
    return m


def lokr_delta(m: dict[str, torch.Tensor], shape) -> torch.Tensor:
    w1 = m["lokr_w1"] if "lokr_w1" in m else m["lokr_w1_a"] @ m["lokr_w1_b"]
    w2 = m["lokr_w2"] if "lokr_w2" in m else m["lokr_w2_a"] @ m["lokr_w2_b"]
    decomposed = "lokr_w1_a" in m or "lokr_w2_a" in m
    scale = m["alpha"].item() / RANK if decomposed else 1.0
    if w2.dim() == 4:  # [B, D, kh, kw]: the kernel rides along with w2, one w1 entry per (B, D) block
        out = torch.einsum("ac,bdhw->abcdhw", w1, w2).reshape(A * B, C * D, *w2.shape[2:])
    else:  # [B, D * kh * kw]
        out = torch.kron(w1, w2)
    return (scale * out).reshape(shape)


def dora_module(layer: str, weight: torch.Tensor, seed: int = 3) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    if layer == "conv3x3":
        down, up = _randn(g, RANK, IN, *KERNEL), _randn(g, OUT, RANK, 1, 1)
    else:
        down, up = _randn(g, RANK, IN), _randn(g, OUT, RANK)
    # A magnitude per input channel (LyCORIS wd_on_out=False), near the weight's own norm.
    norm = weight.transpose(0, 1).reshape(IN, -1).norm(dim=1)
    magnitude = norm * (1 + 0.3 * torch.rand(IN, generator=g))
    dora_scale = magnitude.reshape(1, IN, *[1] * (weight.dim() - 2))
    return {
        "lora_down.weight": down * 0.3,
        "lora_up.weight": up * 0.3,
        "alpha": torch.tensor(ALPHA),
        "dora_scale": dora_scale,
    }


def dora_lora_delta(m: dict[str, torch.Tensor], shape) -> torch.Tensor:
    up, down = m["lora_up.weight"], m["lora_down.weight"]
    return (m["alpha"].item() / RANK * (up.reshape(OUT, -1) @ down.reshape(RANK, -1))).reshape(shape)


def dora_full(m: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """W' = merged * m / ‖merged‖, the norm over outputs (and kernel) per input channel."""
    merged = weight + dora_lora_delta(m, weight.shape)
    norm = merged.transpose(0, 1).reshape(IN, -1).norm(dim=1).reshape(1, IN, *[1] * (weight.dim() - 2))
    return merged * m["dora_scale"] / norm


def all_cases():
    for layer in SHAPES:
        yield pytest.param("LoHa", layer, None, id=f"loha-{layer}")
        for variant in LOKR_VARIANTS:
            yield pytest.param("LoKr", layer, variant, id=f"lokr-{variant}-{layer}")
        yield pytest.param("DoRA", layer, None, id=f"dora-{layer}")


def make_case(kind: str, layer: str, variant: str | None):
    weight = _weight(layer)
    if kind == "LoHa":
        m = loha_module(layer)
    elif kind == "LoKr":
        m = lokr_module(layer, variant)
    else:
        m = dora_module(layer, weight)
    return m, weight


def textbook(kind: str, m: dict[str, torch.Tensor], weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    """patched − W by the textbook: mult·ΔW, and for DoRA mult·(W' − W) (the UIs' multiplier interpolates
    between the original and the decomposed weight)."""
    if kind == "LoHa":
        return multiplier * loha_delta(m, weight.shape)
    if kind == "LoKr":
        return multiplier * lokr_delta(m, weight.shape)
    return multiplier * (dora_full(m, weight) - weight)


# ---------------------------------------------------------------------------------------------------------
# The helper against the textbook, and the UIs against each other
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multiplier", MULTIPLIERS)
@pytest.mark.parametrize("ui", UIS)
@pytest.mark.parametrize(("kind", "layer", "variant"), list(all_cases()))
def test_patched_weight_is_the_textbook_formula(kind, layer, variant, ui, multiplier):
    m, weight = make_case(kind, layer, variant)
    got = patched_weight(ui, m, weight, multiplier)
    assert got.shape == weight.shape and got.dtype == weight.dtype
    torch.testing.assert_close(got - weight, textbook(kind, m, weight, multiplier), **TOL)


@pytest.mark.parametrize("multiplier", MULTIPLIERS)
@pytest.mark.parametrize(("kind", "layer", "variant"), list(all_cases()))
def test_the_three_uis_agree(kind, layer, variant, multiplier):
    m, weight = make_case(kind, layer, variant)
    a1111, forge, comfy = (patched_weight(ui, m, weight, multiplier) for ui in UIS)
    torch.testing.assert_close(forge, comfy, rtol=0, atol=0)  # the same code, float32 throughout
    torch.testing.assert_close(a1111, comfy, **TOL)  # A1111: no eps in the DoRA norm


@pytest.mark.parametrize("ui", UIS)
@pytest.mark.parametrize("layer", list(SHAPES))
def test_lokr_scale_is_one_without_a_decomposed_factor(ui, layer):
    """alpha/dim only applies once a factor is decomposed: with full w1 and w2 alpha is read and ignored."""
    weight = _weight(layer)
    m = lokr_module(layer, "full")
    for alpha in (1.0, 16.0):
        m["alpha"] = torch.tensor(alpha)
        got = patched_weight(ui, m, weight)
        w2 = m["lokr_w2"]
        w1 = m["lokr_w1"][:, :, None, None] if w2.dim() == 4 else m["lokr_w1"]
        torch.testing.assert_close(got - weight, torch.kron(w1, w2).reshape(weight.shape), **TOL)


@pytest.mark.parametrize("ui", UIS)
@pytest.mark.parametrize("kind", ["LoHa", "LoKr"])
def test_no_alpha_means_scale_one(ui, kind):
    weight = _weight("linear")
    m = loha_module("linear") if kind == "LoHa" else lokr_module("linear", "w2_decomposed")
    del m["alpha"]
    expected = (
        loha_delta(m | {"alpha": torch.tensor(float(RANK))}, weight.shape)
        if kind == "LoHa"
        else lokr_delta(m | {"alpha": torch.tensor(float(RANK))}, weight.shape)
    )
    torch.testing.assert_close(patched_weight(ui, m, weight) - weight, expected, **TOL)


@pytest.mark.parametrize("ui", UIS)
@pytest.mark.parametrize(("kind", "layer", "variant"), list(all_cases()))
def test_every_suffix_of_our_modules_is_consumed(kind, layer, variant, ui):
    m, _ = make_case(kind, layer, variant)
    assert module_type(m) == kind
    assert leftover_suffixes(ui, m) == set()
    assert set(m) <= UI_SUFFIXES[ui][kind]


def test_suffix_tables_name_the_same_factor_keys():
    for kind in ("LoHa", "LoKr", "DoRA"):
        comfy, forge, a1111 = (UI_SUFFIXES[ui][kind] for ui in ("ComfyUI", "Forge", "A1111"))
        assert forge <= comfy and forge <= a1111
    assert UI_SUFFIXES["ComfyUI"]["DoRA"] - UI_SUFFIXES["Forge"]["DoRA"] == {"reshape_weight"}


def test_low_precision_weight_keeps_its_dtype():
    weight = _weight("linear").to(torch.float16)
    m = loha_module("linear")
    expected = (weight.float() + loha_delta(m, weight.shape)).to(torch.float16)
    for ui in UIS:
        got = patched_weight(ui, m, weight)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------------------
# Documented disagreements
# ---------------------------------------------------------------------------------------------------------


def test_output_axis_dora_scale_differs_between_a1111_and_comfyui():
    """[out, 1] magnitudes (LyCORIS' wd_on_out=True, not what we write): ComfyUI/Forge divide by the ORIGINAL
    weight's row norms; A1111 still divides by the merged weight's per-input-channel norms."""
    weight = _weight("linear")
    m = dora_module("linear", weight)
    m["dora_scale"] = weight.norm(dim=1, keepdim=True) * 1.1
    merged = weight + dora_lora_delta(m, weight.shape)
    comfy_expected = (
        merged * m["dora_scale"] / (weight.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    )
    a1111_expected = merged * m["dora_scale"] / merged.norm(dim=0, keepdim=True)
    torch.testing.assert_close(patched_weight("ComfyUI", m, weight), comfy_expected, **TOL)
    torch.testing.assert_close(patched_weight("Forge", m, weight), comfy_expected, **TOL)
    torch.testing.assert_close(patched_weight("A1111", m, weight), a1111_expected, **TOL)
    assert not torch.allclose(comfy_expected, a1111_expected)


def test_single_output_layer_takes_comfyuis_output_axis_branch():
    """With one output row, ComfyUI's `dora_scale.shape[0] == weight.shape[0]` holds for our [1, in] scale
    too: it then uses the original weight's (single) row norm instead of the per-input-channel norms."""
    g = _gen(5)
    weight = _randn(g, 1, IN)
    m = {
        "lora_down.weight": _randn(g, RANK, IN) * 0.3,
        "lora_up.weight": _randn(g, 1, RANK) * 0.3,
        "alpha": torch.tensor(ALPHA),
        "dora_scale": weight.abs() * 1.2,
    }
    merged = weight + ALPHA / RANK * m["lora_up.weight"] @ m["lora_down.weight"]
    torch.testing.assert_close(
        patched_weight("A1111", m, weight), merged * m["dora_scale"] / merged.abs(), **TOL
    )
    comfy_expected = merged * m["dora_scale"] / (weight.norm() + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(patched_weight("ComfyUI", m, weight), comfy_expected, **TOL)


def test_mismatched_product_comfyui_skips_forge_and_a1111_raise():
    weight = _randn(_gen(6), OUT + 1, IN)
    m = loha_module("linear")
    torch.testing.assert_close(patched_weight("ComfyUI", m, weight), weight, rtol=0, atol=0)
    for ui in ("Forge", "A1111"):
        with pytest.raises(RuntimeError):
            patched_weight(ui, m, weight)


# ---------------------------------------------------------------------------------------------------------
# Against LyCORIS' own code
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multiplier", MULTIPLIERS)
@pytest.mark.parametrize("layer", list(SHAPES))
def test_loha_matches_lycoris_functional(layer, multiplier):
    loha = pytest.importorskip("lycoris.functional.loha")
    weight = _weight(layer)
    m = loha_module(layer)
    diff = loha.diff_weight(
        m["hada_w1_b"], m["hada_w1_a"], m["hada_w2_b"], m["hada_w2_a"], None, None, gamma=ALPHA / RANK
    ).reshape(weight.shape)
    for ui in UIS:
        torch.testing.assert_close(
            patched_weight(ui, m, weight, multiplier) - weight, multiplier * diff, **TOL
        )


@pytest.mark.parametrize("variant", LOKR_VARIANTS)
@pytest.mark.parametrize("layer", list(SHAPES))
def test_lokr_matches_lycoris_functional(layer, variant):
    lokr = pytest.importorskip("lycoris.functional.lokr")
    weight = _weight(layer)
    m = lokr_module(layer, variant)
    keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    # gamma is alpha: diff_weight divides by the rank itself, by gamma (scale 1) when nothing is decomposed.
    diff = lokr.diff_weight(*(m.get(k) for k in keys), None, gamma=ALPHA).reshape(weight.shape)
    for ui in UIS:
        torch.testing.assert_close(patched_weight(ui, m, weight) - weight, diff, **TOL)


def _lycoris_locon(layer: str, m: dict[str, torch.Tensor], weight: torch.Tensor):
    locon = pytest.importorskip("lycoris.modules.locon")
    if layer == "conv3x3":
        org = torch.nn.Conv2d(IN, OUT, KERNEL, padding=1, bias=False)
    else:
        org = torch.nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        org.weight.copy_(weight)
    module = locon.LoConModule("lora_unet_x", org, 1.0, RANK, ALPHA, weight_decompose=True, wd_on_out=False)
    with torch.no_grad():
        module.lora_up.weight.copy_(m["lora_up.weight"].reshape(module.lora_up.weight.shape))
        module.lora_down.weight.copy_(m["lora_down.weight"].reshape(module.lora_down.weight.shape))
        assert module.dora_scale.shape == m["dora_scale"].shape
        module.dora_scale.copy_(m["dora_scale"])
    return module


@pytest.mark.parametrize("layer", list(SHAPES))
def test_dora_matches_lycoris_weight_decompose(layer):
    pytest.importorskip("lycoris")
    from lycoris.functional.general import weight_decompose

    weight = _weight(layer)
    m = dora_module(layer, weight)
    merged = weight + dora_lora_delta(m, weight.shape)
    functional = weight_decompose(merged, m["dora_scale"], 1, wd_on_out=False)
    module = _lycoris_locon(layer, m, weight)
    with torch.no_grad():
        via_module = module.apply_weight_decompose(merged)
        merged_weight = module.get_merged_weight(multiplier=1)[0]
    torch.testing.assert_close(via_module, functional, **TOL)
    torch.testing.assert_close(merged_weight, functional, **TOL)
    for ui in UIS:
        torch.testing.assert_close(patched_weight(ui, m, weight), functional, **TOL)


@pytest.mark.parametrize("layer", list(SHAPES))
def test_dora_multiplier_differs_from_lycoris_get_merged_weight(layer):
    """At multiplier 0.5 the UIs give W + ½(W' − W); LyCORIS' get_merged_weight gives
    W + sΔW + ½(W' − W − sΔW): it adds the whole direction and halves only the rescale."""
    pytest.importorskip("lycoris")
    weight = _weight(layer)
    m = dora_module(layer, weight)
    module = _lycoris_locon(layer, m, weight)
    with torch.no_grad():
        lycoris_half = module.get_merged_weight(multiplier=0.5)[0]
    delta, full = dora_lora_delta(m, weight.shape), dora_full(m, weight)
    torch.testing.assert_close(lycoris_half, weight + delta + 0.5 * (full - weight - delta), **TOL)
    for ui in UIS:
        ui_half = patched_weight(ui, m, weight, 0.5)
        torch.testing.assert_close(ui_half, weight + 0.5 * (full - weight), **TOL)
        assert not torch.allclose(ui_half, lycoris_half, **TOL)
