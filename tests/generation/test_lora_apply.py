"""LoRA files applied through diffusers: every layer gets exactly `W + w * (alpha / rank) * up @ down`."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from peft.tuners.lora import LoraLayer

from lora_scripts.errors import UserError
from lora_scripts.generation.lora_apply import load_lora, set_lora_weights, unload_loras
from tests.generation.conftest import make_pipe
from tests.generation.kohya_files import TEXT_ENCODER, UNET_ATTENTION, make_modules, write_kohya_file
from tests.helpers.peft_veto import transformers_refuses_peft

TOL = dict(atol=1e-5, rtol=0)


def _fused_weights(pipe, loras) -> dict[str, dict[str, torch.Tensor]]:
    """The weights the pipeline computes with: the active adapters fused in at their set scales."""
    pipe.fuse_lora(
        components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=[lora.adapter for lora in loras]
    )
    pipe.unload_lora_weights()
    return {"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict()}


def _base_weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {
        c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")
    }


def _check(fused, base, expected_deltas):
    """expected_deltas: {(component, module name): delta}; every other weight must be unchanged."""
    for component in ("unet", "text_encoder"):
        for key, value in fused[component].items():
            delta = expected_deltas.get((component, key.removesuffix(".weight")))
            if key.endswith(".weight") and delta is not None:
                torch.testing.assert_close(value, base[component][key] + delta, **TOL)
            else:
                assert torch.equal(value, base[component][key]), key


@pytest.mark.parametrize(("te_weight", "unet_weight"), [(0.7, 0.7), (0.3, 1.2), (1.0, 0.0), (0.0, -0.5)])
def test_each_layer_gets_its_delta_on_the_right_component(
    tiny_dir, lora_dir, lora_modules, te_weight, unet_weight
):
    pipe = make_pipe(tiny_dir)
    base = _base_weights(pipe)
    lora = load_lora(pipe, lora_dir / "ink_style.safetensors", adapter="ink")
    assert lora.components == {"unet", "text_encoder"}
    set_lora_weights(pipe, [lora], [(te_weight, unet_weight)])
    weights = {"unet": unet_weight, "text_encoder": te_weight}
    expected = {(m.component, m.name): weights[m.component] * m.delta() for m in lora_modules["ink"]}
    _check(_fused_weights(pipe, [lora]), base, expected)


def test_locon_conv_layers(tiny_dir, lora_dir, lora_modules):
    pipe = make_pipe(tiny_dir)
    base = _base_weights(pipe)
    lora = load_lora(pipe, lora_dir / "styles" / "locon.safetensors", adapter="locon")
    assert lora.components == {"unet"}
    set_lora_weights(pipe, [lora], [(1.0, 0.8)])
    conv = [m for m in lora_modules["locon"] if m.down.dim() == 4 and m.down.shape[-1] == 3]
    assert conv, "the LoCon file must hold 3x3 conv layers"
    expected = {(m.component, m.name): 0.8 * m.delta() for m in lora_modules["locon"]}
    _check(_fused_weights(pipe, [lora]), base, expected)


def test_two_loras_add_up(tiny_dir, lora_dir, lora_modules):
    pipe = make_pipe(tiny_dir)
    base = _base_weights(pipe)
    ink = load_lora(pipe, lora_dir / "ink_style.safetensors", adapter="ink")
    locon = load_lora(pipe, lora_dir / "styles" / "locon.safetensors", adapter="locon")
    set_lora_weights(pipe, [ink, locon], [(0.5, 0.6), (1.0, -0.4)])
    expected: dict = {}
    for modules, weights in ((lora_modules["ink"], (0.5, 0.6)), (lora_modules["locon"], (1.0, -0.4))):
        for m in modules:
            w = weights[1] if m.component == "unet" else weights[0]
            key = (m.component, m.name)
            expected[key] = expected.get(key, 0) + w * m.delta()
    assert len(expected) < len(lora_modules["ink"]) + len(lora_modules["locon"])  # some layers carry both
    _check(_fused_weights(pipe, [ink, locon]), base, expected)


def test_unload_leaves_other_adapters(tiny_dir, lora_dir):
    pipe = make_pipe(tiny_dir)
    ink = load_lora(pipe, lora_dir / "ink_style.safetensors", adapter="ink")
    only = load_lora(pipe, lora_dir / "unet-only.v2.safetensors", adapter="only")
    unload_loras(pipe, [ink])
    assert pipe.get_list_adapters() == {"unet": ["only"]}
    set_lora_weights(pipe, [only], [(1.0, 1.0)])


def test_diffusers_peft_format_files_load(tiny_dir, tmp_path, lora_modules):
    """A file in diffusers' own PEFT layout goes to diffusers unchanged (no alpha: scale 1)."""
    module = lora_modules["unet_only"][0]
    path = tmp_path / "peft.safetensors"
    safetensors.torch.save_file(
        {
            f"unet.{module.name}.lora_A.weight": module.down.float(),
            f"unet.{module.name}.lora_B.weight": module.up.float(),
        },
        path,
    )
    pipe = make_pipe(tiny_dir)
    base = _base_weights(pipe)
    lora = load_lora(pipe, path, adapter="peft")
    set_lora_weights(pipe, [lora], [(1.0, 0.5)])
    expected = {("unet", module.name): 0.5 * module.delta() * module.down.shape[0] / module.alpha}
    _check(_fused_weights(pipe, [lora]), base, expected)


def test_files_for_another_model_or_format_are_refused(tiny_dir, tmp_path):
    pipe = make_pipe(tiny_dir)
    sdxl = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(
        {
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4),
        },
        sdxl,
    )
    with pytest.raises(
        UserError, match=r"LoRA 'sdxl' \('.*sdxl.safetensors'\) was made for SDXL but the base"
    ):
        load_lora(pipe, sdxl, adapter="x", label="sdxl")
    wide = tmp_path / "sd2.safetensors"
    safetensors.torch.save_file(
        {
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1024),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1024, 4),
        },
        wide,
    )
    with pytest.raises(UserError, match="1 have another size"):
        load_lora(pipe, wide, adapter="y", label="sd2")
    tucker = tmp_path / "tucker.safetensors"
    safetensors.torch.save_file(
        {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_t1": torch.zeros(2, 2, 3, 3)}, tucker
    )
    with pytest.raises(
        UserError,
        match=r"LoRA 'tucker': LyCORIS LoHa with Tucker decomposition \(use_tucker\) files are not supported",
    ):
        load_lora(pipe, tucker, adapter="z", label="tucker")
    oft = tmp_path / "oft.safetensors"
    safetensors.torch.save_file({"lora_unet_x.oft_blocks": torch.zeros(2, 2, 2)}, oft)
    with pytest.raises(UserError, match="LoRA 'oft': LyCORIS OFT files are not supported"):
        load_lora(pipe, oft, adapter="w", label="oft")
    assert not pipe.get_list_adapters()


def test_text_encoder_layers_are_attached_through_peft_alone(tiny_dir, tmp_path, capfd):
    """The text encoder's part of a kohya file goes through peft itself: it loads, scales, fuses exactly and
    unloads with transformers' adapter API refusing the installed peft (transformers >= 5.24 with peft
    0.21), each module at its own rank and alpha, and without transformers' load report on the console."""
    pipe = make_pipe(tiny_dir)
    base = _base_weights(pipe)
    modules = make_modules(pipe, UNET_ATTENTION[:1], TEXT_ENCODER, rank=4, alpha=2.0, seed=5)
    modules += make_modules(pipe, [], ["encoder.layers.1.mlp.fc1"], rank=2, alpha=8.0, seed=6)
    path = write_kohya_file(tmp_path / "mixed.safetensors", modules)
    capfd.readouterr()
    with transformers_refuses_peft():
        lora = load_lora(pipe, path, adapter="mixed")
        assert "Loading weights" not in capfd.readouterr().err
        assert lora.components == {"unet", "text_encoder"}
        assert pipe.get_list_adapters() == {"unet": ["mixed"], "text_encoder": ["mixed"]}
        ranks = {name: layer.r["mixed"] for name, layer in _lora_layers(pipe.text_encoder).items()}
        assert ranks == {"encoder.layers.0.self_attn.q_proj": 4, "encoder.layers.1.mlp.fc1": 2}
        set_lora_weights(pipe, [lora], [(0.6, 1.0)])
        weights = {"unet": 1.0, "text_encoder": 0.6}
        expected = {(m.component, m.name): weights[m.component] * m.delta() for m in modules}
        _check(_fused_weights(pipe, [lora]), base, expected)


def test_unloading_a_text_encoder_lora_leaves_the_others(tiny_dir, lora_dir, tmp_path):
    pipe = make_pipe(tiny_dir)
    modules = make_modules(pipe, [], ["encoder.layers.1.mlp.fc1"], rank=2, alpha=1.0, seed=7)
    other = write_kohya_file(tmp_path / "te_only.safetensors", modules)
    with transformers_refuses_peft():
        ink = load_lora(pipe, lora_dir / "ink_style.safetensors", adapter="ink")
        te_only = load_lora(pipe, other, adapter="te")
        assert pipe.get_list_adapters() == {"unet": ["ink"], "text_encoder": ["ink", "te"]}
        unload_loras(pipe, [ink])
        assert pipe.get_list_adapters() == {"text_encoder": ["te"]}
        unload_loras(pipe, [te_only])
        assert pipe.get_list_adapters() == {}
        assert not any("ink" in layer.lora_A for layer in _lora_layers(pipe.text_encoder).values())


def _lora_layers(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def test_a_diffusers_file_with_text_encoder_layers_applies_its_metadata_alphas(tiny_dir, tmp_path):
    """A file saved by diffusers' own `save_lora_weights` (peft names, alphas only in its
    `lora_adapter_metadata`): both components at alpha / rank, the text encoder's through peft alone."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    source = make_pipe(tiny_dir)
    torch.manual_seed(0)
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False),
        "text_encoder": LoraConfig(
            r=2, lora_alpha=8, target_modules=["q_proj", "fc1"], init_lora_weights=False
        ),
    }
    for component, config in configs.items():
        inject_adapter_in_model(config, getattr(source, component))
    layers = {c: _lora_layers(getattr(source, c)) for c in configs}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(source.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(source.text_encoder),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
    )
    expected = {
        (component, name): 0.5 * (configs[component].lora_alpha / configs[component].r) * _delta(layer)
        for component in configs
        for name, layer in layers[component].items()
    }
    assert {c for c, _ in expected} == {"unet", "text_encoder"}

    pipe = make_pipe(tiny_dir)
    base = _base_weights(pipe)
    with transformers_refuses_peft():
        lora = load_lora(pipe, tmp_path / "pytorch_lora_weights.safetensors", adapter="diffusers")
        assert lora.components == {"unet", "text_encoder"}
        set_lora_weights(pipe, [lora], [(0.5, 0.5)])
        _check(_fused_weights(pipe, [lora]), base, expected)


def _delta(layer) -> torch.Tensor:
    return layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()
