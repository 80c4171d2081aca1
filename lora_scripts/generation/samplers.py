"""Samplers under AUTOMATIC1111's names, built as diffusers schedulers from the base model's own config.

A user types `euler_a`, `Euler a`, `k_euler_a` or `DPM++ 2M Karras`; all resolve to one `SamplerSpec` whose
`display_name` is what A1111 writes into the infotext, so a PNG pasted into WebUI selects the same sampler.
The schedules are diffusers' (the model's `timestep_spacing`, betas and prediction type), not k-diffusion's,
so the same seed gives a similar picture in WebUI, not the identical one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from lora_scripts.errors import UserError
from lora_scripts.models.detect import PredictionType


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: our key (`euler_a`), A1111's display name (`Euler a`) and the diffusers scheduler."""

    key: str
    display_name: str
    scheduler_class: type[SchedulerMixin]
    options: Mapping[str, Any] = field(default_factory=dict)


_DPM = DPMSolverMultistepScheduler
SAMPLERS: dict[str, SamplerSpec] = {
    spec.key: spec
    for spec in (
        SamplerSpec("euler", "Euler", EulerDiscreteScheduler),
        SamplerSpec("euler_a", "Euler a", EulerAncestralDiscreteScheduler),
        SamplerSpec("heun", "Heun", HeunDiscreteScheduler),
        SamplerSpec("dpm++ 2m", "DPM++ 2M", _DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        SamplerSpec(
            "dpm++ 2m karras",
            "DPM++ 2M Karras",
            _DPM,
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        SamplerSpec("dpm++ 2m sde", "DPM++ 2M SDE", _DPM, {"algorithm_type": "sde-dpmsolver++"}),
        SamplerSpec(
            "dpm++ 2m sde karras",
            "DPM++ 2M SDE Karras",
            _DPM,
            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        ),
        SamplerSpec("ddim", "DDIM", DDIMScheduler),
        SamplerSpec("unipc", "UniPC", UniPCMultistepScheduler),
    )
}
# The parts of a scheduler config that describe the model's noise schedule. Only these are carried over from
# the source config: a sampler's own settings (Karras sigmas, solver type, ...) must not leak from whichever
# scheduler the config came from.
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "steps_offset",
    "timestep_spacing",
    "set_alpha_to_one",
    "clip_sample",
    "rescale_betas_zero_snr",
)


def _normalize(name: str) -> str:
    """`Euler a`, `euler_a`, `k_euler_a`, `DPMPP_2M_Karras` -> `euler a`, `dpm++ 2m karras`."""
    text = re.sub(r"[\s_\-]+", " ", name.strip().lower())
    text = text.replace("dpmpp", "dpm++")
    text = re.sub(r"^k ", "", text)  # A1111's old API names: k_euler_a, k_dpmpp_2m, ...
    text = re.sub(r" ka$", " karras", text)  # k_dpmpp_2m_ka
    return text


_LOOKUP: dict[str, SamplerSpec] = {}
for _spec in SAMPLERS.values():
    _LOOKUP[_normalize(_spec.key)] = _spec
    _LOOKUP[_normalize(_spec.display_name)] = _spec


def resolve_sampler(name: str) -> SamplerSpec:
    """The sampler a user named, in our spelling or A1111's; UserError listing the choices otherwise."""
    spec = _LOOKUP.get(_normalize(name))
    if spec is None:
        choices = ", ".join(f"'{s.key}' ({s.display_name})" for s in SAMPLERS.values())
        raise UserError(f"--sampler: unknown sampler '{name}'; choose one of {choices}.")
    return spec


def make_scheduler(
    sampler: SamplerSpec | str, base_config: Mapping[str, Any], prediction_type: PredictionType | str
) -> SchedulerMixin:
    """A fresh scheduler for `sampler` with the model's noise schedule, taken from `base_config` (any
    scheduler's config: `SDComponents.noise_scheduler.config`, or a pipeline's current scheduler's), and
    `prediction_type` ("epsilon" / "v_prediction"; "flow": FLUX.1's FlowMatchEulerDiscreteScheduler from its
    own config, Euler only).

    Stateful schedulers (DPM++ multistep) must not be shared between two pipelines running at once.
    """
    spec = resolve_sampler(sampler) if isinstance(sampler, str) else sampler
    if prediction_type == "flow":
        # FLUX.1 samples with its own flow-matching Euler (its config: shift, dynamic shifting by image size).
        if spec.key != "euler":
            raise UserError(
                f"sampler: FLUX.1 samples with flow-matching Euler only, not '{spec.display_name}'; "
                "use euler."
            )
        return FlowMatchEulerDiscreteScheduler.from_config(dict(base_config))
    schedule = {key: base_config[key] for key in _SCHEDULE_KEYS if key in base_config}
    return spec.scheduler_class.from_config(schedule, prediction_type=prediction_type, **spec.options)
