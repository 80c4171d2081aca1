"""LyCORIS LoHa / LoKr and DoRA files (made by our trainer) applied by `generate` as A1111 and ComfyUI apply
them: every layer's weight becomes `W + w * ΔW` (ΔW = `LoraModule.update(float32, weight=W)`), summed over
the files, on the UNet and the text encoders; the pipeline then computes what the trained network computes;
unloading gives back the original weights bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from torch import nn

from lora_scripts.cli import main
from lora_scripts.errors import UserError
from lora_scripts.export.kohya import kohya_state_dict
from lora_scripts.export.lora_model import LoraModule, resolve_modules
from lora_scripts.export.lora_reader import file_modules, module_index
from lora_scripts.export.lycoris import LOHA_KEYS as LOHA
from lora_scripts.generation.generate import run_generate
from lora_scripts.generation.lora_apply import (
    load_lora,
    pipeline_networks,
    set_lora_weights,
    unload_loras,
)
from lora_scripts.generation.options import GenerateOptions
from lora_scripts.generation.pipeline import load_pipeline
from lora_scripts.generation.samplers import resolve_sampler
from lora_scripts.models.family import LoraTargets, ModelFamily
from lora_scripts.models.lora import LoraSpec, NetworkKind
from lora_scripts.models.registry import load_family
from lora_scripts.models.tiny import build_tiny_sdxl
from tests.generation.conftest import make_pipe
from tests.models.test_lora_network import tiny_family

KINDS = {
    "loha": NetworkKind("loha"),
    "lokr": NetworkKind("lokr"),  # the second factor decomposed where the layer is wide enough
    "lokr_full": NetworkKind("lokr", lokr_full_matrix=True),
    "dora": NetworkKind("dora"),
}
SD_PARTS = ("unet", "text_encoder")
XL_PARTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a small shared machine: torch's threads cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trained_file(family: ModelFamily, kind: str, path: Path, seed: int) -> Path:
    """Adapters of `kind` on `family` (UNet with 3x3 convs, text encoders), every trainable parameter moved
    off its initial value (so each ΔW and DoRA magnitude matters), saved as training saves them."""
    networks = family.add_lora(LoraTargets("kohya", "kohya"), LoraSpec(4, 2.0, conv_rank=2, kind=KINDS[kind]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for network in networks:
            network.module.eval()
            for parameter in network.module.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    safetensors.torch.save_file(kohya_state_dict(networks, torch.float32), str(path))
    return path


def _weights(pipe, parts) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in parts}


def _file_modules(pipe, path: Path) -> list[LoraModule]:
    """The file's modules on the pipeline's layers, read independently of `load_lora`."""
    tensors = safetensors.torch.load_file(str(path))
    found = resolve_modules(file_modules(tensors, {}, path, "test"), module_index(pipeline_networks(pipe)))
    assert found.complete and found.modules
    return found.modules


def _layer_key(pipe, module: LoraModule) -> tuple[str, str]:
    """(component, state-dict key of the module's weight) in the pipeline."""
    prefixes = {net.module: net.name_prefix for net in pipeline_networks(pipe)}
    component = getattr(pipe, module.component)
    return module.component, module.path.removeprefix(prefixes[component]) + ".weight"


def _check_patched(pipe, base, files: list[tuple[Path, float, float]], parts) -> None:
    """Each patched weight is `base + Σ w * update(base)` over the files (rtol 1e-5); the rest unchanged."""
    expected: dict[tuple[str, str], torch.Tensor] = {}
    for path, te_weight, unet_weight in files:
        for module in _file_modules(pipe, path):
            component, key = _layer_key(pipe, module)
            weight = unet_weight if component == "unet" else te_weight
            original = base[component][key]
            delta = weight * module.update(torch.float32, weight=original)
            expected[(component, key)] = expected.get((component, key), original) + delta
    assert expected
    for component in parts:
        for key, value in getattr(pipe, component).state_dict().items():
            if (component, key) in expected:
                torch.testing.assert_close(value, expected[(component, key)], rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(value, base[component][key]), (component, key)


def _assert_restored(pipe, base, parts) -> None:
    """Every weight is the original, bit for bit (under a peft wrapper an unloaded plain LoRA leaves)."""
    for component in parts:
        for key, value in getattr(pipe, component).state_dict().items():
            if ".lora_" not in key:
                assert torch.equal(value, base[component][key.replace(".base_layer.", ".")]), (component, key)


def _text_states(text_encoder: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 9, 17, 33, 2, 1, 1]])
    with torch.no_grad():
        return text_encoder(ids, output_hidden_states=True).hidden_states[-1]


def _unet_output(unet: nn.Module, context_width: int, xl: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 6, context_width, generator=generator)
    extra = {}
    if xl:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2),
        }
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), context, **extra).sample


def _assert_close_outputs(patched: torch.Tensor, live: torch.Tensor, base: torch.Tensor) -> None:
    """The patched pipeline computes what the trained network computes, and the adapters do change it."""
    scale = live.abs().max()
    torch.testing.assert_close(patched, live, rtol=0, atol=2e-5 * scale)
    assert (live - base).abs().max() > 1e-3 * scale


# --- SD 1.x -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_type_patches_w_plus_w_times_its_update_and_unloads_exactly(tiny_dir, tmp_path, kind):
    family = tiny_family()
    pipe = make_pipe(tiny_dir)
    base = _weights(pipe, SD_PARTS)
    assert all(torch.equal(v, base["unet"][k]) for k, v in family.unet.state_dict().items())
    width = pipe.unet.config.cross_attention_dim
    base_unet, base_text = _unet_output(pipe.unet, width), _text_states(pipe.text_encoder)
    path = _trained_file(family, kind, tmp_path / f"{kind}.safetensors", seed=1)

    lora = load_lora(pipe, path, adapter="x", label=kind)
    assert lora.components == {"unet", "text_encoder"} and lora.patches
    _assert_restored(pipe, base, SD_PARTS)  # loading alone changes nothing
    assert not pipe.get_list_adapters()  # no peft adapter: the weights themselves are patched

    set_lora_weights(pipe, [lora], [(0.6, 1.3)])
    _check_patched(pipe, base, [(path, 0.6, 1.3)], SD_PARTS)
    set_lora_weights(pipe, [lora], [(1.0, 1.0)])  # a changed weight patches again from the originals
    _check_patched(pipe, base, [(path, 1.0, 1.0)], SD_PARTS)
    _assert_close_outputs(_unet_output(pipe.unet, width), _unet_output(family.unet, width), base_unet)
    _assert_close_outputs(_text_states(pipe.text_encoder), _text_states(family.text_encoder), base_text)

    unload_loras(pipe, [lora])
    _assert_restored(pipe, base, SD_PARTS)
    assert torch.equal(_unet_output(pipe.unet, width), base_unet)


def test_weight_grid_columns_patch_from_the_originals_and_zero_is_the_base(tiny_dir, tmp_path):
    pipe = make_pipe(tiny_dir)
    pipe.to(dtype=torch.bfloat16)  # cast back to the weight's dtype; weight 0 is the original to the bit
    base = _weights(pipe, SD_PARTS)
    path = _trained_file(tiny_family(), "loha", tmp_path / "loha.safetensors", seed=2)
    lora = load_lora(pipe, path, adapter="grid")
    for weight in (0.0, 0.5, 1.0, 0.0, -0.5):
        set_lora_weights(pipe, [lora], [(weight, weight)])
        if weight == 0:
            _assert_restored(pipe, base, SD_PARTS)
        else:
            module = _file_modules(pipe, path)[0]
            component, key = _layer_key(pipe, module)
            original = base[component][key]
            expected = original.float() + weight * module.update(torch.float32, weight=original.float())
            assert torch.equal(getattr(pipe, component).state_dict()[key], expected.to(torch.bfloat16)), (
                weight
            )
    set_lora_weights(pipe, [], [])  # no LoRA active: the originals
    _assert_restored(pipe, base, SD_PARTS)
    set_lora_weights(pipe, [lora], [(1.0, 1.0)])
    unload_loras(pipe, [lora])
    _assert_restored(pipe, base, SD_PARTS)


def test_two_files_of_different_types_add_up(tiny_dir, tmp_path):
    pipe = make_pipe(tiny_dir)
    base = _weights(pipe, SD_PARTS)
    loha = _trained_file(tiny_family(), "loha", tmp_path / "loha.safetensors", seed=3)
    dora = _trained_file(tiny_family(), "dora", tmp_path / "dora.safetensors", seed=4)
    loras = [load_lora(pipe, loha, adapter="a"), load_lora(pipe, dora, adapter="b")]
    set_lora_weights(pipe, loras, [(0.8, 0.7), (0.4, -1.1)])
    _check_patched(pipe, base, [(loha, 0.8, 0.7), (dora, 0.4, -1.1)], SD_PARTS)
    set_lora_weights(pipe, loras[1:], [(1.0, 1.0)])  # the other file is deactivated
    _check_patched(pipe, base, [(dora, 1.0, 1.0)], SD_PARTS)
    unload_loras(pipe, loras)
    _assert_restored(pipe, base, SD_PARTS)


def test_a_plain_lora_and_a_lokr_file_at_once(tiny_dir, lora_dir, lora_modules, tmp_path):
    """A plain LoRA goes through peft (its layers wrapped), the LoKr patches the base layers underneath, in
    either order; unloading both gives back the base model exactly, and the fused weights are base + both
    deltas."""
    pipe = make_pipe(tiny_dir)
    base = _weights(pipe, SD_PARTS)
    lokr = _trained_file(tiny_family(), "lokr", tmp_path / "lokr.safetensors", seed=5)
    for i, lokr_first in enumerate((False, True)):
        files = [lora_dir / "ink_style.safetensors", lokr]
        files = files[::-1] if lokr_first else files
        loras = [load_lora(pipe, path, adapter=f"{path.stem}_{i}") for path in files]
        plain, patched = (loras[1], loras[0]) if lokr_first else (loras[0], loras[1])
        assert not plain.patches and patched.patches
        weights = {plain.adapter: (0.5, 0.9), patched.adapter: (1.0, 0.6)}
        set_lora_weights(pipe, loras, [weights[lora.adapter] for lora in loras])
        assert pipe.get_list_adapters()["unet"] == [plain.adapter]
        for module in _file_modules(pipe, lokr):
            component, key = _layer_key(pipe, module)
            layer = getattr(pipe, component).get_submodule(key.removesuffix(".weight"))
            original = base[component][key]
            multiplier = 0.6 if component == "unet" else 1.0
            expected = original + multiplier * module.update(torch.float32, weight=original)
            live = getattr(layer, "base_layer", layer).weight
            torch.testing.assert_close(live, expected, rtol=1e-5, atol=1e-7)
        unload_loras(pipe, loras)
        assert not pipe.get_list_adapters().get("unet")
        _assert_restored(pipe, base, SD_PARTS)
    plain = load_lora(pipe, lora_dir / "ink_style.safetensors", adapter="ink")
    patched = load_lora(pipe, lokr, adapter="lokr")
    set_lora_weights(pipe, [plain, patched], [(0.5, 0.9), (1.0, 0.6)])
    pipe.fuse_lora(components=list(SD_PARTS), lora_scale=1.0, adapter_names=["ink"])
    pipe.unload_lora_weights()
    with_plain = {component: dict(weights) for component, weights in base.items()}
    for module in lora_modules["ink"]:
        key = f"{module.name}.weight"
        weight = 0.9 if module.component == "unet" else 0.5
        with_plain[module.component][key] = base[module.component][key] + weight * module.delta()
    _check_patched(pipe, with_plain, [(lokr, 1.0, 0.6)], SD_PARTS)


def test_a_layer_on_the_meta_device_is_refused(tiny_dir, tmp_path):
    pipe = make_pipe(tiny_dir)
    path = _trained_file(tiny_family(), "loha", tmp_path / "loha.safetensors", seed=6)
    layer = pipe.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    layer.weight = nn.Parameter(torch.empty_like(layer.weight, device="meta"), requires_grad=False)
    with pytest.raises(UserError, match=r"LoRA 'offloaded': LyCORIS LoHa files are applied to the base "):
        load_lora(pipe, path, adapter="x", label="offloaded")


# --- SDXL ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("xl_lycoris") / "tiny-sdxl")


@pytest.mark.parametrize("kind", ["lokr", "dora"])
def test_sdxl_unet_and_both_text_encoders(xl_dir, tmp_path, kind):
    family = load_family(str(xl_dir))
    pipe = load_pipeline(
        str(xl_dir), resolve_sampler("euler"), device=torch.device("cpu"), dtype=torch.float32
    ).pipe
    base = _weights(pipe, XL_PARTS)
    width = pipe.unet.config.cross_attention_dim
    base_unet = _unet_output(pipe.unet, width, xl=True)
    base_te2 = _text_states(pipe.text_encoder_2)
    path = _trained_file(family, kind, tmp_path / f"xl_{kind}.safetensors", seed=7)
    lora = load_lora(pipe, path, adapter="xl")
    assert lora.components == set(XL_PARTS)
    set_lora_weights(pipe, [lora], [(0.7, 1.2)])
    _check_patched(pipe, base, [(path, 0.7, 1.2)], XL_PARTS)
    set_lora_weights(pipe, [lora], [(1.0, 1.0)])
    _assert_close_outputs(
        _unet_output(pipe.unet, width, xl=True), _unet_output(family.unet, width, xl=True), base_unet
    )
    _assert_close_outputs(_text_states(pipe.text_encoder_2), _text_states(family.text_encoder_2), base_te2)
    unload_loras(pipe, [lora])
    _assert_restored(pipe, base, XL_PARTS)


# --- the command --------------------------------------------------------------------------------------------


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def test_cli_renders_a_loha_file_and_its_weight_grid(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "loras"
    folder.mkdir()
    _trained_file(tiny_family(), "loha", folder / "heron_loha.safetensors", seed=8)
    argv = ["generate", "--base-model", str(tiny_dir), "--lora-dir", str(folder), "--steps", "2"]
    argv += ["--width", "64", "--height", "64", "--seed", "5", "--sampler", "euler"]
    assert main([*argv, "--prompt", "a heron", "--output", str(tmp_path / "base.png")]) == 0
    tagged = "a heron, <lora:heron_loha:1>"
    assert main([*argv, "--prompt", tagged, "--output", str(tmp_path / "loha.png")]) == 0
    grid_argv = [*argv, "--prompt", tagged, "--lora-weights", "0,1", "--output", f"{tmp_path / 'grid'}/"]
    assert main(grid_argv) == 0
    capsys.readouterr()
    base, loha = _pixels(tmp_path / "base.png"), _pixels(tmp_path / "loha.png")
    assert np.abs(base - loha).max() > 8  # the LoHa shows
    (grid_file,) = (tmp_path / "grid").iterdir()
    grid = _pixels(grid_file)
    height, width = base.shape[:2]
    cells = [grid[:height, i * width : (i + 1) * width] for i in range(2)]  # above the weight labels
    assert np.array_equal(cells[0], base) and np.array_equal(cells[1], loha)


def test_flux_refuses_lycoris_files(flux_dir, tmp_path):
    """FLUX.1's fused layers (qkv, linear1) take only a plain LoRA's exact split: refused in one sentence."""
    loha = tmp_path / "flux_loha.safetensors"
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    factors = {name: torch.zeros(4, 2) if name.endswith("_a") else torch.zeros(2, 4) for name in LOHA}
    safetensors.torch.save_file(
        {
            **{f"{stem}.{name}": tensor for name, tensor in factors.items()},
            f"{stem}.alpha": torch.tensor(2.0),
        },
        str(loha),
        metadata={"ss_base_model_version": "flux1"},
    )
    with pytest.raises(UserError, match=r"LyCORIS LoHa files are not supported on a FLUX.1 base model"):
        run_generate(
            GenerateOptions(
                base_model=str(flux_dir),
                prompt=f"a cat <lora:{loha}:1>",
                output=tmp_path / "x.png",
                steps=1,
                width=64,
                height=64,
                progress=False,
                t5xxl=None,
            )
        )
