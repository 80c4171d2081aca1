"""A full disk, a read-only output_dir and too little GPU memory end a run with one plain sentence; atomic
writes never leave a damaged or temporary file behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.export import lora_file
from lora_scripts.export.atomic import write_atomic
from lora_scripts.training import loop
from lora_scripts.training.failures import explain_failure
from tests.training.conftest import write_config

OUT = Path("/runs/ink")
DISK_FULL_RUST = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


def messages(exc: BaseException, **kwargs) -> list[str] | None:
    error = explain_failure(exc, output_dir=kwargs.pop("output_dir", OUT), **kwargs)
    return None if error is None else error.messages


DISK_FULL_TAIL = (
    "; free some space on that disk or choose an output_dir on another one, then run again (resume: auto "
    "continues from the last saved state); the files saved before are intact."
)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/runs/ink/ink-step00000020.safetensors"),
            "disk full while writing '/runs/ink/ink-step00000020.safetensors'" + DISK_FULL_TAIL,
        ),
        (
            OSError(errno.EDQUOT, "Disk quota exceeded", "/elsewhere/cache.safetensors"),
            "disk quota exceeded while writing '/elsewhere/cache.safetensors'" + DISK_FULL_TAIL,
        ),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            "disk full while writing into '/runs/ink'" + DISK_FULL_TAIL,
        ),
        (SafetensorError(DISK_FULL_RUST), "disk full while writing into '/runs/ink'" + DISK_FULL_TAIL),
        (
            RuntimeError("writer: No space left on device (os error 28)"),
            "disk full while writing into '/runs/ink'" + DISK_FULL_TAIL,
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/runs/ink/config.yaml"),
            "cannot write '/runs/ink/config.yaml' (read-only file system); choose a writable output_dir.",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/runs/ink/logs/events"),
            "cannot write '/runs/ink/logs/events' (permission denied); choose a writable output_dir.",
        ),
        (
            PermissionError(errno.EPERM, "Operation not permitted", "/runs"),  # mkdir of a parent folder
            "cannot write '/runs' (permission denied); choose a writable output_dir.",
        ),
    ],
    ids=[
        "ENOSPC",
        "EDQUOT",
        "no file name",
        "safetensors",
        "os error in message",
        "EROFS",
        "EACCES",
        "EPERM",
    ],
)
def test_disk_failures(exc: BaseException, expected: str) -> None:
    assert messages(exc) == [expected]


def test_the_cause_is_found_down_the_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/ink/ink.safetensors")
        except OSError as disk:
            raise RuntimeError("saving failed") from disk
    except RuntimeError as outer:
        assert messages(outer) == ["disk full while writing '/runs/ink/ink.safetensors'" + DISK_FULL_TAIL]


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(errno.EACCES, "Permission denied", "/data/images/a.png"),  # reading, not our output
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/runs/ink/x"),
        ValueError("a bug"),
        RuntimeError("expected scalar type Float but found Half"),
        KeyboardInterrupt(),
        UserError("already a sentence"),
    ],
    ids=["outside output_dir", "ENOENT", "ValueError", "RuntimeError", "KeyboardInterrupt", "UserError"],
)
def test_anything_else_is_not_explained(exc: BaseException) -> None:
    assert messages(exc) is None


def test_a_user_error_is_not_replaced_by_its_cause() -> None:
    error = UserError("base_model: 'x.ckpt' is not a readable PyTorch checkpoint.")
    error.__cause__ = OSError(errno.EACCES, "Permission denied", "/runs/ink/x")
    assert messages(error) is None


OOM = torch.OutOfMemoryError(
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB of which "
    "1.02 GiB is free."
)


def test_out_of_memory_names_the_keys_with_their_values(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path / "c.yaml",
            train_data_dir=str(tmp_path),
            base_model=str(_model_folder(tmp_path)),
            output_dir=str(tmp_path / "out"),
            batch_size=4,
            resolution=768,
            mixed_precision="no",
            cache_latents=False,
        )
    )
    assert messages(OOM, config=config) == [
        "out of GPU memory (tried to allocate 2.00 GiB); to use less, lower batch_size (now 4) (raise "
        "gradient_accumulation_steps to keep the effective batch) or resolution (now 768), set "
        "gradient_checkpointing: true (now false), cache_latents: true (now false), mixed_precision: bf16 or "
        "fp16 (now no) or memory_profile: low (all of these at once)."
    ]
    # switches already on are not suggested again
    frugal = config.model_copy(update={"cache_latents": True, "gradient_checkpointing": True})
    assert messages(OOM, config=frugal)[0].endswith(
        "or resolution (now 768), set mixed_precision: bf16 or fp16 (now no) or memory_profile: low (all of "
        "these at once)."
    )
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError  # what CUDA raises is what we catch


def test_out_of_memory_without_a_config() -> None:
    expected = [
        "out of GPU memory; to use less, lower batch_size (raise gradient_accumulation_steps to keep the "
        "effective batch) or resolution, set gradient_checkpointing: true, cache_latents: true, "
        "mixed_precision: bf16 or fp16 or memory_profile: low (all of these at once)."
    ]
    assert messages(torch.OutOfMemoryError("CUDA out of memory.")) == expected
    assert messages(RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)")) == expected


def _model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


# --- atomic writes ----------------------------------------------------------------------------------------


def test_disk_full_halfway_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "ink.safetensors"
    target.write_bytes(b"the old LoRA")

    def half_then_full(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError) as info:
        write_atomic(target, half_then_full)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)  # the real name, not .tmp
    assert target.read_bytes() == b"the old LoRA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ink.safetensors"]


def test_a_writer_reporting_the_disk_in_its_message_becomes_an_os_error(tmp_path: Path) -> None:
    target = tmp_path / "ink.safetensors"

    def safetensors_full(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise SafetensorError(DISK_FULL_RUST)

    with pytest.raises(OSError) as info:
        write_atomic(target, safetensors_full)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(target))
    assert isinstance(info.value.__cause__, SafetensorError)
    assert list(tmp_path.iterdir()) == []

    def other_failure(tmp: Path) -> None:
        raise SafetensorError("Error while serializing: wrong dtype")

    with pytest.raises(SafetensorError):  # not about the disk: passed on as it is
        write_atomic(target, other_failure)
    assert list(tmp_path.iterdir()) == []


def test_an_error_about_another_file_keeps_its_name(tmp_path: Path) -> None:
    def copy_from_unreadable(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/source/metadata.csv")

    with pytest.raises(PermissionError) as info:
        write_atomic(tmp_path / "metadata.csv.bak", copy_from_unreadable)
    assert info.value.filename == "/source/metadata.csv"


def test_interrupted_write_cleans_up(tmp_path: Path) -> None:
    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "a.bin", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "lora.safetensors", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(old)
    # 0644 like any file the user creates, not mkstemp's 0600 (unreadable to a WebUI run by another user)
    assert (tmp_path / "lora.safetensors").stat().st_mode & 0o777 == 0o644


# --- through `lora-scripts train` ------------------------------------------------------------------------


def test_disk_full_during_training(
    tmp_path: Path,
    tiny_model_dir: Path,
    dataset_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The second step file hits a full disk halfway: one sentence, exit 2, the first step file intact."""
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        train_data_dir=str(dataset_dir),
        metadata_path=str(dataset_dir / "metadata.csv"),
        base_model=str(tiny_model_dir),
        resolution=64,
        batch_size=3,
        max_train_steps=4,
        save_steps=1,
        output_dir=str(out),
    )
    save_file = safetensors.torch.save_file

    def filling_disk(tensors, filename, metadata=None):
        if Path(filename).name.startswith(".out-step00000002.safetensors."):  # write_atomic's temporary
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError(DISK_FULL_RUST)
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(lora_file.safetensors.torch, "save_file", filling_disk)

    code = main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    step2 = out / "out-step00000002.safetensors"
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: disk full while writing '{step2}'" + DISK_FULL_TAIL
    ]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["out-step00000001.safetensors"]
    assert not [p for p in out.rglob("*.tmp")]  # no temporary file left
    assert safetensors.torch.load_file(out / "out-step00000001.safetensors")  # the earlier file reads


def test_an_unexplained_failure_keeps_its_traceback(
    tmp_path: Path, dataset_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        train_data_dir=str(dataset_dir),
        metadata_path=str(dataset_dir / "metadata.csv"),
        base_model=str(_model_folder(tmp_path)),
        output_dir=str(tmp_path / "out"),
    )

    def bug(config, **_):
        raise ValueError("a bug")

    monkeypatch.setattr(loop, "train", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["train", "--config", str(cfg)])


def test_out_of_memory_through_the_cli(
    tmp_path: Path, dataset_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        train_data_dir=str(dataset_dir),
        metadata_path=str(dataset_dir / "metadata.csv"),
        base_model=str(_model_folder(tmp_path)),
        output_dir=str(tmp_path / "out"),
        gradient_checkpointing=True,
    )

    def oom(config, **_):
        raise OOM

    monkeypatch.setattr(loop, "train", oom)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: out of GPU memory (tried to allocate 2.00 GiB); to use less, lower batch_size (now 1)"
    )
    # gradient_checkpointing is already on in this run: not suggested again
    assert "gradient_checkpointing" not in err and "memory_profile: low" in err and err.count("\n") == 1


def test_a_full_disk_while_saving_a_training_state_is_explained(tmp_path: Path, monkeypatch) -> None:
    from lora_scripts.training import state

    def full_disk(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError) as info:
        state._save_torch(tmp_path / "out" / "state" / "optimizer.pt", {"step": torch.zeros(3)})
    assert info.value.errno == errno.ENOSPC
    explained = explain_failure(info.value, output_dir=tmp_path / "out")
    assert explained is not None and "disk full" in explained.messages[0]
    assert list((tmp_path / "out" / "state").iterdir()) == []  # no temporary file left behind
