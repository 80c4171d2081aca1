"""Training options on the tiny model: v-prediction (SD 2.x), accumulation, checkpointing, schedules."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.config import load_config
from lora_scripts.export.lora_file import read_lora_metadata
from lora_scripts.models.tiny import build_tiny_sd
from lora_scripts.training.loop import train
from lora_scripts.training.plan import TrainingPlan
from tests.training.conftest import write_config


def _scalars(logging_dir, tag):
    (events,) = list(logging_dir.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize(
    ("batches", "accum", "epochs", "max_steps", "expected"),
    [
        (3, 1, 10, None, (3, 10, 30)),
        (3, 2, 10, None, (2, 10, 20)),  # the partial accumulation at the end of an epoch is a step
        (3, 2, 10, 5, (2, 3, 5)),  # max_train_steps overrides epochs
        (1, 4, 2, None, (1, 2, 2)),
    ],
)
def test_plan(batches, accum, epochs, max_steps, expected):
    plan = TrainingPlan.compute(
        num_images=10,
        batches_per_epoch=batches,
        gradient_accumulation_steps=accum,
        epochs=epochs,
        max_train_steps=max_steps,
    )
    assert (plan.steps_per_epoch, plan.num_epochs, plan.max_train_steps) == expected


def test_v_prediction_sd2_with_accumulation_checkpointing_and_warmup(tmp_path, dataset_dir):
    model = build_tiny_sd(tmp_path / "tiny-sd2-v", version="sd_v2", prediction_type="v_prediction")
    out = tmp_path / "out" / "v_run"
    cfg = write_config(
        tmp_path / "v.yaml",
        train_data_dir=str(dataset_dir),
        metadata_path=str(dataset_dir / "metadata.csv"),
        base_model=str(model),
        resolution=64,
        batch_size=2,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        train_text_encoder=True,
        text_encoder_lr=1e-4,
        lr_scheduler="linear",
        lr_warmup_steps=2,
        learning_rate=2e-4,
        max_train_steps=4,
        output_dir=str(out),
    )
    config = load_config(cfg)
    result = train(config)
    # 6 images / batch 2 = 3 batches per epoch → 2 updates per epoch (2 + 1 micro-batches)
    assert result.global_step == 4 and result.epochs_run == 2
    meta = read_lora_metadata(out / "v_run.safetensors")
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
    assert meta["ss_v_parameterization"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    # the rate each update used: linear warmup from 0 over 2 steps, then linear decay to 0 at step 4
    lrs = _scalars(config.logging_dir, "lr")
    assert [s for s, _ in lrs] == [1, 2, 3, 4]
    assert [v for _, v in lrs] == pytest.approx([0.0, 1e-4, 2e-4, 1e-4])
    assert [v for _, v in _scalars(config.logging_dir, "lr_text_encoder")] == pytest.approx(
        [0, 5e-5, 1e-4, 5e-5]
    )


def test_v_target_is_the_velocity():
    from diffusers import DDPMScheduler

    from lora_scripts.export.metadata import FamilyInfo
    from lora_scripts.models.stable_diffusion import StableDiffusionFamily

    family = StableDiffusionFamily.__new__(StableDiffusionFamily)  # only the target needs no model
    family.noise_scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    abar = family.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    family.info = FamilyInfo("sd_v2", True, "v_prediction", "stable-diffusion-v2-768-v")
    torch.testing.assert_close(
        family.training_target(x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0
    )
    family.info = FamilyInfo("sd_v1", False, "epsilon", "stable-diffusion-v1")
    assert torch.equal(family.training_target(x0, noise, t), noise)


def test_bf16_mixed_precision_and_save_precision(tmp_path, tiny_model_dir, dataset_dir):
    import safetensors.torch

    out = tmp_path / "bf16_run"
    cfg = write_config(
        tmp_path / "bf16.yaml",
        train_data_dir=str(dataset_dir),
        metadata_path=str(dataset_dir / "metadata.csv"),
        base_model=str(tiny_model_dir),
        resolution=64,
        batch_size=3,
        max_train_steps=2,
        learning_rate=1e-3,
        mixed_precision="bf16",
        save_precision="bf16",
        output_dir=str(out),
    )
    result = train(load_config(cfg))
    assert result.global_step == 2 and 0 < result.last_loss < 10
    tensors = safetensors.torch.load_file(out / "pytorch_lora_weights.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert all(t.abs().max() > 0 for t in ups)  # the fp32 LoRA weights trained under bf16 autocast


def test_training_from_a_single_file_checkpoint_matches_the_folder(tmp_path, tiny_model_dir, dataset_dir):
    """The same model as a CompVis single file trains to the same LoRA as its diffusers folder."""
    import safetensors.torch

    from lora_scripts.models.tiny import build_tiny_sd_components
    from tests.helpers.compvis import write_compvis_checkpoint

    tiny = build_tiny_sd_components()  # the same seed as the `tiny_model_dir` folder
    single = write_compvis_checkpoint(tmp_path / "tiny.safetensors", tiny.unet, tiny.vae, tiny.text_encoder)
    common = dict(
        train_data_dir=str(dataset_dir),
        metadata_path=str(dataset_dir / "metadata.csv"),
        resolution=64,
        batch_size=3,
        max_train_steps=2,
        learning_rate=1e-3,
        save_precision="fp32",
    )
    runs = {
        "file": dict(base_model=str(single), base_model_config=str(tiny_model_dir)),
        "folder": dict(base_model=str(tiny_model_dir)),
    }
    loras = {}
    for name, source in runs.items():
        cfg = write_config(tmp_path / f"{name}.yaml", **common, **source, output_dir=str(tmp_path / name))
        train(load_config(cfg))
        loras[name] = safetensors.torch.load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
    assert loras["file"].keys() == loras["folder"].keys()
    for key in loras["file"]:
        torch.testing.assert_close(loras["file"][key], loras["folder"][key], atol=1e-6, rtol=0)


def test_sd2_partial_text_encoder_attention_targets_warn():
    from lora_scripts.models.stable_diffusion import partial_fused_attention_warning

    assert partial_fused_attention_warning(["q_proj", "v_proj", "fc1"]).endswith("add k_proj, out_proj.")
    assert partial_fused_attention_warning(["q_proj", "k_proj", "v_proj", "out_proj"]) is None
    assert partial_fused_attention_warning(["fc1", "fc2"]) is None
