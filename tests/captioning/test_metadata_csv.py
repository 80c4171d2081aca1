"""metadata.csv and .txt captions: exact round trips, rows kept byte for byte, backups, `captions convert`."""

from __future__ import annotations

import pytest

from lora_scripts.captioning.metadata_csv import (
    CsvCaptions,
    backup_file,
    read_metadata_csv,
    render_metadata_csv,
)
from lora_scripts.cli import main
from lora_scripts.data import collect_dataset
from lora_scripts.errors import UserError
from tests.captioning.helpers import write_images

AWKWARD = {
    "a.png": 'temple, "old" pine, and mist',
    "b.png": "first line\nsecond line, with a comma",
    "c.png": "山水画，水墨 — ünïcödé 🖌️",
    "d.png": '"quoted from the start"',
    "e.png": "windows\r\nline end; semicolon; tab\there",
}


def test_awkward_captions_round_trip_through_the_csv(tmp_path):
    write_images(tmp_path, list(AWKWARD))
    store = CsvCaptions(tmp_path / "metadata.csv", tmp_path)
    store.save(AWKWARD)
    again = CsvCaptions(tmp_path / "metadata.csv", tmp_path)
    assert again.existing == AWKWARD
    # The trainer's reader agrees, caption for caption.
    read = {item.file_name: item.caption for item in collect_dataset(tmp_path, tmp_path / "metadata.csv")}
    assert read == AWKWARD


def test_rendering_keeps_every_existing_row_and_appends(tmp_path):
    text = (
        "\ufefffile_name , text,source\r\n"
        '001.jpg,  "spaced, quoted",web\r\n'
        "\r\n"
        '002.jpg,"multi\r\nline",scan\r\n'
        "gone.jpg,still here,x"  # no final line ending
    )
    path = tmp_path / "metadata.csv"
    path.write_bytes(text.encode("utf-8"))
    parsed = read_metadata_csv(path)
    assert parsed is not None and parsed.columns == ["file_name", "text", "source"]
    assert [parsed.file_name(r) for r in parsed.rows] == ["001.jpg", "", "002.jpg", "gone.jpg"]
    assert parsed.text(parsed.rows[2]) == "multi\r\nline"

    captions = {"001.jpg": "ignored: it has a row", "new.jpg": 'a "b", c'}
    rendered = render_metadata_csv(parsed, captions, replace=False, drop=frozenset())
    assert rendered == text + '\r\nnew.jpg,"a ""b"", c",\r\n'
    replaced = render_metadata_csv(parsed, {"002.jpg": "fresh"}, replace=True, drop=frozenset({"gone.jpg"}))
    assert replaced == text.replace('"multi\r\nline",scan', "fresh,scan").replace("gone.jpg,still here,x", "")


def test_bad_csv_files_are_user_errors(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text('file_name,text\na.png,"never closed\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"metadata.csv line 2: not valid CSV"):
        read_metadata_csv(path)
    path.write_text("image,caption\na.png,x\n", encoding="utf-8")
    with pytest.raises(UserError, match="no 'file_name' and no 'text' column"):
        read_metadata_csv(path)
    path.write_bytes("file_name,text\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        read_metadata_csv(path)
    path.write_text("", encoding="utf-8")
    assert read_metadata_csv(path) is None  # an empty file is a new file


def test_backups_never_overwrite_a_different_backup(tmp_path):
    path = tmp_path / "metadata.csv"
    for version in ("one", "two", "two", "three"):
        path.write_text(version)
        assert backup_file(path) == tmp_path / "metadata.csv.bak"
    assert path.with_name("metadata.csv.bak").read_text() == "three"
    assert path.with_name("metadata.csv.bak.1").read_text() == "one"
    assert path.with_name("metadata.csv.bak.2").read_text() == "two"
    assert not path.with_name("metadata.csv.bak.3").exists()


def test_convert_txt_to_csv_and_back(tmp_path, capsys):
    write_images(tmp_path, ["a.png", "b.png", "c.png", "sub/d.png"])
    (tmp_path / "a.txt").write_text(AWKWARD["b.png"], encoding="utf-8")
    (tmp_path / "b.txt").write_text("\ufeffbom caption\n", encoding="utf-8")
    (tmp_path / "sub" / "d.txt").write_text("deep", encoding="utf-8")
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("file_name,text\nb.png,hand edited\n", encoding="utf-8")

    assert main(["captions", "convert", "--input", str(tmp_path), "--to", "csv", "--recursive"]) == 0
    assert CsvCaptions(metadata, tmp_path).existing == {
        "b.png": "hand edited",  # the row wins over b.txt without --overwrite
        "a.png": AWKWARD["b.png"],
        "sub/d.png": "deep",
    }
    assert metadata.read_text(encoding="utf-8").startswith("file_name,text\nb.png,hand edited\n")
    out = capsys.readouterr().out
    assert "Wrote 2 captions" in out and "kept 1 already there" in out and "  c.png" in out

    # Back to .txt files somewhere else: every row becomes a caption file beside its image.
    other = tmp_path / "copy"
    write_images(other, ["a.png", "b.png", "c.png"])
    (other / "c.txt").write_text("keep me", encoding="utf-8")
    (other / "metadata.csv").write_text("file_name,text\na.png,alpha\nb.png,beta\nc.png,gamma\nzz.png,z\n")
    assert main(["captions", "convert", "--input", str(other), "--to", "txt"]) == 0
    assert [(other / f"{s}.txt").read_text(encoding="utf-8") for s in "abc"] == ["alpha", "beta", "keep me"]
    out = capsys.readouterr().out
    assert "Wrote 2 captions" in out and "  zz.png" in out

    assert main(["captions", "convert", "--input", str(other), "--to", "txt", "--overwrite"]) == 0
    assert (other / "c.txt").read_text(encoding="utf-8") == "gamma"
    assert (other / "c.txt.bak").read_text(encoding="utf-8") == "keep me"


def test_convert_needs_a_csv_to_read(tmp_path, capsys):
    write_images(tmp_path, ["a.png"])
    assert main(["captions", "convert", "--input", str(tmp_path), "--to", "txt"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "metadata.csv' not found" in err
