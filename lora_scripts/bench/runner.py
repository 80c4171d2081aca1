"""Run a benchmark: build the workspace, time our loop and the reference loop, return the figures."""

from __future__ import annotations

import gc
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from lora_scripts.bench.loops import BenchLoop, OurLoop, ReferenceLoop
from lora_scripts.bench.measure import (
    PHASES,
    PhaseClock,
    count_flops,
    peak_memory_mb,
    peak_tflops,
    reset_peak_memory,
)
from lora_scripts.bench.workspace import BenchSettings, make_images, prepare_base_model, write_config
from lora_scripts.devices import pick_device
from lora_scripts.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopFigures:
    """One loop's measurements. Times in seconds; phases are seconds per step from the instrumented run."""

    setup_s: float  # model load, LoRA, caches (not part of the step time)
    s_per_step: float  # timed run: no device syncs but one at the end
    images_per_sec: float
    phases: dict[str, float]
    instrumented_s_per_step: float  # == sum(phases): the clock's marks are contiguous
    peak_memory_mb: dict[str, float]
    flops_per_step: int | None
    mean_loss: float


TIMED_ROUNDS = 3


def time_loop(loop: BenchLoop, settings: BenchSettings, setup_s: float) -> LoopFigures:
    """Warm up (the first warm-up step under the FLOP counter), then TIMED_ROUNDS timed runs (the median
    counts) and an instrumented run of `settings.steps` steps each; the first timed run starts from the same
    seed in both loops (its mean loss is the fairness check)."""
    device = loop.device
    set_seed(0)  # both loops see the same batches and draws: same losses (a fairness check in the JSON)
    flops = None
    for i in range(settings.warmup):
        clock = PhaseClock(device, sync=False)
        clock.start()
        if i == 0:
            flops = count_flops(lambda c=clock: loop.step(c))
        else:
            loop.step(clock)
    memory_reset = reset_peak_memory(device)
    if not memory_reset:
        log.info("Peak RSS could not be reset: it covers the whole process.")
    # TIMED_ROUNDS timed runs, the median kept: one stall of another process on a shared machine then
    # cannot decide the figure. Each run syncs only once, at its end (reading its losses).
    round_times, mean_loss = [], float("nan")
    for round_index in range(TIMED_ROUNDS):
        set_seed(round_index)
        clock = PhaseClock(device, sync=False)
        losses = []
        clock.start()
        start = time.perf_counter()
        for _ in range(settings.steps):
            losses.append(loop.step(clock))
        loss = torch.stack(losses).float().mean().item()  # the only host sync of the timed run
        round_times.append(time.perf_counter() - start)
        mean_loss = loss if round_index == 0 else mean_loss
    elapsed = statistics.median(round_times)
    instrumented = PhaseClock(device, sync=True)
    instrumented.start()
    for _ in range(settings.steps):
        loop.step(instrumented)
    memory = peak_memory_mb(device)
    phases = {name: instrumented.totals[name] / settings.steps for name in PHASES}
    s_per_step = elapsed / settings.steps
    return LoopFigures(
        setup_s=setup_s,
        s_per_step=s_per_step,
        images_per_sec=settings.batch_size / s_per_step,
        phases=phases,
        instrumented_s_per_step=sum(phases.values()),
        peak_memory_mb=memory,
        flops_per_step=flops,
        mean_loss=mean_loss,
    )


@contextmanager
def _device_choice(device: str) -> Iterator[None]:
    """accelerate picks the device; `cpu` forces it through its ACCELERATE_USE_CPU switch."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device: '{device}' is not one of auto, cpu, cuda.")
    if device == "cuda":
        pick_device("cuda")  # a one-sentence error when there is no CUDA GPU
    if device != "cpu":
        yield
        return
    old = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = old


def _run_loop(cls: type[BenchLoop], root: Path, settings: BenchSettings, base_model: str, cache: bool):
    start = time.perf_counter()
    config = write_config(root, settings, base_model, cache=cache, reference=cls is ReferenceLoop)
    loop = cls(config, base_model)
    figures = time_loop(loop, settings, time.perf_counter() - start)
    device, precision = loop.device, loop.accelerator.mixed_precision
    del loop  # free this model before the next loop builds its own
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return figures, device, precision


def run_bench(settings: BenchSettings) -> dict:
    """Build everything in a temporary folder, time both loops, and return the report (see `report.py`)."""
    for name, value in (("--steps", settings.steps), ("--batch-size", settings.batch_size)):
        if value < 1:
            raise UserError(f"{name}: {value} is not allowed; use 1 or more.")
    if settings.warmup < 0:
        raise UserError(f"--warmup: {settings.warmup} is not allowed; use 0 or more.")
    if settings.image_size % 8:
        raise UserError(f"--resolution: {settings.image_size} is not a multiple of 8; use e.g. 512.")
    with tempfile.TemporaryDirectory(prefix="lora-scripts-bench-") as tmp, _device_choice(settings.device):
        root = Path(tmp)
        make_images(root / "data", settings.image_count, settings.image_size)
        base_model = prepare_base_model(root, settings.model)
        ours, device, precision = _run_loop(OurLoop, root, settings, base_model, settings.cache)
        reference, _, _ = _run_loop(ReferenceLoop, root, settings, base_model, False)
    return build_report(settings, device, precision, ours, reference)


def build_report(
    settings: BenchSettings, device: torch.device, precision: str, ours: LoopFigures, reference: LoopFigures
) -> dict:
    """The JSON-ready report: headline figures first, then per-loop details."""
    peak = peak_tflops(device)
    mfu = None
    if peak is not None and ours.flops_per_step is not None:
        mfu = ours.flops_per_step / ours.s_per_step / (peak * 1e12)
    main_memory = ours.peak_memory_mb.get("allocated", ours.peak_memory_mb.get("rss", 0.0))
    per_image = ours.flops_per_step / settings.batch_size if ours.flops_per_step is not None else None
    return {
        "images_per_sec": ours.images_per_sec,
        "s_per_step": ours.s_per_step,
        "reference_images_per_sec": reference.images_per_sec,
        "reference_s_per_step": reference.s_per_step,
        "speedup": reference.s_per_step / ours.s_per_step,
        "peak_memory_mb": main_memory,
        "reference_peak_memory_mb": reference.peak_memory_mb.get(
            "allocated", reference.peak_memory_mb.get("rss", 0.0)
        ),
        "flops_per_image": per_image,
        "mfu": mfu,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "settings": {
            **asdict(settings),
            "resolution": settings.image_size,
            "num_images": settings.image_count,
            "effective_precision": precision,
        },
        "phases": {"ours": ours.phases, "reference": reference.phases},
        "loops": {"ours": asdict(ours), "reference": asdict(reference)},
    }
