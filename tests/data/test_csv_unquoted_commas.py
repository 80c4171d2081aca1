"""metadata.csv rows whose caption has commas outside double quotes: the seed tells users to hand-edit the
file, and `ink_05.png,inkstyle, misty, river` used to train on "inkstyle" alone, silently.

With the header `file_name,text` the rest of such a row is the caption, taken as written, with a warning
naming the lines; with more columns it is an error naming the lines. Quoted rows read as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_scripts.data.captions import collect_dataset, metadata_warnings
from lora_scripts.data.csv_rows import caption_after_file_name
from lora_scripts.errors import UserError
from tests.data.imagefiles import write_image

ISSUE_ROW = "ink_05.png,inkstyle, misty, river"


def _dataset(tmp_path: Path, text: str, names: tuple[str, ...] = ("ink_05.png",)) -> tuple[Path, Path]:
    data = tmp_path / "data"
    for name in names:
        write_image(data / name)
    metadata = data / "metadata.csv"
    metadata.write_bytes(text.encode("utf-8"))
    return data, metadata


def _captions(data: Path, metadata: Path) -> dict[str, str]:
    return {item.file_name: item.caption for item in collect_dataset(data, metadata)}


def test_the_issue_row_trains_on_the_whole_caption_with_a_warning(tmp_path: Path) -> None:
    data, metadata = _dataset(tmp_path, f"file_name,text\n{ISSUE_ROW}\n")
    assert _captions(data, metadata) == {"ink_05.png": "inkstyle, misty, river"}
    assert metadata_warnings(metadata) == [
        f"{metadata} line 2: a caption with commas outside double quotes; the rest of the row is taken as "
        "the caption ('inkstyle, misty, river'). Put a caption that contains commas in double quotes: "
        'ink_05.png,"inkstyle, misty, river".'
    ]


def test_the_caption_is_the_row_as_written(tmp_path: Path) -> None:
    """Spacing inside the caption is the user's; a BOM, CRLF and a space before the first word are not."""
    text = '\ufefffile_name,text\r\na.png, ink,misty ,  river  \r\nb.png,5" tall, ink\r\n'
    data, metadata = _dataset(tmp_path, text, names=("a.png", "b.png"))
    assert _captions(data, metadata) == {"a.png": "ink,misty ,  river", "b.png": '5" tall, ink'}
    [warning] = metadata_warnings(metadata)
    assert f"{metadata} lines 2, 3: captions with commas outside double quotes" in warning
    assert warning.endswith(
        'Put a caption that contains commas in double quotes: a.png,"ink,misty ,  river".'
    )


def test_quoted_rows_and_empty_extra_fields_read_as_before(tmp_path: Path) -> None:
    text = (
        "file_name,text\n"
        'a.png,"inkstyle, misty, river"\n'
        'b.png, "spaced, quoted"\n'
        "c.png,plain\n"
        "d.png,trailing commas,,\n"  # no text in the extra fields: nothing is lost
        '"e,1.png",inkstyle\n'
    )
    names = ("a.png", "b.png", "c.png", "d.png", "e,1.png")
    data, metadata = _dataset(tmp_path, text, names)
    assert _captions(data, metadata) == {
        "a.png": "inkstyle, misty, river",
        "b.png": "spaced, quoted",
        "c.png": "plain",
        "d.png": "trailing commas",
        "e,1.png": "inkstyle",
    }
    assert metadata_warnings(metadata) == []


def test_many_rows_name_the_first_lines_and_count_the_rest(tmp_path: Path) -> None:
    names = tuple(f"{i}.png" for i in range(9))
    rows = [f"{name},ink, wash" if i % 2 == 0 else f'{name},"ink, wash"' for i, name in enumerate(names)]
    more_rows = rows + [f"{name},ink, {i}" for i, name in enumerate(names[:4])]  # lines 11-14
    data, metadata = _dataset(tmp_path, "file_name,text\n" + "\n".join(rows) + "\n", names)
    assert set(_captions(data, metadata).values()) == {"ink, wash"}
    [warning] = metadata_warnings(metadata)
    assert warning.startswith(f"{metadata} lines 2, 4, 6, 8, 10: captions with commas outside double quotes")

    more = tmp_path / "more.csv"
    more.write_text("file_name,text\n" + "\n".join(more_rows) + "\n", encoding="utf-8")
    [warning] = metadata_warnings(more)
    assert warning.startswith(f"{more} lines 2, 4, 6, 8, 10 and 4 more (9 rows): captions with commas")


def test_a_trailing_unnamed_column_is_no_column(tmp_path: Path) -> None:
    """`file_name,text,` (a spreadsheet's export): text past the named columns is still caption text."""
    text = "file_name,text,\na.png,inkstyle,\nb.png,inkstyle, misty\n"
    data, metadata = _dataset(tmp_path, text, names=("a.png", "b.png"))
    assert _captions(data, metadata) == {"a.png": "inkstyle", "b.png": "inkstyle, misty"}
    [warning] = metadata_warnings(metadata)
    assert warning.startswith(f"{metadata} line 3: a caption with commas outside double quotes")


def test_with_more_columns_a_row_with_extra_fields_is_an_error(tmp_path: Path) -> None:
    text = "file_name,text,source\na.png,inkstyle, misty,web\nb.png,fine,scan\nc.png,ink, wash,web\n"
    data, metadata = _dataset(tmp_path, text, names=("a.png", "b.png", "c.png"))
    with pytest.raises(UserError) as caught:
        collect_dataset(data, metadata)
    assert caught.value.messages == [
        f"{metadata} lines 2, 4: more fields than the 3 columns of the header (file_name,text,source), so "
        "where the caption ends cannot be told; put a caption that contains commas in double quotes, e.g. "
        'a.png,"a caption, with commas",….'
    ]


def test_quotes_after_unquoted_commas_are_an_error(tmp_path: Path) -> None:
    """`ink, "misty, river"`: the quotes may be part of the caption or mark a field; no guess."""
    data, metadata = _dataset(tmp_path, 'file_name,text\na.png,ink, "misty, river"\n', names=("a.png",))
    with pytest.raises(UserError) as caught:
        collect_dataset(data, metadata)
    [message] = caught.value.messages
    assert message.startswith(
        f"{metadata} line 2: more fields than the 2 columns of the header (file_name,text)"
    )
    assert metadata_warnings(metadata) == []


@pytest.mark.parametrize(
    "raw, caption",
    [
        ("a.png,ink, misty\r\n", "ink, misty"),
        ('"a,b.png",ink, misty\n', "ink, misty"),
        ('"a ""x"".png",ink, misty', "ink, misty"),
        ("a.png,ink, misty,\n", "ink, misty,"),
        ('a.png,ink, "misty"\n', None),
        ('a.png,"ink", misty\n', None),
    ],
)
def test_caption_after_file_name(raw: str, caption: str | None) -> None:
    assert caption_after_file_name(raw) == caption


def test_no_warnings_for_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    assert metadata_warnings(tmp_path / "absent.csv") == []
