"""`lora-scripts bench`: the reference loop computes our loss, the CLI's JSON and table, the MFU formula."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from accelerate.utils import set_seed

from lora_scripts.bench import runner
from lora_scripts.bench.loops import OurLoop, ReferenceLoop
from lora_scripts.bench.measure import PHASES
from lora_scripts.bench.reference import encode_reference_batch, reference_loss
from lora_scripts.bench.report import render_table
from lora_scripts.bench.runner import LoopFigures, build_report
from lora_scripts.bench.workspace import BenchSettings, write_config
from lora_scripts.cli import main
from lora_scripts.training.step import diffusion_loss
from tests.bench.conftest import SETTINGS, losses_of


def test_reference_loop_computes_our_loss_step_after_step(workspace):
    """Same seed, same batches: the cached step and the diffusers-style step give the same losses, also
    after optimizer updates (so both train the same LoRA the same way)."""
    root, base_model = workspace
    ours = losses_of(OurLoop(write_config(root, SETTINGS, base_model, cache=True), base_model), 3)
    reference = losses_of(ReferenceLoop(write_config(root, SETTINGS, base_model, cache=False), base_model), 3)
    assert len(set(ours)) == 3  # different batches and draws each step
    assert ours == pytest.approx(reference, rel=1e-6, abs=1e-6)


def test_reference_loss_equals_diffusion_loss_on_one_batch(workspace):
    root, base_model = workspace
    loop = ReferenceLoop(write_config(root, SETTINGS, base_model, cache=False), base_model)
    batch = next(loop.batches)
    family = loop.family
    set_seed(7)
    latents, hidden = encode_reference_batch(family, batch["pixel_values"], batch["captions"], loop.device)
    expected = reference_loss(family, latents, hidden)
    set_seed(7)
    ours_latents = family.sample_latents(family.encode_images(batch["pixel_values"]))
    cond = family.encode_prompts(batch["captions"], loop.device)
    ours = diffusion_loss(family, ours_latents, cond, loop.settings)
    torch.testing.assert_close(ours_latents, latents, rtol=0, atol=1e-6)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bench_cli_json(capsys):
    assert main(["bench", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("images_per_sec", "reference_images_per_sec", "speedup", "peak_memory_mb", "flops_per_image"):
        assert report[key] > 0, key
    assert report["device"] == "cpu" and report["mfu"] is None  # no MFU without a known GPU peak
    assert report["settings"]["model"] == "tiny" and report["settings"]["resolution"] == 64
    for name in ("ours", "reference"):
        loop = report["loops"][name]
        assert set(report["phases"][name]) == set(PHASES)
        assert all(v >= 0 for v in report["phases"][name].values())
        # The phases are contiguous slices of each step: they add up to the instrumented step time.
        assert math.isclose(
            sum(report["phases"][name].values()), loop["instrumented_s_per_step"], rel_tol=1e-9
        )
        assert math.isclose(loop["images_per_sec"] * loop["s_per_step"], 2, rel_tol=1e-9)
    # Identical draws in both loops: the same mean loss, so the speed comparison is like for like.
    assert report["loops"]["ours"]["mean_loss"] == pytest.approx(
        report["loops"]["reference"]["mean_loss"], 1e-6
    )
    ours_rounds = report["loops"]["ours"]["round_s_per_step"]
    reference_rounds = report["loops"]["reference"]["round_s_per_step"]
    assert len(ours_rounds) == len(reference_rounds) == runner.TIMED_ROUNDS
    assert report["speedup_per_round"] == pytest.approx(
        [r / o for o, r in zip(ours_rounds, reference_rounds, strict=True)]
    )
    assert report["speedup"] == pytest.approx(statistics.median(report["speedup_per_round"]))
    assert report["loops"]["ours"]["s_per_step"] == pytest.approx(statistics.median(ours_rounds))
    phases = report["phases"]["reference"]
    assert report["reference_unet_share"] == pytest.approx(
        (phases["forward"] + phases["backward"]) / report["loops"]["reference"]["instrumented_s_per_step"]
    )
    assert 0 < report["reference_unet_share"] < 1


def _figures(s_per_step: float, flops: int) -> LoopFigures:
    phases = dict.fromkeys(PHASES, s_per_step / 5)
    return LoopFigures(
        setup_s=1.0,
        s_per_step=s_per_step,
        round_s_per_step=[s_per_step] * 5,
        images_per_sec=4 / s_per_step,
        phases=phases,
        instrumented_s_per_step=s_per_step,
        peak_memory_mb={"allocated": 10.0, "reserved": 12.0},
        flops_per_step=flops,
        mean_loss=0.1,
    )


def test_mfu_is_flops_over_time_over_peak(monkeypatch):
    monkeypatch.setattr(runner, "peak_tflops", lambda device: 100.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    settings = BenchSettings(batch_size=4)
    # 20 TFLOP per step in 0.5 s = 40 TFLOP/s of a 100 TFLOP/s peak.
    effective = {"effective_precision": "bf16", "images_per_step": 4}
    report = build_report(
        settings, torch.device("cuda"), effective, _figures(0.5, 20 * 10**12), _figures(1.0, 1)
    )
    assert report["mfu"] == pytest.approx(0.4)
    assert report["flops_per_image"] == 5 * 10**12
    assert report["speedup"] == pytest.approx(2.0)
    assert report["peak_memory_mb"] == 10.0
    # The reference's UNet forward + backward are 2 of its 5 equal phases: the other 60% is all there is to
    # save with the same UNet, so the bound is 1 / 0.4.
    assert report["reference_unet_share"] == pytest.approx(0.4)
    assert report["speedup_bound_same_unet"] == pytest.approx(2.5)


def test_table_shows_speedup_phases_and_the_bound():
    effective = {"effective_precision": "no", "images_per_step": 4}
    report = build_report(BenchSettings(), torch.device("cpu"), effective, _figures(0.5, 1), _figures(1.0, 1))
    table = render_table(report)
    assert "model tiny, 64², batch 4, 10 steps after 2 warm-up, precision no, cache on" in table
    assert "speedup: 2.00x (median of 5 pairs of rounds, 2.00-2.00x)" in table
    assert "40% of the reference's step; with them unchanged, the rest can give at most 2.50x" in table
    # One row per phase, ours then the reference's (each 1/5 of its step), and the totals.
    rows = {line[:34].strip(): line[34:].split() for line in table.splitlines()}
    assert rows["VAE + text encoder / cache read"] == ["0.1000", "0.2000"]
    assert rows["total (instrumented run)"] == ["0.5000", "1.0000"]


def test_bench_rejects_bad_settings(capsys):
    assert main(["bench", "--steps", "0"]) == 2
    assert "--steps: 0" in capsys.readouterr().err
