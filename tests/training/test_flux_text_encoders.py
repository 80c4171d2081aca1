"""FLUX.1's two text encoders take the text-encoder targets each in its own layer names: the default
text_encoder_target_modules (CLIP's q_proj, k_proj, v_proj, out_proj) and the presets mean CLIP-L's
attention on CLIP-L and T5's SelfAttention q, k, v, o on T5-XXL, so `text_encoder_lr: [clip_l, t5]` trains
both without naming layers, and `check` counts what training trains."""

from __future__ import annotations

import pytest

from lora_scripts.checks import check_config_file, report_to_json
from lora_scripts.cli import main
from lora_scripts.errors import UserError
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora_presets import FLUX_PRESETS, resolve_lora_layers
from lora_scripts.models.tiny import build_tiny_flux_components
from tests.training.test_flux_exact import exact_config, trained
from tests.training.test_flux_train import lora_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # text_encoder_target_modules' default
CLIP_ATTENTION = {
    f"encoder.layers.{layer}.self_attn.{name}" for layer in range(2) for name in DEFAULT_TARGETS
}
T5_ATTENTION = {
    f"encoder.block.{block}.layer.0.SelfAttention.{name}" for block in range(2) for name in "qkvo"
}
T5_MLP = {
    f"encoder.block.{block}.layer.1.DenseReluDense.{name}"
    for block in range(2)
    for name in ("wi_0", "wi_1", "wo")
}
CLIP_MLP = {f"encoder.layers.{layer}.mlp.{name}" for layer in range(2) for name in ("fc1", "fc2")}


def _text_encoder_layers(text_encoder: list[str] | str) -> list[set[str]]:
    tiny = build_tiny_flux_components()
    targets = LoraTargets(unet="attn", text_encoder=text_encoder, text_encoder_mask=(True, True))
    _, _, te_layers = resolve_lora_layers(
        tiny.transformer,
        [tiny.text_encoder, tiny.text_encoder_2],
        targets,
        conv=False,
        presets=FLUX_PRESETS,
        component="transformer",
    )
    assert te_layers is not None
    return [set(layers) for layers in te_layers]


@pytest.mark.parametrize(
    ("text_encoder", "clip_l", "t5"),
    [
        (DEFAULT_TARGETS, CLIP_ATTENTION, T5_ATTENTION),
        (list(reversed(DEFAULT_TARGETS)), CLIP_ATTENTION, T5_ATTENTION),  # the same names in any order
        ("attn", CLIP_ATTENTION, T5_ATTENTION),
        ("attn-mlp", CLIP_ATTENTION | CLIP_MLP, T5_ATTENTION | T5_MLP),
        ("kohya", CLIP_ATTENTION | CLIP_MLP, T5_ATTENTION | T5_MLP),
    ],
    ids=["default", "default-reordered", "attn", "attn-mlp", "kohya"],
)
def test_presets_and_the_default_resolve_per_encoder(text_encoder, clip_l, t5):
    assert _text_encoder_layers(text_encoder) == [clip_l, t5]


def test_other_layer_names_must_match_every_trained_encoder():
    """Only the default list stands for a preset; a list of CLIP's names given for both encoders is refused
    for T5, naming T5's own layers."""
    with pytest.raises(UserError) as err:
        _text_encoder_layers(["q_proj", "v_proj"])
    assert err.value.messages == [
        f"text_encoder_target_modules: '{name}' matches no layer of the text encoder 2; use layer names "
        "such as k, o, q, v, wi_0, wi_1, wo."
        for name in ("q_proj", "v_proj")
    ]


def test_default_targets_train_clip_l_and_t5(tmp_path, flux_dir, dataset_dir):
    values = dict(train_text_encoder=True, text_encoder_lr=[1e-4, 1e-4], max_train_steps=2)
    config = exact_config(tmp_path, "te", dataset_dir, flux_dir, **values)
    report = report_to_json(check_config_file(config))
    assert report["errors"] == []
    assert main(["train", "--config", str(config)]) == 0
    tensors = lora_of(config)
    assert {"_".join(key.split("_")[:2]) for key in tensors} == {"lora_unet", "lora_te1", "lora_te3"}
    for prefix in ("lora_te1", "lora_te3"):
        assert trained(tensors, prefix), prefix
    modules = {k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")}
    # sd-scripts' names of CLIP-L's attention and of T5's SelfAttention q, k, v, o: nothing else of either
    assert {m for m in modules if m.startswith("lora_te1_")} == {
        f"lora_te1_text_model_encoder_layers_{layer}_self_attn_{name}"
        for layer in range(2)
        for name in DEFAULT_TARGETS
    }
    assert {m for m in modules if m.startswith("lora_te3_")} == {
        f"lora_te3_encoder_block_{block}_layer_0_SelfAttention_{name}"
        for block in range(2)
        for name in "qkvo"
    }
    # check counts what training trains
    te_count = sum(
        v.numel() for k, v in tensors.items() if k.startswith("lora_te") and not k.endswith(".alpha")
    )
    assert report["network"]["trainable_parameters"]["text_encoder"] == te_count
    assert report["speed"]["denoiser"] == "transformer"
