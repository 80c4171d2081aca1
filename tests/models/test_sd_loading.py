"""load_sd_components on tiny models: single files (every tensor bit-identical), diffusers folders, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from lora_scripts.errors import UserError
from lora_scripts.models import sd_loading
from lora_scripts.models.sd_loading import SDComponents, load_sd_components
from lora_scripts.models.tiny import TinySD, build_tiny_sd, build_tiny_sd_components
from tests.helpers.compvis import to_compvis_state_dict, write_compvis_checkpoint
from tests.helpers.hub_cache import hub_snapshot


def assert_same_weights(
    loaded: SDComponents, reference: TinySD, *, dtype: torch.dtype = torch.float32
) -> None:
    """Every tensor of unet/vae/text_encoder equals the reference (rounded through `dtype` first)."""
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            expected = value.to(dtype).to(value.dtype) if value.is_floating_point() else value
            assert ours[key].dtype == value.dtype, key
            assert torch.equal(ours[key], expected), f"{name}: {key}"


def assert_ready_for_training(loaded: SDComponents) -> None:
    for module in (loaded.unet, loaded.vae, loaded.text_encoder):
        assert not module.training
        assert all(
            not p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu"
            for p in module.parameters()
        )
    assert isinstance(loaded.noise_scheduler, DDPMScheduler)
    assert loaded.noise_scheduler.config.prediction_type == loaded.prediction_type


def test_single_file_round_trip_is_bit_identical(tiny_sd_file, tiny_sd_dir, tiny_sd):
    loaded = load_sd_components(str(tiny_sd_file), config_dir=tiny_sd_dir)
    assert (loaded.version, loaded.prediction_type) == ("sd_v1", "epsilon")
    assert loaded.location.kind == "single_file"
    assert_same_weights(loaded, tiny_sd)
    assert_ready_for_training(loaded)
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_half_precision_ckpt_loads_through_weights_only(tmp_path, tiny_sd_dir, tiny_sd):
    state = to_compvis_state_dict(
        tiny_sd.unet.state_dict(),
        tiny_sd.vae.state_dict(),
        tiny_sd.text_encoder.state_dict(),
        layers_per_block=1,
    )
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 3}, tmp_path / "tiny.ckpt")
    loaded = load_sd_components(str(tmp_path / "tiny.ckpt"), config_dir=tiny_sd_dir)
    assert_same_weights(loaded, tiny_sd, dtype=torch.float16)
    assert_ready_for_training(loaded)


def test_sd2_single_file_with_open_clip_layout(tmp_path):
    tiny = build_tiny_sd_components(version="sd_v2")
    config_dir = build_tiny_sd(tmp_path / "tiny-v2", version="sd_v2")
    path = write_compvis_checkpoint(
        tmp_path / "v2.safetensors", tiny.unet, tiny.vae, tiny.text_encoder, text_encoder_kind="open_clip"
    )
    loaded = load_sd_components(str(path), config_dir=config_dir)
    assert loaded.version == "sd_v2"
    assert_same_weights(loaded, tiny)  # q/k/v split back out of OpenCLIP's fused in_proj, extra block dropped
    assert loaded.tokenizer.pad_token == "!"


def test_sd2_prediction_type_comes_from_the_unet_heuristic(tmp_path, monkeypatch):
    tiny = build_tiny_sd_components(version="sd_v2")
    config_dir = build_tiny_sd(tmp_path / "tiny-v2", version="sd_v2")
    path = write_compvis_checkpoint(
        tmp_path / "v2.safetensors", tiny.unet, tiny.vae, tiny.text_encoder, text_encoder_kind="open_clip"
    )
    asked = []
    monkeypatch.setattr(
        sd_loading, "is_v_prediction_unet", lambda unet, context_dim: asked.append(context_dim) or True
    )
    loaded = load_sd_components(str(path), config_dir=config_dir)
    assert asked == [32]  # the tiny config's cross-attention width
    assert loaded.prediction_type == "v_prediction"
    assert not loaded.unet.config.upcast_attention  # 768-v overrides apply only to the shipped SD 2 config
    # An explicit setting wins without running the UNet.
    asked.clear()
    assert (
        load_sd_components(str(path), config_dir=config_dir, v_parameterization=False).prediction_type
        == "epsilon"
    )
    assert asked == []


def test_v_pred_key_and_explicit_setting(tmp_path, tiny_sd, tiny_sd_dir):
    path = write_compvis_checkpoint(
        tmp_path / "v.safetensors",
        tiny_sd.unet,
        tiny_sd.vae,
        tiny_sd.text_encoder,
        extra={"v_pred": torch.tensor([])},
    )
    assert load_sd_components(str(path), config_dir=tiny_sd_dir).prediction_type == "v_prediction"
    loaded = load_sd_components(str(path), config_dir=tiny_sd_dir, v_parameterization=False)
    assert loaded.prediction_type == loaded.noise_scheduler.config.prediction_type == "epsilon"


def test_ztsnr_key_and_rescale_betas_zero_snr_mark_zero_terminal_snr(
    tmp_path, tiny_sd, tiny_sd_dir, tiny_sd_file
):
    marked = write_compvis_checkpoint(
        tmp_path / "ztsnr.safetensors",
        tiny_sd.unet,
        tiny_sd.vae,
        tiny_sd.text_encoder,
        extra={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])},
    )
    loaded = load_sd_components(str(marked), config_dir=tiny_sd_dir)
    assert (loaded.prediction_type, loaded.zero_terminal_snr) == ("v_prediction", True)
    assert load_sd_components(str(tiny_sd_file), config_dir=tiny_sd_dir).zero_terminal_snr is False
    assert load_sd_components(str(tiny_sd_dir)).zero_terminal_snr is False

    folder = shutil.copytree(tiny_sd_dir, tmp_path / "zsnr-folder")
    scheduler_json = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_json.read_text(encoding="utf-8"))
    scheduler_json.write_text(json.dumps({**config, "rescale_betas_zero_snr": True}), encoding="utf-8")
    assert load_sd_components(str(folder)).zero_terminal_snr is True
    # a single file's base_model_config counts too: the loader builds the schedule from it
    assert load_sd_components(str(tiny_sd_file), config_dir=folder).zero_terminal_snr is True


def test_diffusers_folder_loads(tiny_sd_dir, tiny_sd):
    loaded = load_sd_components(str(tiny_sd_dir))
    assert (loaded.version, loaded.prediction_type, loaded.location.kind) == (
        "sd_v1",
        "epsilon",
        "diffusers_folder",
    )
    assert_same_weights(loaded, tiny_sd)
    assert_ready_for_training(loaded)
    assert loaded.tokenizer.pad_token == "<|endoftext|>"
    assert load_sd_components(str(tiny_sd_dir), v_parameterization=True).prediction_type == "v_prediction"


def test_v_prediction_folder_and_fp16_only_variant(tmp_path):
    folder = build_tiny_sd(tmp_path / "tiny-v", version="sd_v2", prediction_type="v_prediction")
    for weights in folder.glob("*/*.safetensors"):  # what `--variant fp16` downloads leave behind
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    loaded = load_sd_components(str(folder))
    assert (loaded.version, loaded.prediction_type) == ("sd_v2", "v_prediction")
    assert_same_weights(loaded, build_tiny_sd_components(version="sd_v2"))
    assert loaded.tokenizer.pad_token == "!"


def test_tiny_file_without_its_config_is_refused(tiny_sd_file):
    with pytest.raises(UserError, match=r"32-wide cross-attention.*expects 768") as err:
        load_sd_components(str(tiny_sd_file))
    assert str(tiny_sd_file) in str(err.value)


def test_missing_tensors_are_reported_per_component(tmp_path, tiny_sd, tiny_sd_dir):
    state = to_compvis_state_dict(
        tiny_sd.unet.state_dict(),
        tiny_sd.vae.state_dict(),
        tiny_sd.text_encoder.state_dict(),
        layers_per_block=1,
    )
    del state["first_stage_model.decoder.conv_out.weight"]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "partial.safetensors")
    with pytest.raises(UserError, match=r"VAE weights .*\(1 missing, e\.g\. 'decoder\.conv_out\.weight'\)"):
        load_sd_components(str(tmp_path / "partial.safetensors"), config_dir=tiny_sd_dir)


def test_config_dir_must_be_a_diffusers_layout(tmp_path, tiny_sd_file):
    with pytest.raises(UserError, match="has no unet/config.json"):
        load_sd_components(str(tiny_sd_file), config_dir=tmp_path)


def test_sdxl_folder_is_refused(tmp_path, tiny_sd_dir):
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "xl")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "X"]}))
    with pytest.raises(
        UserError, match=r"is not an SD 1\.x/2\.x model .*load_family, which picks its family"
    ):
        load_sd_components(str(folder))


def test_corrupt_folder_weights_name_the_folder(tmp_path, tiny_sd_dir):
    folder = Path(shutil.copytree(tiny_sd_dir, tmp_path / "broken"))
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"could not load '.*vae'") as err:
        load_sd_components(str(folder))
    assert str(folder) in str(err.value)


def test_cached_hub_id_loads_offline(tmp_path, monkeypatch, tiny_sd_dir, tiny_sd):
    """A hub id counts when its snapshot is in the local cache (laid out as huggingface_hub writes it)."""
    shutil.copytree(tiny_sd_dir, hub_snapshot(tmp_path, monkeypatch, "someone/tiny-sd"))
    loaded = load_sd_components("someone/tiny-sd")
    assert loaded.location.kind == "hub_cache"
    assert_same_weights(loaded, tiny_sd)
