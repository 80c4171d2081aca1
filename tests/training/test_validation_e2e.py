"""Validation through `lora-scripts train`: the loss curve in TensorBoard, `-best` is its argmin, early
stopping still writes the final files, and a resumed run remembers the best so far."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.cli import main
from lora_scripts.export.lora_file import read_lora_metadata
from lora_scripts.training import validation
from tests.training.conftest import make_dataset, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path: Path, model: Path, **values) -> Path:
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, n=8)
    settings = {
        "train_data_dir": str(data),
        "metadata_path": str(data / "metadata.csv"),
        "base_model": str(model),
        "resolution": 64,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "max_train_steps": 6,
        "validation_split": 0.25,
        "validate_every_n_steps": 2,
        "output_dir": str(tmp_path / "out" / "val_v1"),
        **values,
    }
    return write_config(tmp_path / "val.yaml", **settings)


def _scalars(out: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    return {event.step: event.value for event in acc.Scalars(tag)}


def test_best_file_is_the_argmin_of_the_logged_validation_loss(tmp_path, tiny_model_dir):
    assert main(["train", "--config", str(_config(tmp_path, tiny_model_dir))]) == 0
    out = tmp_path / "out" / "val_v1"
    losses = _scalars(out, "validation_loss")
    assert sorted(losses) == [2, 4, 6]
    best_step = min(losses, key=losses.get)
    meta = read_lora_metadata(out / "val_v1-best.safetensors")
    assert meta["ss_steps"] == str(best_step)
    assert float(meta["ss_validation_loss"]) == pytest.approx(losses[best_step], rel=1e-6)
    assert meta["ss_num_train_images"] == "6"  # 2 of the 8 images held out


def test_early_stopping_ends_the_run_with_its_final_files(tmp_path, tiny_model_dir, monkeypatch):
    measured = iter([1.0, 2.0, 3.0])
    monkeypatch.setattr(validation.Validator, "loss", lambda self, family: next(measured))
    config = _config(tmp_path, tiny_model_dir, early_stopping_patience=1)
    assert main(["train", "--config", str(config)]) == 0
    out = tmp_path / "out" / "val_v1"
    assert _scalars(out, "validation_loss") == {2: 1.0, 4: 2.0}  # no improvement at 4: stop
    assert read_lora_metadata(out / "val_v1.safetensors")["ss_steps"] == "4"
    assert read_lora_metadata(out / "val_v1-best.safetensors")["ss_steps"] == "2"


def test_a_resumed_run_keeps_the_best_so_far(tmp_path, tiny_model_dir, monkeypatch):
    # First run: best 1.0 at step 2, then stopped at step 4 (as Ctrl-C would, through the test hook).
    measured = iter([1.0, 2.0, 1.5])
    monkeypatch.setattr(validation.Validator, "loss", lambda self, family: next(measured))
    monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", "sigint@4")
    config = _config(tmp_path, tiny_model_dir, save_steps=2)
    assert main(["train", "--config", str(config)]) == 130
    out = tmp_path / "out" / "val_v1"
    assert read_lora_metadata(out / "val_v1-best.safetensors")["ss_steps"] == "2"
    # Resumed: 1.5 at step 6 does not beat the remembered 1.0 (a forgotten best would take it as the best).
    monkeypatch.delenv("LORA_SCRIPTS_TEST_FAULT")
    assert main(["train", "--config", str(config), "--resume", "auto"]) == 0
    assert _scalars(out, "validation_loss") == {2: 1.0, 4: 2.0, 6: 1.5}
    meta = read_lora_metadata(out / "val_v1-best.safetensors")
    assert meta["ss_steps"] == "2" and float(meta["ss_validation_loss"]) == 1.0
