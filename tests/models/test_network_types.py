"""The network types on the tiny SD 1.x and SDXL models: the layers peft (LoHa, LoKr) and models/dora.py
(DoRA) put in, the file training writes for each (LyCORIS' keys), and that the update export/lycoris.py
computes from that file is the update the trained network applies: each adapted layer's output equals the base
layer's with W + ΔW, for every module of the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer

from lora_scripts.export.kohya import LoraNetwork, kohya_state_dict, lora_layers
from lora_scripts.export.lora_model import LoraModule, resolve_modules
from lora_scripts.export.lora_reader import file_modules, module_index
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec, NetworkKind
from lora_scripts.models.registry import load_family
from lora_scripts.models.tiny import build_tiny_sdxl
from tests.models.test_lora_network import tiny_family

KINDS = {
    "locon": NetworkKind("locon"),
    "loha": NetworkKind("loha"),
    "lokr": NetworkKind("lokr"),
    "lokr_factor_4": NetworkKind("lokr", lokr_factor=4),
    "lokr_full": NetworkKind("lokr", lokr_full_matrix=True),
    "dora": NetworkKind("dora"),
}
# The suffixes of one module of each type in the file.
SUFFIXES = {
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
}
SPEC = dict(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "tiny-sdxl")


def _adapted(family, kind: NetworkKind, seed: int = 1) -> list[LoraNetwork]:
    """The family with the network of `kind` on the kohya layers of the UNet and text encoders, its
    trainable weights moved off their initial values (B = 0 etc. would hide a wrong formula)."""
    networks = family.add_lora(LoraTargets("kohya", "kohya"), LoraSpec(**SPEC, kind=kind))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in networks:
            for param in net.module.parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return networks


def _layer(networks: list[LoraNetwork], module: LoraModule) -> torch.nn.Module:
    for net in networks:
        component = net.component or {"lora_unet": "unet", "lora_te": "text_encoder"}.get(
            net.kohya_prefix, {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}.get(net.kohya_prefix)
        )
        if component == module.component:
            return net.module.get_submodule(module.path.removeprefix(net.name_prefix))
    raise AssertionError(module.name)


def _assert_file_is_the_network(networks: list[LoraNetwork]) -> int:
    """Every module of the saved file, through export/lycoris.py's formulas, makes the layer output the
    trained network's layer gives; the number of modules."""
    tensors = kohya_state_dict(networks, torch.float32)
    found = resolve_modules(file_modules(tensors, {}, Path("x.safetensors"), "test"), module_index(networks))
    assert found.complete, (found.missing[:3], found.wrong_shape[:3])
    assert len(found.modules) == sum(len(lora_layers(net)) for net in networks)
    generator = torch.Generator().manual_seed(0)
    for module in found.modules:
        layer = _layer(networks, module)
        base = layer.get_base_layer()
        weight = base.weight.detach().float()
        patched = weight + module.update(torch.float32, weight)
        with torch.no_grad():
            if isinstance(base, torch.nn.Linear):
                x = torch.randn(3, weight.shape[1], generator=generator)
                expected = F.linear(x, patched, base.bias)
            else:
                x = torch.randn(2, weight.shape[1], 6, 6, generator=generator)
                expected = F.conv2d(x, patched, base.bias, base.stride, base.padding)
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5, msg=module.name)
    return len(found.modules)


@pytest.mark.parametrize("name", list(KINDS))
def test_sd_file_of_each_type_is_the_trained_network(name):
    family = tiny_family()
    networks = _adapted(family, KINDS[name])
    assert _assert_file_is_the_network(networks) == 91  # kohya layers + 18 3x3 convs + 12 text-encoder layers
    tensors = kohya_state_dict(networks, torch.float16)
    stems = {key.rsplit(".", 1)[0] if key.endswith(".alpha") else None for key in tensors} - {None}
    for stem in stems:
        suffixes = {key.removeprefix(stem + ".") for key in tensors if key.startswith(stem + ".")}
        suffixes = {s for s in suffixes if "." not in s or s.endswith(".weight")}
        if name.startswith("lokr"):
            assert (
                {"alpha"}
                < suffixes
                <= {"alpha", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
            ), stem
        else:
            assert suffixes == SUFFIXES.get(name, SUFFIXES["locon"]), stem
    assert all(t.dtype == torch.float16 for t in tensors.values())


@pytest.mark.parametrize("name", ["loha", "lokr", "dora"])
def test_sdxl_file_of_each_type_is_the_trained_network(tiny_sdxl_dir, name):
    family = load_family(str(tiny_sdxl_dir))
    networks = _adapted(family, KINDS[name])
    assert _assert_file_is_the_network(networks) > 0
    names = kohya_state_dict(networks, torch.float32)
    assert any(k.startswith("lora_unet_input_blocks_") for k in names)  # sgm names, as sd-scripts writes
    assert any(k.startswith("lora_te2_") for k in names)


def test_layer_classes_and_parameter_counts():
    """peft's LoHa / LoKr layers, peft LoRA + a magnitude per input channel for DoRA; counts by hand for one
    320x320 attention projection (tiny UNet: to_q of the first block at rank 4)."""
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    counts = {}
    for name, kind in KINDS.items():
        family = tiny_family()
        family.add_lora(LoraTargets("kohya", None), LoraSpec(**SPEC, kind=kind))
        layer = family.unet.get_submodule(path)
        cls = {"loha": LoHaLayer, "lokr": LoKrLayer}.get(kind.type, LoraLayer)
        assert isinstance(layer, cls), name
        counts[name] = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    width = tiny_family().unet.get_submodule(path).in_features
    assert counts["locon"] == 2 * 4 * width
    assert counts["loha"] == 2 * 2 * 4 * width
    assert counts["dora"] == 2 * 4 * width + width  # the magnitude: one per input channel
    # LoKr, factor -1 on width = a·b: w1 [a, a] full, w2 [b, b] full or a rank-4 product (peft's rule)
    a, b = _factor(width)
    w2 = b * b if 4 >= b / 2 else 2 * 4 * b
    assert counts["lokr"] == a * a + w2
    assert counts["lokr_full"] == a * a + b * b


def _factor(n: int) -> tuple[int, int]:
    from peft.tuners.lokr.layer import factorization

    return factorization(n, -1)


def test_dora_starts_from_the_base_model():
    """The magnitudes start at the base weight's input-channel norms and the LoRA's up at zero, so the
    adapted UNet's output is the base UNet's before training."""
    family = tiny_family()
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 77, family.text_encoder.config.hidden_size)
    with torch.no_grad():
        before = family.unet(sample, 10, encoder_hidden_states=hidden).sample
    family.add_lora(LoraTargets("kohya", None), LoraSpec(**SPEC, kind=KINDS["dora"]))
    with torch.no_grad():
        after = family.unet(sample, 10, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_dora_magnitudes_and_lora_learn():
    """One backward pass reaches the magnitudes and the LoRA's up weights."""
    family = tiny_family()
    networks = family.add_lora(LoraTargets("kohya", None), LoraSpec(**SPEC, kind=KINDS["dora"]))
    out = family.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32)).sample
    out.square().mean().backward()
    grads = {n: p.grad for n, p in networks[0].module.named_parameters() if p.requires_grad}
    magnitudes = [g for n, g in grads.items() if ".lora_dora_scale." in n]
    ups = [g for n, g in grads.items() if ".lora_B." in n]
    assert magnitudes and all(g is not None and g.abs().sum() > 0 for g in magnitudes)
    assert ups and all(g is not None and g.abs().sum() > 0 for g in ups)
