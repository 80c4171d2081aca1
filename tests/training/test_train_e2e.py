"""A real training run through `python train.py --config …` on the tiny model, and what it leaves behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.export.lora_file import read_lora_metadata

REPO = Path(__file__).resolve().parents[2]

# The seed's ink_painting.yaml, verbatim apart from paths, resolution and length (tiny model, CPU).
SEED_STYLE_CONFIG = """\
train_data_dir: "./data/ink_painting"
metadata_path: "./data/ink_painting/metadata.csv"
base_model: "./models/tiny-sd"
lora_rank: 8
target_modules: ["to_q", "to_v"]
batch_size: 4
epochs: 15
learning_rate: 2e-4
output_dir: "./output/ink_painting_v1"
save_steps: 10
resolution: 64
lora_alpha: 4
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, dataset_dir):
    """Train once from a working directory with relative paths, as the user does."""
    work = tmp_path_factory.mktemp("run")
    shutil.copytree(dataset_dir, work / "data" / "ink_painting")
    shutil.copytree(tiny_model_dir, work / "models" / "tiny-sd")
    (work / "configs").mkdir()
    (work / "configs" / "ink_painting.yaml").write_text(SEED_STYLE_CONFIG)
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", "configs/ink_painting.yaml"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "output" / "ink_painting_v1", proc


def test_steps_and_files(trained_run):
    out, proc = trained_run
    # 6 images, batch 4 → 2 batches (partial included) per epoch × 15 epochs = 30 steps
    assert sorted(p.name for p in out.glob("*-step*.safetensors")) == [
        "ink_painting_v1-step00000010.safetensors",
        "ink_painting_v1-step00000020.safetensors",
        "ink_painting_v1-step00000030.safetensors",
    ]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "ink_painting_v1.safetensors").is_file()
    a = safetensors.torch.load_file(out / "pytorch_lora_weights.safetensors")
    b = safetensors.torch.load_file(out / "ink_painting_v1.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    last_step = safetensors.torch.load_file(out / "ink_painting_v1-step00000030.safetensors")
    assert all((a[k] == last_step[k]).all() for k in a)
    assert "Trainable LoRA parameters" in proc.stderr


def test_resolved_config_yaml(trained_run):
    out, _ = trained_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["learning_rate"] == pytest.approx(0.0002)
    assert cfg["output_name"] == "ink_painting_v1"
    assert cfg["lora_alpha"] == 4
    assert Path(cfg["logging_dir"]) == Path("output/ink_painting_v1/logs")


def test_tensorboard_has_a_loss_point_per_step(trained_run):
    out, _ = trained_run
    event_dirs = {p.parent for p in (out / "logs").rglob("events.out.tfevents.*")}
    assert len(event_dirs) == 1
    acc = EventAccumulator(str(event_dirs.pop()))
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 31))
    assert all(0 < e.value < 10 for e in loss)
    assert [e.step for e in acc.Scalars("lr")] == list(range(1, 31))
    assert acc.Scalars("lr")[0].value == pytest.approx(2e-4)


def test_kohya_keys_only(trained_run):
    out, _ = trained_run
    sd = safetensors.torch.load_file(out / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("lora_unet_") for k in sd)
    names = {k.split(".")[0] for k in sd}
    assert all({f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"} <= sd.keys() for n in names)
    assert len(sd) == 3 * len(names)
    assert {n.rsplit("_", 1)[-1] for n in names} == {"q", "v"}  # ..._to_q / ..._to_v only
    assert (
        sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0]
        == 8
    )
    assert all(v.dtype.is_floating_point and v.element_size() == 2 for v in sd.values())  # fp16 default


def test_metadata(trained_run):
    out, _ = trained_run
    final = read_lora_metadata(out / "pytorch_lora_weights.safetensors")
    assert final["ss_output_name"] == "ink_painting_v1"
    assert read_lora_metadata(out / "ink_painting_v1.safetensors")["ss_output_name"] == "ink_painting_v1"
    step = read_lora_metadata(out / "ink_painting_v1-step00000010.safetensors")
    assert step["ss_output_name"] == "ink_painting_v1-step00000010"
    assert step["ss_steps"] == "10"
    assert final["ss_steps"] == "30" and final["ss_epoch"] == "15"
    assert final["ss_network_module"] == "networks.lora"
    assert final["ss_network_dim"] == "8" and final["ss_network_alpha"] == "4"
    assert json.loads(final["ss_network_args"]) == {"target_modules": ["to_q", "to_v"]}
    assert final["ss_base_model_version"] == "sd_v1" and final["ss_v2"] == "False"
    assert final["ss_resolution"] == "(64, 64)"
    assert final["ss_num_train_images"] == "6"
    assert final["ss_learning_rate"] == "0.0002"
    assert final["ss_sd_model_name"] == "tiny-sd"
    tags = json.loads(final["ss_tag_frequency"])
    assert tags["ink_painting"]["ink wash painting"] == 6
    assert float(final["ss_training_started_at"]) > 1.7e9
    assert final["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert final["modelspec.prediction_type"] == "epsilon"
    assert final["modelspec.resolution"] == "64x64"
    assert final["modelspec.title"] == "ink_painting_v1"


def test_model_hash_recomputed_from_file(trained_run):
    out, _ = trained_run
    for path in out.glob("*.safetensors"):
        raw = path.read_bytes()
        header = int.from_bytes(raw[:8], "little")
        meta = read_lora_metadata(path)
        assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header :]).hexdigest()
        assert len(meta["sshs_legacy_hash"]) == 8


def test_lora_moved_away_from_zero_init(trained_run):
    out, _ = trained_run
    sd = safetensors.torch.load_file(out / "pytorch_lora_weights.safetensors")
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert all(v.abs().max() > 0 for v in ups)  # peft/kohya init lora_up at zero; training moved them
