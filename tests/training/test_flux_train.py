"""FLUX.1 training end to end on the tiny FLUX model: from a diffusers folder and from the files ComfyUI users
have (BFL transformer + ae + clip_l + t5xxl), with sample images, sd-scripts' FLUX file names and metadata,
an interrupted run resumed to the same LoRA, `check`'s plan, and the keys each family refuses."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from PIL import Image

from lora_scripts.checks import check_config_file, report_to_json
from lora_scripts.cli import main
from lora_scripts.export.lora_file import read_lora_metadata
from tests.training.conftest import write_config

STEPS = 4


def flux_config(tmp: Path, name: str, data: Path, **values) -> Path:
    settings = dict(
        train_data_dir=str(data),
        metadata_path=str(data / "metadata.csv"),
        resolution=64,
        batch_size=2,
        max_train_steps=STEPS,
        save_steps=2,
        output_dir=str(tmp / name),
        t5xxl_max_token_length=32,  # the tiny run: 32 T5 tokens instead of 512
        network_dropout=0.1,
        flip_aug=True,
    )
    return write_config(tmp / f"{name}.yaml", **{**settings, **values})


def lora_of(config: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    out = config.parent / config.stem
    return safetensors.torch.load_file(out / f"{name or config.stem}.safetensors")


def test_a_folder_trains_samples_and_resumes_exactly(tmp_path, flux_dir, dataset_dir, monkeypatch):
    prompts = {"sample_prompts": ["ink wash painting, a temple --s 2 --d 3"], "sample_every_n_steps": 2}
    reference = flux_config(tmp_path, "ref", dataset_dir, base_model=str(flux_dir), **prompts)
    assert main(["train", "--config", str(reference)]) == 0
    tensors = lora_of(reference)
    modules = {k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")}
    # The default target_modules (to_q, to_k, to_v, to_out.0): the image stream's fused qkv and proj in the
    # double blocks, each single block's fused linear1.
    assert modules == {
        *(f"lora_unet_double_blocks_{b}_img_attn_{m}" for b in range(2) for m in ("qkv", "proj")),
        *(f"lora_unet_single_blocks_{b}_linear1" for b in range(2)),
    }
    metadata = read_lora_metadata(reference.parent / "ref" / "ref.safetensors")
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"].startswith("flux-1-dev")
    samples = sorted((reference.parent / "ref" / "sample").glob("*.png"))
    assert len(samples) == 2
    with Image.open(samples[0]) as image:
        assert image.size == (64, 64) and "CFG scale: 3.5" in image.info["parameters"]

    # Stopped after step 2 and resumed: the same LoRA as the uninterrupted run.
    stopped = flux_config(tmp_path, "stopped", dataset_dir, base_model=str(flux_dir), **prompts)
    monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", "sigint@2")
    assert main(["train", "--config", str(stopped)]) == 130
    monkeypatch.delenv("LORA_SCRIPTS_TEST_FAULT")
    assert main(["train", "--config", str(stopped), "--resume", "auto"]) == 0
    resumed = lora_of(stopped)
    assert resumed.keys() == tensors.keys()
    assert all(torch.equal(resumed[k], tensors[k]) for k in tensors)


def test_comfyui_files_train(tmp_path, flux_dir, flux_files, dataset_dir):
    config = flux_config(
        tmp_path,
        "comfy",
        dataset_dir,
        base_model=str(flux_files["transformer_fp8"]),
        base_model_config=str(flux_dir),  # the tiny model's configs (the shipped ones are FLUX.1's full size)
        vae=str(flux_files["ae"]),
        clip_l=str(flux_files["clip_l"]),
        t5xxl=str(flux_files["t5xxl"]),
        max_train_steps=2,
        target_modules="kohya",
        train_text_encoder=True,
    )
    assert main(["train", "--config", str(config)]) == 0
    tensors = lora_of(config)
    assert any(k.startswith("lora_te1_") for k in tensors)  # CLIP-L trains with the text encoder...
    assert not any(k.startswith("lora_te3_") for k in tensors)  # ...T5 only when text_encoder_lr names it
    assert "lora_unet_single_blocks_0_modulation_lin.lora_down.weight" in tensors
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_check_shows_the_flux_plan(tmp_path, flux_dir, dataset_dir):
    config = flux_config(tmp_path, "plan", dataset_dir, base_model=str(flux_dir))
    report = report_to_json(check_config_file(config))
    assert report["errors"] == []
    network = report["network"]
    assert network["sd_version"] == "flux1"
    # 2 double blocks x (to_q, to_k, to_v, to_out.0) + 2 single blocks x (to_q, to_k, to_v), rank 4 by
    # default: (in + out) * 4 each; the tiny transformer's inner width is 32.
    assert network["trainable_parameters"]["unet"] == (2 * 4 + 2 * 3) * (32 + 32) * network["rank"]


def test_check_names_the_part_files_a_single_file_lacks(tmp_path, flux_files, flux_dir, dataset_dir, capsys):
    config = flux_config(
        tmp_path,
        "parts",
        dataset_dir,
        base_model=str(flux_files["transformer"]),
        base_model_config=str(flux_dir),
        clip_l=str(flux_files["clip_l"]),
    )
    assert main(["check", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert "vae: '" in err and "set vae: to" in err
    assert "t5xxl: '" in err and "set t5xxl: to" in err and "clip_l:" not in err


def test_each_family_refuses_the_other_familys_keys(tmp_path, flux_dir, tiny_model_dir, dataset_dir, capsys):
    flux = flux_config(tmp_path, "f", dataset_dir, base_model=str(flux_dir), min_snr_gamma=5, clip_skip=2)
    assert main(["check", "--config", str(flux)]) != 0
    err = capsys.readouterr().err
    assert "min_snr_gamma: FLUX.1's rectified-flow loss has no SNR weighting; leave it out." in err
    assert "clip_skip: FLUX.1 reads CLIP-L's pooled output and T5, not a CLIP layer; leave it out." in err
    sd = flux_config(tmp_path, "s", dataset_dir, base_model=str(tiny_model_dir), timestep_sampling="sigmoid")
    assert main(["check", "--config", str(sd)]) != 0
    assert (
        "timestep_sampling: applies to FLUX.1 base models only; remove it for this base model."
        in capsys.readouterr().err
    )
