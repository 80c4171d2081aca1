"""Held-out validation images: how many, which ones (the same for the same files and seed), never
regularization images, excluded from training, and the validation_data_dir folder. No model is loaded."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from lora_scripts.checks.run import check_before_training, run_check
from lora_scripts.config import TrainConfig, validate_config_dict
from lora_scripts.data.captions import CaptionedImage
from lora_scripts.data.training_set import split_validation, training_set_for
from lora_scripts.errors import UserError
from tests.data.imagefiles import write_image


def images(n: int, reg: int = 0) -> list[CaptionedImage]:
    """n training and `reg` regularization images (paths only, nothing on disk)."""
    out = [CaptionedImage(Path(f"/data/train/{i:02d}.png"), f"train {i}", f"{i:02d}.png") for i in range(n)]
    out += [
        CaptionedImage(Path(f"/data/reg/{i:02d}.png"), "person", f"{i:02d}.png", is_reg=True, subset=1)
        for i in range(reg)
    ]
    return out


@pytest.mark.parametrize(
    ("n", "fraction", "held"),
    [
        (10, 0.1, 1),
        (10, 0.25, 3),  # 2.5 rounds half up (Python's round would give 2)
        (10, 0.04, 1),  # 0.4 rounds to 0, but a fraction above 0 holds out at least one
        (3, 0.5, 2),  # 1.5 → 2
        (4, 0.5, 2),
        (2, 0.5, 1),
        (20, 0.15, 3),
        (10, 0.0, 0),
    ],
)
def test_held_out_count(n: int, fraction: float, held: int) -> None:
    kept, validation = split_validation(images(n), fraction, seed=0)
    assert len(validation) == held and len(kept) == n - held
    assert set(kept).isdisjoint(validation) and set(kept) | set(validation) == set(images(n))


def test_the_same_files_and_seed_hold_out_the_same_images_in_any_order() -> None:
    items = images(12)
    kept, validation = split_validation(items, 0.25, seed=7)
    shuffled = list(items)
    random.Random(1).shuffle(shuffled)
    kept_shuffled, validation_shuffled = split_validation(shuffled, 0.25, seed=7)
    assert validation_shuffled == validation == sorted(validation, key=lambda item: str(item.path))
    assert kept == [item for item in items if item not in validation]  # input order kept
    assert kept_shuffled == [item for item in shuffled if item not in validation]
    # The seed chooses: across ten seeds, 3 of 12 images are not always the same three.
    chosen = {tuple(i.file_name for i in split_validation(items, 0.25, seed=s)[1]) for s in range(10)}
    assert len(chosen) > 1


def test_the_choice_is_a_seeded_permutation_of_the_sorted_paths() -> None:
    items = images(8)
    order = list(range(8))
    random.Random("validation_split/3").shuffle(order)
    _, validation = split_validation(list(reversed(items)), 0.25, seed=3)
    assert validation == [items[i] for i in sorted(order[:2])]  # `items` is already sorted by path


def test_regularization_images_are_never_held_out() -> None:
    items = images(3, reg=5)
    kept, validation = split_validation(items, 0.5, seed=0)
    assert len(validation) == 2 and not any(item.is_reg for item in validation)  # 1.5 of 3 training → 2
    assert [item for item in kept if item.is_reg] == items[3:]


@pytest.mark.parametrize(
    ("n", "fraction", "words"),
    [
        (1, 0.1, "hold out 1 of the 1 training images"),
        (2, 0.75, "hold out 2 of the 2 training images"),
        (3, 1.0, "must be at least 0 and below 1"),
        (3, -0.1, "must be at least 0 and below 1"),
    ],
)
def test_nothing_left_to_train_on_is_a_user_error(n: int, fraction: float, words: str) -> None:
    with pytest.raises(UserError) as err:
        split_validation(images(n, reg=4), fraction, seed=0)
    (message,) = err.value.messages
    assert message.startswith(f"validation_split: {fraction} ") and words in message


# --- through the config --------------------------------------------------------------------------------


def captioned(path: Path, caption: str, size: tuple[int, int] = (8, 8)) -> None:
    write_image(path, size=size)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")


def config(tmp_path: Path, **values: Any) -> TrainConfig:
    data = {"base_model": "m.safetensors", "output_dir": str(tmp_path / "out"), **values}
    return validate_config_dict(data, "<test>", check_paths=False)


def test_held_out_images_are_not_trained_on(tmp_path: Path) -> None:
    data, reg = tmp_path / "train", tmp_path / "reg"
    for i in range(10):
        captioned(data / "3_ink" / f"{i}.png", f"ink {i}")
    for i in range(2):
        write_image(reg / "1_person" / f"{i}.png", size=(8, 8))
    cfg = config(tmp_path, train_data_dir=str(data), reg_data_dir=str(reg), validation_split=0.2, seed=5)
    training_set = training_set_for(cfg)
    held = {item.path for item in training_set.validation}
    assert len(held) == 2 and all(not item.is_reg for item in training_set.validation)
    assert held.isdisjoint(item.path for item in training_set.images)
    assert held.isdisjoint(sample.image.path for sample in training_set.samples)
    assert training_set.num_train_images == 8 and training_set.num_reg_images == 2
    assert training_set.num_train_samples == 8 * 3  # the folder's 3 repeats, for the kept images only
    # The same config holds out the same images; another seed may hold out others, never other counts.
    assert training_set_for(cfg).validation == training_set.validation
    again = training_set_for(config(tmp_path, train_data_dir=str(data), validation_split=0.2, seed=5))
    assert again.validation == training_set.validation  # reg images do not change the choice
    # check counts (and plans steps for) the training images only
    assert check_before_training(cfg).num_train_images == 8
    report = run_check(cfg, config_path="<test>")
    assert [e for e in report.errors if not e.startswith("base_model:")] == []  # no model in this test
    assert report.plan.num_images == 8 and report.dataset.images_captioned == 8 + 2


def test_without_validation_nothing_is_held_out(tmp_path: Path) -> None:
    for i in range(4):
        captioned(tmp_path / "train" / f"{i}.png", f"ink {i}")
    training_set = training_set_for(config(tmp_path, train_data_dir=str(tmp_path / "train")))
    assert training_set.validation == [] and training_set.num_train_images == 4


def test_validation_split_too_large_names_the_key(tmp_path: Path) -> None:
    captioned(tmp_path / "train" / "only.png", "ink")
    cfg = config(tmp_path, train_data_dir=str(tmp_path / "train"), validation_split=0.5)
    with pytest.raises(UserError) as err:
        training_set_for(cfg)
    assert err.value.messages[0].startswith("validation_split: 0.5 would hold out 1 of the 1 training images")


def test_validation_data_dir_is_read_like_train_data_dir(tmp_path: Path) -> None:
    for i in range(3):
        captioned(tmp_path / "train" / f"{i}.png", f"ink {i}")
    captioned(tmp_path / "val" / "a.png", "held out a")
    captioned(tmp_path / "val" / "5_x" / "b.png", "held out b")  # N_name folders do not repeat here
    cfg = config(tmp_path, train_data_dir=str(tmp_path / "train"), validation_data_dir=str(tmp_path / "val"))
    training_set = training_set_for(cfg)
    assert [(i.file_name, i.caption, i.repeats) for i in training_set.validation] == [
        ("5_x/b.png", "held out b", 1),
        ("a.png", "held out a", 1),
    ]
    assert training_set.num_train_images == 3 and len(training_set.samples) == 3


def test_validation_data_dir_uses_its_own_metadata_csv(tmp_path: Path) -> None:
    captioned(tmp_path / "train" / "t.png", "ink")
    write_image(tmp_path / "val" / "a.png", size=(8, 8))
    (tmp_path / "val" / "metadata.csv").write_text("file_name,text\na.png,from the csv\n", encoding="utf-8")
    cfg = config(tmp_path, train_data_dir=str(tmp_path / "train"), validation_data_dir=str(tmp_path / "val"))
    assert [i.caption for i in training_set_for(cfg).validation] == ["from the csv"]


def test_validation_data_dir_problems_come_with_the_training_data_problems(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "t.png", size=(8, 8))  # no caption
    write_image(tmp_path / "val" / "v.png", size=(8, 8))  # no caption
    cfg = config(tmp_path, train_data_dir=str(tmp_path / "train"), validation_data_dir=str(tmp_path / "val"))
    with pytest.raises(UserError) as err:
        training_set_for(cfg)
    messages = err.value.messages
    assert len(messages) == 2
    assert messages[0].startswith(f"{tmp_path / 'train' / 't.png'}: image without a caption")
    assert messages[1].startswith(f"{tmp_path / 'val' / 'v.png'}: image without a caption")
    assert run_check(cfg, config_path="<test>").errors[:2] == messages  # then base_model's (none here)
