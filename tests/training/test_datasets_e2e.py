"""The dataset features end to end through `lora-scripts train` / `check` (the CLI function) on the tiny
model: kohya repeat folders, missing captions, several datasets with their own resolution and caption options,
regularization images with prior_loss_weight, and aspect-ratio buckets whose plan `check` shows and `train`
follows. What each step saw is recorded by wrapping the loop's `batch_inputs` and `diffusion_loss`."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.cli import main
from lora_scripts.demo import draw_ink_image
from lora_scripts.export.lora_file import read_lora_metadata
from lora_scripts.training import loop
from tests.training.conftest import write_config


def picture(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A deterministic ink drawing of `size` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_ink_image(seed, seed=seed, size=max(size)).resize(size).save(path)
    return path


def captioned(path: Path, caption: str, size: tuple[int, int] = (64, 64), extension: str = ".txt") -> Path:
    picture(path, size, seed=sum(map(ord, path.name)))
    path.with_suffix(extension).write_text(caption, encoding="utf-8")
    return path


def run_config(tmp_path: Path, model: Path, **values: Any) -> Path:
    """A short run's config: tiny model, fixed seed, 64 px unless `values` say otherwise."""
    defaults = {"base_model": str(model), "output_dir": str(tmp_path / "out" / "run"), "resolution": 64}
    return write_config(tmp_path / "run.yaml", **{**defaults, "learning_rate": 1e-3, **values})


class Steps:
    """What each micro-batch fed the loss: captions, latents shape [B, 4, h, w], loss weights [B]."""

    def __init__(self) -> None:
        self.captions: list[list[str]] = []
        self.shapes: list[tuple[int, ...]] = []
        self.weights: list[list[float]] = []


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Steps:
    seen = Steps()
    batch_inputs, diffusion_loss = loop.batch_inputs, loop.diffusion_loss

    def recording_batch_inputs(family: Any, batch: dict, *args: Any) -> Any:
        seen.captions.append(list(batch["captions"]))
        return batch_inputs(family, batch, *args)

    def recording_loss(family: Any, latents: torch.Tensor, cond: Any, settings: Any, weights: Any) -> Any:
        seen.shapes.append(tuple(latents.shape))
        seen.weights.append(weights.tolist())
        return diffusion_loss(family, latents, cond, settings, weights)

    monkeypatch.setattr(loop, "batch_inputs", recording_batch_inputs)
    monkeypatch.setattr(loop, "diffusion_loss", recording_loss)
    return seen


Cli = Callable[..., tuple[int, str, str]]  # argv -> (exit code, stdout, stderr)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def loss_steps(logging_dir: Path) -> list[int]:
    (events,) = list(logging_dir.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars("loss")]


def test_kohya_folders_train_with_their_repeats(
    tmp_path: Path, tiny_model_dir: Path, cli: Cli, steps: Steps
) -> None:
    data = tmp_path / "data"
    captioned(data / "3_ink" / "a.png", "ink wash, mountain")
    captioned(data / "3_ink" / "b.png", "ink wash, river")
    captioned(data / "1_close" / "c.png", "ink wash, close-up")
    config = run_config(tmp_path, tiny_model_dir, train_data_dir=str(data), batch_size=2, epochs=2)
    code, out, err = cli("train", "--config", str(config))
    assert code == 0, err
    # 2 images x 3 + 1 x 1 = 7 samples; batch 2 -> 4 batches per epoch; 2 epochs = 8 steps
    assert "Done: 8 steps." in out
    assert sorted(len(batch) for batch in steps.captions) == [1, 1, 2, 2, 2, 2, 2, 2]
    assert Counter(c for batch in steps.captions for c in batch) == {
        "ink wash, mountain": 6,
        "ink wash, river": 6,
        "ink wash, close-up": 2,
    }
    meta = read_lora_metadata(tmp_path / "out" / "run" / "run.safetensors")
    assert meta["ss_num_train_images"] == "7"  # sd-scripts counts images x repeats
    assert meta["ss_num_batches_per_epoch"] == "4" and meta["ss_steps"] == "8" and meta["ss_epoch"] == "2"
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "1_close": {"n_repeats": 1, "img_count": 1},
        "3_ink": {"n_repeats": 3, "img_count": 2},
    }
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {} and meta["ss_num_reg_images"] == "0"
    assert loss_steps(tmp_path / "out" / "run" / "logs") == list(range(1, 9))


def test_missing_caption_stops_before_anything_is_written(
    tmp_path: Path, tiny_model_dir: Path, cli: Cli
) -> None:
    data = tmp_path / "data"
    captioned(data / "2_ink" / "a.png", "ink wash")
    picture(data / "2_ink" / "b.png", (64, 64), seed=1)
    config = run_config(tmp_path, tiny_model_dir, train_data_dir=str(data))
    code, out, err = cli("train", "--config", str(config))
    assert code == 2 and out == ""
    b = data / "2_ink" / "b.png"
    assert err.splitlines()[-1] == (
        f"error: {b}: image without a caption (no b.txt beside it); write its caption in "
        f"{b.with_suffix('.txt')} or remove the image."
    )
    assert not (tmp_path / "out").exists()


def test_captions_with_another_extension_are_named(tmp_path: Path, tiny_model_dir: Path, cli: Cli) -> None:
    data = tmp_path / "data"
    captioned(data / "a.png", "ink wash", extension=".caption")
    captioned(data / "b.png", "ink wash", extension=".caption")
    config = run_config(tmp_path, tiny_model_dir, train_data_dir=str(data))
    code, _, err = cli("train", "--config", str(config))
    assert code == 2
    assert (
        f"error: found 2 .caption files beside the images in {data} but no .txt ones; set "
        "caption_extension: .caption."
    ) in err.splitlines()
    assert not (tmp_path / "out").exists()


def test_two_datasets_with_their_own_resolution_and_captions(
    tmp_path: Path, tiny_model_dir: Path, cli: Cli, steps: Steps
) -> None:
    ink, photos = tmp_path / "ink", tmp_path / "photos"
    captioned(ink / "a.png", "ink wash, mountain")
    captioned(ink / "b.png", "ink wash, river")
    captioned(photos / "c.png", "photo, bridge, boat, dusk", size=(128, 128), extension=".caption")
    config = run_config(
        tmp_path,
        tiny_model_dir,
        caption_prefix="sks",  # the top level is every dataset's default
        batch_size=2,
        epochs=2,
        datasets=[
            {"train_data_dir": str(ink), "num_repeats": 2},
            {
                "train_data_dir": str(photos),
                "resolution": 128,
                "caption_extension": ".caption",
                "caption_suffix": "photo style",
                "shuffle_caption": True,
                "keep_tokens": 1,
            },
        ],
    )
    code, out, err = cli("train", "--config", str(config))
    assert code == 0, err
    # ink: 2 x 2 samples at 64 px -> 2 batches of latents [2, 4, 8, 8]; photos: 1 sample at 128 px -> one
    # batch [1, 4, 16, 16]. 3 batches per epoch, 2 epochs = 6 steps.
    assert "Done: 6 steps." in out
    assert Counter(steps.shapes) == {(2, 4, 8, 8): 4, (1, 4, 16, 16): 2}
    ink_captions = [c for batch in steps.captions if len(batch) == 2 for c in batch]
    assert Counter(ink_captions) == {"sks, ink wash, mountain": 4, "sks, ink wash, river": 4}
    photo_captions = [batch[0] for batch in steps.captions if len(batch) == 1]
    assert len(photo_captions) == 2
    for caption in photo_captions:
        tags = caption.split(", ")
        # keep_tokens 1 keeps the inherited prefix first; the rest (suffix included) is shuffled
        assert tags[0] == "sks" and sorted(tags[1:]) == ["boat", "bridge", "dusk", "photo", "photo style"]
    assert photo_captions[0] != photo_captions[1]  # reshuffled per draw (the seed 42 orders differ)
    meta = read_lora_metadata(tmp_path / "out" / "run" / "run.safetensors")
    assert meta["ss_num_train_images"] == "5" and meta["ss_steps"] == "6"
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert [(b["resolution"], b["count"]) for b in buckets.values()] == [([64, 64], 4), ([128, 128], 1)]


def test_reg_images_are_balanced_and_weighted(
    tmp_path: Path, tiny_model_dir: Path, cli: Cli, steps: Steps
) -> None:
    data, reg = tmp_path / "data", tmp_path / "reg"
    for name in ("a", "b", "c"):
        captioned(data / "2_sks" / f"{name}.png", f"sks person, {name}")
    for i in range(4):
        picture(reg / "1_person" / f"{i}.png", (64, 64), seed=10 + i)  # no captions: class token "person"
    config = run_config(
        tmp_path,
        tiny_model_dir,
        train_data_dir=str(data),
        reg_data_dir=str(reg),
        prior_loss_weight=0.5,
        batch_size=4,
        epochs=1,
    )
    code, out, err = cli("train", "--config", str(config))
    assert code == 0, err
    # 3 images x 2 = 6 training samples; reg repeats [1, 1, 1, 1] balanced to 6 draws: [2, 2, 1, 1].
    # 12 samples / batch 4 = 3 steps; every training draw weighs 1.0, every reg draw 0.5.
    assert "Done: 3 steps." in out
    weights = [w for batch in steps.weights for w in batch]
    assert Counter(weights) == {1.0: 6, 0.5: 6}
    captions = Counter(c for batch in steps.captions for c in batch)
    assert captions["person"] == 6 and sum(captions.values()) == 12
    # the weights of a batch belong to its own samples
    for batch_captions, batch_weights in zip(steps.captions, steps.weights, strict=True):
        assert batch_weights == [0.5 if c == "person" else 1.0 for c in batch_captions]
    meta = read_lora_metadata(tmp_path / "out" / "run" / "run.safetensors")
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_reg_images"] == "4"
    assert meta["ss_prior_loss_weight"] == "0.5" and meta["ss_num_batches_per_epoch"] == "3"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks": {"n_repeats": 2, "img_count": 3}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 4}}


def test_check_shows_the_buckets_and_steps_that_train_runs(
    tmp_path: Path, tiny_model_dir: Path, cli: Cli, steps: Steps
) -> None:
    data = tmp_path / "data"
    for i in range(2):
        captioned(data / f"wide{i}.png", "ink wash, wide", size=(200, 70))
    captioned(data / "tall.png", "ink wash, tall", size=(70, 200))
    for i in range(3):
        captioned(data / f"square{i}.png", "ink wash, square", size=(100, 100))
    config = run_config(
        tmp_path,
        tiny_model_dir,
        train_data_dir=str(data),
        resolution=128,
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=256,
        batch_size=2,
        epochs=2,
    )
    code, out, err = cli("check", "--config", str(config))
    assert code == 0, err
    # Buckets of about 128x128 px: 200x70 -> 192x64, 70x200 -> 64x192, 100x100 -> 128x128.
    # Batches: ceil(1/2) + ceil(3/2) + ceil(2/2) = 4 per epoch, x 2 epochs = 8 steps.
    lines = out.splitlines()
    assert "Plan: 8 steps" in lines
    start = lines.index("Buckets: 3")
    assert lines[start + 1 : start + 4] == [
        "     64 x 192       1 samples    1 batches  #######",
        "    128 x 128       3 samples    2 batches  ####################",
        "    192 x 64        2 samples    1 batches  #############",
    ]
    assert any(line.endswith("= 4 batches per epoch") for line in lines)

    code, out, err = cli("train", "--config", str(config))
    assert code == 0, err
    assert "Done: 8 steps." in out
    # latents [B, 4, height/8, width/8] per bucket, per epoch: 1 tall batch, 2 square, 1 wide
    assert Counter(steps.shapes) == {(1, 4, 24, 8): 2, (2, 4, 16, 16): 2, (1, 4, 16, 16): 2, (2, 4, 8, 24): 2}
    meta = read_lora_metadata(tmp_path / "out" / "run" / "run.safetensors")
    assert meta["ss_steps"] == "8" and meta["ss_num_batches_per_epoch"] == "4"
    assert meta["ss_enable_bucket"] == "True"
    assert loss_steps(tmp_path / "out" / "run" / "logs") == list(range(1, 9))
