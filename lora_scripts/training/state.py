"""The full training state of a run, saved so that a stopped run continues exactly where it was.

A state is a folder `<output_dir>/state/step-XXXXXXXX/`:

    lora.safetensors   the trained LoRA weights in fp32, under peft's names (`<kohya_prefix>/<module path>`)
    optimizer.pt       optimizer.state_dict()
    scheduler.pt       the learning-rate schedule's state_dict()
    scaler.pt          the fp16 grad scaler's state_dict() (only when there is one)
    rng-<rank>.pt      python, numpy, torch CPU (and CUDA) RNG states of each process
    validation.json    the best validation loss so far and the early-stopping count (when validating)
    config.yaml        the resolved config of the run
    progress.json      step, epoch, batches consumed in the epoch, process count, lr scale, data fingerprint

Written by hand rather than with accelerate's save_state: that one writes every prepared model whole (the
full UNet, gigabytes, where the LoRA is megabytes), writes in place, and its loader unpickles. Here every
file is written and fsynced inside `.tmp-step-XXXXXXXX/`, which is then renamed into place, so a kill at any
moment leaves either the complete state or none; a folder without progress.json, or a hidden one, is never
taken. Everything is read back with safetensors or `torch.load(weights_only=True)`.

"Newest" means most recently saved (`saved_at` in progress.json), not the highest step: after resuming
from an older state, the states saved from then on are the run's present, not the abandoned ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import yaml
from accelerate import Accelerator

from lora_scripts.config import TrainConfig, dump_config
from lora_scripts.data.training_set import TrainingSet
from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic, write_text_atomic
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.models.registry import base_model_zero_terminal_snr
from lora_scripts.training.output_dir import STATE_FOLDER
from lora_scripts.training.saved_states import (  # finding states needs no torch: they live apart
    FORMAT_VERSION,
    PROGRESS_FILE,
    STATE_PREFIX,
    latest_state,
    list_states,
    read_progress,
    state_name,
)

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.json"  # the best validation loss so far, when the run validates

# Config keys that may change between a run and its resume. Every other key changes what is trained (the
# network, the data, the noise, the optimizer...), so a resumed run with it changed would be neither the old
# run nor a new one: that is refused. Learning rates are allowed: the schedule is rescaled to the new value.
ALLOWED_CHANGES = frozenset(
    {
        "epochs",
        "max_train_steps",
        "save_steps",
        "save_precision",
        "save_state",
        "save_last_n_states",
        "resume",
        "overwrite",
        "nan_policy",
        "output_dir",
        "output_name",
        "logging_dir",
        "sample_prompts",
        "sample_every_n_steps",
        "sample_every_n_epochs",
        "sample_at_first",
        "sample_sampler",
        "validation_data_dir",
        "validate_every_n_steps",
        "early_stopping_patience",
        "dataloader_num_workers",
        "gradient_checkpointing",  # recomputes activations; the same numbers
        "cache_latents",  # cached and uncached runs train bit for bit the same (tests/training)
        "cache_latents_to_disk",
        "cache_dir",
        "cache_text_encoder_outputs",
        "trigger_word",
        "learning_rate",
        "unet_lr",
        "text_encoder_lr",
    }
)


@dataclass
class Progress:
    """Where a run is. `epoch` is 1-based while it runs (0 before the first); `batches_in_epoch` counts the
    batches of it this process has consumed; `lr_scale` is the product of the NaN rollbacks' halvings."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    lr_scale: float = 1.0


@dataclass(frozen=True)
class TrainingParts:
    """What a state holds besides `Progress`: the prepared optimizer and scheduler, and the grad scaler."""

    networks: list[LoraNetwork]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None = None
    validator: Any | None = None  # training/validation.py's Validator: best loss so far, patience count


def data_fingerprint(training_set: TrainingSet) -> dict[str, Any]:
    """The epoch's samples (image, caption, bucket, weight, in order) as a count and a SHA-256."""
    digest = hashlib.sha256()
    for sample in training_set.samples:
        row = [str(sample.image.path), sample.image.caption, list(sample.bucket), sample.loss_weight]
        digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    return {"samples": len(training_set.samples), "sha256": digest.hexdigest()}


# --- choosing and checking the state to resume from ---


def resume_state(config: TrainConfig) -> Path | None:
    """The state `config.resume` asks for: the newest in output_dir/state for `auto` (None, logged, when
    there is none: a new run), or the given folder (a state, or a state/ folder: its newest)."""
    if config.resume is None:
        return None
    root = config.output_dir / STATE_FOLDER
    if config.resume == "auto":
        found = latest_state(root)
        if found is None:
            log.info("resume: auto: no saved training state in %s; starting a new run", root)
        return found
    path = Path(config.resume)
    if read_progress(path) is not None:
        return path
    found = latest_state(path / STATE_FOLDER) or latest_state(path)
    if found is None:
        raise UserError(
            f"resume: '{path}' is not a saved training state (a folder like {root / state_name(100)} with "
            f"{PROGRESS_FILE}); write resume: auto to take the newest one in {root}."
        )
    return found


def check_resume(
    folder: Path, config: TrainConfig, training_set: TrainingSet, num_processes: int
) -> dict[str, Any]:
    """Refuse a state this config cannot continue; log the allowed changes. Returns its progress.json.

    Raises UserError naming every changed key that changes the run, a changed training set, or another
    process count (the batches are dealt out differently).
    """
    progress = read_progress(folder)
    if progress is None:
        raise UserError(f"resume: '{folder}' is not a complete training state; resume from another one.")
    saved = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
    current = config.to_yaml_dict()
    changed = [
        k
        for k in current.keys() | saved.keys()
        if current.get(k) != saved.get(k) and not _same_from_base_model(k, saved, current, config)
    ]
    shown = {k: f"{k}: {_show(saved.get(k))} -> {_show(current.get(k))}" for k in sorted(changed)}
    breaking = [shown[k] for k in sorted(changed) if k not in ALLOWED_CHANGES]
    problems = []
    if breaking:
        problems.append(
            f"resume: the config changed since the state {folder} was saved ({'; '.join(breaking)}); these "
            "change what is trained, so set them back, or start a new run (remove resume, or choose "
            "another output_dir)."
        )
    data = data_fingerprint(training_set)
    if data != progress.get("data") and not any(k in changed for k in _DATA_KEYS):
        saved_count = (progress.get("data") or {}).get("samples")
        problems.append(
            f"resume: the training images or captions changed since the state {folder} was saved "
            f"({saved_count} samples then, {data['samples']} now); put them back, or start a new run."
        )
    if progress.get("num_processes", 1) != num_processes:
        problems.append(
            f"resume: the state {folder} was saved by {progress.get('num_processes')} processes and this run "
            f"has {num_processes}; launch it with {progress.get('num_processes')}, or start a new run."
        )
    if problems:
        raise UserError(problems)
    allowed = [shown[k] for k in sorted(changed) if k in ALLOWED_CHANGES and k != "resume"]
    if allowed:
        log.info("Resuming with changed settings: %s", "; ".join(allowed))
    return progress


def _same_from_base_model(key: str, saved: dict, current: dict, config: TrainConfig) -> bool:
    """True when one side leaves zero_terminal_snr out (null: what the base model says) and the other writes
    the value the base model says, so the run trains the same. States saved before the key could be left out
    have `false` there, which a config leaving it out continues on a model without the marker."""
    if key != "zero_terminal_snr" or (saved.get(key) is None) == (current.get(key) is None):
        return False
    written = saved[key] if current.get(key) is None else current[key]
    return written == base_model_zero_terminal_snr(config.base_model, config.base_model_config)


# Keys whose change is already reported as a config change; a data fingerprint mismatch then says nothing new.
_DATA_KEYS = ("train_data_dir", "metadata_path", "datasets", "reg_data_dir", "validation_split", "resolution")


def _show(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value, ensure_ascii=False)


# --- RNG states ---


def rng_state() -> dict[str, Any]:
    """Every global RNG of this process, in types `torch.load(weights_only=True)` reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- saving and loading ---


def lora_tensors(networks: list[LoraNetwork]) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters of every network, fp32 on the CPU, as `<kohya_prefix>/<peft name>`."""
    return {
        f"{net.kohya_prefix}/{name}": param.detach().to("cpu", torch.float32).contiguous()
        for net in networks
        for name, param in net.module.named_parameters()
        if param.requires_grad
    }


class StateStore:
    """Saves and loads the states of one run under `root` (`<output_dir>/state`), keeping the newest `keep`.

    Every process calls `save` and `load` at the same step: each writes and reads its own RNG file, the main
    process everything else. `fault` is the test suite's fault injection (FaultInjection.during_save). Made
    before any state is loaded: it notes the config's learning rates, which `load` restores.
    """

    def __init__(
        self,
        root: Path,
        parts: TrainingParts,
        *,
        keep: int,
        accelerator: Accelerator,
        config: TrainConfig,
        data: dict[str, Any],
        fault: Callable[[int], None] | None = None,
    ):
        self.root = Path(root)
        self.parts = parts
        self.keep = keep
        self.accelerator = accelerator
        self.config = config
        self.data = data
        self.fault = fault
        # The schedule's base rates as this config sets them (None: Adafactor picks its own).
        self.config_lrs = [group.get("initial_lr") for group in parts.optimizer.param_groups]

    def latest(self) -> Path | None:
        return latest_state(self.root)

    def save(self, progress: Progress) -> Path:
        """Write the state of `progress` atomically, prune older ones; returns its folder."""
        acc = self.accelerator
        final = self.root / state_name(progress.global_step)
        tmp = self.root / f".tmp-{final.name}"
        if acc.is_main_process:
            self._remove_leftovers()
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            _save_torch(tmp / f"rng-{acc.process_index}.pt", rng_state())
            if acc.is_main_process:
                self._write_main_files(tmp, progress)
            acc.wait_for_everyone()
            if acc.is_main_process:
                _fsync_folder(tmp)
                self._commit(tmp, final)
        except BaseException:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # a second Ctrl-C or an error: the older states stay
            raise
        if acc.is_main_process:
            self._prune()
            log.info("Saved training state %s", final)
        return final

    def _write_main_files(self, tmp: Path, progress: Progress) -> None:
        parts = self.parts
        tensors = lora_tensors(parts.networks)
        write_atomic(tmp / "lora.safetensors", lambda p: safetensors.torch.save_file(tensors, str(p)))
        _save_torch(tmp / "optimizer.pt", parts.optimizer.state_dict())
        if self.fault is not None:
            self.fault(progress.global_step)  # the test suite's kill in the middle of a save
        _save_torch(tmp / "scheduler.pt", parts.lr_scheduler.state_dict())
        if parts.scaler is not None:
            _save_torch(tmp / "scaler.pt", parts.scaler.state_dict())
        if parts.validator is not None:
            write_text_atomic(tmp / VALIDATION_FILE, json.dumps(parts.validator.state_dict()) + "\n")
        dump_config(self.config, tmp / "config.yaml")
        record = {
            "format": FORMAT_VERSION,
            **asdict(progress),
            "num_processes": self.accelerator.num_processes,
            "data": self.data,
            "saved_at": time.time(),
        }
        write_text_atomic(tmp / PROGRESS_FILE, json.dumps(record, indent=2) + "\n")  # last: marks it complete

    def _commit(self, tmp: Path, final: Path) -> None:
        """Rename `tmp` to `final`; a state already there (the same step saved again) goes only after."""
        old = None
        if final.exists():
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_folder(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Folders of saves that were killed half-way (`.tmp-*`, `.old-*`); never read, now deleted."""
        if self.root.is_dir():
            for folder in self.root.glob(".*-" + STATE_PREFIX + "*"):
                shutil.rmtree(folder, ignore_errors=True)

    def _prune(self) -> None:
        states = list_states(self.root)
        for folder in states[: max(len(states) - self.keep, 0)]:
            shutil.rmtree(folder, ignore_errors=True)

    def load(self, folder: Path, *, lr_scale: float | None = None) -> Progress:
        """Put the state in `folder` into the LoRA, optimizer, schedule, scaler and RNGs (this process's).

        The learning rates become this config's times `lr_scale` (default: the state's own), so a
        learning_rate changed before resuming takes effect, a rollback's halving applies, and an unchanged
        rate stays bit for bit as saved.
        """
        data = read_progress(folder)
        if data is None:
            raise UserError(f"resume: '{folder}' is not a complete training state; resume from another one.")
        parts = self.parts
        _load_lora(folder / "lora.safetensors", parts.networks)
        parts.optimizer.load_state_dict(_load_torch(folder / "optimizer.pt"))
        parts.lr_scheduler.load_state_dict(_load_torch(folder / "scheduler.pt"))
        if parts.scaler is not None and (folder / "scaler.pt").is_file():
            parts.scaler.load_state_dict(_load_torch(folder / "scaler.pt"))
        if parts.validator is not None and (folder / VALIDATION_FILE).is_file():
            saved = (folder / VALIDATION_FILE).read_text(encoding="utf-8")
            parts.validator.load_state_dict(json.loads(saved))
        progress = Progress(
            global_step=int(data["global_step"]),
            epoch=int(data["epoch"]),
            batches_in_epoch=int(data["batches_in_epoch"]),
            lr_scale=float(data["lr_scale"]) if lr_scale is None else lr_scale,
        )
        inner = getattr(parts.lr_scheduler, "scheduler", parts.lr_scheduler)
        saved_lrs = getattr(inner, "base_lrs", None)
        if saved_lrs and None not in self.config_lrs:
            factors = [c * progress.lr_scale / s for c, s in zip(self.config_lrs, saved_lrs, strict=True)]
            if any(factor != 1.0 for factor in factors):
                scale_learning_rates(parts.optimizer, parts.lr_scheduler, factors)
        set_rng_state(_load_torch(folder / f"rng-{self.accelerator.process_index}.pt"))
        return progress


def scale_learning_rates(optimizer: torch.optim.Optimizer, lr_scheduler: Any, factors: list[float]) -> None:
    """Multiply each param group's rate, and the schedule's base rate it follows, by its factor."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    for i, (group, factor) in enumerate(zip(optimizer.param_groups, factors, strict=True)):
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
        if hasattr(inner, "base_lrs"):
            inner.base_lrs[i] *= factor
    if hasattr(inner, "_last_lr"):
        inner._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def _load_lora(path: Path, networks: list[LoraNetwork]) -> None:
    saved = safetensors.torch.load_file(str(path))
    params = {
        f"{net.kohya_prefix}/{name}": param
        for net in networks
        for name, param in net.module.named_parameters()
        if param.requires_grad
    }
    if saved.keys() != params.keys():
        raise UserError(
            f"resume: {path} holds other LoRA layers than this run ({len(params.keys() - saved.keys())} "
            f"missing, {len(saved.keys() - params.keys())} unexpected); resume from another state or start "
            "a new run."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name].to(param.device, param.dtype))


def _save_torch(path: Path, obj: Any) -> None:
    # Serialised in memory first (LoRA-sized), then written as plain bytes: torch.save's own file writer
    # reports a full disk only as "file write failed", where a plain write raises OSError(ENOSPC), which
    # training/failures.py turns into a clear message.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def _load_torch(path: Path) -> Any:
    # weights_only: a state file can never run code, whoever made it.
    return torch.load(path, map_location="cpu", weights_only=True)


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX; Windows cannot open a folder and needs no such step)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
