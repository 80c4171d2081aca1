"""What a run will do, worked out without loading weights: its steps, its LoRA's size, the files it writes.

The trainable-parameter count builds the UNet (and the text encoder) from its config on the meta device
(shapes only, no memory), adds the same peft adapter training adds (the config's network_type: LoRA, LoCon,
LoHa, LoKr or DoRA), and counts; this also checks `target_modules` against the real layer names, with the
message training would give. The LoRA file's size comes from training's saver run on that same meta network
(checks/lora_file.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from accelerate import init_empty_weights

from lora_scripts.checks.lora_file import LoraFileFacts, lora_file_facts
from lora_scripts.config import TrainConfig
from lora_scripts.data.training_set import TrainingSet
from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.models.detect import ModelVersion
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.locate import locate_base_model
from lora_scripts.models.lora import NetworkKind, add_lora_adapter
from lora_scripts.models.lora_presets import resolve_lora_layers
from lora_scripts.models.registry import FAMILIES, base_model_version, single_file_config_dir

# The loader's own rules for a diffusers folder, so that `check` and `train` refuse the same models.
from lora_scripts.models.sd_loading import (
    require_configs,
)
from lora_scripts.training.output_dir import run_files, writable_problem
from lora_scripts.training.plan import TrainingPlan
from lora_scripts.training.run_lock import LockStatus, lock_status
from lora_scripts.training.saving import FINAL_DIFFUSERS_NAME, SAVE_DTYPES, step_file_name
from lora_scripts.training.setup import lora_spec, text_encoder_mask

CONFIG_FILE_NAME = "config.yaml"  # what train() dumps the resolved config as
FOLDER_PARTS = ("unet", "vae", "text_encoder")  # what training loads from a diffusers folder
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # the loader's weight files (models/sd_loading.py)


@dataclass(frozen=True)
class SpeedFacts:
    """The resolved speed and memory settings of a run (what `memory_profile` and the automatic caches
    chose); `*_why` says why a cache is off ("" when it is on)."""

    memory_profile: str
    cache_latents: bool
    cache_latents_why: str
    cache_text_encoder_outputs: bool
    cache_text_encoder_outputs_why: str
    gradient_checkpointing: bool
    mixed_precision: str
    optimizer_type: str
    batch_size: int
    gradient_accumulation_steps: int
    torch_compile: bool
    quantize_base: str
    denoiser: str = "UNet"  # the family's name of the network quantize_base stores ("UNet", "transformer")
    blocks_to_swap: int = 0
    swapped_blocks: int = 0  # the blocks blocks_to_swap keeps on the CPU (FLUX.1: doubles and singles)
    swapped_parameters: int = 0  # their frozen weights (NetworkFacts.swapped_parameters)


def speed_facts(
    config: TrainConfig, denoiser: str = "UNet", network: NetworkFacts | None = None
) -> SpeedFacts:
    """The speed facts of a resolved `config` (every key filled in: what the run will use) on a family whose
    denoiser is called `denoiser` (ModelFamily.denoiser_name); `network` gives the swapped blocks' sizes."""

    def why(on: bool, blockers: list[str]) -> str:
        if on:
            return ""
        return "turned off by " + ", ".join(blockers) if blockers else "set to false"

    te_blockers = (
        ["train_text_encoder"] if config.train_text_encoder else []
    ) + config.changing_caption_keys()
    return SpeedFacts(
        memory_profile=config.memory_profile,
        cache_latents=bool(config.cache_latents),
        cache_latents_why=why(bool(config.cache_latents), config.random_crop_keys()),
        cache_text_encoder_outputs=bool(config.cache_text_encoder_outputs),
        cache_text_encoder_outputs_why=why(bool(config.cache_text_encoder_outputs), te_blockers),
        gradient_checkpointing=config.gradient_checkpointing,
        mixed_precision=config.mixed_precision,
        optimizer_type=config.optimizer_type,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        torch_compile=config.torch_compile,
        quantize_base=config.quantize_base,
        denoiser=denoiser,
        blocks_to_swap=config.blocks_to_swap,
        swapped_blocks=network.swapped_blocks if network is not None else 0,
        swapped_parameters=network.swapped_parameters if network is not None else 0,
    )


@dataclass(frozen=True)
class PlanFacts:
    """Step arithmetic of a run on `num_processes` processes. A step is one optimizer update."""

    num_images: int  # training images (each counted once)
    num_reg_images: int
    num_samples: int  # draws per epoch: images x repeats, plus as many regularization draws
    num_train_samples: int  # the training images' share of num_samples
    bucket_counts: dict[tuple[int, int], int]  # samples per (width, height) bucket
    num_processes: int
    batch_size: int
    gradient_accumulation_steps: int
    batches_per_epoch: int  # per process, a partial last batch per bucket included
    steps_per_epoch: int
    epochs: int  # epochs started (the last one may be cut short by max_train_steps)
    total_steps: int
    limited_by: str  # "epochs" or "max_train_steps"

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size * self.gradient_accumulation_steps * self.num_processes


def plan_facts(training_set: TrainingSet, config: TrainConfig, *, num_processes: int = 1) -> PlanFacts:
    """The same TrainingPlan train() computes, for this training set.

    Batches are counted as train()'s batch sampler makes them (each bucket cut into batches, a partial last
    batch per bucket kept) and as accelerate deals them out over processes
    (every process gets the same count).
    """
    plan = TrainingPlan.compute(
        num_images=training_set.num_train_images,
        batches_per_epoch=training_set.batches_per_epoch(config.batch_size, num_processes),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        epochs=config.epochs,
        max_train_steps=config.max_train_steps,
    )
    return PlanFacts(
        num_images=training_set.num_train_images,
        num_reg_images=training_set.num_reg_images,
        num_samples=len(training_set.samples),
        num_train_samples=training_set.num_train_samples,
        bucket_counts=training_set.bucket_counts(),
        num_processes=num_processes,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        batches_per_epoch=plan.batches_per_epoch,
        steps_per_epoch=plan.steps_per_epoch,
        epochs=plan.num_epochs,
        total_steps=plan.max_train_steps,
        limited_by="epochs" if config.max_train_steps is None else "max_train_steps",
    )


@dataclass(frozen=True)
class NetworkFacts:
    """The base model as far as the LoRA is concerned, the network training adds (its type, trainable
    parameter counts) and the file it saves."""

    base_model_kind: str  # "single_file", "diffusers_folder" or "hub_cache"
    sd_version: ModelVersion
    architecture_from: Path  # the folder whose unet/ and text_encoder/ configs describe the model
    rank: int
    alpha: float
    unet_parameters: int
    text_encoder_parameters: int  # 0 when train_text_encoder is false
    swapped_blocks: int = 0  # the denoiser blocks blocks_to_swap keeps on the CPU
    swapped_parameters: int = 0  # their frozen weights
    kind: NetworkKind = NetworkKind()  # network_type (as the config says it: "locon" stays "locon")
    conv_rank: int | None = None  # the 3x3 convs' rank; None: no 3x3 conv is adapted
    conv_alpha: float | None = None
    file: LoraFileFacts | None = None  # the LoRA file training saves (save_precision), metadata aside

    @property
    def total_parameters(self) -> int:
        return self.unet_parameters + self.text_encoder_parameters


def network_facts(config: TrainConfig) -> NetworkFacts:
    """Count the LoRA's trainable parameters without reading any weight.

    Raises UserError for a base model training could not use (as the loader words it) and for every
    target name that matches no layer (as training words it).
    """
    location = locate_base_model(config.base_model)
    version = base_model_version(config.base_model)
    parts = folder_parts(version)
    family = FAMILIES[version]
    if location.kind == "single_file":
        problems = family.single_file_problems(location.path, config.changed_values())
        if problems:
            raise UserError(problems)
        config_dir = Path(config.base_model_config or single_file_config_dir(version, location.path))
        require_configs(config_dir, parts)
    else:
        config_dir = location.path
        problems = family.folder_problems(config_dir)
        if problems:
            raise UserError(problems)
        _check_folder_weights(config_dir, parts)

    alpha = float(config.lora_alpha if config.lora_alpha is not None else config.lora_rank)
    conv_alpha = config.conv_alpha if config.conv_alpha is not None else config.conv_rank
    # The network training builds (training/setup.py's LoraSpec): type, LoKr's options and dropout.
    spec = lora_spec(config)
    kind, dropout = spec.kind, spec.dropout
    problems = family.key_problems(config.changed_values())
    if problems:
        raise UserError(problems)
    # Meta tensors: an SD 1.5 UNet builds in ~0.1 s and takes no memory.
    unet, encoders = family.meta_modules(config_dir, text_encoders=config.train_text_encoder)
    swapped = family.swap_blocks(unet, config.blocks_to_swap) if config.blocks_to_swap else []
    swapped_parameters = sum(p.numel() for block in swapped for p in block.parameters())
    with init_empty_weights():
        targets = LoraTargets(
            unet=_listed(config.target_modules),
            text_encoder=_listed(config.text_encoder_target_modules) if config.train_text_encoder else None,
            text_encoder_mask=text_encoder_mask(config, family),
        )
        unet_targets, conv_targets, te_targets = resolve_lora_layers(
            unet,
            encoders,
            targets,
            conv=bool(config.conv_rank) and family.has_convs,
            presets=family.denoiser_presets,
            component=family.denoiser_name,
        )
        unet_count = add_lora_adapter(
            unet,
            unet_targets,
            config.lora_rank,
            alpha,
            conv_targets=conv_targets,
            conv_rank=config.conv_rank,
            conv_alpha=conv_alpha,
            dropout=dropout,
            kind=kind,
        )
        te_count = sum(
            add_lora_adapter(encoder, layers, config.lora_rank, alpha, dropout=dropout, kind=kind)
            for encoder, layers in zip(encoders, targets.text_encoder_layers(te_targets), strict=False)
            if layers is not None
        )
    networks = _saved_networks(family.file_networks(unet, encoders))
    return NetworkFacts(
        location.kind,
        version,
        config_dir,
        config.lora_rank,
        alpha,
        unet_count,
        te_count,
        len(swapped),
        swapped_parameters,
        kind=kind,
        conv_rank=config.conv_rank if conv_targets else None,
        conv_alpha=float(conv_alpha) if conv_targets and conv_alpha is not None else None,
        file=lora_file_facts(networks, SAVE_DTYPES[config.save_precision]),
    )


def _saved_networks(networks: list[LoraNetwork]) -> list[LoraNetwork]:
    """The networks training's saver writes, of a family's `file_networks`: the first name of each module
    (SD 1.x also lists its text encoder as lora_te1, a spelling files may use but training does not write)."""
    seen: set[int] = set()
    saved = []
    for network in networks:
        if id(network.module) not in seen:
            seen.add(id(network.module))
            saved.append(network)
    return saved


def folder_parts(version: str) -> tuple[str, ...]:
    """The diffusers-folder parts training loads for a model version."""
    return FAMILIES[version].diffusers_parts()


def _check_folder_weights(folder: Path, parts: tuple[str, ...] = FOLDER_PARTS) -> None:
    """Each part of a diffusers folder that training loads has its config and weight files, and every
    .safetensors header reads (a truncated file fails here): an incomplete download is found before training
    touches output_dir, without reading a weight."""
    from safetensors import safe_open

    problems: list[str] = []
    for part in parts:
        if not (folder / part / "config.json").is_file():
            problems.append(
                f"base_model: '{folder}' has no {part}/config.json; it is not a complete SD model."
            )
            continue
        weights = sorted(p for p in (folder / part).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        if not weights:
            problems.append(
                f"base_model: '{folder}' has no weights in {part}/ (no .safetensors or .bin file); the "
                "download may be incomplete, so download it again."
            )
        for path in (p for p in weights if p.suffix == ".safetensors"):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every problem
                problems.append(
                    f"base_model: '{path}' is not a readable .safetensors file ({err}); it may be truncated "
                    "or corrupt, so download it again."
                )
    if problems:
        raise UserError(problems)


def _listed(targets: str | tuple[str, ...]) -> str | list[str]:
    return targets if isinstance(targets, str) else list(targets)


@dataclass(frozen=True)
class OutputFacts:
    """Where a run writes. File names are relative to `output_dir`; `step_files` is None when the number
    of steps is unknown (the dataset has problems)."""

    output_dir: Path
    output_name: str
    step_files: list[str] | None
    final_files: list[str]
    config_file: str
    logging_dir: Path
    existing_files: list[str]  # config.yaml, *.safetensors, state/, logs/, sample/ already there: a run
    exists: bool = False  # False: train creates it (and its missing parents)
    writable_problem: str | None = None  # why it cannot be created or written (an error); None: it can
    lock: LockStatus | None = None  # the lock file of a run in it (training/run_lock.py); None: no lock file


def output_facts(config: TrainConfig, total_steps: int | None) -> OutputFacts:
    """The files train() will write for `config` (resolved), what already lies in output_dir, whether it can
    be written, and whether a run holds it. Nothing is written (see `writable_problem`)."""
    name = config.output_name or config.resolved().output_name
    assert name is not None
    step_files = None
    if total_steps is not None:
        every = config.save_steps
        step_files = (
            [step_file_name(name, step) for step in range(every, total_steps + 1, every)] if every else []
        )
    existing = run_files(config.output_dir)  # the same test train() refuses an output_dir by
    return OutputFacts(
        output_dir=config.output_dir,
        output_name=name,
        step_files=step_files,
        final_files=[FINAL_DIFFUSERS_NAME, f"{name}.safetensors"],
        config_file=CONFIG_FILE_NAME,
        logging_dir=config.logging_dir or config.output_dir / "logs",
        existing_files=existing,
        exists=config.output_dir.is_dir(),
        writable_problem=writable_problem(config.output_dir),
        lock=lock_status(config.output_dir),
    )
