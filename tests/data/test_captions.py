"""collect_dataset: both caption layouts, every problem kind reported at once, tag_frequency."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from lora_scripts.data.captions import CaptionedImage, collect_dataset, tag_frequency
from lora_scripts.errors import UserError
from tests.data.imagefiles import truncate, write_image


def problems_of(train_data_dir: Path, metadata_path: Path | None = None) -> list[str]:
    with pytest.raises(UserError) as caught:
        collect_dataset(train_data_dir, metadata_path)
    return caught.value.messages


def one_matching(messages: list[str], *fragments: str) -> str:
    """The single message containing every fragment (fails if none or several do)."""
    matching = [m for m in messages if all(f in m for f in fragments)]
    assert len(matching) == 1, (fragments, messages)
    return matching[0]


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


# ---- .txt captions -------------------------------------------------------------------------------------


def test_txt_captions_are_found_recursively_and_sorted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_image(data / "b.png")
    (data / "b.txt").write_text("  a cat, sitting \n", encoding="utf-8")
    write_image(data / "sub" / "a.JPG")
    (data / "sub" / "a.txt").write_text("\ufeffa dog", encoding="utf-8")  # BOM from Notepad
    write_image(data / "c.webp")
    (data / "c.txt").write_text("a bird", encoding="utf-8")
    # Ignored: hidden files and folders, files that are not images.
    write_image(data / ".hidden.png")
    write_image(data / ".ipynb_checkpoints" / "x.png")
    (data / "notes.md").write_text("hello")
    before = snapshot(tmp_path)

    items = collect_dataset(data, None)

    assert items == [
        CaptionedImage(path=data / "b.png", caption="a cat, sitting", file_name="b.png"),
        CaptionedImage(path=data / "c.webp", caption="a bird", file_name="c.webp"),
        CaptionedImage(path=data / "sub" / "a.JPG", caption="a dog", file_name="sub/a.JPG"),
    ]
    assert snapshot(tmp_path) == before  # nothing written


def test_txt_missing_and_empty_captions_are_reported_together(tmp_path: Path) -> None:
    write_image(tmp_path / "no_txt.png")
    write_image(tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text("  \n")
    write_image(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "latin1.png").write_bytes((tmp_path / "ok.png").read_bytes())
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))

    messages = problems_of(tmp_path)

    assert len(messages) == 3
    one_matching(messages, "no_txt.png", "image without a caption", "no_txt.txt")
    one_matching(messages, "empty.txt", "caption file is empty")
    one_matching(messages, "latin1.txt", "not UTF-8")


# ---- metadata.csv --------------------------------------------------------------------------------------


def test_csv_captions_with_commas_quotes_newlines_bom_and_extra_columns(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("a.png", "b.jpg", "sub/c.bmp"):
        write_image(data / name)
    metadata = tmp_path / "metadata.csv"
    metadata.write_text(
        "\ufefffile_name,text,source\r\n"
        'b.jpg,"a cat, sitting, on a ""red"" mat",web\r\n'
        "\r\n"
        'a.png,"first line\nsecond line",\r\n'
        "./sub/c.bmp,plain caption,scan\r\n",
        encoding="utf-8",
    )

    items = collect_dataset(data, metadata)

    assert [(i.file_name, i.caption) for i in items] == [
        ("a.png", "first line\nsecond line"),
        ("b.jpg", 'a cat, sitting, on a "red" mat'),
        ("sub/c.bmp", "plain caption"),
    ]
    assert items[2].path == data / "sub" / "c.bmp"


def test_csv_every_problem_is_reported_in_one_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("ok.png", "dup.png", "empty.png", "uncaptioned.png"):
        write_image(data / name)
    (data / "broken.png").write_text("not an image")
    (data / "notes.txt").write_text("hello")
    write_image(tmp_path / "outside.png")
    metadata = data / "metadata.csv"  # inside the folder, as Hugging Face imagefolder puts it
    metadata.write_text(
        "file_name,text\n"  # line 1
        'ok.png,"a caption\nspanning two lines"\n'  # lines 2-3
        "missing.png,a ghost\n"  # line 4: the multi-line caption above must not shift this number
        "dup.png,one\n"  # line 5
        "dup.png,two\n"  # line 6
        "empty.png,  \n"  # line 7
        "../outside.png,escape\n"  # line 8
        f"{tmp_path / 'outside.png'},absolute\n"  # line 9
        ",no name\n"  # line 10
        "notes.txt,not an image\n"  # line 11
        "broken.png,unreadable\n",  # line 12
        encoding="utf-8",
    )

    messages = problems_of(data, metadata)

    one_matching(messages, f"{metadata} line 4", "'missing.png' does not exist")
    one_matching(messages, f"{metadata} lines 5, 6", "several rows for 'dup.png'")
    one_matching(messages, f"{metadata} line 7", "'empty.png' has an empty caption")
    one_matching(messages, f"{metadata} line 8", "'../outside.png' points outside train_data_dir")
    one_matching(messages, f"{metadata} line 9", "points outside train_data_dir")
    one_matching(messages, f"{metadata} line 10", "file_name is empty")
    one_matching(messages, f"{metadata} line 11", "'notes.txt' is not an image")
    one_matching(messages, "uncaptioned.png", "image without a caption", "metadata.csv")
    one_matching(messages, "broken.png", "cannot be read as an image")
    assert len(messages) == 9


@pytest.mark.parametrize(
    "header, missing",
    [
        ("name,caption", ["'file_name'", "'text'"]),
        ("file_name,caption", ["'text'"]),
        ("image,text", ["'file_name'"]),
    ],
)
def test_csv_missing_columns_are_named(tmp_path: Path, header: str, missing: list[str]) -> None:
    write_image(tmp_path / "a.png")
    metadata = tmp_path / "m.csv"
    metadata.write_text(f"{header}\na.png,hello\n")
    [message] = problems_of(tmp_path, metadata)
    assert str(metadata) in message and "header" in message
    for column in missing:
        assert f"no {column}" in message or f"and no {column}" in message


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "metadata file not found"),
        (b"", "the file is empty"),
        ("caf\xe9".encode("latin-1"), "not UTF-8"),
    ],
)
def test_csv_file_itself_unusable(tmp_path: Path, content: bytes | None, fragment: str) -> None:
    data = tmp_path / "data"
    write_image(data / "a.png")
    metadata = tmp_path / "m.csv"
    if content is not None:
        metadata.write_bytes(content)
    [message] = problems_of(data, metadata)
    assert message.startswith(str(metadata)) and fragment in message


def test_csv_unclosed_quote_is_reported_at_the_row_where_it_starts(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    metadata = tmp_path / "m.csv"
    metadata.write_text('file_name,text\na.png,fine\nb.png,"never closed\nmore\n')
    [message] = problems_of(tmp_path, metadata)
    assert message.startswith(f"{metadata} line 3: not valid CSV")


def test_csv_space_before_a_quoted_caption(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    metadata = tmp_path / "m.csv"
    metadata.write_text('file_name, text\na.png, "red, round"\n')
    [item] = collect_dataset(tmp_path, metadata)
    assert item.caption == "red, round"


def test_csv_windows_separators_are_accepted(tmp_path: Path) -> None:
    write_image(tmp_path / "sub" / "a.png")
    metadata = tmp_path / "m.csv"
    metadata.write_text("file_name,text\nsub\\a.png,hello\n")
    [item] = collect_dataset(tmp_path, metadata)
    assert item.file_name == "sub/a.png"


# ---- problems common to both layouts ---------------------------------------------------------------------


def test_no_images_at_all(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    [message] = problems_of(tmp_path)
    assert str(tmp_path) in message and "no images found" in message


def test_train_data_dir_that_is_not_a_folder(tmp_path: Path) -> None:
    [message] = problems_of(tmp_path / "nope")
    assert message.startswith("train_data_dir:") and "is not a folder" in message


def test_truncated_and_fake_images_are_listed_as_unreadable(tmp_path: Path) -> None:
    Image.effect_noise((256, 256), 64).convert("RGB").save(tmp_path / "cut.jpg", quality=90)
    truncate(tmp_path / "cut.jpg")
    Image.effect_noise((256, 256), 64).convert("RGB").save(tmp_path / "cut.png")
    truncate(tmp_path / "cut.png")
    (tmp_path / "fake.png").write_text("this is a text file")
    write_image(tmp_path / "good.png")
    for stem in ("cut", "fake", "good"):
        (tmp_path / f"{stem}.txt").write_text("caption")

    messages = problems_of(tmp_path)

    assert len(messages) == 3
    for name in ("cut.jpg", "cut.png", "fake.png"):
        message = one_matching(messages, f"{tmp_path / name}: cannot be read as an image")
        assert str(tmp_path) not in message.split(":", 1)[1]  # the reason does not repeat the long path


def test_more_than_20_problems_of_a_kind_are_capped(tmp_path: Path) -> None:
    for i in range(25):
        write_image(tmp_path / f"img{i:02d}.png", size=(4, 4))
    (tmp_path / "fake.png").write_text("x")

    messages = problems_of(tmp_path)

    uncaptioned = [m for m in messages if "image without a caption" in m]
    assert len(uncaptioned) == 20
    assert "... and 6 more images without a caption." in messages  # 25 + fake.png
    assert any("fake.png: cannot be read" in m for m in messages)
    assert len(messages) == 22


def test_many_images_are_checked_quickly(tmp_path: Path) -> None:
    for i in range(300):
        write_image(tmp_path / f"{i:03d}.jpg", size=(96, 64))
        (tmp_path / f"{i:03d}.txt").write_text(f"image {i}")
    items = collect_dataset(tmp_path, None)
    assert [i.file_name for i in items] == [f"{i:03d}.jpg" for i in range(300)]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    write_image(tmp_path / "real" / "a.png")
    (tmp_path / "real" / "a.txt").write_text("cap")
    data = tmp_path / "data"
    data.mkdir()
    (data / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real" / "loop").symlink_to(data, target_is_directory=True)  # a link cycle
    assert [i.file_name for i in collect_dataset(data, None)] == ["linked/a.png"]


# ---- tag_frequency ---------------------------------------------------------------------------------------


def test_tag_frequency_counts_comma_separated_tags() -> None:
    items = [
        CaptionedImage(Path("a.png"), "1girl, solo, Red hair", "a.png"),
        CaptionedImage(Path("b.png"), "1girl,  smile ,,red hair", "b.png"),
        CaptionedImage(Path("c.png"), "solo, 1girl\n", "c.png"),
    ]
    frequency = tag_frequency(items)
    assert frequency == {"1girl": 3, "solo": 2, "Red hair": 1, "smile": 1, "red hair": 1}
    assert list(frequency)[:2] == ["1girl", "solo"]


def test_caption_words_lowercase_without_stopwords():
    from lora_scripts.data import caption_words

    assert caption_words("A Temple on the mountain-top, ink wash painting of 2 cranes") == [
        "temple",
        "mountain-top",
        "ink",
        "wash",
        "painting",
        "2",
        "cranes",
    ]
