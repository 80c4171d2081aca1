"""FLUX.1 training keeps SD's guarantees, on the tiny FLUX model: the latent and text-encoder caches change
nothing but speed (bit-equal LoRA files, fp32 and memory_profile: low's bf16), a run stopped and resumed from
the ComfyUI files (BFL transformer + ae + clip_l + t5xxl) with both caches on equals the uninterrupted one,
quantize_base stores the frozen transformer's Linear weights in 8 bits while the LoRA trains and saves as
without it, and CLIP-L and T5 train beside the transformer (lora_te1_ / lora_te3_) with the text cache off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import T5EncoderModel

import lora_scripts.training.setup as setup
from lora_scripts.checks import check_config_file, report_to_json
from lora_scripts.cli import main
from lora_scripts.export.lora_file import read_lora_metadata
from lora_scripts.generation.generate import run_generate
from lora_scripts.generation.options import GenerateOptions
from lora_scripts.models.flux import FluxFamily
from lora_scripts.models.quantize import stored_bytes
from tests.training.test_flux_train import flux_config, lora_of
from tests.training.test_resume import loss_curve

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # every run compared here is in this process

UNCACHED = {"cache_latents": False, "cache_text_encoder_outputs": False}
CACHED = {"cache_latents": True, "cache_text_encoder_outputs": True}


def exact_config(tmp: Path, name: str, data: Path, base: Path, **values) -> Path:
    """flux_config (flip_aug, network_dropout, 4 steps of 2 of the 6 images: over an epoch's end) with fp32
    files, so the trained numbers themselves are compared, and a rate at which 4 steps move the LoRA."""
    settings = {"save_precision": "fp32", "learning_rate": 1e-3, "base_model": str(base)}
    return flux_config(tmp, name, data, **(settings | values))


def trained(tensors: dict[str, torch.Tensor], prefix: str = "lora_") -> bool:
    """Every LoRA up matrix under `prefix` moved from its zero init."""
    ups = [v for k, v in tensors.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
    return bool(ups) and all(v.abs().max() > 0 for v in ups)


def assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert trained(a)


# --- caches -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", [{}, {"memory_profile": "low"}], ids=["fp32", "low-bf16"])
def test_cached_latents_and_text_train_the_same_lora_as_no_cache(
    tmp_path, flux_dir, dataset_dir, monkeypatch, precision
):
    calls = {"images": 0, "captions": 0}
    encode_images, encode_prompts = FluxFamily.encode_images, FluxFamily.encode_prompts

    def images(self, pixels):
        calls["images"] += pixels.shape[0]
        return encode_images(self, pixels)

    def prompts(self, captions, device):
        calls["captions"] += len(captions)
        return encode_prompts(self, captions, device)

    monkeypatch.setattr(FluxFamily, "encode_images", images)
    monkeypatch.setattr(FluxFamily, "encode_prompts", prompts)
    uncached = exact_config(tmp_path, "uncached", dataset_dir, flux_dir, **precision, **UNCACHED)
    assert main(["train", "--config", str(uncached)]) == 0
    assert calls == {"images": 4 * 2, "captions": 4 * 2}  # every step encodes its batch
    calls.update(images=0, captions=0)
    cached = exact_config(tmp_path, "cached", dataset_dir, flux_dir, **precision, **CACHED)
    assert main(["train", "--config", str(cached)]) == 0
    # Once, before the first step: 6 images in both flips (flip_aug), the 6 distinct captions.
    assert calls == {"images": 6 * 2, "captions": 6}
    assert_same_lora(lora_of(cached), lora_of(uncached))
    assert loss_curve(cached) == loss_curve(uncached)


# --- resume -------------------------------------------------------------------------------------------------


def test_comfyui_files_with_caches_resume_to_the_uninterrupted_lora(
    tmp_path, flux_dir, flux_files, dataset_dir, monkeypatch
):
    files = {
        "base_model_config": str(flux_dir),  # the tiny model's configs
        "vae": str(flux_files["ae"]),
        "clip_l": str(flux_files["clip_l"]),
        "t5xxl": str(flux_files["t5xxl"]),
        **CACHED,
    }
    reference = exact_config(tmp_path, "ref", dataset_dir, flux_files["transformer"], **files)
    assert main(["train", "--config", str(reference)]) == 0
    stopped = exact_config(tmp_path, "stopped", dataset_dir, flux_files["transformer"], **files)
    monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", "sigint@1")  # mid-epoch: 3 batches of 2 per epoch
    assert main(["train", "--config", str(stopped)]) == 130
    monkeypatch.delenv("LORA_SCRIPTS_TEST_FAULT")
    assert main(["train", "--config", str(stopped), "--resume", "auto"]) == 0
    assert_same_lora(lora_of(stopped), lora_of(reference))
    assert loss_curve(stopped) == loss_curve(reference)
    assert [step for step, _ in loss_curve(stopped)] == [1, 2, 3, 4]


# --- quantize_base and memory_profile: low ----------------------------------------------------------------


def frozen_linears(module: nn.Module) -> list[nn.Linear]:
    """The transformer's frozen Linear layers: every base layer (LoRA-wrapped or not), not the LoRA's."""
    return [m for m in module.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]


@pytest.mark.parametrize(
    ("values", "stored", "scale_bytes"),
    [
        ({"quantize_base": "int8"}, torch.int8, 4),  # scales in the frozen weights' fp32
        ({"quantize_base": "float8"}, torch.float8_e4m3fn, 4),
        ({"quantize_base": "int8", "memory_profile": "low"}, torch.int8, 2),  # bf16
    ],
    ids=["int8", "float8", "low-int8"],
)
def test_quantize_base_stores_the_transformer_in_8_bits_and_saves_the_same_lora_keys(
    tmp_path, flux_dir, dataset_dir, monkeypatch, capsys, values, stored, scale_bytes
):
    from optimum.quanto.nn import QLinear

    quantized: list[nn.Module] = []
    quantize_frozen = setup.quantize_frozen
    monkeypatch.setattr(
        setup, "quantize_frozen", lambda m, kind: quantized.append(m) or quantize_frozen(m, kind)
    )
    observed: dict[str, object] = {}
    predict = FluxFamily.predict

    def predict_and_look(self, noisy, timesteps, cond):
        # During training, at every step: what the transformer's frozen layers hold.
        layers = frozen_linears(self.transformer)
        observed["types"] = {type(layer) for layer in layers}
        observed["data"] = {layer.weight._data.dtype for layer in layers if hasattr(layer.weight, "_data")}
        observed["bytes"] = sum(stored_bytes(layer) - _plain_bytes(layer) for layer in layers)
        observed["numel"] = sum(layer.weight.numel() for layer in layers)
        observed["rows"] = sum(layer.weight.shape[0] for layer in layers)
        return predict(self, noisy, timesteps, cond)

    monkeypatch.setattr(FluxFamily, "predict", predict_and_look)
    config = exact_config(tmp_path, "q", dataset_dir, flux_dir, **values)
    report = report_to_json(check_config_file(config))
    assert report["speed"]["quantize_base"] == values["quantize_base"]
    assert main(["train", "--config", str(config)]) == 0
    log = capsys.readouterr().err
    # The transformer, then T5-XXL (which only encodes the captions for the cache: 8 bits let an 8 GB card
    # hold it while it does).
    assert [type(m) for m in quantized] == [FluxFamily.denoiser_class, T5EncoderModel]
    assert {type(layer) for layer in frozen_linears(quantized[1])} == {QLinear}
    assert "quantize_base " + values["quantize_base"] + ": the T5EncoderModel's weights take" in log
    assert observed["types"] == {QLinear} and observed["data"] == {stored}
    # 1 byte per weight, plus one scale per output row (fp32, or bf16 under memory_profile: low).
    assert observed["bytes"] == observed["numel"] + scale_bytes * observed["rows"]
    assert f"quantize_base {values['quantize_base']}: the transformer's weights take 0.2 MiB" in log
    assert "Trainable LoRA parameters: 7,168 (lora_unet: 7,168)" in log  # only the LoRA trains

    plain = exact_config(
        tmp_path, "plain", dataset_dir, flux_dir, **{k: v for k, v in values.items() if k != "quantize_base"}
    )
    assert main(["train", "--config", str(plain)]) == 0
    q_file, plain_file = lora_of(config), lora_of(plain)
    assert {k: (v.shape, v.dtype) for k, v in q_file.items()} == {
        k: (v.shape, v.dtype) for k, v in plain_file.items()
    }
    assert trained(q_file)
    # The loss differs by the 8-bit weights' noise, and no more.
    q_losses, plain_losses = loss_curve(config), loss_curve(plain)
    assert [loss for _, loss in q_losses] != [loss for _, loss in plain_losses]
    assert [loss for _, loss in q_losses] == pytest.approx([loss for _, loss in plain_losses], rel=2e-2)
    meta = read_lora_metadata(config.parent / "q" / "q.safetensors")
    assert meta["ss_quantize_base"] == values["quantize_base"] and meta["ss_base_model_version"] == "flux1"
    if "memory_profile" in values:
        dumped = (config.parent / "q" / "config.yaml").read_text(encoding="utf-8")
        for line in ("gradient_checkpointing: true", "mixed_precision: bf16", "batch_size: 1"):
            assert line in dumped


def _plain_bytes(layer: nn.Linear) -> int:
    """What a layer holds besides its weight: its bias and quanto's activation-scale buffers."""
    return sum(t.numel() * t.element_size() for t in (layer.bias, *layer.buffers()) if t is not None)


def test_a_lora_trained_on_int8_loads_in_generate(tmp_path, flux_dir, dataset_dir, capsys):
    config = exact_config(tmp_path, "ink", dataset_dir, flux_dir, quantize_base="int8", learning_rate=1e-2)
    assert "transformer weights int8 (quantize_base), LoRA in fp32" in _check_text(config, capsys)
    assert main(["train", "--config", str(config)]) == 0

    def render(prompt: str, name: str) -> np.ndarray:
        options = GenerateOptions(
            base_model=str(flux_dir),
            prompt=prompt,
            output=tmp_path / f"{name}.png",
            steps=2,
            width=64,
            height=64,
            seed=3,
            progress=False,
            lora_dirs=[config.parent / "ink"],
        )
        result = run_generate(options)
        with Image.open(result.files[0]) as image:
            return np.asarray(image.convert("RGB")).astype(int)

    base = render("ink wash painting, a temple", "base")
    assert np.abs(render("ink wash painting, a temple <lora:ink:1>", "lora") - base).max() > 0
    np.testing.assert_array_equal(render("ink wash painting, a temple <lora:ink:0>", "zero"), base)


def _check_text(config: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["check", "--config", str(config)]) == 0
    return capsys.readouterr().out


# --- text encoders ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text_encoder_lr", "prefixes"),
    [
        (1e-3, {"lora_unet", "lora_te1"}),  # one rate: CLIP-L only (sd-scripts' train_t5xxl is off)
        ([1e-3, 1e-3], {"lora_unet", "lora_te1", "lora_te3"}),  # a rate for T5: it trains too
        ([0, 1e-3], {"lora_unet", "lora_te3"}),  # 0: CLIP-L frozen
    ],
    ids=["clip", "clip-t5", "t5"],
)
def test_text_encoders_train_beside_the_transformer_without_the_text_cache(
    tmp_path, flux_dir, dataset_dir, capsys, text_encoder_lr, prefixes
):
    values = dict(
        train_text_encoder=True,
        text_encoder_lr=text_encoder_lr,
        text_encoder_target_modules="kohya",  # CLIP's and T5's attention and MLP (their layer names differ)
        max_train_steps=2,
    )
    config = exact_config(tmp_path, "te", dataset_dir, flux_dir, **values)
    report = report_to_json(check_config_file(config))
    assert report["speed"]["cache_text_encoder_outputs"] is False
    assert report["speed"]["cache_text_encoder_outputs_why"] == "turned off by train_text_encoder"
    assert main(["train", "--config", str(config)]) == 0
    log = capsys.readouterr().err
    assert "latent cache: 0 hits" in log and "text encoder cache" not in log
    tensors = lora_of(config)
    assert {"_".join(key.split("_")[:2]) for key in tensors} == prefixes
    for prefix in prefixes:
        assert trained(tensors, prefix), prefix
    if "lora_te3" in prefixes:  # sd-scripts' names of T5's layers
        assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in tensors
        assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo.lora_up.weight" in tensors
    # check counts what training trains
    te_count = sum(
        v.numel() for k, v in tensors.items() if k.startswith("lora_te") and not k.endswith(".alpha")
    )
    assert report["network"]["trainable_parameters"]["text_encoder"] == te_count
    dumped = (config.parent / "te" / "config.yaml").read_text(encoding="utf-8")
    assert "cache_text_encoder_outputs: false" in dumped


def test_the_text_cache_is_refused_while_a_text_encoder_trains(tmp_path, flux_dir, dataset_dir, capsys):
    values = dict(train_text_encoder=True, text_encoder_lr=[1e-3, 1e-3], cache_text_encoder_outputs=True)
    config = exact_config(tmp_path, "refused", dataset_dir, flux_dir, **values)
    assert main(["train", "--config", str(config)]) != 0
    assert (
        "cache_text_encoder_outputs: cannot be used with train_text_encoder: true (a trained text encoder "
        "changes its outputs)" in capsys.readouterr().err
    )
    assert not (config.parent / "refused").exists()
