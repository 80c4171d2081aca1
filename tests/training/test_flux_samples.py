"""FLUX.1 training samples with the text cache on: the sample prompts are encoded once, before CLIP-L and T5
leave the device (T5-XXL takes 9 GB of a 12 GB card), and the images are the same as when the pipeline
encodes the prompts itself at every round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from transformers import T5EncoderModel

from lora_scripts.config import load_config
from lora_scripts.training import caching
from lora_scripts.training.loop import train
from tests.training.test_flux_train import flux_config

PROMPTS = ["ink wash painting, a temple --s 2 --d 3", "a boat on a river --s 2 --d 4 --l 2.0"]


def _pixels(folder: Path) -> list[np.ndarray]:
    files = sorted((folder / "sample").glob("*.png"))
    assert len(files) == 2 * len(PROMPTS)  # steps 2 and 4
    return [np.asarray(Image.open(path)) for path in files]


def test_samples_render_from_prompts_encoded_ahead(tmp_path, flux_dir, dataset_dir, monkeypatch):
    samples = dict(sample_prompts=PROMPTS, sample_every_n_steps=2, network_dropout=0.0, flip_aug=False)
    encoded = flux_config(
        tmp_path, "ahead", dataset_dir, base_model=str(flux_dir), cache_text_encoder_outputs=True, **samples
    )
    each_round = flux_config(
        tmp_path, "rounds", dataset_dir, base_model=str(flux_dir), cache_text_encoder_outputs=False, **samples
    )
    calls: list[int] = []
    offloads: list[bool] = []
    real_forward, real_cache = T5EncoderModel.forward, caching.cache_text_encoder_outputs

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return real_forward(self, *args, **kwargs)

    def recording_cache(*args, offload: bool = True, **kwargs):
        offloads.append(offload)
        result = real_cache(*args, offload=offload, **kwargs)
        calls.clear()  # from here on, T5 runs only where sampling would need it
        return result

    monkeypatch.setattr(T5EncoderModel, "forward", counting_forward)
    monkeypatch.setattr("lora_scripts.training.loop.cache_text_encoder_outputs", recording_cache)
    train(load_config(encoded))
    assert offloads == [True]  # the text encoders leave the device although samples are asked for
    assert calls == []  # and no sampling round ran T5
    monkeypatch.undo()
    train(load_config(each_round))
    ahead, rounds = _pixels(tmp_path / "ahead"), _pixels(tmp_path / "rounds")
    assert all(np.array_equal(a, b) for a, b in zip(ahead, rounds, strict=True))
    assert not np.array_equal(ahead[0], ahead[1])  # two prompts, two pictures
