"""Sample images during training: sd-scripts' prompt files, rendered with the LoRA as it is being trained.

`TrainingSampler` is made once per run; the loop calls `at_start`, `after_step` and `after_epoch`, and each
decides from the config whether this is a sampling round. A round renders every prompt with the same seed
as every other round, writes `<output_dir>/sample/<output_name>_s<step>_p<index>_<slug>.png` with its
infotext, and logs one grid of the round to TensorBoard. Only the main process renders; every RNG state is
restored afterwards, so a run with samples trains the same LoRA as one without. The pipeline is the model
family's (`ModelFamily.sampling_pipeline`: SD 1.x/2.x's StableDiffusionPipeline, SDXL's
StableDiffusionXLPipeline), over the very modules being trained, and renders as `generate` does.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError
from lora_scripts.generation import infotext, outputs, pipeline, samplers
from lora_scripts.generation.grid import make_grid

if TYPE_CHECKING:
    from lora_scripts.models.family import ModelFamily
    from lora_scripts.models.inference import SamplingPipeline

log = logging.getLogger(__name__)

DEFAULT_STEPS = 20
DEFAULT_CFG = 7.0
_OPTION = re.compile(r"(?:^|\s)--([a-z]+)\b")  # where `--n`, `--w`, … start inside a prompt line
_INT_OPTIONS = {"w": "width", "h": "height", "d": "seed", "s": "steps"}


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt with its settings (sizes in pixels)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    cfg_scale: float | None  # None: the family's default (7; FLUX.1: its guidance 3.5)
    steps: int


def parse_prompt_line(line: str, index: int, *, resolution: int, seed: int, where: str) -> SamplePrompt:
    """`a cat --n blurry --w 512 --h 768 --d 1 --l 7.5 --s 28` -> SamplePrompt. Unset: width/height =
    `resolution`, seed = `seed + index`, 20 steps, the family's CFG (None here: 7, FLUX.1's guidance 3.5),
    no negative. UserError names `where`."""
    starts = list(_OPTION.finditer(line))
    values: dict[str, object] = {
        "prompt": line[: starts[0].start()].strip() if starts else line.strip(),
        "negative_prompt": "",
        "width": resolution,
        "height": resolution,
        "seed": seed + index,
        "cfg_scale": None,
        "steps": DEFAULT_STEPS,
    }
    for i, match in enumerate(starts):
        key = match.group(1)
        end = starts[i + 1].start() if i + 1 < len(starts) else len(line)
        text = line[match.end() : end].strip()
        try:
            if key == "n":
                values["negative_prompt"] = text
            elif key == "l":
                values["cfg_scale"] = float(text)
            elif key in _INT_OPTIONS:
                values[_INT_OPTIONS[key]] = int(text)
            else:
                raise UserError(f"{where}: unknown option --{key} (use --n, --w, --h, --d, --l or --s)")
        except ValueError:
            raise UserError(f"{where}: --{key} '{text}' is not a number") from None
    for key in ("width", "height"):
        if values[key] < 8 or values[key] % 8:  # type: ignore[operator]
            raise UserError(f"{where}: {key} {values[key]} is not a positive multiple of 8")
    if values["steps"] < 1:  # type: ignore[operator]
        raise UserError(f"{where}: --s {values['steps']} must be at least 1")
    if not values["prompt"]:
        raise UserError(f"{where}: the prompt is empty")
    return SamplePrompt(**values)  # type: ignore[arg-type]


def load_sample_prompts(config: TrainConfig) -> list[SamplePrompt]:
    """The config's sample prompts: its list, or its prompt file (blank lines and `#` comments skipped)."""
    source = config.sample_prompts
    if source is None:
        return []
    if isinstance(source, Path):
        if not source.is_file():
            raise UserError(f"sample_prompts: file '{source}' does not exist")
        numbered = [
            (f"{source}:{n}", line.strip())
            for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1)
        ]
        numbered = [(where, line) for where, line in numbered if line and not line.startswith("#")]
    else:
        numbered = [(f"sample_prompts[{i}]", line) for i, line in enumerate(source)]
    return [
        parse_prompt_line(line, i, resolution=config.resolution, seed=config.seed, where=where)
        for i, (where, line) in enumerate(numbered)
    ]


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt: `Ink wash, a cat!` -> `ink_wash_a_cat`."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit].rstrip("_") or "prompt"


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), numpy and `random` states on exit, whatever ran in between."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


class TrainingSampler:
    """Renders the config's sample prompts at the steps and epochs it asks for (see the module doc)."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator):
        self.prompts = load_sample_prompts(config)  # UserError before any model loads
        # None: the family's (euler_a; FLUX.1: euler), known once the model is loaded.
        self.spec = samplers.resolve_sampler(config.sample_sampler) if config.sample_sampler else None
        self.every_n_steps = config.sample_every_n_steps
        self.every_n_epochs = config.sample_every_n_epochs
        self.at_first = config.sample_at_first
        self.folder = config.output_dir / "sample"
        self.output_name = config.output_name
        self.model_name = Path(config.base_model).stem
        self.accelerator = accelerator
        self._pipeline: SamplingPipeline | None = None
        self._default_cfg = DEFAULT_CFG
        self._embeddings: list[dict[str, torch.Tensor]] | None = None  # see encode_ahead

    @property
    def needs_text_encoders(self) -> bool:
        """Whether sampling rounds encode the prompts, so the text encoders must stay on the device."""
        return bool(self.prompts) and self._embeddings is None

    def encode_ahead(self, family: ModelFamily) -> None:
        """Encode every sample prompt now, once, for a family that samples from its conditioning
        (`ModelFamily.samples_from_embeddings`: FLUX.1, whose T5-XXL takes 9 GB): the text encoders can then
        leave the device with the text cache, and each round passes the embeddings to the pipeline. Called
        only when the text encoders do not train (the text cache is on), so the embeddings never change;
        they are the pipeline's own (FluxFamily.encode_prompts computes FluxPipeline's conditioning)."""
        if not self.prompts or not family.samples_from_embeddings or not self.accelerator.is_main_process:
            return
        device = self.accelerator.device
        with torch.no_grad(), self.accelerator.autocast():
            self._embeddings = [
                {name: t.to("cpu") for name, t in family.encode_prompts([prompt.prompt], device).items()}
                for prompt in self.prompts
            ]

    # Each returns the files it wrote (none when this is not a sampling round).
    def at_start(self, family: ModelFamily) -> list[Path]:
        return self.sample(family, step=0) if self.at_first else []

    def after_step(self, family: ModelFamily, step: int) -> list[Path]:
        if self.every_n_steps and step % self.every_n_steps == 0:
            return self.sample(family, step=step)
        return []

    def after_epoch(self, family: ModelFamily, step: int, epoch: int) -> list[Path]:
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            return self.sample(family, step=step)
        return []

    def sample(self, family: ModelFamily, step: int) -> list[Path]:
        """Render every prompt now (main process only) and return the files written."""
        if not self.prompts or not self.accelerator.is_main_process:
            return []
        if self._pipeline is None:  # built once; the modules are shared, so it always sees the current LoRA
            self.spec = self.spec or samplers.resolve_sampler(family.default_sampler)
            scheduler = samplers.make_scheduler(
                self.spec, family.schedule_config, family.info.prediction_type
            )
            self._default_cfg = family.default_cfg_scale
            self._pipeline = family.sampling_pipeline(scheduler, self.accelerator.unwrap_model)
        modules = self._pipeline.modules
        was_training = [m.training for m in modules]
        paths: list[Path] = []
        try:
            for m in modules:
                m.eval()
            with preserved_rng(), torch.no_grad(), self.accelerator.autocast():
                images = [self._render(index, prompt) for index, prompt in enumerate(self.prompts)]
        finally:
            for m, training in zip(modules, was_training, strict=True):
                m.train(training)
        for index, (prompt, image) in enumerate(zip(self.prompts, images, strict=True)):
            path = self.folder / f"{self.output_name}_s{step:06d}_p{index:02d}_{slug(prompt.prompt)}.png"
            outputs.save_png(path, image, self._infotext(prompt, step))
            paths.append(path)
        self._log_grid(images, step)
        log.info("Sampled %d images at step %d into %s", len(images), step, self.folder)
        return paths

    def _cfg(self, prompt: SamplePrompt) -> float:
        return prompt.cfg_scale if prompt.cfg_scale is not None else self._default_cfg

    def _render(self, index: int, prompt: SamplePrompt) -> Image.Image:
        settings = pipeline.SamplingSettings(
            sampler=self.spec,
            steps=prompt.steps,
            cfg_scale=self._cfg(prompt),
            width=prompt.width,
            height=prompt.height,
            negative_prompt=prompt.negative_prompt,
            clip_skip=self._pipeline.clip_skip,
        )
        embeddings = None
        if self._embeddings is not None:
            device = self.accelerator.device
            embeddings = {name: t.to(device) for name, t in self._embeddings[index].items()}
        return pipeline.render_image(
            self._pipeline.pipe, prompt.prompt, settings, prompt.seed, progress=False, embeddings=embeddings
        )

    def _infotext(self, prompt: SamplePrompt, step: int) -> str:
        clip_skip = self._pipeline.clip_skip
        return infotext.build_infotext(
            prompt=prompt.prompt,
            negative_prompt=prompt.negative_prompt,
            steps=prompt.steps,
            sampler=self.spec.display_name,
            cfg_scale=self._cfg(prompt),
            seed=prompt.seed,
            width=prompt.width,
            height=prompt.height,
            model_name=self.model_name,
            extra={"Clip skip": clip_skip if clip_skip > 1 else None, "Training step": step},
        )

    def _log_grid(self, images: list[Image.Image], step: int) -> None:
        """One grid per round under the TensorBoard tag `samples` (prompts of other sizes are resized)."""
        try:
            writer = self.accelerator.get_tracker("tensorboard").writer
        except (ValueError, AttributeError):  # no TensorBoard tracker in this run
            return
        size = images[0].size
        row = [image if image.size == size else image.resize(size) for image in images]
        grid = make_grid([row], [f"p{i:02d}" for i in range(len(row))])
        writer.add_image("samples", np.array(grid), step, dataformats="HWC")
        writer.flush()
