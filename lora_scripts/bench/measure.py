"""Clocks, peak memory and FLOPs for the benchmark; nothing here knows about training."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

PHASES = ("data", "encode", "forward", "backward", "optimizer")

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity), matched as substrings
# of torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("A6000", 155.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("T4", 65.0),
    ("RTX 4090", 165.0),
    ("RTX 4080", 97.0),
    ("RTX 3090", 71.0),
    ("RTX 3080", 59.5),
)


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16/fp16 peak from PEAK_TFLOPS, or None (CPU, unknown GPU: no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


class PhaseClock:
    """Contiguous timestamps through one step: `mark(phase)` closes the phase that just ran, so the phases
    of a step always sum to the step's time. With `sync`, the device is synchronised before each mark (the
    instrumented run only: CUDA work is asynchronous, and without it a phase's time lands in a later one)."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.device = device
        self.totals = dict.fromkeys(PHASES, 0.0)  # seconds
        self._last = 0.0

    def start(self) -> None:
        self._synchronize()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        self._synchronize()
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now

    def _synchronize(self) -> None:
        if self.sync:
            torch.cuda.synchronize(self.device)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's counters, or on Linux the process's peak RSS (VmHWM) through
    /proc/self/clear_refs. False when the RSS peak cannot be reset (then it covers the whole process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")  # "5": reset the peak RSS
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak memory since `reset_peak_memory`, in MiB: {"allocated", "reserved"} on CUDA, {"rss"} elsewhere
    (VmHWM from /proc, else getrusage's ru_maxrss, which is KiB on Linux)."""
    if device.type == "cuda":
        return {
            "allocated": torch.cuda.max_memory_allocated(device) / 2**20,
            "reserved": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return {"rss": int(line.split()[1]) / 1024}
    except OSError:
        pass
    return {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _register_cpu_attention_flops() -> None:
    """torch's FLOP counter knows the CUDA attention kernels but not the CPU one SDPA runs on a CPU
    (`_scaled_dot_product_flash_attention_for_cpu`): without this, CPU counts miss all attention (SD 1.5
    at 512² counted 1.34 instead of 1.71 TFLOP per image). Its arguments start like the CUDA kernels', so
    the same formulas apply."""
    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in flop_registry:

        @register_flop_formula(forward)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    if backward is not None and backward not in flop_registry:

        @register_flop_formula(backward)
        def _cpu_sdpa_backward(
            grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
        ) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_attention_flops()


def _register_quanto_flops() -> None:
    """quantize_base: quanto multiplies by an 8-bit weight with its own op, `quanto::qbytes_mm(A, B, scales)`
    (A [..., K] times B [N, K] transposed), which torch's counter does not know; the model's FLOPs are the
    same as with float weights, so count it as the matmul it is. A no-op until quanto is loaded."""
    try:
        qbytes_mm = torch.ops.quanto.qbytes_mm
    except (AttributeError, RuntimeError):
        return
    if qbytes_mm not in flop_registry:

        @register_flop_formula(qbytes_mm)
        def _qbytes_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * math.prod(a_shape[:-1]) * a_shape[-1] * b_shape[0]


def count_flops(run_step: Callable[[], object]) -> int:
    """FLOPs of everything `run_step` runs (forward, backward, optimizer) as torch.utils.flop_counter counts
    them: matmuls, convolutions and attention, the work MFU is measured against."""
    _register_quanto_flops()
    with FlopCounterMode(display=False) as counter:
        run_step()
    return counter.get_total_flops()
