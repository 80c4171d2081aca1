"""LoHa, LoKr and DoRA files load everywhere and mean what the trained network does.

1. Key maps: on the full-size SD 1.5, SD 2.1 and SDXL architectures (meta device), the file training writes
   for each type names the same modules as a LoCon file, every one of which A1111 and ComfyUI/Forge map to a
   model layer (tests/helpers/webui_keys.py), and every key of every module is read by each UI's loader for
   that module type (tests/helpers/lycoris_ui.py UI_SUFFIXES): nothing is left as "lora key not loaded".
2. Formulas: on the tiny SD 1.x and SDXL models with trained (randomised) weights, the weight each UI computes
   from the file (its own code, ported in tests/helpers/lycoris_ui.py) equals the trained layer's effective
   weight: the layer's output on random inputs is the base layer's with that weight; at multiplier 0.5 each
   UI gives W + 0.5 · (W' − W), what `generate` and `merge --base` apply (LoraModule.update).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora_scripts.export.kohya import kohya_state_dict
from lora_scripts.export.lora_model import resolve_modules
from lora_scripts.export.lora_reader import file_modules, module_index
from lora_scripts.export.sdxl_keys import sdxl_networks
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec, NetworkKind, add_lora_adapter
from lora_scripts.models.lora_presets import unet_lora_layers
from lora_scripts.models.registry import load_family
from lora_scripts.models.tiny import build_tiny_sdxl
from tests.export.test_sdxl_keys import _kohya_text_encoder_layers
from tests.export.test_webui_key_compat import _assert_loaded_everywhere, _meta_family
from tests.helpers.lycoris_ui import UIS, leftover_suffixes, module_type, patched_weight
from tests.helpers.webui_keys import (
    a1111_dropped,
    a1111_sdxl_layers,
    comfyui_dropped,
    comfyui_sdxl_model,
    meta_sdxl_model,
)
from tests.models.test_lora_network import tiny_family
from tests.models.test_network_types import _adapted, _layer

TYPES = {
    "loha": NetworkKind("loha"),
    "lokr": NetworkKind("lokr"),
    "lokr_full": NetworkKind("lokr", lokr_full_matrix=True),
    "dora": NetworkKind("dora"),
}
UI_TYPE = {"loha": "LoHa", "lokr": "LoKr", "lokr_full": "LoKr", "dora": "DoRA", "locon": "LoRA"}


def _materialise(networks) -> None:
    """Real (zero) storage for the adapters' parameters only; the base model stays on the meta device."""
    for net in networks:
        for module in net.module.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.requires_grad and param.is_meta:
                    module._parameters[name] = torch.nn.Parameter(torch.zeros(param.shape))


def _modules(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The file's modules: stem → {suffix: tensor}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        stem, suffix = key.split(".", 1)
        out.setdefault(stem, {})[suffix] = tensor
    return out


def _assert_every_key_read(modules: dict[str, dict[str, torch.Tensor]], name: str) -> None:
    for stem, tensors in modules.items():
        assert module_type(tensors) == UI_TYPE[name], stem
        for ui in UIS:
            assert not leftover_suffixes(ui, tensors), (ui, stem)


def _sd_file(version: str, kind: NetworkKind) -> dict[str, dict[str, torch.Tensor]]:
    family = _meta_family(version)
    networks = family.add_lora(LoraTargets("kohya", "kohya"), LoraSpec(2, 1.0, conv_rank=2, kind=kind))
    _materialise(networks)
    return _modules(kohya_state_dict(networks))


@pytest.mark.parametrize("version", ["sd_v1", "sd_v2"])
@pytest.mark.parametrize("name", list(TYPES))
def test_full_size_sd_files_load_every_key_in_each_ui(version, name):
    modules = _sd_file(version, TYPES[name])
    assert sorted(modules) == sorted(_sd_file(version, NetworkKind("locon")))  # LoCon's names: tested to map
    _assert_loaded_everywhere(version, sorted(modules))
    _assert_every_key_read(modules, name)


def _sdxl_file(kind: NetworkKind) -> dict[str, dict[str, torch.Tensor]]:
    model = meta_sdxl_model()
    linear, convs = unet_lora_layers(model.unet, "kohya", conv=True)
    add_lora_adapter(model.unet, linear, 2, 1.0, conv_targets=convs, conv_rank=2, conv_alpha=1.0, kind=kind)
    for text_encoder in (model.text_encoder, model.text_encoder_2):
        add_lora_adapter(text_encoder, _kohya_text_encoder_layers(text_encoder), 2, 1.0, kind=kind)
    networks = sdxl_networks(model.unet, [model.text_encoder, model.text_encoder_2])
    _materialise(networks)
    return _modules(kohya_state_dict(networks))


@pytest.mark.parametrize("name", ["loha", "lokr", "dora"])
def test_full_size_sdxl_files_load_every_key_in_each_ui(name):
    modules = _sdxl_file(TYPES[name])
    names = sorted(modules)
    assert names == sorted(_sdxl_file(NetworkKind("locon")))
    assert a1111_dropped(names, a1111_sdxl_layers()) == {}
    assert comfyui_dropped(names, comfyui_sdxl_model()) == {}
    _assert_every_key_read(modules, name)


def _assert_each_ui_applies_the_network(networks) -> int:
    tensors = kohya_state_dict(networks, torch.float32)
    modules = _modules(tensors)
    found = resolve_modules(file_modules(tensors, {}, Path("x.safetensors"), "test"), module_index(networks))
    assert found.complete
    generator = torch.Generator().manual_seed(0)
    for module in found.modules:
        layer = _layer(networks, module)
        base = layer.get_base_layer()
        weight = base.weight.detach().float()
        x = (
            torch.randn(3, weight.shape[1], generator=generator)
            if weight.dim() == 2
            else torch.randn(2, weight.shape[1], 6, 6, generator=generator)
        )
        with torch.no_grad():
            trained = layer(x)
        for ui in UIS:
            patched = patched_weight(ui, modules[module.source], weight.clone())
            if weight.dim() == 2:
                applied = F.linear(x, patched, base.bias)
            else:
                applied = F.conv2d(x, patched, base.bias, base.stride, base.padding)
            torch.testing.assert_close(applied, trained, rtol=1e-5, atol=2e-5, msg=f"{ui} {module.name}")
            half = patched_weight(ui, modules[module.source], weight.clone(), 0.5)
            expected = weight + 0.5 * module.update(torch.float32, weight)
            torch.testing.assert_close(half, expected, rtol=1e-5, atol=1e-6, msg=f"{ui} {module.name} at 0.5")
    return len(found.modules)


@pytest.mark.parametrize("name", list(TYPES))
def test_each_ui_applies_the_trained_sd_network(name):
    assert _assert_each_ui_applies_the_network(_adapted(tiny_family(), TYPES[name], seed=7)) == 91


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "tiny-sdxl")


@pytest.mark.parametrize("name", list(TYPES))
def test_each_ui_applies_the_trained_sdxl_network(tiny_sdxl_dir, name):
    family = load_family(str(tiny_sdxl_dir))
    assert _assert_each_ui_applies_the_network(_adapted(family, TYPES[name], seed=8)) > 0
