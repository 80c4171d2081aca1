"""The speed switches: SDPA attention, CUDA-only switches left off on a CPU, torch_compile reaching
torch.compile, the loss read once per `logging_steps` (with the NaN guard still exact), and a tiny run with
`memory_profile: low` on a CPU."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.models.registry import load_family
from lora_scripts.training import loop, setup
from lora_scripts.training.loop import train
from lora_scripts.training.loss_log import PendingLosses, read_losses
from lora_scripts.training.nan_guard import NanGuard
from tests.training.conftest import tiny_run_settings, write_config


def test_attention_runs_through_sdpa_and_cuda_switches_stay_off_on_a_cpu(tiny_model_dir, caplog):
    family = load_family(str(tiny_model_dir))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    setup.speed_switches(family, torch.device("cpu"))
    processors = family.denoiser.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    assert "SDPA" not in caplog.text
    assert torch.backends.cuda.matmul.allow_tf32 == tf32  # untouched without CUDA
    conv = family.denoiser.conv_in.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


def test_compile_is_applied_only_when_asked(monkeypatch):
    """Compiled only when asked; on a CPU without inductor's channels_last layout optimization (it made the
    SD 1.5 step slower there), on CUDA with inductor's defaults."""
    compiled: list[tuple[torch.nn.Module, dict | None]] = []
    monkeypatch.setattr(
        torch, "compile", lambda module, options=None: compiled.append((module, options)) or module
    )
    module = torch.nn.Linear(2, 2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert setup.compiled_denoiser(module, enabled=False, device=cpu) is module and compiled == []
    assert setup.compiled_denoiser(module, enabled=True, device=cpu) is module
    assert setup.compiled_denoiser(module, enabled=True, device=cuda) is module
    assert compiled == [(module, {"layout_optimization": False}), (module, None)]


class _Accelerator:
    """One process: gather returns its input."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def log(self, scalars: dict, step: int) -> None:
        self.logged.append((step, scalars))


class _Bar:
    n = 0

    def set_postfix(self, **kwargs) -> None:
        self.postfix = kwargs

    def refresh(self) -> None:
        pass


def _guard() -> NanGuard:
    return NanGuard(
        policy="stop",
        mixed_precision="no",
        noise_offset=None,
        min_snr_gamma=None,
        multires_noise_iterations=None,
    )


def test_pending_losses_are_logged_each_at_its_step_in_one_read():
    accelerator = _Accelerator()
    losses = PendingLosses(accelerator)
    for step, value in enumerate([0.5, 0.25, 0.125], start=1):
        losses.add(step, torch.tensor(value), [1e-4 * step])
    checkpoints = SimpleNamespace(accelerator=accelerator, last_file=None)
    bar = _Bar()
    assert read_losses(losses, _guard(), None, checkpoints, bar, SimpleNamespace(epoch=1)) is None
    assert accelerator.logged == [
        (1, {"loss": 0.5, "lr": 1e-4}),
        (2, {"loss": 0.25, "lr": 2e-4}),
        (3, {"loss": 0.125, "lr": pytest.approx(3e-4)}),
    ]
    assert losses.last_value == 0.125 and bar.postfix["loss"] == "0.1250"
    assert losses.read() == []  # emptied


def test_a_nan_in_the_pending_losses_stops_at_its_own_step():
    accelerator = _Accelerator()
    losses = PendingLosses(accelerator)
    for step, value in enumerate([0.5, float("nan"), 0.25], start=1):
        losses.add(step, torch.tensor(value), [1e-4])
    checkpoints = SimpleNamespace(accelerator=accelerator, last_file=None)
    store = SimpleNamespace(latest=lambda: None)
    with pytest.raises(UserError, match="the loss became nan at step 2;"):
        read_losses(losses, _guard(), store, checkpoints, _Bar(), SimpleNamespace(epoch=1))
    assert [step for step, _ in accelerator.logged] == [1]  # nothing of or after the bad step
    assert losses.last_value == 0.5


def _train(tmp_path, model, data, **values):
    settings = tiny_run_settings(data, model, **values)
    return train(load_config(write_config(tmp_path / "c.yaml", **settings, output_dir=str(tmp_path / "out"))))


def test_the_loss_is_read_every_logging_steps_and_at_the_end(
    tmp_path, tiny_model_dir, dataset_dir, monkeypatch
):
    reads: list[list[int]] = []
    real = PendingLosses.read

    def counting(self):
        reads.append(list(self.steps))
        return real(self)

    monkeypatch.setattr(PendingLosses, "read", counting)
    result = _train(tmp_path, tiny_model_dir, dataset_dir, max_train_steps=5, logging_steps=2)
    assert reads == [[1, 2], [3, 4], [5]]
    assert math.isfinite(result.last_loss)
    (event_dir,) = {p.parent for p in (tmp_path / "out" / "logs").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in points] == [1, 2, 3, 4, 5]  # every step, each at its own step
    assert points[-1][1] == pytest.approx(result.last_loss)


def test_a_read_comes_before_every_save(tmp_path, tiny_model_dir, dataset_dir, monkeypatch):
    events: list[str] = []
    real_read, real_save = PendingLosses.read, loop.Checkpoints.save
    monkeypatch.setattr(
        PendingLosses, "read", lambda self: events.append(f"read{self.steps}") or real_read(self)
    )
    monkeypatch.setattr(
        loop.Checkpoints, "save", lambda self, p: events.append(f"save{p.global_step}") or real_save(self, p)
    )
    _train(tmp_path, tiny_model_dir, dataset_dir, max_train_steps=3, save_steps=1, logging_steps=10)
    assert events == ["read[1]", "save1", "read[2]", "save2", "read[3]", "save3"]


def test_torch_compile_key_reaches_torch_compile(tmp_path, tiny_model_dir, dataset_dir, monkeypatch):
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(module) or module)
    result = _train(tmp_path, tiny_model_dir, dataset_dir, max_train_steps=1, torch_compile=True)
    assert len(compiled) == 1 and result.global_step == 1


def test_low_memory_profile_trains_on_a_cpu(tmp_path, tiny_model_dir, dataset_dir):
    result = _train(tmp_path, tiny_model_dir, dataset_dir, max_train_steps=1, memory_profile="low")
    assert result.global_step == 1 and math.isfinite(result.last_loss)
    dumped = (tmp_path / "out" / "config.yaml").read_text(encoding="utf-8")
    for line in (
        "gradient_checkpointing: true",
        "mixed_precision: bf16",
        "batch_size: 1",
        "gradient_accumulation_steps: 2",
        "cache_latents: true",
    ):
        assert line in dumped


def test_loader_workers_auto_only_where_a_gpu_would_wait_on_decoding(monkeypatch):
    """Left out: background loaders on a CUDA GPU when images are decoded every step; none with cached
    latents or on a CPU; a written value always wins."""
    from types import SimpleNamespace

    auto, two = SimpleNamespace(dataloader_num_workers=None), SimpleNamespace(dataloader_num_workers=2)
    cached = {"some request": torch.zeros(1)}
    monkeypatch.setattr(setup.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup.loader_workers(auto, None) == 0  # a CPU: workers would take its cores from training
    assert setup.loader_workers(two, None) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert setup.loader_workers(auto, cached) == 0  # nothing to decode
    assert setup.loader_workers(auto, None) == 4  # min(4, 16 // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert setup.loader_workers(auto, None) == 2  # 16 cores shared by 4 processes: 16 // 8
    monkeypatch.setattr(setup.os, "cpu_count", lambda: 2)
    assert setup.loader_workers(auto, None) == 0
    assert setup.loader_workers(SimpleNamespace(dataloader_num_workers=0), None) == 0


def test_quantize_base_trains_the_same_lora_on_an_8_bit_unet(tmp_path, tiny_model_dir, dataset_dir, caplog):
    """quantize_base: int8 with attention LoRA and LoCon: the UNet's frozen weights in 8 bits, the LoRA file
    as without it (same keys, shapes and dtypes), and a loss that differs only by the quantization noise."""
    from safetensors.torch import load_file

    from lora_scripts.export.lora_file import read_lora_metadata

    run = {"max_train_steps": 1, "conv_rank": 4}
    with caplog.at_level("INFO"):
        quantized = _train(tmp_path / "q", tiny_model_dir, dataset_dir, **run, quantize_base="int8")
    assert (
        "quantize_base int8: the UNet's weights take 1.0 MiB instead of 3.3 MiB (frozen ones in float32)"
        in (caplog.text)
    )
    caplog.clear()
    with caplog.at_level("INFO"):
        plain = _train(tmp_path / "p", tiny_model_dir, dataset_dir, **run)
    # Only the LoRA trains: quanto's 8-bit weights (new Parameters that require a gradient) are frozen again.
    assert "Trainable LoRA parameters: 62,848 (lora_unet: 62,848)" in caplog.text
    assert caplog.text.count("Trainable LoRA parameters") == 1
    assert quantized.last_loss != plain.last_loss
    assert quantized.last_loss == pytest.approx(plain.last_loss, rel=2e-2)
    q_file = load_file(tmp_path / "q" / "out" / "pytorch_lora_weights.safetensors")
    p_file = load_file(tmp_path / "p" / "out" / "pytorch_lora_weights.safetensors")
    assert any("conv" in key for key in q_file)
    assert {k: (v.shape, v.dtype) for k, v in q_file.items()} == {
        k: (v.shape, v.dtype) for k, v in p_file.items()
    }
    assert "quantize_base: int8" in (tmp_path / "q" / "out" / "config.yaml").read_text(encoding="utf-8")
    meta = read_lora_metadata(tmp_path / "q" / "out" / "out.safetensors")
    assert meta["ss_quantize_base"] == "int8" and meta["ss_fp8_base"] == "False"
    assert read_lora_metadata(tmp_path / "p" / "out" / "out.safetensors")["ss_quantize_base"] == "no"
