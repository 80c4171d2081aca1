"""Labelling never loses a hand edit: reruns, --overwrite backups, unreadable files, subfolders, --prune."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lora_scripts.captioning.base import Captioner
from lora_scripts.captioning.blip import load_blip
from lora_scripts.captioning.labeler import LabelOptions, label_images
from tests.captioning.helpers import label, write_images


def rows(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8", newline="") as f:
        return {row["file_name"]: row["text"] for row in csv.DictReader(f, skipinitialspace=True)}


@pytest.fixture
def labelled(tiny_blip, tmp_path) -> Path:
    """A folder of three images captioned once."""
    data = tmp_path / "data"
    write_images(data, ["001.jpg", "002.png", "003.png"])
    assert label(tiny_blip, data) == 0
    return data


def test_rerun_keeps_hand_edits_byte_for_byte_and_adds_new_images(tiny_blip, labelled, capsys):
    metadata = labelled / "metadata.csv"
    generated = metadata.read_text(encoding="utf-8")
    # A hand edit in the user's own style: CRLF, a space after the comma, extra column, no trailing newline.
    lines = generated.splitlines()
    edited = "\r\n".join(
        [
            "file_name,text,rating",
            '002.png, "my caption, with ""quotes""\r\nand a second line",5',
            *[line + ",4" for line in lines[1:] if not line.startswith("002.png")],
        ]
    )
    metadata.write_bytes(edited.encode("utf-8"))
    write_images(labelled, ["004.png"])
    capsys.readouterr()

    assert label(tiny_blip, labelled) == 0
    after = metadata.read_bytes().decode("utf-8")
    assert after.startswith(edited + "\r\n")  # every old byte kept, in place
    new_row = after[len(edited) + 2 :]
    assert new_row.startswith("004.png,") and new_row.endswith(",\r\n")  # empty rating, file's line ending
    assert rows(metadata)["002.png"] == 'my caption, with "quotes"\r\nand a second line'
    out = capsys.readouterr().out
    assert "Captioned 1 image with blip" in out and "Kept 3 existing captions" in out
    assert not (labelled / "metadata.csv.bak").exists()

    # Nothing left to caption: no model is loaded and the file is untouched.
    assert label(labelled / "no_model_needed", labelled) == 0
    assert metadata.read_bytes().decode("utf-8") == after


def test_overwrite_backs_up_first_and_keeps_older_backups(tiny_blip, labelled):
    metadata = labelled / "metadata.csv"
    metadata.write_text("file_name,text\n001.jpg,hand written\n002.png,x\n003.png,y\n", encoding="utf-8")
    old = metadata.read_bytes()
    assert label(tiny_blip, labelled, "--overwrite") == 0
    assert (labelled / "metadata.csv.bak").read_bytes() == old
    assert rows(metadata)["001.jpg"] != "hand written"
    recaptioned = metadata.read_bytes()

    # A second --overwrite must not destroy the first backup (the only copy of the hand edits).
    metadata.write_text("file_name,text\n001.jpg,second edit\n", encoding="utf-8")
    second = metadata.read_bytes()
    assert label(tiny_blip, labelled, "--overwrite") == 0
    assert (labelled / "metadata.csv.bak").read_bytes() == second
    assert (labelled / "metadata.csv.bak.1").read_bytes() == old
    assert metadata.read_bytes() == recaptioned  # greedy decoding: the same captions again


def test_unreadable_images_are_named_and_skipped_other_files_ignored(tiny_blip, tmp_path, capsys):
    write_images(tmp_path, ["good.png", "ok.jpg"])
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:40])
    (tmp_path / "notes.txt").write_text("not a caption")
    (tmp_path / "info.json").write_text("{}")
    write_images(tmp_path, [".hidden.png", "._mac.jpg"])
    assert label(tiny_blip, tmp_path, "--batch-size", "2") == 0
    assert sorted(rows(tmp_path / "metadata.csv")) == ["good.png", "ok.jpg"]
    out = capsys.readouterr().out
    assert "Skipped 2 images:" in out
    assert "  broken.jpg: " in out and "  cut.png: " in out
    assert "notes.txt" not in out and "hidden" not in out


def test_recursive_and_unicode_names(tiny_blip, tmp_path):
    write_images(tmp_path, ["山水 01.png", "top.png", "sub/深い/谷.jpg", "sub/b.png"])
    assert label(tiny_blip, tmp_path) == 0
    assert sorted(rows(tmp_path / "metadata.csv")) == ["top.png", "山水 01.png"]  # top level only
    assert label(tiny_blip, tmp_path, "--recursive") == 0
    captions = rows(tmp_path / "metadata.csv")
    assert sorted(captions) == ["sub/b.png", "sub/深い/谷.jpg", "top.png", "山水 01.png"]
    assert all(captions.values())


def test_only_subfolder_images_hint_at_recursive(tiny_blip, tmp_path, capsys):
    write_images(tmp_path, ["sub/a.png"])
    assert label(tiny_blip, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "add --recursive" in err


def test_missing_rows_are_reported_then_pruned_with_a_backup(tiny_blip, labelled, capsys):
    metadata = labelled / "metadata.csv"
    (labelled / "002.png").unlink()
    before = metadata.read_bytes()
    capsys.readouterr()
    assert label(tiny_blip, labelled) == 0
    assert metadata.read_bytes() == before  # reported, kept
    out = capsys.readouterr().out
    assert "Missing: 1 caption for images that no longer exist (kept; --prune removes them):" in out
    assert "  002.png" in out

    assert label(tiny_blip, labelled, "--prune") == 0
    assert sorted(rows(metadata)) == ["001.jpg", "003.png"]
    assert (labelled / "metadata.csv.bak").read_bytes() == before
    assert "removed (--prune)" in capsys.readouterr().out


def test_txt_format_never_overwrites_without_overwrite(tiny_blip, tmp_path, capsys):
    write_images(tmp_path, ["a.png", "b.jpg", "sub/c.png"])
    (tmp_path / "a.txt").write_text("hand caption", encoding="utf-8")
    (tmp_path / "gone.txt").write_text("caption of a deleted image", encoding="utf-8")
    assert label(tiny_blip, tmp_path, "--format", "txt", "--trigger", "zk") == 0
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "hand caption"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8").startswith("zk, ")
    assert not (tmp_path / "sub" / "c.txt").exists() and not (tmp_path / "metadata.csv").exists()
    out = capsys.readouterr().out
    assert "Kept 1 existing caption" in out and "  gone.txt" in out

    assert label(tiny_blip, tmp_path, "--format", "txt", "--overwrite", "--recursive") == 0
    assert (tmp_path / "a.txt.bak").read_text(encoding="utf-8") == "hand caption"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") != "hand caption"
    assert (tmp_path / "sub" / "c.txt").read_text(encoding="utf-8")


def test_option_mistakes_are_reported_together(tiny_blip, tmp_path, capsys):
    write_images(tmp_path, ["a.png", "a.jpg"])
    assert label(tiny_blip, tmp_path, "--format", "txt", "--prune", "--batch-size", "0") == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "--prune" in err and "--batch-size: 0" in err
    assert label(tiny_blip, tmp_path, "--format", "txt") == 2
    assert "a.jpg and a.png would share one caption file" in capsys.readouterr().err
    assert label(tiny_blip, tmp_path / "nope") == 2
    assert "--input: " in capsys.readouterr().err


class _InterruptedAfterOneBatch:
    """The real BLIP captioner, but the user presses Ctrl-C during the second batch."""

    def __init__(self, inner: Captioner) -> None:
        self.inner, self.name, self.calls = inner, inner.name, 0

    def caption(self, images: list) -> list[str]:
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.inner.caption(images)


def test_an_interrupted_run_keeps_its_captions_and_a_rerun_finishes(tiny_blip, tmp_path):
    write_images(tmp_path, ["1.png", "2.png", "3.png", "4.png", "5.png"])
    options = LabelOptions(input_dir=tmp_path, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        label_images(options, lambda: _InterruptedAfterOneBatch(load_blip(str(tiny_blip), max_new_tokens=6)))
    assert sorted(rows(tmp_path / "metadata.csv")) == ["1.png", "2.png"]
    assert label(tiny_blip, tmp_path) == 0
    assert sorted(rows(tmp_path / "metadata.csv")) == ["1.png", "2.png", "3.png", "4.png", "5.png"]
