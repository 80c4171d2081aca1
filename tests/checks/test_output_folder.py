"""`check` shows whether output_dir can take the run (new or there, writable, locked by a training) and
fails, as `train` would, when it cannot; it writes nothing to find out."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_scripts.cli import main
from lora_scripts.training.run_lock import LOCK_FILE_NAME, output_dir_lock

FOLDER_ROW = "  folder              "


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def with_output_dir(config: Path, out: Path) -> Path:
    values = yaml.safe_load(config.read_text(encoding="utf-8"))
    config.write_text(yaml.safe_dump({**values, "output_dir": str(out)}), encoding="utf-8")
    return config


def check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str, str]:
    """(exit code, JSON facts, text report, stderr of the text run)."""
    code = main(["check", "--config", str(config), "--json"])
    facts = json.loads(capsys.readouterr().out)
    assert main(["check", "--config", str(config)]) == code
    text = capsys.readouterr()
    return code, facts, text.out, text.err


def folder_row(text: str) -> str:
    (row,) = [line for line in text.splitlines() if line.startswith(FOLDER_ROW)]
    return row.removeprefix(FOLDER_ROW)


def test_a_new_output_dir_is_shown_writable_and_not_made(
    problem_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = problem_config.parent
    before = snapshot(root)
    code, facts, text, _ = check(problem_config, capsys)
    assert code == 0
    outputs = facts["outputs"]
    assert (outputs["exists"], outputs["writable"], outputs["lock"]) == (False, True, None)
    assert folder_row(text) == "new, writable (made when training starts)"
    assert snapshot(root) == before  # the test folder was made and removed again; out/ not made


def test_an_output_dir_under_a_file_is_an_error(
    problem_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = problem_config.parent / "notes.txt"
    notes.write_text("my notes", encoding="utf-8")
    out = notes / "run1"
    with_output_dir(problem_config, out)
    before = snapshot(problem_config.parent)
    code, facts, text, err = check(problem_config, capsys)
    expected = (
        f"output_dir: '{out}' cannot be created, because '{notes}' is a file, not a folder; choose another "
        "output_dir, or move that file away."
    )
    assert code == 2 and facts["errors"] == [expected] and err.splitlines() == [f"error: {expected}"]
    assert facts["outputs"]["writable"] is False
    assert folder_row(text) == "cannot be written (see the error below)"
    assert snapshot(problem_config.parent) == before


def test_an_output_dir_in_use_is_an_error(problem_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = problem_config.parent / "out" / "run1"
    with output_dir_lock(out):  # a training in this process: flock refuses any other open file, even ours
        holder = json.loads((out / LOCK_FILE_NAME).read_text(encoding="utf-8"))
        code, facts, text, err = check(problem_config, capsys)
    assert code == 2
    assert facts["errors"] == [
        f"output_dir: '{out}' is in use by another training (pid {os.getpid()} on host "
        f"'{socket.gethostname()}', started {holder['started']}, command: {holder['command']}); wait for it "
        f"to end or stop it, or choose another output_dir (its lock file is '{out / LOCK_FILE_NAME}')."
    ]
    assert facts["outputs"]["lock"] == {"file": str(out / LOCK_FILE_NAME), "state": "in_use", **holder}
    assert folder_row(text) == (
        f"in use by another training (pid {os.getpid()} on host '{socket.gethostname()}', started "
        f"{holder['started']}; see the error below)"
    )


def test_a_lock_left_by_an_ended_training_is_shown_not_refused(
    problem_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = problem_config.parent / "out" / "run1"
    out.mkdir(parents=True)
    record = {
        "pid": 4242,
        "host": socket.gethostname(),
        "started": "2025-01-02T03:04:05+00:00",
        "command": "x",
    }
    (out / LOCK_FILE_NAME).write_text(json.dumps(record), encoding="utf-8")  # its flock is free: it ended
    code, facts, text, _ = check(problem_config, capsys)
    assert code == 0 and facts["errors"] == []
    assert facts["outputs"]["lock"] == {"file": str(out / LOCK_FILE_NAME), "state": "stale", **record}
    assert folder_row(text) == "exists, writable; the lock left by an ended training (pid 4242) is taken over"
