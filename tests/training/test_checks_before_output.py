"""Everything that can fail before training (the config, the data, the base model, a writable output_dir) is
checked before a model loads and before output_dir is touched: through `lora-scripts train`, one `error:`
line, exit code 2, nothing written, and with `overwrite: true` the earlier run left where it was."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from lora_scripts.cli import main
from lora_scripts.training import loop
from lora_scripts.training import output_dir as output_dir_module
from tests.training.conftest import tiny_run_settings, write_config
from tests.training.test_output_dir import earlier_run, tree

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def no_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("the base model was loaded")


def train_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, **values: object
) -> list[str]:
    """Run `lora-scripts train` on a config of `values` (the model loader fails the test if reached); returns
    its `error:` lines after checking the exit code, that there is no traceback and that nothing was written
    under tmp_path."""
    cfg = write_config(tmp_path / "c.yaml", **values)
    monkeypatch.setattr(loop, "load_family", no_model)
    before = tree(tmp_path)
    code = main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert tree(tmp_path) == before  # no output folder, no cache, no backup: nothing
    return [line for line in err.splitlines() if line.startswith("error: ")]


# --- an output_dir that cannot be created or written ----------------------------------------------------


def test_output_dir_under_a_file(
    tmp_path: Path,
    tiny_model_dir: Path,
    dataset_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes", encoding="utf-8")
    out = notes / "runs" / "ink_v1"
    settings = tiny_run_settings(dataset_dir, tiny_model_dir, output_dir=str(out), cache_latents_to_disk=True)
    errors = train_errors(tmp_path, capsys, monkeypatch, **settings)
    assert errors == [
        f"error: output_dir: '{out}' cannot be created, because '{notes}' is a file, not a folder; choose "
        "another output_dir, or move that file away."
    ]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_output_dir_where_no_folder_can_be_made(
    tmp_path: Path,
    tiny_model_dir: Path,
    dataset_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/proc passes os.access for root (as the tests run) but takes no new folder: the probe finds it."""
    out = Path("/proc/lora-scripts-test/ink_v1")
    errors = train_errors(
        tmp_path, capsys, monkeypatch, **tiny_run_settings(dataset_dir, tiny_model_dir, output_dir=str(out))
    )
    assert errors == [
        f"error: output_dir: '{out}' cannot be written in '/proc' (a test folder could not be made: "
        f"{os.strerror(errno.ENOENT)}); choose an output_dir on a writable disk."
    ]


@pytest.mark.parametrize(
    ("read_only", "reason"), [(True, "read-only file system"), (False, "permission denied")]
)
def test_output_dir_in_a_folder_without_write_permission(
    tmp_path: Path,
    tiny_model_dir: Path,
    dataset_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    read_only: bool,
    reason: str,
) -> None:
    """A read-only disk or a folder of another user. The tests run as root, for whom chmod changes nothing:
    the operating system's answers are stood in for, for this one folder."""
    locked = tmp_path / "shared"
    locked.mkdir()
    out = locked / "ink_v1"
    real_access, real_statvfs = os.access, os.statvfs

    def access(path: os.PathLike, mode: int, **kwargs: object) -> bool:
        return False if Path(path) == locked and mode & os.W_OK else real_access(path, mode, **kwargs)

    def statvfs(path: os.PathLike) -> object:
        flags = real_statvfs(path).f_flag
        return SimpleNamespace(f_flag=flags | os.ST_RDONLY if read_only and Path(path) == locked else flags)

    monkeypatch.setattr(output_dir_module.os, "access", access)
    monkeypatch.setattr(output_dir_module.os, "statvfs", statvfs)
    errors = train_errors(
        tmp_path, capsys, monkeypatch, **tiny_run_settings(dataset_dir, tiny_model_dir, output_dir=str(out))
    )
    assert errors == [
        f"error: output_dir: '{out}' cannot be written in '{locked}' ({reason}); choose an output_dir on a "
        "writable disk."
    ]


# --- overwrite: true never moves the earlier run for a run that cannot start ------------------------------


def text_file(path: Path, model: Path) -> None:
    path.write_text("https://civitai.com/api/download/models/12345\n", encoding="utf-8")


def truncated(path: Path, model: Path) -> None:
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, path)
    path.write_bytes(path.read_bytes()[:-20])


def sdxl_refiner(path: Path, model: Path) -> None:
    keys = (
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.0.model.transformer.x.weight",
    )
    safetensors.torch.save_file({key: torch.zeros(2, 2) for key in keys}, path)


def folder_without_unet_weights(folder: Path, model: Path) -> None:
    """A copy of the tiny diffusers `model` whose unet/ lost its weights (an interrupted download)."""
    for file in model.rglob("*"):
        if file.is_file() and not (file.parent.name == "unet" and file.suffix == ".safetensors"):
            (folder / file.relative_to(model)).parent.mkdir(parents=True, exist_ok=True)
            (folder / file.relative_to(model)).write_bytes(file.read_bytes())


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        (
            "model.safetensors",
            text_file,
            "base_model: '{path}' is a text file (it starts with 'https://civitai.com/api/download/models/12345'"
            "), not a checkpoint; a failed download or a Git LFS pointer leaves such a file, so download the "
            "model again.",
        ),
        (
            "model.safetensors",
            truncated,
            "base_model: '{path}' is not a readable .safetensors file (Error while deserializing header: "
            "incomplete metadata, file not fully covered); it may be truncated or corrupt, so download it "
            "again.",
        ),
        (
            "sdxl_refiner.safetensors",
            sdxl_refiner,
            "base_model: '{path}' is an SDXL refiner checkpoint, which is not supported yet; lora-scripts "
            "trains SD 1.x, SD 2.x, SDXL and FLUX.1 base models.",
        ),
        (
            "tiny-sd",
            folder_without_unet_weights,
            "base_model: '{path}' has no weights in unet/ (no .safetensors or .bin file); the download may "
            "be incomplete, so download it again.",
        ),
    ],
    ids=["text file", "truncated", "SDXL refiner", "diffusers folder without weights"],
)
def test_overwrite_with_a_bad_base_model_leaves_the_earlier_run(
    tmp_path: Path,
    tiny_model_dir: Path,
    dataset_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    make: Callable[[Path, Path], None],
    expected: str,
) -> None:
    out = earlier_run(tmp_path / "out", state=True)
    path = tmp_path / "models" / name
    path.parent.mkdir()
    make(path, tiny_model_dir)
    settings = tiny_run_settings(dataset_dir, tiny_model_dir, output_dir=str(out), overwrite=True)
    errors = train_errors(tmp_path, capsys, monkeypatch, **(settings | {"base_model": str(path)}))
    assert errors == [f"error: {expected.format(path=path)}"]  # and tree(tmp_path) unchanged: nothing moved


def test_overwrite_with_a_missing_base_model_leaves_the_earlier_run(
    tmp_path: Path,
    tiny_model_dir: Path,
    dataset_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = earlier_run(tmp_path / "out", state=True)
    missing = tmp_path / "models" / "v1-5-pruned.safetensors"
    settings = tiny_run_settings(dataset_dir, tiny_model_dir, output_dir=str(out), overwrite=True)
    errors = train_errors(tmp_path, capsys, monkeypatch, **(settings | {"base_model": str(missing)}))
    assert len(errors) == 1 and f"base_model: '{missing}' does not exist" in errors[0]


def test_overwrite_with_a_good_model_still_moves_the_earlier_run(
    tmp_path: Path,
    tiny_model_dir: Path,
    dataset_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(output_dir_module, "_timestamp", lambda: "20250102-030405")
    out = earlier_run(tmp_path / "out", state=True)
    before = tree(out)
    cfg = write_config(
        tmp_path / "c.yaml",
        **tiny_run_settings(dataset_dir, tiny_model_dir, output_dir=str(out), overwrite=True),
    )
    assert main(["train", "--config", str(cfg)]) == 0, capsys.readouterr().err[-3000:]
    backup = out / "previous_runs" / "20250102-030405"
    assert tree(backup) == {k: v for k, v in before.items() if k != "notes.txt"}
    assert (out / "out.safetensors").is_file() and not (out / ".lora-scripts.lock").exists()
