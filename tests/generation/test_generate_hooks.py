"""`run_generate`'s hooks for long-lived callers (the web app): progress over every step of every image, a
stop between steps, and a kept pipeline that gives the same pictures as a fresh one and loses its LoRAs."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lora_scripts.generation.generate import load_fresh, run_generate
from lora_scripts.generation.options import GenerateOptions

PROMPT = "ancient temple, <lora:ink_painting_v1:0.7>, ink wash painting"


def _options(base_model, lora_dir, output, **values) -> GenerateOptions:
    settings = dict(
        steps=3, width=64, height=64, seed=7, sampler="euler", progress=False, lora_dirs=[lora_dir]
    )
    settings.update(values)
    return GenerateOptions(base_model=str(base_model), prompt=PROMPT, output=output, **settings)


def _no_lora(base_model, output) -> GenerateOptions:
    settings = dict(steps=3, width=64, height=64, seed=7, sampler="euler", progress=False)
    return GenerateOptions(
        base_model=str(base_model), prompt="ancient temple, ink wash painting", output=output, **settings
    )


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_progress_counts_every_step_of_every_image(tiny_dir, lora_dir, tmp_path):
    reports = []
    options = _options(tiny_dir, lora_dir, tmp_path / "out", num_images=2, lora_weights=[0.0, 1.0])
    run_generate(options, on_progress=lambda done, total: reports.append((done, total)))
    # 2 seeds x 2 weights, 3 Euler steps each: 12 steps, reported in order.
    assert reports == [(n, 12) for n in range(1, 13)]


def test_a_stop_ends_after_the_images_already_written(tiny_dir, lora_dir, tmp_path):
    steps_seen = []

    def stop_in_the_second_image() -> bool:
        steps_seen.append(1)
        return len(steps_seen) > 4  # image 1 takes steps 1-3; the stop comes at step 2 of image 2

    options = _options(tiny_dir, lora_dir, tmp_path / "out", num_images=3)
    result = run_generate(options, should_stop=stop_in_the_second_image)
    assert result.stopped
    assert [p.name for p in result.files] == ["00000-7.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-7.png"]


def test_a_kept_pipeline_renders_as_a_fresh_one_and_drops_its_loras(tiny_dir, lora_dir, tmp_path):
    kept = {}

    def keep(options, sampler, device, dtype):
        if "pipe" not in kept:
            kept["pipe"] = load_fresh(options, sampler, device, dtype)
        return kept["pipe"]

    fresh = run_generate(_options(tiny_dir, lora_dir, tmp_path / "fresh.png"))
    first = run_generate(_options(tiny_dir, lora_dir, tmp_path / "first.png"), load=keep)
    assert not any(kept["pipe"].pipe.get_list_adapters().values())
    again = run_generate(_options(tiny_dir, lora_dir, tmp_path / "again.png"), load=keep)
    plain = run_generate(_no_lora(tiny_dir, tmp_path / "plain.png"), load=keep)
    np.testing.assert_array_equal(_pixels(first.files[0]), _pixels(fresh.files[0]))
    np.testing.assert_array_equal(_pixels(again.files[0]), _pixels(fresh.files[0]))
    no_lora = run_generate(_no_lora(tiny_dir, tmp_path / "no_lora.png"))
    # The kept pipeline without a LoRA tag draws what a fresh pipeline without LoRAs draws, and the LoRA
    # changes the picture (so the equalities above are not vacuous).
    np.testing.assert_array_equal(_pixels(plain.files[0]), _pixels(no_lora.files[0]))
    assert np.abs(_pixels(fresh.files[0]).astype(int) - _pixels(no_lora.files[0]).astype(int)).max() > 0
