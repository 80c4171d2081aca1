"""The progress file and the stop file (training/progress_file.py): what a run writes for other programs,
and how another process stops it, as the GUI does."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.training.interrupt import StopRequest
from lora_scripts.training.loop import train
from lora_scripts.training.progress_file import ProgressFile, StopFile
from lora_scripts.training.runs import read_events, read_run, request_stop
from lora_scripts.training.state import latest_state
from tests.training.conftest import tiny_run_settings, write_config

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path: Path, model: Path, data: Path, name: str = "out", **overrides) -> Path:
    values = tiny_run_settings(data, model, output_dir=str(tmp_path / name), **overrides)
    return write_config(tmp_path / f"{name}.yaml", **values)


def _events(out: Path, kind: str | None = None) -> list[dict]:
    events, _ = read_events(out)
    return [e for e in events if kind is None or e["event"] == kind]


# --- the file itself ---


def test_steps_carry_rate_and_eta_measured_over_the_reads(tmp_path):
    now = [100.0]
    report = ProgressFile(tmp_path, config_path="c.yaml", clock=lambda: now[0])
    report.start(total_steps=100, epochs=5, resumed_from=None)
    now[0] = 110.0  # 10 steps in 10 s
    report.steps([(s, 0.5, [1e-4, 5e-5]) for s in range(1, 11)], epoch=1)
    now[0] = 115.0  # 10 more in 5 s: 20 steps in 15 s over both reads
    report.steps([(s, 0.25, [1e-4, 5e-5]) for s in range(11, 21)], epoch=2)
    report.end("finished", "done", 20)

    start, *steps, end = _events(tmp_path)
    assert start | {"time": None, "command": None} == {
        "event": "start",
        "time": None,
        "pid": os.getpid(),
        "total_steps": 100,
        "epochs": 5,
        "resumed_from": None,
        "config": os.path.abspath("c.yaml"),
        "command": None,
    }
    assert [s["step"] for s in steps] == list(range(1, 21))
    assert steps[0]["lr"] == {"unet": 1e-4, "text_encoder": 5e-5}
    assert steps[0]["rate"] == pytest.approx(1.0) and steps[0]["eta_s"] == pytest.approx(90.0)
    assert steps[-1]["rate"] == pytest.approx(20 / 15) and steps[-1]["eta_s"] == pytest.approx(80 / (20 / 15))
    assert steps[-1]["time"] == 115.0 and steps[-1]["epoch"] == 2
    assert end == {"event": "end", "status": "finished", "message": "done", "step": 20, "pid": os.getpid(),
                   "time": 115.0}  # fmt: skip


def test_paths_are_relative_and_nothing_is_written_by_other_processes(tmp_path):
    report = ProgressFile(tmp_path)
    report.sampled(2, [tmp_path / "sample" / "a.png"])
    report.sampled(3, [])  # not a sampling round: no event
    report.saved(2, tmp_path / "state" / "step-00000002", "state")
    assert _events(tmp_path) == [
        {"event": "sample", "step": 2, "files": ["sample/a.png"]},
        {"event": "save", "step": 2, "file": "state/step-00000002", "kind": "state"},
    ]
    other = tmp_path / "other"
    other.mkdir()
    ProgressFile(other, enabled=False).end("failed", "x")
    assert list(other.iterdir()) == []


def test_a_failing_write_is_logged_once(tmp_path, caplog):
    (tmp_path / "progress.jsonl").mkdir()
    report = ProgressFile(tmp_path)
    with caplog.at_level(logging.WARNING):
        report.start(total_steps=3, epochs=1, resumed_from=None)
        report.steps([(1, 0.1, [1e-3])], epoch=1)
        report.end("finished", "done")
    assert len(caplog.records) == 1 and "Cannot write the progress file" in caplog.records[0].message


def test_stop_file_is_looked_at_once_per_interval(tmp_path):
    now = [0.0]
    stop = StopFile(tmp_path, interval=1.0, clock=lambda: now[0])
    assert not stop.requested()
    stop.path.touch()
    now[0] = 0.5
    assert not stop.requested()  # looked at 0.5 s ago: not again yet
    now[0] = 1.0
    assert stop.requested()
    stop.remove()
    assert not stop.path.exists()
    stop.remove()  # gone already: nothing to do


def test_the_stop_file_sets_the_stop_request_as_a_signal_does(tmp_path):
    stop = StopRequest(StopFile(tmp_path, interval=0))
    one_process = SimpleNamespace(num_processes=1)
    assert not stop.agreed(one_process)
    (tmp_path / "STOP").touch()
    assert stop.agreed(one_process) and stop.signal_name == "STOP file"


# --- real runs ---


def test_a_run_writes_its_progress(tmp_path, tiny_model_dir, dataset_dir):
    config = _config(
        tmp_path,
        tiny_model_dir,
        dataset_dir,
        max_train_steps=4,
        save_steps=2,
        logging_steps=3,
        sample_prompts=["ink wash painting, a cat --s 2"],
        sample_every_n_steps=2,
    )
    out = tmp_path / "out"
    train(load_config(config), config_path=config)

    events = _events(out)
    start = events[0]
    assert start["event"] == "start" and start["pid"] == os.getpid()
    assert (start["total_steps"], start["resumed_from"], start["config"]) == (4, None, str(config))
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]  # read at 2 (save), 3 (logging_steps) and 4 (the end)
    assert all(math.isfinite(e["loss"]) and 0 < e["lr"]["unet"] <= 1e-3 for e in steps)
    assert steps[-1]["rate"] > 0 and steps[-1]["eta_s"] == 0
    samples = [e for e in events if e["event"] == "sample"]
    assert [e["step"] for e in samples] == [2, 4]
    assert all((out / f).is_file() for e in samples for f in e["files"])
    saves = [(e["step"], e["file"], e["kind"]) for e in events if e["event"] == "save"]
    assert saves == [
        (2, "out-step00000002.safetensors", "lora"),
        (2, "state/step-00000002", "state"),
        (4, "out-step00000004.safetensors", "lora"),
        (4, "state/step-00000004", "state"),
        (4, "pytorch_lora_weights.safetensors", "lora"),
        (4, "out.safetensors", "lora"),
    ]
    assert all((out / file).exists() for _, file, _ in saves)
    assert events[-1] | {"time": 0} == {
        "event": "end", "status": "finished", "message": "done at step 4", "step": 4, "pid": os.getpid(),
        "time": 0,
    }  # fmt: skip

    run = read_run(out)
    assert (run.status, run.step, run.total_steps, run.steps) == ("finished", 4, 4, [1, 2, 3, 4])
    assert run.loss == [e["loss"] for e in steps] and run.lr["unet"] == [e["lr"]["unet"] for e in steps]
    assert [(s.step, s.path.parent.name) for s in run.samples] == [(2, "sample"), (4, "sample")]
    assert [s.step for s in run.states] == [2, 4] and run.resumable
    assert {p.name for p in run.lora_files} == {name for _, name, kind in saves if kind == "lora"}
    assert run.config_path == config and run.eta_s is None


def test_a_progress_file_that_cannot_be_written_does_not_stop_the_run(
    tmp_path, tiny_model_dir, dataset_dir, capsys
):
    config = _config(tmp_path, tiny_model_dir, dataset_dir, max_train_steps=2, save_steps=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "progress.jsonl").mkdir()  # every open() of it fails
    assert main(["train", "--config", str(config)]) == 0
    assert (tmp_path / "out" / "out.safetensors").is_file()
    assert capsys.readouterr().err.count("Cannot write the progress file") == 1


def test_a_failing_run_ends_failed_with_its_reason(tmp_path, tiny_model_dir, dataset_dir, monkeypatch):
    config = _config(tmp_path, tiny_model_dir, dataset_dir, max_train_steps=3, save_steps=2)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "x.safetensors"))

    monkeypatch.setattr("lora_scripts.training.saving.save_lora_file", full_disk)
    with pytest.raises(OSError):
        train(load_config(config))
    end = _events(tmp_path / "out")[-1]
    assert (end["event"], end["status"], end["step"]) == ("end", "failed", 2)
    assert end["message"].startswith("disk full while writing")
    assert read_run(tmp_path / "out").status == "failed"


def test_the_stop_file_stops_a_run_like_ctrl_c_and_it_resumes(tmp_path, tiny_model_dir, dataset_dir):
    config = _config(tmp_path, tiny_model_dir, dataset_dir, max_train_steps=400, logging_steps=1)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 240
        while not _events(out, "step") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert read_run(out).status == "running"
        assert request_stop(out)  # as the GUI does, from another process
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    end = _events(out)[-1]
    stopped_at = end["step"]
    assert end["status"] == "stopped" and 0 < stopped_at < 400
    assert f"Stopped at step {stopped_at} (STOP file)" in stdout
    assert latest_state(out / "state") == out / "state" / f"step-{stopped_at:08d}"
    assert not (out / "STOP").exists()  # removed at the end
    run = read_run(out)
    assert run.status == "stopped" and run.resumable and run.step == stopped_at

    (out / "STOP").touch()  # as if a run had been killed after a stop request: must not stop the resume
    resumed = _config(
        tmp_path, tiny_model_dir, dataset_dir, max_train_steps=stopped_at + 2, logging_steps=1, resume="auto"
    )
    assert main(["train", "--config", str(resumed)]) == 0
    starts = _events(out, "start")
    assert [s["resumed_from"] for s in starts] == [None, stopped_at]
    assert _events(out)[-1]["status"] == "finished"
    run = read_run(out)
    assert run.status == "finished" and run.steps == list(range(1, stopped_at + 3))
    assert not (out / "STOP").exists()
