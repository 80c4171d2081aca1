"""An output_dir holding a run is refused (by `train` and `check`), kept for `resume`, and moved aside, never
deleted, with `overwrite: true`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lora_scripts.checks import check_config_file
from lora_scripts.errors import UserError
from lora_scripts.training import output_dir as output_dir_module
from lora_scripts.training.output_dir import STATE_FOLDER, prepare_output_dir, run_files, will_resume
from lora_scripts.training.state import FORMAT_VERSION, PROGRESS_FILE, state_name
from tests.training.conftest import write_config


def earlier_run(out: Path, *, state: bool = False) -> Path:
    """What a finished run leaves, plus a file of the user's and a temporary file of a killed save."""
    (out / "logs" / "run").mkdir(parents=True)
    (out / "logs" / "run" / "events.out.tfevents.1").write_bytes(b"tb")
    (out / "sample").mkdir()
    (out / "sample" / "0001.png").write_bytes(b"png")
    (out / "config.yaml").write_text("lora_rank: 8\n", encoding="utf-8")
    (out / "run.safetensors").write_bytes(b"final")
    (out / "run-step00000010.safetensors").write_bytes(b"step 10")
    (out / ".run.safetensors.1a2b3c4d.tmp").write_bytes(b"half")
    (out / "notes.txt").write_text("my notes", encoding="utf-8")
    if state:
        saved_state(out)
    return out


def saved_state(out: Path) -> Path:
    """A complete training state as training/state.py writes it (progress.json marks it complete)."""
    folder = out / STATE_FOLDER / state_name(10)
    folder.mkdir(parents=True)
    (folder / "optimizer.bin").write_bytes(b"adam")
    progress = {"format": FORMAT_VERSION, "global_step": 10, "saved_at": 1.0}
    (folder / PROGRESS_FILE).write_text(json.dumps(progress), encoding="utf-8")
    return folder


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (folders as "dir")."""
    return {
        p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def test_run_files_are_what_a_run_leaves(tmp_path: Path) -> None:
    out = earlier_run(tmp_path / "out", state=True)
    (out / "previous_runs").mkdir()
    assert run_files(out) == [
        "config.yaml",
        "logs/",
        "run-step00000010.safetensors",
        "run.safetensors",
        "sample/",
        "state/",
    ]
    assert run_files(tmp_path / "missing") == []
    notes_only = tmp_path / "notes_only"
    notes_only.mkdir()
    (notes_only / "notes.txt").write_text("x")
    (notes_only / "previous_runs").mkdir()
    assert run_files(notes_only) == []


def test_a_run_is_refused_and_nothing_is_touched(tmp_path: Path) -> None:
    out = earlier_run(tmp_path / "out")
    before = tree(tmp_path)
    with pytest.raises(UserError) as info:
        prepare_output_dir(out, overwrite=False, resuming=False)
    assert info.value.messages == [
        f"output_dir: '{out}' already holds a run (config.yaml, logs/, run-step00000010.safetensors, "
        f"run.safetensors, sample/); set overwrite: true to replace it (the old files are moved to "
        f"{out}/previous_runs/; it has no saved state to resume), or choose another output_dir."
    ]
    assert tree(tmp_path) == before


def test_a_run_with_a_state_suggests_resume(tmp_path: Path) -> None:
    out = earlier_run(tmp_path / "out", state=True)
    (out / "logs").rename(out / "old_logs")  # keep the list short: config, 2 LoRA files, sample/, state/
    with pytest.raises(UserError) as info:
        prepare_output_dir(out, overwrite=False, resuming=False)
    assert info.value.messages == [
        f"output_dir: '{out}' already holds a run (config.yaml, run-step00000010.safetensors, "
        f"run.safetensors, sample/, state/); set resume: auto to continue it, overwrite: true to start again "
        f"(the old files are moved to {out}/previous_runs/), or choose another output_dir."
    ]


def test_resume_auto_without_a_complete_state_says_so(tmp_path: Path) -> None:
    out = earlier_run(tmp_path / "out")
    (out / STATE_FOLDER / f".tmp-{state_name(10)}").mkdir(parents=True)  # killed during its first save
    with pytest.raises(UserError) as info:
        prepare_output_dir(out, overwrite=False, resuming=False, resume_requested=True)
    (message,) = info.value.messages
    assert "resume: auto found no complete training state in it to continue from" in message
    assert message.endswith(
        f"set overwrite: true to start again (the old files are moved to {out}/previous_runs/), or choose "
        "another output_dir."
    )


def test_nothing_to_do_for_a_new_folder_or_a_resumed_run(tmp_path: Path) -> None:
    assert prepare_output_dir(tmp_path / "new", overwrite=False, resuming=False) is None
    assert not (tmp_path / "new").exists()  # not even created: train() does that when it writes
    out = earlier_run(tmp_path / "out", state=True)
    before = tree(out)
    assert prepare_output_dir(out, overwrite=False, resuming=True) is None
    assert prepare_output_dir(out, overwrite=True, resuming=True) is None  # resuming wins: keep the run
    assert tree(out) == before


def test_overwrite_moves_the_run_into_a_dated_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_dir_module, "_timestamp", lambda: "20250102-030405")
    out = earlier_run(tmp_path / "out", state=True)
    before = tree(out)

    backup = prepare_output_dir(out, overwrite=True, resuming=False)

    assert backup == out / "previous_runs" / "20250102-030405"
    moved = {k: v for k, v in before.items() if not k.startswith("notes.txt")}
    assert tree(backup) == moved  # every byte of the run, nothing lost
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "previous_runs"]  # the user's file stays
    assert run_files(out) == []

    # Another run in the same second: a second backup beside the first, the first untouched.
    earlier_run(out)
    second = prepare_output_dir(out, overwrite=True, resuming=False)
    assert second == out / "previous_runs" / "20250102-030405-2"
    assert tree(backup) == moved
    assert (second / "run.safetensors").read_bytes() == b"final"


def test_a_file_as_output_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(UserError) as info:
            prepare_output_dir(tmp_path / "out", overwrite=overwrite, resuming=False)
        assert info.value.messages == [
            f"output_dir: '{tmp_path / 'out'}' is a file, not a folder; choose a folder for the run's files."
        ]


def test_will_resume(tmp_path: Path) -> None:
    out = earlier_run(tmp_path / "out")
    assert not will_resume(out, None)
    assert not will_resume(out, "auto")  # no state: auto starts fresh, which would replace the run
    assert will_resume(out, str(tmp_path / "some_state"))
    (out / STATE_FOLDER / ".tmp-step-00000012").mkdir(parents=True)  # a save killed halfway
    assert not will_resume(out, "auto")
    saved_state(out)
    assert will_resume(out, "auto")


@pytest.mark.parametrize(
    ("settings", "state", "error", "warning"),
    [
        ({}, False, True, False),
        ({"overwrite": True}, False, False, True),
        ({"resume": "auto"}, True, False, False),
        ({"resume": "auto"}, False, True, False),  # nothing to resume: same as a new run
    ],
    ids=["refused", "overwrite", "resume", "resume without state"],
)
def test_check_reports_an_earlier_run_as_train_does(
    tmp_path: Path,
    tiny_model_dir: Path,
    dataset_dir: Path,
    settings: dict,
    state: bool,
    error: bool,
    warning: bool,
) -> None:
    out = earlier_run(tmp_path / "out", state=state)
    cfg = write_config(
        tmp_path / "c.yaml",
        train_data_dir=str(dataset_dir),
        metadata_path=str(dataset_dir / "metadata.csv"),
        base_model=str(tiny_model_dir),
        resolution=64,
        output_dir=str(out),
        **settings,
    )
    report = check_config_file(cfg)
    refused = [e for e in report.errors if e.startswith(f"output_dir: '{out}' already holds a run")]
    assert len(refused) == error and len(report.errors) == error
    notes = [w for w in report.warnings if w.startswith(f"output_dir: '{out}' already holds a run")]
    assert notes == (
        [
            f"output_dir: '{out}' already holds a run (config.yaml, logs/, run-step00000010.safetensors, "
            f"run.safetensors, sample/); overwrite: true moves its files to {out}/previous_runs/"
            "YYYYmmdd-HHMMSS/ before training starts."
        ]
        if warning
        else []
    )
