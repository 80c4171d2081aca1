"""A NaN loss is caught at the step it appears: `nan_policy: stop` names the step, the causes and the last
good files and saves nothing more; `rollback` goes back to the last state with half the learning rate.

The NaN is injected by wrapping the loop's `diffusion_loss` (its k-th call is step k with batch 2 and no
accumulation), so the gradients, the optimizer and the weights really turn NaN, as they would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.cli import main
from lora_scripts.training import loop
from lora_scripts.training.nan_guard import NanGuard
from lora_scripts.training.state import list_states
from tests.training.conftest import write_config


def inject_nan(monkeypatch: pytest.MonkeyPatch, at_call: Callable[[int], bool]) -> None:
    real = loop.diffusion_loss
    calls = itertools.count(1)

    def diffusion_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if at_call(next(calls)) else loss

    monkeypatch.setattr(loop, "diffusion_loss", diffusion_loss)


@pytest.fixture
def config_for(tmp_path, tiny_model_dir, dataset_dir):
    def make(**overrides) -> Path:
        values = dict(
            train_data_dir=str(dataset_dir),
            metadata_path=str(dataset_dir / "metadata.csv"),
            base_model=str(tiny_model_dir),
            resolution=64,
            batch_size=2,
            max_train_steps=8,
            save_steps=2,
            output_dir=str(tmp_path / "out"),
        )
        return write_config(tmp_path / "run.yaml", **{**values, **overrides})

    return make


def scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(out / "logs" / "out"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_stop_names_the_step_the_causes_and_the_last_good_files(config_for, monkeypatch, capsys):
    config = config_for()
    inject_nan(monkeypatch, lambda call: call == 3)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    out = config.parent / "out"
    assert (
        "error: the loss became nan at step 3; training stopped and nothing was saved after it: the last "
        f"good LoRA file is {out / 'out-step00000002.safetensors'} and the last training state is "
        f"{out / 'state' / 'step-00000002'}." in err
    )
    assert "learning_rate too high (this step used 0.0001; try 5e-05 or lower)" in err
    assert "nan_policy: rollback" in err and "Traceback" not in err
    # nothing after step 2: no later LoRA file, no final file, no later state; TensorBoard up to step 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["out-step00000002.safetensors"]
    assert [p.name for p in list_states(out / "state")] == ["step-00000002"]
    assert [step for step, _ in scalars(out, "loss")] == [1, 2]


def test_rollback_goes_back_to_the_last_state_with_half_the_learning_rate(config_for, monkeypatch, capsys):
    config = config_for(nan_policy="rollback")
    inject_nan(monkeypatch, lambda call: call == 6)  # step 5 is trained and logged, step 6 is NaN
    assert main(["train", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    out = config.parent / "out"
    assert "The loss was nan at step 6: back to the state of step 4" in err
    assert "0.5 x the configured one (rollback 1 of 3)" in err
    lrs = scalars(out, "lr")
    assert [step for step, _ in lrs] == list(range(1, 9))  # step 5 once: its first try was purged
    assert [lr for _, lr in lrs] == pytest.approx([1e-4] * 4 + [5e-5] * 4)
    assert [step for step, _ in scalars(out, "loss")] == list(range(1, 9))
    final = safetensors.torch.load_file(out / "out.safetensors")
    assert all(t.float().isfinite().all() for t in final.values())


def test_rollback_before_the_first_save_uses_the_state_of_step_0(config_for, monkeypatch, capsys):
    config = config_for(nan_policy="rollback", max_train_steps=3)
    inject_nan(monkeypatch, lambda call: call == 1)
    assert main(["train", "--config", str(config)]) == 0
    assert "The loss was nan at step 1: back to the state of step 0" in capsys.readouterr().err
    assert [lr for _, lr in scalars(config.parent / "out", "lr")] == pytest.approx([5e-5] * 3)


def test_rollback_gives_up_after_three_tries(config_for, monkeypatch, capsys):
    config = config_for(nan_policy="rollback")
    inject_nan(monkeypatch, lambda call: call >= 3)  # every try of step 3 is NaN
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "rollback 3 of 3" in err
    assert "error: the loss became nan at step 3 after 3 rollbacks with half the learning rate each" in err
    assert "this step used 1.25e-05" in err  # 1e-4 halved three times
    assert not (config.parent / "out" / "out.safetensors").exists()


def test_the_causes_name_this_runs_risky_settings():
    guard = NanGuard(
        policy="stop",
        mixed_precision="fp16",
        noise_offset=0.3,
        min_snr_gamma=1.0,
        multires_noise_iterations=6,
    )
    messages = guard.stop_messages(float("inf"), step=12, lr=1e-3, last_file=None, last_state=None)
    assert messages[0] == (
        "the loss became inf at step 12; training stopped and nothing was saved after it: no LoRA file was "
        "saved before it."
    )
    causes = messages[1]
    assert causes.startswith(
        "likely causes: learning_rate too high (this step used 0.001; try 0.0005 or lower)"
    )
    assert "fp16 overflow (set mixed_precision: bf16" in causes and "a VAE that breaks in fp16" in causes
    assert "noise_offset 0.3" in causes and "min_snr_gamma 1" in causes
    assert "multires_noise_iterations 6" in causes
    assert "start again" in messages[2]  # no state to resume from
    plain = NanGuard("stop", "no", None, None, None).stop_messages(
        float("nan"), step=1, lr=1e-4, last_file=None, last_state=None
    )
    assert plain[1] == "likely causes: learning_rate too high (this step used 0.0001; try 5e-05 or lower)."
