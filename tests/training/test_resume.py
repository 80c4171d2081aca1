"""Exact resume: a run stopped by SIGINT, SIGTERM or `kill -9` (even during a save) and resumed ends with the
very same LoRA as the uninterrupted run, and TensorBoard has each step once.

The runs stop themselves at a chosen step through the test-only LORA_SCRIPTS_TEST_FAULT variable
(training/interrupt.py), so nothing depends on timing. Interrupted runs go through `python train.py` in a
subprocess where a real signal or kill is the point; resumes run in-process through `lora_scripts.cli.main`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.cli import main
from lora_scripts.training.state import latest_state, list_states, read_progress
from tests.training.conftest import make_dataset, write_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 8  # 6 images, batch 2: 3 batches per epoch, so steps 3 and 6 end an epoch and 4, 5, 7 do not


def make_config(tmp: Path, name: str, model: Path, data: Path, **overrides) -> Path:
    values = dict(
        train_data_dir=str(data),
        metadata_path=str(data / "metadata.csv"),
        base_model=str(model),
        resolution=64,
        batch_size=2,
        max_train_steps=STEPS,
        save_steps=2,
        output_dir=str(tmp / name),
        # every random path of a step: LoRA dropout, flips and caption shuffles, noise and timesteps
        network_dropout=0.1,
        flip_aug=True,
        shuffle_caption=True,
    )
    return write_config(tmp / f"{name}.yaml", **{**values, **overrides})


def final_lora(config: Path) -> dict[str, torch.Tensor]:
    out = config.parent / config.stem
    return safetensors.torch.load_file(out / f"{config.stem}.safetensors")


def assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA differs from the uninterrupted one"


def loss_curve(config: Path) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(config.parent / config.stem / "logs" / config.stem))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("loss")]


def run_script(config: Path, fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORA_SCRIPTS_TEST_FAULT": fault}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def resume(config: Path, monkeypatch: pytest.MonkeyPatch, fault: str | None = None) -> int:
    if fault:
        monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", fault)
    else:
        monkeypatch.delenv("LORA_SCRIPTS_TEST_FAULT", raising=False)
    return main(["train", "--config", str(config), "--resume", "auto"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, dataset_dir):
    """The uninterrupted run: its final LoRA, its loss curve and its output folder."""
    tmp = tmp_path_factory.mktemp("reference")
    config = make_config(tmp, "ref", tiny_model_dir, dataset_dir)
    assert main(["train", "--config", str(config)]) == 0
    return final_lora(config), loss_curve(config), tmp / "ref"


@pytest.fixture
def config_for(tmp_path, tiny_model_dir, dataset_dir):
    return lambda name, **overrides: make_config(tmp_path, name, tiny_model_dir, dataset_dir, **overrides)


def test_sigint_mid_epoch_then_resume_equals_uninterrupted(reference, config_for, monkeypatch, capsys):
    config = config_for("sigint")
    proc = run_script(config, "sigint@4")
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = config.parent / "sigint"
    # the step under way was finished, then its LoRA file and state were saved
    assert (out / "sigint-step00000004.safetensors").is_file()
    assert read_progress(out / "state" / "step-00000004") is not None
    assert not (out / "sigint.safetensors").exists()
    command = next(line for line in proc.stdout.splitlines() if line.startswith("To continue: "))
    argv = shlex.split(command.removeprefix("To continue: "))
    assert argv == ["python", str(REPO / "train.py"), "--config", str(config), "--resume", "auto"]

    assert main(["train", *argv[2:]]) == 0  # the printed command, in-process
    assert "Resuming from" in capsys.readouterr().err
    assert_same_lora(final_lora(config), reference[0])
    assert loss_curve(config) == reference[1]  # steps 1..8, each once, with the same losses


def test_kill_9_then_resume_equals_uninterrupted(reference, config_for, monkeypatch):
    config = config_for("killed")
    proc = run_script(config, "sigkill@5")
    assert proc.returncode == -9
    states = config.parent / "killed" / "state"
    assert latest_state(states) == states / "step-00000004"  # step 5 was trained, never saved
    assert resume(config, monkeypatch) == 0
    assert_same_lora(final_lora(config), reference[0])
    assert [step for step, _ in loss_curve(config)] == list(range(1, STEPS + 1))
    assert loss_curve(config) == reference[1]


def test_resumed_twice_and_sigterm(reference, config_for, monkeypatch, capsys):
    # resume: auto with nothing saved yet starts a new run
    config = config_for("twice", resume="auto")
    monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", "sigterm@3")
    assert main(["train", "--config", str(config)]) == 130
    assert "no saved training state" in capsys.readouterr().err
    assert resume(config, monkeypatch, "sigint@7") == 130
    assert "step 3 of 8, epoch 1 (3 of its batches done)" in capsys.readouterr().err
    assert resume(config, monkeypatch) == 0
    assert "step 7 of 8, epoch 3 (1 of its batches done)" in capsys.readouterr().err
    assert_same_lora(final_lora(config), reference[0])
    assert loss_curve(config) == reference[1]
    states = config.parent / "twice" / "state"
    assert [p.name for p in list_states(states)] == ["step-00000007", "step-00000008"]  # 2 newest kept


def test_killed_during_a_save_leaves_the_previous_files_valid(reference, config_for, monkeypatch, capsys):
    config = config_for("save_killed")
    proc = run_script(config, "sigkill-in-save@4")
    assert proc.returncode == -9
    out = config.parent / "save_killed"
    half = out / "state" / ".tmp-step-00000004"
    assert half.is_dir() and not (half / "progress.json").exists()  # killed half-way through
    assert [p.name for p in list_states(out / "state")] == ["step-00000002"]
    assert latest_state(out / "state") == out / "state" / "step-00000002"
    for path in (out / "state" / "step-00000002").glob("*.pt"):
        torch.load(path, weights_only=True)
    safetensors.torch.load_file(out / "state" / "step-00000002" / "lora.safetensors")
    for step in (2, 4):  # the LoRA files are written (atomically) before the state
        safetensors.torch.load_file(out / f"save_killed-step{step:08d}.safetensors")

    assert resume(config, monkeypatch) == 0
    assert "state/step-00000002: step 2 of 8" in capsys.readouterr().err
    assert_same_lora(final_lora(config), reference[0])
    assert not half.exists()  # the next save cleared it
    assert loss_curve(config) == reference[1]


def test_resume_with_gradient_accumulation(config_for, monkeypatch):
    """3 batches per epoch, 2 per step: the epoch's last step has one batch; resume after the first."""
    plain = config_for("accum_ref", gradient_accumulation_steps=2, max_train_steps=5, save_steps=None)
    assert main(["train", "--config", str(plain)]) == 0
    config = config_for("accum", gradient_accumulation_steps=2, max_train_steps=5, save_steps=None)
    monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", "sigint@3")  # epoch 2, after its first two batches
    assert main(["train", "--config", str(config)]) == 130
    assert read_progress(config.parent / "accum" / "state" / "step-00000003")["batches_in_epoch"] == 2
    assert resume(config, monkeypatch) == 0
    assert_same_lora(final_lora(config), final_lora(plain))


@pytest.fixture
def finished_run(reference, tmp_path, tiny_model_dir, dataset_dir):
    """A copy of the reference run's output folder (same name, so same output_name), with its config."""
    shutil.copytree(reference[2], tmp_path / "ref")
    return lambda **overrides: make_config(tmp_path, "ref", tiny_model_dir, dataset_dir, **overrides)


def test_changed_rank_is_refused_before_anything_is_written(finished_run, capsys):
    config = finished_run(lora_rank=4, seed=7)
    out = config.parent / "ref"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["train", "--config", str(config), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "lora_rank: 8 -> 4" in err and "seed: 42 -> 7" in err
    assert "set them back, or start a new run" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_changed_epochs_steps_and_learning_rate_are_allowed(finished_run, capsys):
    config = finished_run(epochs=20, max_train_steps=10, learning_rate=5e-5)
    assert main(["train", "--config", str(config), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    changes = next(line for line in err.splitlines() if line.startswith("Resuming with changed settings:"))
    assert "epochs: 10 -> 20" in changes and "max_train_steps: 8 -> 10" in changes
    assert "learning_rate: 0.0001 -> 5e-05" in changes and "lora_rank" not in changes
    assert "step 8 of 10" in err
    assert [step for step, _ in loss_curve(config)] == list(range(1, 11))
    acc = EventAccumulator(str(config.parent / "ref" / "logs" / "ref"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([1e-4] * 8 + [5e-5] * 2)  # the new rate


def test_state_saved_with_zero_terminal_snr_written_resumes_where_the_model_says_the_same(
    finished_run, capsys
):
    """A state whose config wrote zero_terminal_snr (every state saved before it could be left out has
    `false`) continues under a config leaving it out exactly when the base model says that value: the tiny
    model has no `ztsnr` marker, so false resumes and true is refused."""
    config = finished_run(max_train_steps=10)
    state_config = latest_state(config.parent / "ref" / "state") / "config.yaml"
    saved = state_config.read_text(encoding="utf-8")
    assert "zero_terminal_snr: null" in saved  # left out: what this run trained with came from the model
    state_config.write_text(
        saved.replace("zero_terminal_snr: null", "zero_terminal_snr: true"), encoding="utf-8"
    )
    assert main(["train", "--config", str(config), "--resume", "auto"]) == 2
    assert "zero_terminal_snr: true -> (unset)" in capsys.readouterr().err
    state_config.write_text(
        saved.replace("zero_terminal_snr: null", "zero_terminal_snr: false"), encoding="utf-8"
    )
    assert main(["train", "--config", str(config), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "step 8 of 10" in err and "zero_terminal_snr" not in err


def test_resume_path_that_is_not_a_state(config_for, tmp_path, capsys):
    config = config_for("nothing")
    (tmp_path / "empty").mkdir()
    assert main(["train", "--config", str(config), "--resume", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert f"resume: '{tmp_path / 'empty'}' is not a saved training state" in err
    assert not (tmp_path / "nothing").exists()


def test_newest_state_is_the_last_saved_and_incomplete_ones_are_never_taken(tmp_path):
    def state(name: str, step: int, saved_at: float | None) -> None:
        (tmp_path / name).mkdir()
        if saved_at is not None:
            record = {"format": 1, "global_step": step, "saved_at": saved_at}
            (tmp_path / name / "progress.json").write_text(json.dumps(record))

    state("step-00000006", 6, saved_at=100.0)  # a later step of a timeline abandoned by resuming from step 2
    state("step-00000004", 4, saved_at=200.0)
    state("step-00000008", 8, saved_at=None)  # killed before progress.json: incomplete
    state(".tmp-step-00000010", 10, saved_at=300.0)  # a temporary folder is never a state
    assert [p.name for p in list_states(tmp_path)] == ["step-00000006", "step-00000004"]
    assert latest_state(tmp_path) == tmp_path / "step-00000004"
    assert latest_state(tmp_path / "missing") is None


def test_changed_captions_are_refused(tmp_path, tiny_model_dir, monkeypatch, capsys):
    data = tmp_path / "data"
    make_dataset(data, n=4)
    config = make_config(tmp_path, "captions", tiny_model_dir, data, max_train_steps=4)
    monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", "sigint@2")
    assert main(["train", "--config", str(config)]) == 130
    monkeypatch.delenv("LORA_SCRIPTS_TEST_FAULT")
    csv = data / "metadata.csv"
    csv.write_text(csv.read_text(encoding="utf-8").replace("subject 1", "subject one"), encoding="utf-8")
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "resume: the training images or captions changed since the state" in err
    assert "(4 samples then, 4 now); put them back, or start a new run." in err
