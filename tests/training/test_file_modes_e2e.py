"""A real training run leaves every file and folder with the user's umask mode (0644/0755 under umask 022),
so a WebUI or ComfyUI running as another user can read the LoRA. See tests/export/test_file_modes.py."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_scripts.cli import main
from lora_scripts.training.caching import CACHE_FOLDER_NAME
from tests.training.conftest import make_dataset, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _written(root: Path) -> Iterator[Path]:
    """Every file and folder under `root` (root itself excluded)."""
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            yield Path(folder) / name


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_every_file_a_training_run_writes(tmp_path: Path, tiny_model_dir: Path, mask: int) -> None:
    """LoRA files (final, diffusers name, steps, best), states, config.yaml, the latent cache, sample images
    and TensorBoard's event files, all with the umask's mode."""
    data = tmp_path / "data"
    make_dataset(data, n=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ink wash painting, a cat --s 1\n", encoding="utf-8")
    out = tmp_path / "out" / "ink_v1"
    cfg = write_config(
        tmp_path / "run.yaml",
        train_data_dir=str(data),
        metadata_path=str(data / "metadata.csv"),
        base_model=str(tiny_model_dir),
        output_dir=str(out),
        resolution=64,
        batch_size=1,
        max_train_steps=4,
        save_steps=2,
        save_state=True,
        cache_latents_to_disk=True,
        validation_split=0.25,
        validate_every_n_steps=2,
        sample_prompts=str(prompts),
        sample_every_n_steps=4,
    )
    old = os.umask(mask)
    try:
        assert main(["train", "--config", str(cfg)]) == 0
    finally:
        os.umask(old)

    cache = data / CACHE_FOLDER_NAME
    written = [out, *_written(out), cache, *_written(cache)]
    names = {p.name for p in written}
    # what this run is meant to leave, so a missing kind of file cannot pass unnoticed
    for expected in (
        "ink_v1.safetensors",
        "pytorch_lora_weights.safetensors",
        "ink_v1-step00000002.safetensors",
        "ink_v1-best.safetensors",
        "config.yaml",
        "lora.safetensors",
        "optimizer.pt",
        "rng-0.pt",
    ):
        assert expected in names, expected
    assert any(p.suffix == ".png" for p in written)
    assert any(p.name.startswith("events.out.tfevents.") for p in written)
    assert any(p.parent == cache and p.suffix == ".safetensors" for p in written)

    wrong = {
        str(p.relative_to(tmp_path)): oct(_mode(p))
        for p in written
        if _mode(p) != (0o777 if p.is_dir() else 0o666) & ~mask
    }
    assert wrong == {}
