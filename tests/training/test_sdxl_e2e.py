"""SDXL end to end on the tiny SDXL model (resolution 64, 2-4 steps): from a diffusers folder and from an sgm
single file, with the text encoders, the file's keys and metadata, diffusers loading and fusing it, caches,
resume, network_weights, LoCon, v-prediction, validation, quantize_base and the low-memory profile.

The images are not square, so every sample is cropped (and flip_aug mirrors the crop): the size/crop
conditioning the UNet gets is not the trivial one. Names are checked against independent conversions: the
tiny model's own sgm checkpoint (tests/helpers/sgm.py) and sd-scripts' full-size module tree
(tests/helpers/sd_scripts_sdxl.py).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lora_scripts.training.loop as loop
from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.demo import draw_ink_image
from lora_scripts.export.kohya import count_modules
from lora_scripts.export.lora_file import read_lora_metadata
from lora_scripts.models.lora_presets import unet_lora_layers
from lora_scripts.models.tiny import TinySDXL, build_tiny_sdxl, build_tiny_sdxl_components
from lora_scripts.training.loop import TrainResult, train
from lora_scripts.training.noise import TERMINAL_ALPHA_BAR
from tests.helpers.sd_scripts_sdxl import (
    UNET_CONV_TARGETS,
    UNET_TARGETS,
    create_modules_names,
    meta_sgm_unet,
)
from tests.helpers.sgm import sdxl_unet_to_sgm, write_sgm_checkpoint
from tests.training.conftest import tiny_run_settings, write_config
from tests.training.test_resume import assert_same_lora, final_lora, loss_curve, make_config, resume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")
NUM_IMAGES = 4
LONG_CAPTION = ", ".join(f"tag{i}" for i in range(30))  # 109 tokens: two chunks at max_token_length 150
# sd-scripts' default network (networks/lora.py): every Linear and 1x1 conv of the transformer blocks.
KOHYA = dict(target_modules="kohya")
TEXT_ENCODERS = dict(train_text_encoder=True, text_encoder_target_modules="kohya", text_encoder_lr=5e-4)
LOCON = dict(conv_rank=2, conv_alpha=1)
CLIP_LAYER_PARTS = (
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
    "mlp_fc1",
    "mlp_fc2",
)


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> TinySDXL:
    return build_tiny_sdxl_components()


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl_model") / "tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory, tiny) -> Path:
    """The same weights (seed 0) as one sgm-layout .safetensors, as civitai serves SDXL checkpoints."""
    path = tmp_path_factory.mktemp("sdxl_file") / "tiny-sdxl.safetensors"
    return write_sgm_checkpoint(path, *(getattr(tiny, name) for name in MODULES))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 images, landscape (96x72) and portrait (72x96): at resolution 64 each is cropped 21 pixels."""
    folder = tmp_path_factory.mktemp("sdxl_data") / "ink"
    folder.mkdir()
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "text"])
        for i in range(NUM_IMAGES):
            image = draw_ink_image(i, seed=i, size=96)
            image.crop((0, 0, 96, 72) if i % 2 else (0, 0, 72, 96)).save(folder / f"img_{i}.png")
            text = LONG_CAPTION if i == 3 else f"ink wash painting, subject {i}, monochrome"
            writer.writerow([f"img_{i}.png", text])
    return folder


def settings(data: Path, model: Path, **overrides) -> dict:
    """A short run; fp32 files (the trained weights themselves are compared) and no caches unless asked."""
    uncached = {"cache_latents": False, "cache_text_encoder_outputs": False}
    base = dict(save_precision="fp32", lora_rank=4, lora_alpha=2, flip_aug=True, max_train_steps=3)
    return tiny_run_settings(data, model, **(base | uncached | overrides))


def train_run(folder: Path, name: str, values: dict) -> TrainResult:
    """Train with `values` into folder/name through `train()`; its result (finite loss, every step run)."""
    cfg = write_config(folder / f"{name}.yaml", **values, output_dir=str(folder / name))
    result = train(load_config(cfg))
    assert result.global_step == values["max_train_steps"] and math.isfinite(result.last_loss)
    return result


def run(folder: Path, name: str, values: dict) -> Path:
    """`train_run`; the final LoRA file."""
    train_run(folder, name, values)
    return folder / name / f"{name}.safetensors"


def load(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


def stems(state: dict[str, torch.Tensor], prefix: str = "") -> set[str]:
    return {key.split(".", 1)[0] for key in state if key.startswith(prefix)}


def trained(state: dict[str, torch.Tensor]) -> bool:
    """Every UNet lora_up moved away from its zero init."""
    ups = [
        value
        for key, value in state.items()
        if key.startswith("lora_unet_") and key.endswith("lora_up.weight")
    ]
    return bool(ups) and all(value.abs().max() > 0 for value in ups)


def sgm_layer_names(tiny: TinySDXL) -> dict[str, str]:
    """kohya name (lora_unet_ + sgm path, "." → "_") → diffusers weight key, from the tiny model's own
    sgm conversion (tests/helpers/sgm.py), not from the exporter's map."""
    unet_sd = tiny.unet.state_dict()
    sgm = sdxl_unet_to_sgm({key: key for key in unet_sd}, tiny.unet.config.layers_per_block)  # type: ignore[arg-type]
    names = {}
    for sgm_key, diffusers_key in sgm.items():
        if sgm_key.endswith(".weight"):
            path = sgm_key.removeprefix("model.diffusion_model.").removesuffix(".weight")
            names["lora_unet_" + path.replace(".", "_")] = str(diffusers_key)
    return names


def text_encoder_names(prefix: str, text_encoder: torch.nn.Module) -> dict[str, str]:
    """kohya name → weight key of every Linear of a transformers CLIP text encoder (sd-scripts names its
    layers from `text_model.`, which transformers 5's CLIPTextModel no longer has)."""
    names = {}
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            dotted = name if name.startswith("text_model.") else f"text_model.{name}"
            names[f"{prefix}_{dotted.replace('.', '_')}"] = f"{name}.weight"
    return names


@pytest.fixture(scope="module")
def te_runs(tmp_path_factory, data, sdxl_dir, sdxl_file) -> dict[str, Path]:
    """The same run with both text encoders, from the folder and from the single file."""
    folder = tmp_path_factory.mktemp("sdxl_te")
    values = settings(data, sdxl_dir, **KOHYA, **TEXT_ENCODERS, max_train_steps=2)
    return {
        "folder": run(folder, "from_folder", values),
        "file": run(
            folder, "from_file", values | {"base_model": str(sdxl_file), "base_model_config": str(sdxl_dir)}
        ),
    }


@pytest.fixture(scope="module")
def cache_runs(tmp_path_factory, data, sdxl_dir) -> dict[str, Path]:
    """A UNet-only run reading captions in two chunks, uncached and with both caches."""
    folder = tmp_path_factory.mktemp("sdxl_cache")
    values = settings(data, sdxl_dir, **KOHYA, max_token_length=150)
    return {
        "uncached": run(folder, "uncached", values),
        "cached": run(folder, "cached", values | {"cache_latents": True, "cache_text_encoder_outputs": True}),
    }


# --- the text-encoder run: single file = folder, keys, metadata, diffusers --------------------------------


def test_single_file_and_folder_train_the_same_lora(te_runs):
    from_folder, from_file = load(te_runs["folder"]), load(te_runs["file"])
    assert from_folder.keys() == from_file.keys()
    for key, value in from_folder.items():
        assert torch.equal(value, from_file[key]), key
    assert trained(from_folder)


def test_text_encoder_run_has_sgm_unet_and_te1_te2_keys_and_sdxl_metadata(te_runs, tiny):
    state = load(te_runs["folder"])
    names = stems(state)
    assert {name.split("_")[1] for name in names} == {"unet", "te1", "te2"}
    unet_names = stems(state, "lora_unet_")
    assert unet_names <= sgm_layer_names(tiny).keys()  # sgm paths: input_blocks, middle_block, output_blocks
    assert not any(name.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks")) for name in unet_names)
    # kohya preset: q, k, v, out_proj, fc1, fc2 of each layer; te1 has 2 layers, te2 3 (+ its projection)
    assert (
        stems(state, "lora_te1_")
        == set(text_encoder_names("lora_te1", tiny.text_encoder))
        == {f"lora_te1_text_model_encoder_layers_{i}_{part}" for i in range(2) for part in CLIP_LAYER_PARTS}
    )
    te2 = set(text_encoder_names("lora_te2", tiny.text_encoder_2)) - {"lora_te2_text_model_text_projection"}
    assert stems(state, "lora_te2_") == te2 and len(te2) == 3 * 6
    assert state["lora_te2_text_model_encoder_layers_2_mlp_fc2.lora_down.weight"].shape == (4, 96)
    assert count_modules(state) == len(names) and len(state) == 3 * len(names)

    meta = read_lora_metadata(te_runs["folder"])
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_v2"] == "False" and meta["ss_v_parameterization"] == "False"
    assert meta["ss_zero_terminal_snr"] == "False"  # left out, on a model without the `ztsnr` marker
    assert meta["ss_network_train_unet_only"] == "False"
    assert meta["ss_text_encoder_lr"] == "0.0005"
    assert meta["ss_sd_model_name"] == "tiny-sdxl"
    assert read_lora_metadata(te_runs["file"])["ss_sd_model_name"] == "tiny-sdxl.safetensors"  # as sd-scripts


def test_text_encoder_layers_train_except_te1s_last(te_runs):
    # SDXL reads CLIP ViT-L's penultimate layer and nothing of its last one, so the last layer's LoRA gets no
    # gradient and keeps its zero lora_up (sd-scripts adds and saves it the same way). bigG's last layer
    # feeds the pooled embedding, so all of te2 trains.
    state = load(te_runs["folder"])
    for stem in stems(state, "lora_te"):
        moved = bool(state[f"{stem}.lora_up.weight"].abs().max() > 0)
        assert moved == (not stem.startswith("lora_te1_text_model_encoder_layers_1_")), stem


def test_diffusers_loads_the_file_and_fuses_every_module_exactly(te_runs, sdxl_dir, tiny):
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    state = load(te_runs["folder"])
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir).to(torch.float32)
    parts = {
        "unet": ("lora_unet_", sgm_layer_names(tiny)),
        "text_encoder": ("lora_te1_", text_encoder_names("lora_te1", pipe.text_encoder)),
        "text_encoder_2": ("lora_te2_", text_encoder_names("lora_te2", pipe.text_encoder_2)),
    }
    base = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()} for part in parts}
    pipe.load_lora_weights(str(te_runs["folder"]), adapter_name="ours")
    for part, (prefix, _) in parts.items():
        adapted = sum(isinstance(m, LoraLayer) for m in getattr(pipe, part).modules())
        assert adapted == len(stems(state, prefix)) > 0, part  # every module of the file was applied
    pipe.set_adapters(["ours"], adapter_weights=[1.0])
    pipe.fuse_lora(components=list(parts), lora_scale=1.0, adapter_names=["ours"])
    pipe.unload_lora_weights()

    for part, (prefix, names) in parts.items():
        fused, changed = getattr(pipe, part).state_dict(), set()
        for stem in stems(state, prefix):
            down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
            alpha = state[f"{stem}.alpha"].item()
            key = names[stem]
            expected = base[part][key] + (alpha / down.shape[0]) * (up @ down)
            torch.testing.assert_close(fused[key], expected, atol=1e-5, rtol=0)
            if up.abs().max() > 0:  # te1's last layer is not trained (see above): it fuses to W
                assert not torch.equal(fused[key], base[part][key]), key
            changed.add(key)
        for key, value in base[part].items():  # nothing else moved
            if key not in changed:
                assert torch.equal(fused[key], value), key
    assert {"time_embedding.linear_1.weight", "add_embedding.linear_1.weight"}.isdisjoint(changed)


# --- names against full-size SDXL -------------------------------------------------------------------------


def test_unet_only_keys_map_one_to_one_onto_full_size_sdxl_names(cache_runs, tiny):
    state = load(cache_runs["uncached"])
    names = stems(state)
    assert all(name.startswith("lora_unet_") for name in names)
    # one to one onto the tiny model's targets, each at its own layer of the tiny sgm checkpoint
    layers = sgm_layer_names(tiny)
    linear, _ = unet_lora_layers(tiny.unet, "kohya", conv=False)
    assert sorted(layers[name].removesuffix(".weight") for name in names) == sorted(linear)
    unet_sd = tiny.unet.state_dict()
    for name in names:
        product = state[f"{name}.lora_up.weight"].flatten(1) @ state[f"{name}.lora_down.weight"].flatten(1)
        assert product.numel() == unet_sd[layers[name]].numel(), name
    # the tiny model's transformer blocks are a subset of full-size SDXL's: every name is one sd-scripts gives
    full_size = set(create_modules_names(meta_sgm_unet(), "lora_unet", UNET_TARGETS))
    assert len(full_size) == 722
    # 6 attention blocks (2 down, 1 middle, 3 up) of 2 transformer blocks × 10 Linears, + proj_in/proj_out
    assert names <= full_size and len(names) == 6 * 2 * 10 + 6 * 2
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k" in names


def test_locon_writes_conv_keys_that_full_size_sdxl_has(tmp_path, data, sdxl_dir, tiny):
    state = load(run(tmp_path, "locon", settings(data, sdxl_dir, **KOHYA, **LOCON, max_train_steps=2)))
    convs = {name for name in stems(state) if state[f"{name}.lora_down.weight"].shape[2:] == (3, 3)}
    _, conv_paths = unet_lora_layers(tiny.unet, "kohya", conv=True)
    assert len(convs) == len(conv_paths) > 0
    layers = sgm_layer_names(tiny)
    assert sorted(layers[name].removesuffix(".weight") for name in convs) == sorted(conv_paths)
    full_size = set(create_modules_names(meta_sgm_unet(), "lora_unet", UNET_TARGETS + UNET_CONV_TARGETS))
    assert stems(state) <= full_size
    for name in (
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_middle_block_0_in_layers_2",
    ):
        assert name in convs
        assert state[f"{name}.lora_down.weight"].shape[0] == 2 and state[f"{name}.alpha"].item() == 1.0
    assert trained(state)


# --- caches, resume, network_weights ----------------------------------------------------------------------


def test_cached_and_uncached_runs_save_the_same_tensors(cache_runs):
    uncached, cached = load(cache_runs["uncached"]), load(cache_runs["cached"])
    assert uncached.keys() == cached.keys()
    for key, value in uncached.items():
        assert torch.equal(value, cached[key]), key
    assert trained(uncached)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, data, sdxl_dir, monkeypatch):
    extra = dict(max_train_steps=4, lora_rank=4, target_modules="kohya")
    reference = make_config(tmp_path, "ref", sdxl_dir, data, **extra)
    assert main(["train", "--config", str(reference)]) == 0
    config = make_config(tmp_path, "stopped", sdxl_dir, data, **extra)
    monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", "sigint@3")  # mid-epoch: 4 images, batch 2
    assert main(["train", "--config", str(config)]) == 130
    assert not (tmp_path / "stopped" / "stopped.safetensors").exists()
    assert resume(config, monkeypatch) == 0
    assert_same_lora(final_lora(config), final_lora(reference))
    assert loss_curve(config) == loss_curve(reference)
    assert [step for step, _ in loss_curve(config)] == [1, 2, 3, 4]


def test_network_weights_continues_from_our_sdxl_file(tmp_path, te_runs, data, sdxl_dir, caplog):
    source = load(te_runs["folder"])
    # Nothing moves at this rate (SGD: w - 1e-20 * g rounds back to w), so the saved file is the loaded one.
    frozen = dict(optimizer_type="SGD", learning_rate=1e-20, text_encoder_lr=1e-20, max_train_steps=1)
    values = settings(data, sdxl_dir, **KOHYA, **TEXT_ENCODERS) | frozen
    with caplog.at_level(logging.INFO, logger="lora_scripts"):
        continued = load(run(tmp_path, "continued", values | {"network_weights": str(te_runs["folder"])}))
    modules = count_modules(source)
    assert f"{modules} layers loaded (0 rescaled to this run's alpha), 0 layers start fresh" in caplog.text
    assert continued.keys() == source.keys()
    for key, value in source.items():
        torch.testing.assert_close(continued[key], value, atol=1e-6, rtol=1e-5)


# --- v-prediction, validation, quantize_base, memory_profile ----------------------------------------------


def test_v_prediction_trains_and_says_so(tmp_path, data, sdxl_dir, cache_runs):
    path = run(
        tmp_path, "v", settings(data, sdxl_dir, **KOHYA, max_token_length=150, v_parameterization=True)
    )
    meta = read_lora_metadata(path)
    assert meta["ss_v_parameterization"] == "True" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.prediction_type"] == "v"
    v_state, epsilon_state = load(path), load(cache_runs["uncached"])  # the same run, epsilon
    assert v_state.keys() == epsilon_state.keys() and trained(v_state)
    assert any(not torch.equal(v_state[k], epsilon_state[k]) for k in v_state if k.endswith("lora_up.weight"))


def test_ztsnr_marker_turns_zero_terminal_snr_on_unless_the_config_says_false(
    tmp_path, data, sdxl_dir, tiny, monkeypatch, caplog
):
    """A NoobAI-XL v-pred file (`v_pred` + `ztsnr` markers) trains on the zero-terminal-SNR schedule with
    the key left out, as ComfyUI samples it; `zero_terminal_snr: false` trains on the plain one."""
    markers = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    path = write_sgm_checkpoint(
        tmp_path / "noobai-v.safetensors", *(getattr(tiny, name) for name in MODULES), extra=markers
    )
    families = []
    load_family = loop.load_family

    def spy(*args, **kwargs):  # the loop sets family.noise_scheduler to the schedule it trains with
        families.append(load_family(*args, **kwargs))
        return families[-1]

    monkeypatch.setattr(loop, "load_family", spy)
    values = settings(data, path, base_model_config=str(sdxl_dir), max_train_steps=2)
    with caplog.at_level(logging.INFO, logger="lora_scripts"):
        marked = run(tmp_path, "marked", values)
    assert sum("as the base model is marked for it" in r.getMessage() for r in caplog.records) == 1
    off = run(tmp_path, "off", values | {"zero_terminal_snr": False})

    meta = read_lora_metadata(marked)
    assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_v_parameterization"] == "True"
    assert read_lora_metadata(off)["ss_zero_terminal_snr"] == "False"
    rescaled, plain = (family.noise_scheduler for family in families)
    assert rescaled.config.prediction_type == plain.config.prediction_type == "v_prediction"
    assert rescaled.alphas_cumprod[-1].item() == pytest.approx(TERMINAL_ALPHA_BAR)  # ~pure noise at t=T
    assert plain.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=1e-4)  # SDXL's own schedule
    assert "zero_terminal_snr: null" in (tmp_path / "marked" / "config.yaml").read_text(encoding="utf-8")


def test_validation_loss_is_measured_on_sdxl(tmp_path, data, sdxl_dir):
    values = settings(
        data, sdxl_dir, validation_split=0.25, validate_every_n_steps=1, max_train_steps=2, learning_rate=1e-3
    )
    run(tmp_path, "val", values)
    out = tmp_path / "val"
    acc = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    losses = {event.step: event.value for event in acc.Scalars("validation_loss")}
    assert sorted(losses) == [1, 2] and all(0 < loss < 10 for loss in losses.values())
    best = read_lora_metadata(out / "val-best.safetensors")
    assert float(best["ss_validation_loss"]) == pytest.approx(min(losses.values()), rel=1e-6)
    assert best["ss_num_train_images"] == "3"  # 1 of the 4 images held out


def test_quantize_base_int8_trains_sdxl(tmp_path, data, sdxl_dir, caplog):
    pytest.importorskip("optimum.quanto")
    values = settings(data, sdxl_dir, max_train_steps=1)
    with caplog.at_level(logging.INFO, logger="lora_scripts"):
        quantized = train_run(tmp_path, "q", values | {"quantize_base": "int8"})
    # the tiny SDXL UNet's 2.0 M parameters: 7.8 MiB in float32, 2.2 MiB with int8 Linear/Conv2d weights
    assert "quantize_base int8: the UNet's weights take 2.2 MiB instead of 7.8 MiB" in caplog.text
    assert "Trainable LoRA parameters: 50,688 (lora_unet: 50,688)" in caplog.text  # only the LoRA trains
    plain = train_run(tmp_path, "plain", values)
    assert quantized.last_loss != plain.last_loss  # the 8-bit weights' noise, and no more
    assert quantized.last_loss == pytest.approx(plain.last_loss, rel=2e-2)
    q_state, plain_state = (
        load(tmp_path / "q" / "q.safetensors"),
        load(tmp_path / "plain" / "plain.safetensors"),
    )
    assert {k: v.shape for k, v in q_state.items()} == {k: v.shape for k, v in plain_state.items()}
    meta = read_lora_metadata(tmp_path / "q" / "q.safetensors")
    assert meta["ss_quantize_base"] == "int8" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert trained(q_state)


def test_low_memory_profile_trains_sdxl(tmp_path, data, sdxl_dir):
    values = settings(data, sdxl_dir, memory_profile="low", max_train_steps=2)
    for key in ("cache_latents", "cache_text_encoder_outputs"):
        values.pop(key)  # the profile's own choices
    path = run(tmp_path, "low", values)
    dumped = (tmp_path / "low" / "config.yaml").read_text(encoding="utf-8")
    for line in (
        "gradient_checkpointing: true",
        "mixed_precision: bf16",
        "batch_size: 1",
        "cache_latents: true",
    ):
        assert line in dumped
    assert trained(load(path))
