"""collect_subsets: kohya N_name repeat folders, caption_extension, regularization images, several subsets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lora_scripts.data.captions import CaptionedImage, collect_dataset
from lora_scripts.data.subsets import SubsetSpec, collect_subsets, folder_repeats
from lora_scripts.errors import UserError
from tests.data.imagefiles import write_image


def captioned(path: Path, caption: str = "a caption", extension: str = ".txt") -> Path:
    """Write a tiny image at `path` and its caption beside it."""
    write_image(path, size=(4, 4))
    path.with_suffix(extension).write_text(caption, encoding="utf-8")
    return path


def problems_of(specs: list[SubsetSpec]) -> list[str]:
    with pytest.raises(UserError) as caught:
        collect_subsets(specs)
    return caught.value.messages


def one_matching(messages: list[str], *fragments: str) -> str:
    """The single message containing every fragment (fails if none or several do)."""
    matching = [m for m in messages if all(f in m for f in fragments)]
    assert len(matching) == 1, (fragments, messages)
    return matching[0]


# ---- folder_repeats --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file_name, expected",
    [
        ("a.png", (1, None)),
        ("10_ink/a.png", (10, "ink")),
        ("10_ink/sub/a.png", (10, "ink")),
        ("2_outer/3_inner/a.png", (3, "inner")),  # the innermost N_name folder wins
        ("3_inner/plain/a.png", (3, "inner")),
        ("1_red_dog/a.png", (1, "red_dog")),  # sd-scripts keeps the underscores of the class
        ("5_sks dog/a.png", (5, "sks dog")),
        ("007_bond/a.png", (7, "bond")),
        ("10_/a.png", (1, None)),  # no name after the number: not a repeat folder
        ("ten_ink/a.png", (1, None)),
        ("10_ink.png", (1, None)),  # the file name itself does not count
    ],
)
def test_folder_repeats(file_name: str, expected: tuple[int, str | None]) -> None:
    assert folder_repeats(file_name) == expected


def test_folder_repeats_zero_is_an_error_naming_the_folder() -> None:
    with pytest.raises(UserError) as caught:
        folder_repeats("1_ok/0_never/a.png")
    [message] = caught.value.messages
    assert message.startswith("1_ok/0_never:") and "0 times" in message


# ---- repeats ---------------------------------------------------------------------------------------------


def test_repeats_come_from_nested_folders(tmp_path: Path) -> None:
    captioned(tmp_path / "10_ink" / "a.png", "ink a")
    captioned(tmp_path / "10_ink" / "deep" / "b.png", "ink b")
    captioned(tmp_path / "10_ink" / "2_sketch" / "c.png", "sketch c")
    captioned(tmp_path / "loose.png", "loose")

    items = collect_subsets([SubsetSpec(tmp_path)])

    assert [(i.file_name, i.repeats, i.caption) for i in items] == [
        ("10_ink/2_sketch/c.png", 2, "sketch c"),
        ("10_ink/a.png", 10, "ink a"),
        ("10_ink/deep/b.png", 10, "ink b"),
        ("loose.png", 1, "loose"),
    ]
    assert items[1] == CaptionedImage(
        path=tmp_path / "10_ink" / "a.png", caption="ink a", file_name="10_ink/a.png", repeats=10
    )


def test_num_repeats_overrides_folder_numbers(tmp_path: Path) -> None:
    captioned(tmp_path / "10_ink" / "a.png")
    captioned(tmp_path / "0_zero" / "b.png")  # no error: the folder numbers are not used
    captioned(tmp_path / "c.png")
    items = collect_subsets([SubsetSpec(tmp_path, num_repeats=3)])
    assert [(i.file_name, i.repeats) for i in items] == [
        ("0_zero/b.png", 3),
        ("10_ink/a.png", 3),
        ("c.png", 3),
    ]


def test_zero_repeat_folder_is_reported_once_per_folder(tmp_path: Path) -> None:
    captioned(tmp_path / "0_ink" / "a.png")
    captioned(tmp_path / "0_ink" / "b.png")
    captioned(tmp_path / "1_ok" / "c.png")
    [message] = problems_of([SubsetSpec(tmp_path)])
    assert message.startswith(f"{tmp_path / '0_ink'}:") and "rename it to 1_<name>" in message


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_num_repeats_names_its_key(tmp_path: Path, bad: int) -> None:
    captioned(tmp_path / "a.png")
    [message] = problems_of([SubsetSpec(tmp_path, num_repeats=bad, key="datasets[2].image_dir")])
    assert message.startswith(f"datasets[2].num_repeats: {bad} is not a positive whole number")


def test_image_dir_named_like_a_repeat_folder_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    captioned(tmp_path / "10_ink" / "a.png")
    with caplog.at_level(logging.WARNING, logger="lora_scripts.data.subsets"):
        [item] = collect_subsets([SubsetSpec(tmp_path / "10_ink")])
    assert item.repeats == 1
    assert "point train_data_dir at its parent folder" in caplog.text


# ---- caption files -----------------------------------------------------------------------------------------


def test_caption_extension_reads_other_files(tmp_path: Path) -> None:
    captioned(tmp_path / "a.png", "from caption", extension=".caption")
    (tmp_path / "a.txt").write_text("from txt")  # ignored: not the configured extension
    captioned(tmp_path / "photo.v2.jpg", "\ufeff dotted stem \n", extension=".caption")  # BOM, spaces

    items = collect_subsets([SubsetSpec(tmp_path, caption_extension=".caption")])

    assert [(i.file_name, i.caption) for i in items] == [
        ("a.png", "from caption"),
        ("photo.v2.jpg", "dotted stem"),
    ]


def test_missing_caption_with_default_txt(tmp_path: Path) -> None:
    captioned(tmp_path / "ok.png")
    write_image(tmp_path / "bare.png")
    [message] = problems_of([SubsetSpec(tmp_path)])
    assert message == (
        f"{tmp_path / 'bare.png'}: image without a caption (no bare.txt beside it); write its caption in "
        f"{tmp_path / 'bare.txt'} or remove the image."
    )


def test_missing_caption_beside_a_metadata_csv_names_metadata_path(tmp_path: Path) -> None:
    """A folder whose captions are in metadata.csv (the labeler's and the web app's default), read with
    metadata_path unset: the message says which key reads them."""
    write_image(tmp_path / "bare.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\nbare.png,a cat\n", encoding="utf-8")
    [message] = problems_of([SubsetSpec(tmp_path)])
    assert message == (
        f"{tmp_path / 'bare.png'}: image without a caption (no bare.txt beside it); set metadata_path: "
        f"{tmp_path / 'metadata.csv'} in the config to read the folder's captions, or write its caption in "
        f"{tmp_path / 'bare.txt'} or remove the image."
    )


def test_missing_caption_with_caption_extension(tmp_path: Path) -> None:
    captioned(tmp_path / "ok.png", extension=".caption")
    write_image(tmp_path / "sub" / "bare.png")
    [message] = problems_of([SubsetSpec(tmp_path, caption_extension=".caption")])
    one_matching([message], "bare.png: image without a caption (no bare.caption beside it)")


def test_hint_when_captions_have_another_extension(tmp_path: Path) -> None:
    for i in range(3):
        captioned(tmp_path / "1_ink" / f"{i}.png", extension=".caption")
    (tmp_path / "1_ink" / "0.tags").write_text("tags")
    (tmp_path / "1_ink" / "unrelated.caption").write_text("no image with this stem")

    messages = problems_of([SubsetSpec(tmp_path, key="datasets[1].train_data_dir")])

    hint = one_matching(messages, "found 3 .caption and 1 .tags files")
    assert hint == (
        f"found 3 .caption and 1 .tags files beside the images in {tmp_path} but no .txt ones; set "
        "datasets[1].caption_extension: .caption."
    )
    assert len([m for m in messages if "image without a caption" in m]) == 3
    assert len(messages) == 4


def test_no_hint_when_some_images_have_the_configured_extension(tmp_path: Path) -> None:
    captioned(tmp_path / "a.png")
    captioned(tmp_path / "b.png", extension=".caption")
    [message] = problems_of([SubsetSpec(tmp_path)])
    assert "b.png: image without a caption" in message


@pytest.mark.parametrize("extension", ["txt", ".", "", "./x"])
def test_caption_extension_needs_a_leading_dot(tmp_path: Path, extension: str) -> None:
    captioned(tmp_path / "a.png")
    [message] = problems_of([SubsetSpec(tmp_path, caption_extension=extension)])
    assert message.startswith(f"caption_extension: '{extension}' is not a file extension")


# ---- regularization images -----------------------------------------------------------------------------


def test_reg_images_take_the_class_token_unless_captioned(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    write_image(reg / "1_person" / "x.png")
    captioned(reg / "1_person" / "y.png", "a person in a red coat")
    write_image(reg / "3_dog" / "sub" / "z.png")

    items = collect_subsets([SubsetSpec(reg, is_reg=True)])

    assert [(i.file_name, i.caption, i.repeats, i.is_reg) for i in items] == [
        ("1_person/x.png", "person", 1, True),
        ("1_person/y.png", "a person in a red coat", 1, True),
        ("3_dog/sub/z.png", "dog", 3, True),
    ]


def test_reg_image_without_caption_or_class_is_an_error(tmp_path: Path) -> None:
    write_image(tmp_path / "1_person" / "x.png")
    write_image(tmp_path / "plain" / "y.png")
    [message] = problems_of([SubsetSpec(tmp_path, is_reg=True, key="reg_data_dir")])
    assert message.startswith(f"{tmp_path / 'plain' / 'y.png'}: regularization image without a caption")
    assert "no y.txt beside it" in message and "1_<class>" in message


def test_training_images_never_take_the_class_token(tmp_path: Path) -> None:
    write_image(tmp_path / "1_person" / "x.png")
    [message] = problems_of([SubsetSpec(tmp_path)])
    assert "x.png: image without a caption" in message


# ---- CSV subsets ------------------------------------------------------------------------------------------


def test_csv_captions_with_repeat_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "4_ink" / "a.png")
    write_image(tmp_path / "b.png")
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("file_name,text\n4_ink/a.png,ink a\nb.png,plain b\n")
    items = collect_subsets([SubsetSpec(tmp_path, metadata_path=metadata)])
    assert [(i.file_name, i.caption, i.repeats) for i in items] == [
        ("4_ink/a.png", "ink a", 4),
        ("b.png", "plain b", 1),
    ]


def test_csv_reg_image_without_row_takes_the_class_token(tmp_path: Path) -> None:
    write_image(tmp_path / "1_person" / "a.png")
    write_image(tmp_path / "1_person" / "b.png")
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("file_name,text\n1_person/a.png,a tall person\n")
    items = collect_subsets([SubsetSpec(tmp_path, metadata_path=metadata, is_reg=True)])
    assert [(i.file_name, i.caption) for i in items] == [
        ("1_person/a.png", "a tall person"),
        ("1_person/b.png", "person"),
    ]


# ---- several subsets ---------------------------------------------------------------------------------------


def test_several_subsets_are_numbered_and_sorted(tmp_path: Path) -> None:
    captioned(tmp_path / "train" / "5_ink" / "b.png", "ink b")
    captioned(tmp_path / "train" / "5_ink" / "a.png", "ink a")
    captioned(tmp_path / "more" / "z.png", "z", extension=".caption")
    write_image(tmp_path / "reg" / "1_style" / "r.png")
    specs = [
        SubsetSpec(tmp_path / "train"),
        SubsetSpec(tmp_path / "more", caption_extension=".caption", num_repeats=2),
        SubsetSpec(tmp_path / "reg", is_reg=True),
    ]

    items = collect_subsets(specs)

    assert [(i.subset, i.file_name, i.caption, i.repeats, i.is_reg) for i in items] == [
        (0, "5_ink/a.png", "ink a", 5, False),
        (0, "5_ink/b.png", "ink b", 5, False),
        (1, "z.png", "z", 2, False),
        (2, "1_style/r.png", "style", 1, True),
    ]
    assert items[2].path == tmp_path / "more" / "z.png"


def test_problems_of_two_subsets_are_reported_together(tmp_path: Path) -> None:
    captioned(tmp_path / "one" / "ok.png")
    write_image(tmp_path / "one" / "bare.png")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "fake.png").write_text("not an image")
    (tmp_path / "two" / "fake.txt").write_text("caption")
    specs = [
        SubsetSpec(tmp_path / "one", key="datasets[0].train_data_dir"),
        SubsetSpec(tmp_path / "two", key="datasets[1].train_data_dir"),
        SubsetSpec(tmp_path / "missing", key="datasets[2].train_data_dir"),
        SubsetSpec(tmp_path / "one", caption_extension="txt", key="datasets[3].train_data_dir"),
    ]

    messages = problems_of(specs)

    one_matching(messages, "bare.png: image without a caption")
    one_matching(messages, f"{tmp_path / 'two' / 'fake.png'}: cannot be read as an image")
    one_matching(
        messages, "datasets[2].train_data_dir: ", "is not a folder", "set datasets[2].train_data_dir"
    )
    one_matching(messages, "datasets[3].caption_extension: 'txt'")
    assert len(messages) == 4


def test_empty_subset_folder(tmp_path: Path) -> None:
    (tmp_path / "reg").mkdir()
    [message] = problems_of([SubsetSpec(tmp_path / "reg", is_reg=True, key="reg_data_dir")])
    assert "no images found" in message and "regularization images" in message and "reg_data_dir" in message


def test_collect_dataset_is_one_subset(tmp_path: Path) -> None:
    captioned(tmp_path / "3_ink" / "a.png", "ink")
    assert collect_dataset(tmp_path, None) == [
        CaptionedImage(path=tmp_path / "3_ink" / "a.png", caption="ink", file_name="3_ink/a.png", repeats=3)
    ]
