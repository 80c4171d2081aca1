"""What a run will do: step arithmetic, trainable LoRA parameters without weights, the files it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_scripts.checks.plan import network_facts, output_facts, plan_facts
from lora_scripts.config import TrainConfig, validate_config_dict
from lora_scripts.data.captions import CaptionedImage
from lora_scripts.data.training_set import Sample, TrainingSet
from lora_scripts.errors import UserError
from lora_scripts.models import detect
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec
from lora_scripts.models.registry import load_family
from lora_scripts.models.tiny import build_tiny_sd_components
from tests.helpers.compvis import write_compvis_checkpoint

# diffusers' train_text_to_image_lora.py prints this for SD 1.5 at rank 4 on to_q/to_k/to_v/to_out.0.
SD15_UNET_RANK4_ATTENTION = 797_184
# CLIP ViT-L/14: 12 layers x 4 projections x rank 4 x (768 in + 768 out).
SD15_TEXT_ENCODER_RANK4 = 12 * 4 * 4 * (768 + 768)


def _config(**values: object) -> TrainConfig:
    base = {"train_data_dir": "data", "base_model": "model", "output_dir": "out/run"}
    return validate_config_dict({**base, **values}, "test.yaml", check_paths=False)


def _training_set(buckets: dict[tuple[int, int], int], reg_samples: int = 0) -> TrainingSet:
    """A training set with `n` samples in each bucket (one image each), the first `reg_samples` of them
    regularization draws."""
    samples = []
    for (w, h), n in buckets.items():
        for i in range(n):
            is_reg = len(samples) < reg_samples
            image = CaptionedImage(Path(f"{w}x{h}_{i}.png"), "a cat", f"{w}x{h}_{i}.png", is_reg=is_reg)
            samples.append(Sample(image, (w, h), 1.0, (w, h)))
    return TrainingSet(images=[s.image for s in samples], samples=samples, datasets=[])


def test_steps_match_a_hand_count() -> None:
    # 10 images / batch 4 -> 3 batches (4, 4, 2); 2 batches per step -> 2 steps per epoch; 3 epochs -> 6
    config = _config(batch_size=4, gradient_accumulation_steps=2, epochs=3)
    plan = plan_facts(_training_set({(512, 512): 10}), config)
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.epochs, plan.total_steps) == (3, 2, 3, 6)
    assert plan.effective_batch_size == 8 and plan.limited_by == "epochs"


def test_max_train_steps_overrides_epochs() -> None:
    config = _config(batch_size=4, gradient_accumulation_steps=2, epochs=3, max_train_steps=5)
    plan = plan_facts(_training_set({(512, 512): 10}), config)
    assert (plan.steps_per_epoch, plan.epochs, plan.total_steps) == (2, 3, 5)  # epochs 1, 2 and half of 3
    assert plan.limited_by == "max_train_steps"


def test_buckets_and_processes_scale_the_batches() -> None:
    config = _config(batch_size=2, epochs=1)
    # each bucket ends in its own partial batch: ceil(5/2) + ceil(3/2) + ceil(1/2) = 3 + 2 + 1 = 6
    buckets = {(512, 512): 5, (576, 448): 3, (448, 576): 1}
    plan = plan_facts(_training_set(buckets), config)
    assert plan.batches_per_epoch == 6 and plan.num_samples == 9
    assert plan.bucket_counts == {(448, 576): 1, (512, 512): 5, (576, 448): 3}
    # 6 batches dealt out to 4 processes: every process runs ceil(6/4) = 2 (accelerate pads the last round)
    assert plan_facts(_training_set(buckets), config, num_processes=4).batches_per_epoch == 2
    # regularization draws count as samples, not as images
    with_reg = plan_facts(_training_set({(512, 512): 8}, reg_samples=4), config)
    assert (with_reg.num_images, with_reg.num_reg_images, with_reg.num_samples) == (4, 4, 8)


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("targets", "te_targets"),
    [(["to_q", "to_v"], None), (["to_q", "to_k", "to_v", "to_out.0", "proj_in"], ["q_proj", "fc1"])],
)
def test_parameter_count_equals_the_real_tiny_model(
    tiny_model: Path, targets: list[str], te_targets: list[str] | None
) -> None:
    config = _config(
        base_model=str(tiny_model),
        lora_rank=4,
        target_modules=targets,
        train_text_encoder=te_targets is not None,
        **({"text_encoder_target_modules": te_targets} if te_targets else {}),
    )
    facts = network_facts(config)
    family = load_family(str(tiny_model))
    networks = family.add_lora(LoraTargets(targets, te_targets), LoraSpec(rank=4, alpha=4.0))
    assert facts.unet_parameters == _trainable(networks[0].module) > 0
    assert facts.text_encoder_parameters == (_trainable(networks[1].module) if te_targets else 0)
    assert facts.base_model_kind == "diffusers_folder" and facts.sd_version == "sd_v1"


def test_single_file_is_counted_from_its_header_only(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = build_tiny_sd_components()
    path = write_compvis_checkpoint(tmp_path / "tiny.safetensors", tiny.unet, tiny.vae, tiny.text_encoder)

    def no_tensor_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("the check read the checkpoint's tensors")

    monkeypatch.setattr(detect, "read_checkpoint", no_tensor_reads)
    config = _config(base_model=str(path), base_model_config=str(tiny_model), train_text_encoder=True)
    facts = network_facts(config)
    folder = network_facts(_config(base_model=str(tiny_model), train_text_encoder=True))
    assert (facts.unet_parameters, facts.text_encoder_parameters) == (
        folder.unet_parameters,
        folder.text_encoder_parameters,
    )
    assert facts.base_model_kind == "single_file" and facts.architecture_from == tiny_model


def _header_only_checkpoint(path: Path, text_encoder_prefix: str) -> Path:
    """A file with the keys version detection looks at, and tiny tensors: an SD 1.x/2.x file to the check."""
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1),
            f"{text_encoder_prefix}text_model.embeddings.token_embedding.weight": torch.zeros(1),
        },
        path,
    )
    return path


def test_full_size_sd15_count_without_memory(tmp_path: Path) -> None:
    path = _header_only_checkpoint(tmp_path / "v1-5.safetensors", "cond_stage_model.transformer.")
    facts = network_facts(_config(base_model=str(path), lora_rank=4, train_text_encoder=True))
    assert facts.sd_version == "sd_v1"
    assert facts.unet_parameters == SD15_UNET_RANK4_ATTENTION
    assert facts.text_encoder_parameters == SD15_TEXT_ENCODER_RANK4
    sd2 = _header_only_checkpoint(tmp_path / "v2-1.safetensors", "cond_stage_model.model.")
    assert network_facts(_config(base_model=str(sd2))).sd_version == "sd_v2"


def test_unknown_targets_get_the_training_message(tiny_model: Path) -> None:
    config = _config(
        base_model=str(tiny_model),
        target_modules=["to_q", "attn_q"],
        train_text_encoder=True,
        text_encoder_target_modules=["query"],
    )
    with pytest.raises(UserError) as checked:
        network_facts(config)
    family = load_family(str(tiny_model))
    with pytest.raises(UserError) as unet_error:
        family.add_lora(LoraTargets(["to_q", "attn_q"], None), LoraSpec(4, 4.0))
    with pytest.raises(UserError) as te_error:
        family.add_lora(LoraTargets(["to_q"], ["query"]), LoraSpec(4, 4.0))
    assert checked.value.messages == unet_error.value.messages + te_error.value.messages
    assert checked.value.messages[0].startswith("target_modules: 'attn_q' matches no layer of the UNet")


def test_output_files_and_an_earlier_run(tmp_path: Path) -> None:
    out = tmp_path / "ink_v1"
    config = _config(output_dir=str(out), save_steps=2)
    facts = output_facts(config, total_steps=5)
    assert facts.step_files == ["ink_v1-step00000002.safetensors", "ink_v1-step00000004.safetensors"]
    assert facts.final_files == ["pytorch_lora_weights.safetensors", "ink_v1.safetensors"]
    assert facts.logging_dir == out / "logs" and facts.existing_files == []
    out.mkdir()
    (out / "config.yaml").write_text("x")
    (out / "notes.txt").write_text("x")
    assert output_facts(config, total_steps=5).existing_files == ["config.yaml"]
    assert output_facts(_config(output_dir=str(out)), None).step_files is None
