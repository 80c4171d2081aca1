"""Network depth on the tiny SD 1.x model: target presets, LoCon conv layers with their own rank and alpha,
dropout, and the errors for targets that match nothing."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec, add_lora_adapter
from lora_scripts.models.lora_presets import (
    TEXT_ENCODER_PRESETS,
    UNET_PRESETS,
    locon_targets,
    resolve_targets,
)
from lora_scripts.models.sd_loading import SDComponents
from lora_scripts.models.stable_diffusion import StableDiffusionFamily
from lora_scripts.models.tiny import build_tiny_sd_components
from tests.helpers.peft_veto import transformers_refuses_peft

# The tiny UNet: 4 Transformer2DModels (down 0, mid, up 1 × 2), each with proj_in/proj_out (1x1 convs),
# attn1/attn2 × to_q/to_k/to_v/to_out.0 and ff.net.0.proj/ff.net.2; 8 ResnetBlock2Ds, 1 down- and 1 upsampler.
TRANSFORMERS = 4
RESNETS = [
    "down_blocks.0.resnets.0",
    "down_blocks.1.resnets.0",
    "up_blocks.0.resnets.0",
    "up_blocks.0.resnets.1",
    "up_blocks.1.resnets.0",
    "up_blocks.1.resnets.1",
    "mid_block.resnets.0",
    "mid_block.resnets.1",
]
SAMPLER_CONVS = ["down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"]
TE_LAYERS = 2


def tiny_family(seed: int = 0) -> StableDiffusionFamily:
    """The tiny SD 1.x model (weights fixed by `seed`) as the family training uses."""
    tiny = build_tiny_sd_components(seed)
    components = SDComponents(
        unet=tiny.unet,
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        noise_scheduler=None,
        version="sd_v1",
        prediction_type="epsilon",
        location="memory",
    )
    return StableDiffusionFamily(components)


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd_components()


def _unet(tiny, preset):
    return resolve_targets(tiny.unet, preset, key="target_modules", component="UNet", presets=UNET_PRESETS)


def _te(tiny, preset):
    return resolve_targets(
        tiny.text_encoder, preset, key="text_encoder_target_modules", component="text encoder",
        presets=TEXT_ENCODER_PRESETS,
    )  # fmt: skip


def test_unet_presets_resolve_to_the_expected_layers(tiny):
    attn, attn_ff, kohya = (_unet(tiny, p) for p in UNET_PRESETS)
    assert len(attn) == TRANSFORMERS * 2 * 4 == 32
    assert {n.rsplit(".", 1)[-1] for n in attn} == {"to_q", "to_k", "to_v", "0"}
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0" in attn
    assert len(attn_ff) == TRANSFORMERS * 10 == 40 and set(attn) < set(attn_ff)
    assert "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj" in attn_ff
    # kohya: every Linear and 1x1 conv of each Transformer2DModel = attn-ff + proj_in/proj_out.
    assert len(kohya) == TRANSFORMERS * 12 == 48 and set(attn_ff) < set(kohya)
    assert "down_blocks.0.attentions.0.proj_in" in kohya
    assert "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2" in kohya
    assert all(".attentions." in n for n in kohya)  # no resnet, time embedding or sampler layer
    assert not any("resnets" in n or "time_emb" in n for n in kohya)


def test_text_encoder_presets_resolve_to_the_expected_layers(tiny):
    attn, attn_mlp, kohya = (_te(tiny, p) for p in TEXT_ENCODER_PRESETS)
    assert len(attn) == TE_LAYERS * 4 and "encoder.layers.1.self_attn.out_proj" in attn
    assert len(attn_mlp) == TE_LAYERS * 6 and "encoder.layers.0.mlp.fc2" in attn_mlp
    assert kohya == attn_mlp  # CLIPAttention + CLIPMLP hold exactly these six Linears per layer


def test_locon_targets_are_the_3x3_convs_of_resnets_and_samplers(tiny):
    names = locon_targets(tiny.unet)
    expected = {f"{r}.{c}" for r in RESNETS for c in ("conv1", "conv2")} | set(SAMPLER_CONVS)
    assert set(names) == expected and len(names) == 2 * 8 + 2 == 18
    assert all(tiny.unet.get_submodule(n).kernel_size == (3, 3) for n in names)
    assert not any(n.endswith(("conv_shortcut", "conv_in", "conv_out")) for n in names)


def test_a_list_keeps_the_peft_suffix_rule(tiny):
    names = _unet(tiny, ["to_q", "proj_in"])
    assert len(names) == TRANSFORMERS * 2 + TRANSFORMERS
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q" in names


def test_unknown_preset_and_unmatched_names_are_user_errors(tiny):
    with pytest.raises(UserError) as err:
        _unet(tiny, "all")
    assert err.value.messages == [
        "target_modules: 'all' is not a preset; use one of attn, attn-ff, kohya, or a list of layer names."
    ]
    with pytest.raises(UserError) as err:
        _te(tiny, "attn-ff")
    assert "use one of attn, attn-mlp, kohya" in err.value.messages[0]
    with pytest.raises(UserError) as err:
        _unet(tiny, ["to_q", "attn_q"])
    assert err.value.messages[0].startswith("target_modules: 'attn_q' matches no layer of the UNet; use ")


def test_add_lora_reports_unet_and_text_encoder_mistakes_together():
    with pytest.raises(UserError) as err:
        tiny_family().add_lora(LoraTargets(["attn_q"], "mlp"), LoraSpec(4, 4.0))
    assert len(err.value.messages) == 2
    assert err.value.messages[0].startswith("target_modules: 'attn_q' matches no layer")
    assert err.value.messages[1].startswith("text_encoder_target_modules: 'mlp' is not a preset")


def _lora_params(layer: LoraLayer) -> int:
    return sum(p.numel() for p in layer.lora_A["default"].parameters()) + sum(
        p.numel() for p in layer.lora_B["default"].parameters()
    )


def test_locon_gives_3x3_convs_their_own_rank_and_alpha():
    family = tiny_family()
    spec = LoraSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
    unet_net, te_net = family.add_lora(LoraTargets("kohya", "kohya"), spec)
    assert (unet_net.kohya_prefix, te_net.kohya_prefix, te_net.name_prefix) == (
        "lora_unet",
        "lora_te",
        "text_model.",
    )
    convs = set(locon_targets(family.unet))
    layers = lora_layers(family.unet)
    # 48 transformer layers + 13 resnet time_emb_proj/conv_shortcut (sd-scripts' conv_dim set) + 18 convs
    assert len(layers) == 48 + 13 + 18 and convs < set(layers)
    expected_params = 0
    for name, layer in layers.items():
        base = layer.get_base_layer()
        rank, alpha = (2, 1.0) if name in convs else (4, 2.0)
        assert (layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"]) == (
            rank,
            alpha,
            0.5,
        )
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if isinstance(base, nn.Conv2d):  # kohya's LoCon layout: down carries the kernel, up is 1x1
            kernel = base.kernel_size
            assert down.shape == (rank, base.in_channels, *kernel) and up.shape == (
                base.out_channels,
                rank,
                1,
                1,
            )
            assert layer.lora_A["default"].stride == base.stride
            expected_params += rank * (base.in_channels * kernel[0] * kernel[1] + base.out_channels)
        else:
            assert down.shape == (rank, base.in_features) and up.shape == (base.out_features, rank)
            expected_params += rank * (base.in_features + base.out_features)
        assert torch.count_nonzero(up) == 0  # B starts at zero: the model is unchanged at step 0
    assert sum(p.numel() for p in family.unet.parameters() if p.requires_grad) == expected_params
    te_layers = lora_layers(family.text_encoder)
    assert len(te_layers) == TE_LAYERS * 6
    assert {(m.r["default"], m.lora_alpha["default"]) for m in te_layers.values()} == {(4, 2.0)}


def test_conv_alpha_defaults_to_conv_rank():
    family = tiny_family()
    family.add_lora(LoraTargets("attn", None), LoraSpec(rank=8, alpha=4.0, conv_rank=2))
    layer = family.unet.get_submodule("mid_block.resnets.1.conv2")
    assert (layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"]) == (2, 2.0, 1.0)
    attn = family.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    assert (attn.r["default"], attn.scaling["default"]) == (8, 0.5)


def test_without_conv_rank_no_conv_is_adapted():
    family = tiny_family()
    family.add_lora(LoraTargets("attn", None), LoraSpec(rank=4, alpha=4.0))
    assert len(lora_layers(family.unet)) == 32 and not lora_layers(family.text_encoder)


def test_dropout_applies_to_the_lora_branch_in_training_only():
    family = tiny_family()
    family.add_lora(LoraTargets(["to_q"], None), LoraSpec(rank=4, alpha=4.0, dropout=0.5))
    layer = family.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert isinstance(layer.lora_dropout["default"], nn.Dropout) and layer.lora_dropout["default"].p == 0.5
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.ones(1, 64, 32)
    base = layer.get_base_layer()
    lora = layer.lora_B["default"](layer.lora_A["default"](x))  # scale 1
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + lora)
    layer.train()
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    mask = torch.nn.functional.dropout(torch.ones_like(x), p=0.5)  # zeros or 2, as nn.Dropout draws
    expected = base(x) + layer.lora_B["default"](layer.lora_A["default"](x * mask))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, base(x) + lora)


def test_no_dropout_is_the_identity():
    family = tiny_family()
    family.add_lora(LoraTargets(["to_q"], None), LoraSpec(rank=4, alpha=4.0))
    layer = family.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert isinstance(layer.lora_dropout["default"], nn.Identity)


def test_add_lora_adapter_keeps_its_positional_signature():
    tiny = build_tiny_sd_components()
    count = add_lora_adapter(tiny.unet, ["to_k"], 2, 2.0)
    # rank × (in + out) per to_k: attn1 maps width → width, attn2 the 32-wide text context → width; the width
    # is 32 in down_blocks.0 and up_blocks.1 (3 transformers) and 64 in the mid block.
    per_transformer = {w: 2 * (w + w) + 2 * (32 + w) for w in (32, 64)}
    assert count == 3 * per_transformer[32] + per_transformer[64] == 1216


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 0, "alpha": 1.0},
        {"rank": 4, "alpha": 4.0, "conv_alpha": 1.0},
        {"rank": 4, "alpha": 4.0, "conv_rank": 0},
        {"rank": 4, "alpha": 4.0, "dropout": 1.0},
    ],
)
def test_lora_spec_rejects_impossible_values(kwargs):
    with pytest.raises(ValueError):
        LoraSpec(**kwargs)


def test_networks_are_named_for_kohya():
    net = LoraNetwork("lora_te", nn.Linear(2, 2), "text_model.")
    assert net.kohya_name("encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"


def test_both_components_are_adapted_through_peft_whatever_transformers_allows():
    """transformers >= 5.24's `add_adapter` refuses peft 0.21 (the newest release at the time); peft's own
    injection does the same work for the text encoder, so training does not depend on that gate."""
    family = tiny_family()
    with transformers_refuses_peft():
        networks = family.add_lora(
            LoraTargets(unet=["to_q"], text_encoder=["q_proj", "fc1"]), LoraSpec(rank=2, alpha=1.0)
        )
    te = {name.removeprefix("text_model."): layer for name, layer in lora_layers(family.text_encoder).items()}
    assert sorted(te) == [
        f"encoder.layers.{i}.{m}" for i in range(TE_LAYERS) for m in ("mlp.fc1", "self_attn.q_proj")
    ]
    assert all(layer.scaling["default"] == 0.5 for layer in te.values())
    assert [net.kohya_prefix for net in networks] == ["lora_unet", "lora_te"]
    trainable = {name for name, p in family.text_encoder.named_parameters() if p.requires_grad}
    assert {name.removeprefix("text_model.") for name in trainable} == {
        f"{name}.lora_{ab}.default.weight" for name in te for ab in "AB"
    }
