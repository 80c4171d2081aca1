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
from lora_scripts.bench.reference import no_reference_reason
from lora_scripts.bench.workspace import (
    BenchSettings,
    make_images,
    model_version,
    prepare_base_model,
    write_config,
)
from lora_scripts.devices import pick_device
from lora_scripts.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopFigures:
    """One loop's measurements. Times in seconds; phases are seconds per step from the instrumented run."""

    setup_s: float  # model load, LoRA, caches (not part of the step time)
    s_per_step: float  # the median timed round's (no device syncs but one at each round's end)
    round_s_per_step: list[float]  # each timed round's, in the order they ran
    images_per_sec: float
    phases: dict[str, float]
    instrumented_s_per_step: float  # == sum(phases): the clock's marks are contiguous
    peak_memory_mb: dict[str, float]
    flops_per_step: int | None
    mean_loss: float


TIMED_ROUNDS = 5


@dataclass
class AloneFigures:
    """What one loop measures while it is the only model in the process: memory, FLOPs, the fairness loss."""

    images_per_step: int  # the loop's batch size (memory_profile: low splits the asked batch into 1s)
    setup_s: float
    peak_memory_mb: dict[str, float]
    flops_per_step: int | None
    mean_loss: float


def warm_up(loop: BenchLoop, settings: BenchSettings, *, count_first: bool) -> int | None:
    """`settings.warmup` untimed steps from seed 0 (the first under the FLOP counter when `count_first`);
    returns the FLOPs of that first step."""
    set_seed(0)  # both loops see the same batches and draws: same losses (a fairness check in the JSON)
    flops = None
    for i in range(settings.warmup):
        clock = PhaseClock(loop.device, sync=False)
        clock.start()
        if i == 0 and count_first:
            with loop.eager():
                flops = count_flops(lambda c=clock: loop.step(c))
        else:
            loop.step(clock)
    return flops


def timed_round(loop: BenchLoop, settings: BenchSettings, seed: int) -> tuple[float, float]:
    """`settings.steps` steps from `seed` with no device sync but one at the end (reading their losses);
    returns (seconds, mean loss)."""
    set_seed(seed)
    clock = PhaseClock(loop.device, sync=False)
    losses = []
    clock.start()
    start = time.perf_counter()
    for _ in range(settings.steps):
        losses.append(loop.step(clock))
    loss = torch.stack(losses).float().mean().item()  # the only host sync of the round
    return time.perf_counter() - start, loss


def measure_alone(loop: BenchLoop, settings: BenchSettings, setup_s: float) -> AloneFigures:
    """Warm up, then a first round from seed 0: its mean loss is the fairness check (both loops run it from
    the same state) and the peak memory is the step's."""
    flops = warm_up(loop, settings, count_first=True)
    if not reset_peak_memory(loop.device):
        log.info("Peak RSS could not be reset: it covers the whole process.")
    _, mean_loss = timed_round(loop, settings, seed=0)
    return AloneFigures(loop.config.batch_size, setup_s, peak_memory_mb(loop.device), flops, mean_loss)


def instrumented_run(loop: BenchLoop, settings: BenchSettings) -> dict[str, float]:
    """`settings.steps` steps, the device synchronised at each phase boundary: seconds per step by phase."""
    clock = PhaseClock(loop.device, sync=True)
    clock.start()
    for _ in range(settings.steps):
        loop.step(clock)
    return {name: clock.totals[name] / settings.steps for name in PHASES}


def interleaved_rounds(
    loops: list[BenchLoop], settings: BenchSettings
) -> tuple[list[list[float]], list[dict[str, float]]]:
    """TIMED_ROUNDS timed rounds of each loop, taken in turn (ours, reference, ours, ...) so that a slower
    stretch of a shared machine or a warming GPU falls on both, then one instrumented run of each; returns
    each loop's s/step in each round, and its phases."""
    times: list[list[float]] = [[] for _ in loops]
    for round_index in range(1, TIMED_ROUNDS + 1):
        for loop, loop_times in zip(loops, times, strict=True):
            loop_times.append(timed_round(loop, settings, seed=round_index)[0] / settings.steps)
    phases = [instrumented_run(loop, settings) for loop in loops]
    return times, phases


def loop_figures(
    alone: AloneFigures, round_s_per_step: list[float], phases: dict[str, float], settings: BenchSettings
) -> LoopFigures:
    s_per_step = statistics.median(round_s_per_step)
    return LoopFigures(
        setup_s=alone.setup_s,
        s_per_step=s_per_step,
        round_s_per_step=round_s_per_step,
        images_per_sec=alone.images_per_step / s_per_step,
        phases=phases,
        instrumented_s_per_step=sum(phases.values()),
        peak_memory_mb=alone.peak_memory_mb,
        flops_per_step=alone.flops_per_step,
        mean_loss=alone.mean_loss,
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


def _build(cls: type[BenchLoop], root: Path, settings: BenchSettings, base_model: str) -> BenchLoop:
    cache = settings.cache if cls is OurLoop else False
    config = write_config(root, settings, base_model, cache=cache, reference=cls is ReferenceLoop)
    return cls(config, base_model)


def _collect() -> None:
    """Free what dropped loops held (their model, caches, optimizer) before the next one is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed_build(
    cls: type[BenchLoop], root: Path, settings: BenchSettings, base_model: str
) -> tuple[BenchLoop, float]:
    start = time.perf_counter()
    loop = _build(cls, root, settings, base_model)
    return loop, time.perf_counter() - start


def run_bench(settings: BenchSettings) -> dict:
    """Build everything in a temporary folder and measure both loops; returns the report (see `report.py`).

    Each loop is first measured alone (memory, FLOPs, the fairness loss): the reference, then ours. The
    reference is then built again beside ours, the timed rounds alternate between the two, and an
    instrumented run of each gives the phases. For a model the reference loop cannot train (SDXL), our loop
    is measured alone, the same way, and the report says why.
    """
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
        skipped = no_reference_reason(model_version(base_model))
        reference_alone = None
        if skipped is None:
            reference, setup_s = _timed_build(ReferenceLoop, root, settings, base_model)
            reference_alone = measure_alone(reference, settings, setup_s)
            reference.close()
            del reference
            _collect()
        else:
            log.info("%s.", skipped[0].upper() + skipped[1:])
        ours, setup_s = _timed_build(OurLoop, root, settings, base_model)
        ours_alone = measure_alone(ours, settings, setup_s)
        device = ours.device
        effective = {  # what the run used (memory_profile: low may have chosen them)
            "effective_precision": ours.accelerator.mixed_precision,
            "effective_gradient_checkpointing": ours.config.gradient_checkpointing,
            "effective_optimizer": ours.config.optimizer_type,
            "images_per_step": ours.config.batch_size,
            "gradient_accumulation_steps": ours.config.gradient_accumulation_steps,
        }
        loops = [ours]
        if reference_alone is not None:
            loops.append(_build(ReferenceLoop, root, settings, base_model))
            warm_up(loops[1], settings, count_first=False)
        try:
            times, phases = interleaved_rounds(loops, settings)
        finally:
            for loop in loops:
                loop.close()
    reference_figures = None
    if reference_alone is not None:
        reference_figures = loop_figures(reference_alone, times[1], phases[1], settings)
    return build_report(
        settings,
        device,
        effective,
        loop_figures(ours_alone, times[0], phases[0], settings),
        reference_figures,
        reference_skipped=skipped,
    )


def build_report(
    settings: BenchSettings,
    device: torch.device,
    effective: dict,
    ours: LoopFigures,
    reference: LoopFigures | None,
    *,
    reference_skipped: str | None = None,
) -> dict:
    """The JSON-ready report: headline figures first, then per-loop details. `effective`: the settings the
    run ended up with (effective_precision, images_per_step, ...), merged into "settings". Without a
    `reference` (`reference_skipped` says why) its figures and the comparisons are None."""
    peak = peak_tflops(device)
    mfu = None
    if peak is not None and ours.flops_per_step is not None:
        mfu = ours.flops_per_step / ours.s_per_step / (peak * 1e12)
    images_per_step = effective.get("images_per_step", settings.batch_size)
    per_image = ours.flops_per_step / images_per_step if ours.flops_per_step is not None else None
    return {
        "images_per_sec": ours.images_per_sec,
        "s_per_step": ours.s_per_step,
        **_comparison(ours, reference),
        "peak_memory_mb": _main_memory(ours),
        "flops_per_image": per_image,
        "mfu": mfu,
        "reference_skipped": reference_skipped,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "settings": {
            **asdict(settings),
            "resolution": settings.image_size,
            "num_images": settings.image_count,
            **effective,
        },
        "phases": {"ours": ours.phases, "reference": reference.phases if reference else None},
        "loops": {"ours": asdict(ours), "reference": asdict(reference) if reference else None},
    }


def _main_memory(loop: LoopFigures) -> float:
    return loop.peak_memory_mb.get("allocated", loop.peak_memory_mb.get("rss", 0.0))


_COMPARISON_KEYS = (
    "reference_images_per_sec",
    "reference_s_per_step",
    "speedup",
    "speedup_per_round",
    "reference_peak_memory_mb",
    "reference_unet_share",
    "speedup_bound_same_unet",
)


def _comparison(ours: LoopFigures, reference: LoopFigures | None) -> dict:
    """The reference's figures and the speedups (all None without a reference)."""
    if reference is None:
        return dict.fromkeys(_COMPARISON_KEYS)
    # What the UNet's forward + backward leave to gain: they are the same work in both loops (unless ours
    # is compiled), so removing everything else from our step could give at most 1 / their share.
    unet_share = (
        reference.phases["forward"] + reference.phases["backward"]
    ) / reference.instrumented_s_per_step
    # The speedup of each pair of rounds run back to back (ours, then the reference): a drift of the machine's
    # speed over the run moves both rounds of a pair alike, so the median of these is steadier than the
    # ratio of the two loops' medians.
    pairs = [r / o for o, r in zip(ours.round_s_per_step, reference.round_s_per_step, strict=True)]
    return {
        "reference_images_per_sec": reference.images_per_sec,
        "reference_s_per_step": reference.s_per_step,
        "speedup": statistics.median(pairs),
        "speedup_per_round": pairs,
        "reference_peak_memory_mb": _main_memory(reference),
        "reference_unet_share": unet_share,
        "speedup_bound_same_unet": 1 / unet_share,
    }
