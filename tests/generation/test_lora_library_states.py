"""A run's output_dir as a --lora-dir: its LoRA files are listed, its training states' LoRAs are not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.generation.lora_library import LoraLibrary
from lora_scripts.training.loop import train
from lora_scripts.training.state import list_states
from tests.training.conftest import make_dataset, tiny_run_settings, write_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A finished 3-step run saving every step (LoRA files and training states), plus what a kill leaves:
    a half-written state in `state/.tmp-step-00000004/`."""
    root = tmp_path_factory.mktemp("run")
    make_dataset(root / "data", n=4)
    output_dir = root / "out"
    settings = tiny_run_settings(
        root / "data", tiny_dir, max_train_steps=3, save_steps=1, output_dir=str(output_dir)
    )
    train(load_config(write_config(root / "run.yaml", **settings)))
    states = list_states(output_dir / "state")
    assert states and all((state / "lora.safetensors").is_file() for state in states)
    half_written = output_dir / "state" / ".tmp-step-00000004"
    half_written.mkdir()
    shutil.copy(states[-1] / "lora.safetensors", half_written / "lora.safetensors")
    return output_dir


def _run_loras(output_dir: Path) -> list[str]:
    """The names of the LoRA files training wrote at the top of `output_dir` (final and per-step files)."""
    return sorted((p.stem for p in output_dir.glob("*.safetensors")), key=str.lower)


def test_training_states_are_not_listed(run_dir: Path) -> None:
    library = LoraLibrary.scan([run_dir])
    assert "lora" not in library.names()
    assert library.names() == _run_loras(run_dir)
    assert all(f.path.parent == run_dir for f in library.files)


def test_a_state_lora_copied_elsewhere_is_recognised_by_its_keys(run_dir: Path, tmp_path: Path) -> None:
    state = list_states(run_dir / "state")[-1]
    shutil.copy(state / "lora.safetensors", tmp_path / "my_lora.safetensors")
    shutil.copy(run_dir / "pytorch_lora_weights.safetensors", tmp_path / "kept.safetensors")
    library = LoraLibrary.scan([tmp_path])
    assert [f.path.name for f in library.files] == ["kept.safetensors"]
    assert "my_lora" not in library.names()


def test_a_state_lora_given_by_path_says_what_to_use(run_dir: Path) -> None:
    path = list_states(run_dir / "state")[-1] / "lora.safetensors"
    with pytest.raises(UserError, match="is a training state's copy of the LoRA, kept to resume training"):
        LoraLibrary(folders=[], files=[]).resolve(str(path))


def test_generate_lists_only_the_runs_loras(
    run_dir: Path, tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "generate",
            "--base-model",
            str(tiny_dir),
            "--lora-dir",
            str(run_dir),
            "--prompt",
            "<lora:lora:1> a painting",
            "--output",
            str(tmp_path / "x.png"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    names = LoraLibrary.scan([run_dir]).names()
    assert f"error: <lora:lora>: no LoRA named 'lora' in '{run_dir}'." in err
    assert f"LoRAs found: {', '.join(names)}." in err
    assert not (tmp_path / "x.png").exists()
