"""Ctrl-C and SIGTERM: the handlers, the second Ctrl-C, the resume command, and all processes of a
multi-process run stopping at the same step (training/interrupt.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from lora_scripts.cli import main
from lora_scripts.training.interrupt import FaultInjection, resume_command, stop_on_signals
from lora_scripts.training.state import latest_state, list_states, read_progress
from tests.helpers.ports import free_port
from tests.training.conftest import make_dataset, write_config

REPO = Path(__file__).resolve().parents[2]


def test_handlers_are_installed_then_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals():
        assert all(signal.getsignal(sig) is not handler for sig, handler in before.items())
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_first_signal_asks_to_stop_and_the_same_one_again_stops_at_once():
    with stop_on_signals() as request:
        assert request.signal_name is None
        os.kill(os.getpid(), signal.SIGINT)
        assert request.signal_name == "SIGINT"  # no exception: the step under way finishes
        os.kill(os.getpid(), signal.SIGTERM)  # what torchrun sends its workers after a Ctrl-C
        assert request.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_sigterm_asks_to_stop():
    with stop_on_signals() as request:
        os.kill(os.getpid(), signal.SIGTERM)
    assert request.signal_name == "SIGTERM"
    assert request.agreed(SimpleNamespace(num_processes=1))  # one process: no collective call


def test_resume_command_repeats_how_the_run_was_started():
    assert resume_command("configs/my lora.yaml", "train.py", environ={}) == (
        "python train.py --config 'configs/my lora.yaml' --resume auto"
    )
    assert (
        resume_command("c.yaml", "/usr/bin/lora-scripts", environ={})
        == "lora-scripts train --config c.yaml --resume auto"
    )


def test_resume_command_repeats_the_launcher_and_its_process_count():
    module = "/site-packages/lora_scripts/__main__.py"  # sys.argv[0] under `-m lora_scripts`
    accelerate_env = {"ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}
    assert resume_command("c.yaml", module, environ=accelerate_env) == (
        "accelerate launch --num_processes 2 -m lora_scripts train --config c.yaml --resume auto"
    )
    assert resume_command("c.yaml", "train.py", environ={"ACCELERATE_MIXED_PRECISION": "no"}) == (
        "accelerate launch train.py --config c.yaml --resume auto"
    )
    torchrun_env = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
    assert resume_command("c.yaml", module, environ=torchrun_env) == (
        "torchrun --nproc_per_node 4 -m lora_scripts train --config c.yaml --resume auto"
    )


def test_fault_injection_is_read_from_its_variable_only():
    assert FaultInjection.from_env({}) is None
    assert FaultInjection.from_env({"LORA_SCRIPTS_TEST_FAULT": "sigkill@5"}) == FaultInjection("sigkill", 5)
    assert FaultInjection.from_env({"LORA_SCRIPTS_TEST_FAULT": "sigint@3:1", "RANK": "0"}) is None
    assert FaultInjection.from_env({"LORA_SCRIPTS_TEST_FAULT": "sigint@3:1", "RANK": "1"}) is not None
    with pytest.raises(ValueError, match="expected"):
        FaultInjection.from_env({"LORA_SCRIPTS_TEST_FAULT": "explode@3"})


def _config(tmp_path: Path, model: Path, data: Path, **overrides) -> Path:
    values = dict(
        train_data_dir=str(data),
        metadata_path=str(data / "metadata.csv"),
        base_model=str(model),
        resolution=64,
        batch_size=2,
        max_train_steps=6,
        save_steps=2,
        output_dir=str(tmp_path / "out"),
    )
    return write_config(tmp_path / "run.yaml", **{**values, **overrides})


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_state(
    tmp_path, tiny_model_dir, dataset_dir, monkeypatch, capsys
):
    config = _config(tmp_path, tiny_model_dir, dataset_dir)
    monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", "sigint-twice@3")
    handler = signal.getsignal(signal.SIGINT)
    assert main(["train", "--config", str(config)]) == 130
    err = capsys.readouterr().err
    assert "Interrupted." in err and "Traceback" not in err
    states = tmp_path / "out" / "state"
    assert latest_state(states) == states / "step-00000002"
    assert [p.name for p in states.iterdir()] == ["step-00000002"]  # no half-written state
    assert not (tmp_path / "out" / "out-step00000003.safetensors").exists()
    for path in (states / "step-00000002").glob("*.pt"):
        torch.load(path, weights_only=True)
    assert signal.getsignal(signal.SIGINT) is handler  # put back


def test_ctrl_c_without_save_state_saves_the_lora_and_says_it_cannot_resume(
    tmp_path, tiny_model_dir, dataset_dir, monkeypatch, capsys
):
    config = _config(tmp_path, tiny_model_dir, dataset_dir, save_state=False)
    monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", "sigint@3")
    assert main(["train", "--config", str(config)]) == 130
    out = capsys.readouterr().out
    assert "Stopped at step 3 (SIGINT)" in out and "cannot be resumed" in out
    safetensors.torch.load_file(tmp_path / "out" / "out-step00000003.safetensors")
    assert not (tmp_path / "out" / "state").exists()


def _torchrun(config: Path, port: int, fault: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LORA_SCRIPTS_TEST_FAULT", None)
    if fault:
        env["LORA_SCRIPTS_TEST_FAULT"] = fault
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
    ]
    command += [str(REPO / "train.py"), "--config", str(config), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_a_signal_to_one_process_stops_all_at_the_same_step_and_resumes(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    make_dataset(data, n=8)  # 4 batches of 2, 2 per process: 2 steps per epoch
    reference = _config(tmp_path / "ref", tiny_model_dir, data, max_train_steps=5)
    assert _torchrun(reference, free_port(), None).returncode == 0
    config = _config(tmp_path, tiny_model_dir, data, max_train_steps=5)

    proc = _torchrun(config, free_port(), "sigint@3:1")  # rank 1 only
    assert proc.returncode != 0  # both processes end with 130
    assert proc.stdout.count("Stopped at step 3 (a signal to another process)") == 1  # rank 0 prints
    state = tmp_path / "out" / "state" / "step-00000003"
    assert sorted(p.name for p in state.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert read_progress(state)["num_processes"] == 2
    assert [p.name for p in list_states(state.parent)] == ["step-00000002", "step-00000003"]

    proc = _torchrun(config, free_port(), None, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Done: 5 steps") == 1
    a = safetensors.torch.load_file(tmp_path / "ref" / "out" / "out.safetensors")
    b = safetensors.torch.load_file(tmp_path / "out" / "out.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
