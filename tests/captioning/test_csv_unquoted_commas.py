"""The labeler and `captions convert` on a hand-edited metadata.csv with commas outside quotes: such a row
is kept byte for byte, read as its whole caption (as training reads it), and never cut."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from lora_scripts.captioning.metadata_csv import CsvCaptions
from lora_scripts.cli import main
from lora_scripts.data import collect_dataset
from lora_scripts.errors import UserError
from tests.captioning.helpers import label, write_images

HAND_EDITED = 'file_name,text\r\nink_04.png,"inkstyle, mountains"\r\nink_05.png,inkstyle, misty,  river\r\n'


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    write_images(folder, ["ink_04.png", "ink_05.png"])
    (folder / "metadata.csv").write_bytes(HAND_EDITED.encode("utf-8"))
    return folder


def test_the_row_reads_as_its_whole_caption_with_a_warning(
    data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        store = CsvCaptions(data / "metadata.csv", data)
    assert store.existing == {"ink_04.png": "inkstyle, mountains", "ink_05.png": "inkstyle, misty,  river"}
    assert [r.getMessage() for r in caplog.records] == [
        f"{data / 'metadata.csv'} line 3: a caption with commas outside double quotes; the rest of the row "
        "is taken as the caption ('inkstyle, misty,  river'). Put a caption that contains commas in double "
        'quotes: ink_05.png,"inkstyle, misty,  river".'
    ]
    training = {item.file_name: item.caption for item in collect_dataset(data, data / "metadata.csv")}
    assert training == store.existing  # the labeler and training read the same captions


def test_label_keeps_the_row_byte_for_byte(
    tiny_blip: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_images(data, ["ink_04.png", "ink_05.png", "ink_06.png"])
    assert label(tiny_blip, data) == 0
    after = (data / "metadata.csv").read_bytes().decode("utf-8")
    assert after.startswith(HAND_EDITED) and after[len(HAND_EDITED) :].startswith("ink_06.png,")
    assert "line 3: a caption with commas outside double quotes" in capsys.readouterr().err


def test_convert_to_txt_writes_the_whole_caption(data: Path) -> None:
    assert main(["captions", "convert", "--input", str(data), "--to", "txt"]) == 0
    assert (data / "ink_05.txt").read_text(encoding="utf-8") == "inkstyle, misty,  river"


def test_overwrite_writes_a_quoted_two_column_row(tiny_blip: Path, data: Path) -> None:
    assert label(tiny_blip, data, "--overwrite") == 0
    assert (data / "metadata.csv.bak").read_bytes() == HAND_EDITED.encode("utf-8")
    with (data / "metadata.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert [len(row) for row in rows] == [2, 2, 2]  # no stray "misty" / "river" cells left behind


def test_an_ambiguous_row_is_an_error_and_the_file_is_untouched(
    tiny_blip: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "file_name,text,source\r\nink_04.png,inkstyle,web\r\nink_05.png,inkstyle, misty,web\r\n"
    (data / "metadata.csv").write_bytes(text.encode("utf-8"))
    with pytest.raises(UserError, match=r"metadata.csv line 3: more fields than the 3 columns of the header"):
        CsvCaptions(data / "metadata.csv", data)
    write_images(data, ["ink_04.png", "ink_05.png", "ink_06.png"])
    assert label(tiny_blip, data) == 2
    assert "line 3: more fields than the 3 columns" in capsys.readouterr().err
    assert (data / "metadata.csv").read_bytes() == text.encode("utf-8")
