"""Reading runs from their output folders (training/runs.py), as the GUI's runs page does: status, curves,
files and log, from progress files written here by hand. Real runs are read in test_progress_file.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from lora_scripts.training.run_lock import LOCK_FILE_NAME, output_dir_lock
from lora_scripts.training.runs import (
    find_runs,
    read_events,
    read_log_tail,
    read_run,
    request_stop,
)


def write_events(out: Path, *events: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "progress.jsonl", "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(e) + "\n" for e in events)


def start(resumed_from: int | None = None, *, pid: int = 1, time: float = 1000.0, total: int = 10) -> dict:
    return {
        "event": "start",
        "time": time,
        "pid": pid,
        "total_steps": total,
        "epochs": 2,
        "resumed_from": resumed_from,
        "config": "/work/c.yaml",
        "command": "lora-scripts train --config /work/c.yaml",
    }


def step(n: int, loss: float | None = None, *, time: float = 1000.0) -> dict:
    loss = n / 10 if loss is None else loss
    lr = {"unet": 1e-4 * n, "text_encoder": 5e-5}
    return {
        "event": "step",
        "step": n,
        "epoch": 1,
        "loss": loss,
        "lr": lr,
        "rate": 2.0,
        "eta_s": 3.0,
        "time": time,
    }


def end(status: str, n: int, *, pid: int = 1, time: float = 2000.0) -> dict:
    return {
        "event": "end",
        "status": status,
        "message": f"{status} at {n}",
        "step": n,
        "pid": pid,
        "time": time,
    }


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_finished_run(tmp_path):
    out = tmp_path / "run"
    write_events(out, start(), *(step(n) for n in range(1, 11)), end("finished", 10))
    run = read_run(out)
    assert (run.status, run.message, run.step, run.total_steps, run.epochs) == (
        "finished",
        "finished at 10",
        10,
        10,
        2,
    )
    assert run.steps == list(range(1, 11)) and run.loss == [n / 10 for n in range(1, 11)]
    assert run.lr == {"unet": [1e-4 * n for n in range(1, 11)], "text_encoder": [5e-5] * 10}
    assert run.config_path == Path("/work/c.yaml") and run.pid == 1
    assert (run.rate, run.eta_s, run.updated) == (2.0, None, 2000.0)  # no ETA once it is over
    assert not run.resumable  # no saved state


def test_a_stopped_run_resumed_keeps_each_step_once(tmp_path):
    out = tmp_path / "run"
    # stopped at 4 with its state; resumed; killed at 7 (state 6); resumed from 6 and finished
    write_events(out, start(), *(step(n) for n in range(1, 5)), end("stopped", 4))
    assert read_run(out).status == "stopped"
    write_events(out, start(4, pid=2), *(step(n, 1.0) for n in range(5, 8)))
    assert read_run(out).status == "crashed"  # a start without an end, and no run holds the lock
    write_events(out, start(6, pid=3), *(step(n, 2.0) for n in range(7, 11)), end("finished", 10, pid=3))
    run = read_run(out)
    assert run.status == "finished" and run.pid == 3
    assert run.steps == list(range(1, 11))
    assert run.loss == [0.1, 0.2, 0.3, 0.4, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]  # step 7 as trained last


def test_a_nan_rollback_replaces_the_steps_it_went_back_over(tmp_path):
    out = tmp_path / "run"
    write_events(out, start(), *(step(n) for n in range(1, 7)), *(step(n, 9.0) for n in range(5, 9)))
    assert read_run(out).steps == list(range(1, 9))
    assert read_run(out).loss[3:] == [0.4, 9.0, 9.0, 9.0, 9.0]


def test_a_killed_run_is_crashed_and_a_failure_before_start_is_failed(tmp_path):
    out = tmp_path / "run"
    write_events(out, start(), step(1))
    lock = {"pid": dead_pid(), "host": socket.gethostname(), "started": "x", "command": "c"}
    (out / LOCK_FILE_NAME).write_text(json.dumps(lock))  # left by a kill -9: nobody holds its flock
    run = read_run(out)
    assert (run.status, run.step, run.pid) == ("crashed", 1, 1)
    write_events(out, end("failed", 1, pid=5))  # a resume that failed while loading: no start of its own
    assert read_run(out).status == "failed"


def test_a_running_run_and_a_stop_request(tmp_path):
    out = tmp_path / "run"
    write_events(out, start(pid=os.getpid()), step(1), step(2))
    assert not request_stop(out)  # nothing holds the folder: no stop file
    assert not (out / "STOP").exists()
    with output_dir_lock(out):  # held as a run holds it, by this process
        run = read_run(out)
        assert (run.status, run.pid, run.step, run.eta_s, run.message) == (
            "running",
            os.getpid(),
            2,
            3.0,
            None,
        )
        assert request_stop(out)
        assert (out / "STOP").is_file()
        write_events(out, end("stopped", 2, pid=os.getpid()))
        assert read_run(out).status == "stopped"  # it has ended and is only letting go of the lock


def test_a_resume_still_loading_is_running(tmp_path):
    out = tmp_path / "run"
    write_events(out, start(pid=1), step(1), end("stopped", 1, pid=1))
    with output_dir_lock(out):  # the resume holds the lock; its start event comes after loading
        run = read_run(out)
        assert run.status == "running" and run.message is None


def test_no_progress_file(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert read_run(out).status == "unknown"
    with output_dir_lock(out):
        assert read_run(out).status == "running"  # loading: no start event yet


def test_events_are_read_in_whole_lines_from_an_offset(tmp_path):
    out = tmp_path / "run"
    write_events(out, start(), step(1))
    with open(out / "progress.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"event": "step", "st')  # the run is writing this line now
    events, offset = read_events(out)
    assert [e["event"] for e in events] == ["start", "step"]
    with open(out / "progress.jsonl", "a", encoding="utf-8") as fh:
        fh.write('ep": 2}\nnot json\n')
    more, offset = read_events(out, offset)
    assert more == [{"event": "step", "step": 2}]
    assert read_events(out, offset) == ([], offset)
    assert read_events(tmp_path / "none") == ([], 0)


def test_log_tail_as_a_terminal_shows_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert read_log_tail(out) == []
    (out / "train.log").write_bytes(
        b"first\r\nloading\n\rtraining: 1/4\rtraining: 2/4\rtraining: 4/4\nSaved x\n" + "é\n".encode()
    )
    assert read_log_tail(out) == ["first", "loading", "training: 4/4", "Saved x", "é"]
    assert read_log_tail(out, 2) == ["Saved x", "é"]
    assert read_run(out, log_lines=1).log_tail == ["é"]


def test_files_samples_and_states(tmp_path):
    out = tmp_path / "run"
    write_events(out, start(), step(1), end("stopped", 4))
    (out / "sample").mkdir()
    for name in (
        "x_s000004_p01_a_dog.png",
        "x_s000004_p00_a_cat.png",
        "x_s000000_p00_a_cat.png",
        "other.png",
    ):
        (out / "sample" / name).touch()
    for step_ in (2, 4):
        folder = out / "state" / f"step-{step_:08d}"
        folder.mkdir(parents=True)
        record = {"format": 1, "global_step": step_, "saved_at": float(step_)}
        (folder / "progress.json").write_text(json.dumps(record))
    (out / "state" / ".tmp-step-00000006").mkdir()  # a save cut short: not a state
    (out / "x-step00000002.safetensors").touch()
    os.utime(out / "x-step00000002.safetensors", (1, 1))
    (out / "x-step00000004.safetensors").touch()

    run = read_run(out)
    assert [(s.step, s.prompt_index, s.path.name) for s in run.samples] == [
        (0, 0, "x_s000000_p00_a_cat.png"),
        (4, 0, "x_s000004_p00_a_cat.png"),
        (4, 1, "x_s000004_p01_a_dog.png"),
    ]
    assert [(s.step, s.path.name) for s in run.states] == [(2, "step-00000002"), (4, "step-00000004")]
    assert [p.name for p in run.lora_files] == ["x-step00000002.safetensors", "x-step00000004.safetensors"]
    assert run.resumable


def test_find_runs_finds_run_folders_only(tmp_path):
    write_events(tmp_path / "output" / "old", start(time=10.0), end("finished", 10, time=20.0))
    write_events(tmp_path / "output" / "new", start(time=30.0), step(1, time=40.0))
    legacy = tmp_path / "output" / "group" / "legacy"  # a run from before progress files
    (legacy / "state").mkdir(parents=True)
    (legacy / "config.yaml").write_text("x: 1\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "config.yaml").write_text("x: 1\n")  # a config alone is not a run
    archived = tmp_path / "output" / "new" / "previous_runs" / "20250101-000000"
    write_events(archived, start())  # inside a run: not listed on its own
    (tmp_path / "output" / ".hidden" / "run").mkdir(parents=True)
    write_events(tmp_path / "output" / ".hidden" / "run", start())

    runs = find_runs([tmp_path, tmp_path / "missing"])
    found = [r.output_dir.relative_to(tmp_path).as_posix() for r in runs]
    assert sorted(found) == ["output/group/legacy", "output/new", "output/old"]
    assert found.index("output/new") < found.index("output/old")  # the latest updated first
    assert all(r.log_tail == [] for r in runs)
    assert find_runs([tmp_path / "output" / "old"])[0].status == "finished"  # a root that is a run
    assert find_runs([tmp_path], max_depth=1) == []
