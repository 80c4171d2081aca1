"""Samplers: A1111's names and ours resolve to one diffusers scheduler, built from the model's schedule."""

from __future__ import annotations

import pytest
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from lora_scripts.errors import UserError
from lora_scripts.generation.samplers import make_scheduler, resolve_sampler
from lora_scripts.models.sd_loading import make_noise_scheduler, shipped_config_dir

NAMES = [
    ("euler", "Euler", EulerDiscreteScheduler),
    ("Euler", "Euler", EulerDiscreteScheduler),
    ("euler_a", "Euler a", EulerAncestralDiscreteScheduler),
    ("Euler a", "Euler a", EulerAncestralDiscreteScheduler),
    ("k_euler_a", "Euler a", EulerAncestralDiscreteScheduler),
    ("dpm++ 2m", "DPM++ 2M", DPMSolverMultistepScheduler),
    ("dpmpp_2m", "DPM++ 2M", DPMSolverMultistepScheduler),
    ("DPM++ 2M Karras", "DPM++ 2M Karras", DPMSolverMultistepScheduler),
    ("dpm++_2m_karras", "DPM++ 2M Karras", DPMSolverMultistepScheduler),
    ("ddim", "DDIM", DDIMScheduler),
    ("DDIM", "DDIM", DDIMScheduler),
]


@pytest.mark.parametrize(("name", "display", "cls"), NAMES)
def test_names_resolve(name, display, cls):
    spec = resolve_sampler(name)
    assert spec.display_name == display
    assert spec.scheduler_class is cls


def test_unknown_sampler_lists_the_choices():
    with pytest.raises(UserError) as info:
        resolve_sampler("plms")
    message = info.value.messages[0]
    assert "unknown sampler 'plms'" in message
    assert "'euler_a' (Euler a)" in message and "'dpm++ 2m karras' (DPM++ 2M Karras)" in message


@pytest.fixture
def sd_config():
    scheduler = DDPMScheduler.load_config(shipped_config_dir("sd_v2"), subfolder="scheduler")
    return make_noise_scheduler(scheduler, "v_prediction").config


def test_scheduler_keeps_the_model_schedule_and_prediction_type(sd_config):
    karras = make_scheduler("DPM++ 2M Karras", sd_config, "v_prediction")
    assert isinstance(karras, DPMSolverMultistepScheduler)
    assert karras.config.use_karras_sigmas and karras.config.prediction_type == "v_prediction"
    assert karras.config.beta_schedule == "scaled_linear" and karras.config.beta_end == 0.012
    # Built from the Karras scheduler's own config, the plain sampler must not inherit Karras sigmas.
    plain = make_scheduler("dpm++ 2m", karras.config, "epsilon")
    assert not plain.config.use_karras_sigmas and plain.config.prediction_type == "epsilon"
    euler = make_scheduler("euler", karras.config, "epsilon")
    assert not euler.config.use_karras_sigmas
