"""The bench loops do their trainer's per-step bookkeeping, and ours gets train()'s speed switches."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.bench import loops, runner
from lora_scripts.bench.loops import OurLoop, ReferenceLoop
from lora_scripts.bench.workspace import BenchSettings, write_config
from lora_scripts.cli import main
from lora_scripts.models.tiny import build_tiny_sd
from tests.bench.conftest import SETTINGS, losses_of


def _scalars(loop, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(loop.config.logging_dir / f"bench_{loop.name}"))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return {}
    return {event.step: event.value for event in events.Scalars(tag)}


def test_reference_logs_every_step_like_diffusers(workspace):
    root, base_model = workspace
    loop = ReferenceLoop(write_config(root, SETTINGS, base_model, cache=False, reference=True), base_model)
    losses = losses_of(loop, 3)
    logged = _scalars(loop, "train_loss")
    assert sorted(logged) == [1, 2, 3]
    assert [logged[s] for s in (1, 2, 3)] == pytest.approx(losses, rel=1e-6)
    assert loop.bar.n == 3


def test_ours_reads_the_loss_every_logging_steps(workspace):
    root, base_model = workspace
    config = write_config(root, SETTINGS, base_model, cache=True).model_copy(update={"logging_steps": 2})
    loop = OurLoop(config, base_model)
    losses = losses_of(loop, 3)
    logged = _scalars(loop, "loss")
    # Steps 1-2 read together at step 2; step 3 is still on the device (the next read would log it).
    assert sorted(logged) == [1, 2]
    assert [logged[1], logged[2]] == pytest.approx(losses[:2], rel=1e-6)
    assert len(loop.pending.steps) == 1 and loop.bar.n == 3


def test_our_loop_gets_train_speed_switches_and_compile(workspace, monkeypatch):
    """Ours: train()'s speed switches and `torch_compile`; the reference: neither (diffusers has none)."""
    root, base_model = workspace
    switched, compiled = [], []
    monkeypatch.setattr(loops, "speed_switches", lambda family, device: switched.append(device.type))

    def fake_compile(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    settings = BenchSettings(**{**SETTINGS.__dict__, "torch_compile": True})
    ours = write_config(root, settings, base_model, cache=True)
    reference = write_config(root, settings, base_model, cache=False, reference=True)
    assert ours.torch_compile and not reference.torch_compile
    OurLoop(ours, base_model).close()
    assert switched == ["cpu"] and compiled == ["UNet2DConditionModel"]
    ReferenceLoop(reference, base_model).close()
    assert switched == ["cpu"] and compiled == ["UNet2DConditionModel"]


def test_bench_on_a_model_path(tmp_path, capsys):
    """`--model PATH`: the user's own model (a diffusers folder here), loaded by the real loading code."""
    path = build_tiny_sd(tmp_path / "my-model")
    args = ["bench", "--model", str(path), "--resolution", "64", "--steps", "1", "--warmup", "1"]
    assert main([*args, "--batch-size", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["model"] == str(path) and report["settings"]["resolution"] == 64
    assert report["images_per_sec"] > 0 and report["reference_images_per_sec"] > 0
    assert report["loops"]["ours"]["mean_loss"] == pytest.approx(report["loops"]["reference"]["mean_loss"])


def test_run_bench_measures_each_loop_alone_then_alternates_the_timed_rounds(monkeypatch):
    """Memory and the fairness loss from each loop alone; the timed rounds taken in turn, so that a slow
    stretch of a shared machine falls on both loops."""
    calls: list[tuple[str, int]] = []
    real_round = runner.timed_round

    # Seconds per step of the timed rounds 1-5: the machine is 3x slower in rounds 2 and 4, and in round 5
    # it slows down between our round and the reference's.
    fake = {"ours": [0.010, 0.030, 0.010, 0.030, 0.030], "reference": [0.015, 0.045, 0.015, 0.045, 0.015]}

    def spy(loop, settings, seed):
        calls.append((loop.name, seed))
        seconds, loss = real_round(loop, settings, seed)
        return (fake[loop.name][seed - 1] * settings.steps if seed else seconds), loss

    monkeypatch.setattr(runner, "timed_round", spy)
    report = runner.run_bench(SETTINGS)
    alternating = [(name, r) for r in range(1, runner.TIMED_ROUNDS + 1) for name in ("ours", "reference")]
    assert calls == [("reference", 0), ("ours", 0), *alternating]
    assert report["loops"]["ours"]["mean_loss"] == pytest.approx(report["loops"]["reference"]["mean_loss"])
    # Each loop's s/step is its median round; the speedup is the median of the back-to-back pairs (1.5x in 4
    # of 5), which the slowdown inside round 5 does not move; the ratio of the medians would say 0.5x.
    assert report["loops"]["ours"]["s_per_step"] == pytest.approx(0.030)
    assert report["loops"]["reference"]["s_per_step"] == pytest.approx(0.015)
    assert report["speedup_per_round"] == pytest.approx([1.5, 1.5, 1.5, 1.5, 0.5])
    assert report["speedup"] == pytest.approx(1.5)


@pytest.fixture
def tf32_flags():
    """Restores torch's process-wide TF32 switches after the test. monkeypatch cannot: torch serves
    `matmul.allow_tf32` through `__getattr__`, so pytest sees no attribute to restore and deletes it."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_each_loop_steps_under_its_own_tf32_switches(workspace, monkeypatch, tf32_flags):
    """TF32 is process-wide and both loops live in one process: ours steps with what train()'s speed
    switches set (on Ampere+ GPUs: on), the reference with torch's defaults, as diffusers leaves them."""
    root, base_model = workspace
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    matmul.allow_tf32, cudnn.allow_tf32 = False, True  # put back by the tf32_flags fixture
    monkeypatch.setattr(loops, "speed_switches", lambda family, device: setattr(matmul, "allow_tf32", True))
    ours = OurLoop(write_config(root, SETTINGS, base_model, cache=True), base_model)
    reference = ReferenceLoop(
        write_config(root, SETTINGS, base_model, cache=False, reference=True), base_model
    )
    seen = []
    real_loss = ReferenceLoop._loss
    monkeypatch.setattr(
        ReferenceLoop, "_loss", lambda self, *a: seen.append(matmul.allow_tf32) or real_loss(self, *a)
    )
    with ours.backend_flags():
        assert matmul.allow_tf32 is True
    losses_of(reference, 1)
    assert seen == [False]
    assert matmul.allow_tf32 is True  # what was set before the step, put back after it
    ours.close()


def test_bench_with_memory_profile_low(capsys):
    """`--memory-profile low`: train()'s preset in both loops (on a CPU: checkpointing, bf16, AdamW), the
    asked batch split into steps of 1 image; images/s counts the images a step really takes."""

    args = ["bench", "--steps", "4", "--warmup", "1", "--batch-size", "2", "--memory-profile", "low"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    s = report["settings"]
    assert s["memory_profile"] == "low" and s["effective_precision"] == "bf16"
    assert s["effective_gradient_checkpointing"] is True and s["effective_optimizer"] == "AdamW"
    assert s["images_per_step"] == 1 and s["gradient_accumulation_steps"] == 2
    for name in ("ours", "reference"):
        loop = report["loops"][name]
        assert loop["images_per_sec"] * loop["s_per_step"] == pytest.approx(1.0)
    # The same draws; in bf16 the cache (encoded in other batches) and the per-step encoding round apart.
    ours, reference = report["loops"]["ours"]["mean_loss"], report["loops"]["reference"]["mean_loss"]
    assert ours == pytest.approx(reference, rel=1e-3)


def test_memory_profile_low_leaves_the_preset_its_keys(workspace):
    root, base_model = workspace
    low = BenchSettings(**{**SETTINGS.__dict__, "memory_profile": "low"})
    ours = write_config(root, low, base_model, cache=True)
    reference = write_config(root, low, base_model, cache=False, reference=True)
    for config in (ours, reference):
        assert config.gradient_checkpointing and config.mixed_precision == "bf16"
        assert config.batch_size == 1 and config.gradient_accumulation_steps == SETTINGS.batch_size
    assert reference.optimizer_args == {}  # no foreach: the preset may choose AdamW8bit
    asked = BenchSettings(**{**low.__dict__, "precision": "no", "gradient_checkpointing": False})
    assert write_config(root, asked, base_model, cache=True).mixed_precision == "bf16"  # "no" = not asked


def test_quantize_base_applies_to_both_loops(workspace):
    """--quantize-base: the same 8-bit UNet in both loops (the bench compares the steps on one model), still
    computing the same losses."""
    from optimum.quanto import QTensor

    root, base_model = workspace
    settings = BenchSettings(**{**SETTINGS.__dict__, "quantize_base": "int8"})
    ours = OurLoop(write_config(root, settings, base_model, cache=True), base_model)
    reference = ReferenceLoop(
        write_config(root, settings, base_model, cache=False, reference=True), base_model
    )
    for loop in (ours, reference):
        assert loop.config.quantize_base == "int8"
        assert isinstance(loop.family.denoiser.conv_in.weight, QTensor)
    assert losses_of(ours, 2) == pytest.approx(losses_of(reference, 2), rel=1e-6, abs=1e-6)


def test_network_type_is_our_loops_only(workspace, capsys):
    """--network-type: our loop trains that network (peft's LoHa layers here); the reference stays diffusers'
    LoRA script, and the table says so."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lora import LoraLayer

    root, base_model = workspace
    settings = BenchSettings(**{**SETTINGS.__dict__, "network_type": "loha"})
    ours = OurLoop(write_config(root, settings, base_model, cache=True), base_model)
    reference = write_config(root, settings, base_model, cache=False, reference=True)
    assert ours.config.network_type == "loha" and reference.network_type == "lora"
    layers = [m for m in ours.family.denoiser.modules() if isinstance(m, (LoHaLayer, LoraLayer))]
    assert layers and all(isinstance(m, LoHaLayer) for m in layers)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses_of(ours, 2))
    from lora_scripts.bench.report import _header

    header = _header(
        {**SETTINGS.__dict__, "network_type": "loha", "resolution": 64, "effective_precision": "no"}
    )
    assert header.endswith("network loha (ours; the reference trains a LoRA)")
