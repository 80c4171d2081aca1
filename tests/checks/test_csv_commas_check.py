"""`lora-scripts check` and `train` on a hand-edited metadata.csv with commas outside quotes: a warning that
names the line (not "Ready to train (0 warnings)"), and training on the whole caption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_scripts.cli import main
from lora_scripts.export.lora_file import read_lora_metadata
from tests.checks.conftest import distinct_image, write_config

ISSUE_ROW = "ink_05.png,inkstyle, misty, river"


def _config(tmp_path: Path, model: Path, header: str, rows: list[str]) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for seed, name in enumerate(["ink_04.png", "ink_05.png", "ink_06.png"]):
        distinct_image(seed).save(data / name)
    (data / "metadata.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return write_config(
        tmp_path / "ink.yaml",
        train_data_dir=data,
        metadata_path=data / "metadata.csv",
        base_model=model,
        resolution=64,
        batch_size=3,
        max_train_steps=1,
        output_dir=tmp_path / "out" / "ink",
    )


def test_check_warns_about_the_line_and_train_uses_the_whole_caption(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = ['ink_04.png,"inkstyle, mountains"', ISSUE_ROW, "ink_06.png,inkstyle"]
    config = _config(tmp_path, tiny_model, "file_name,text", rows)
    metadata = tmp_path / "data" / "metadata.csv"
    expected = (
        f"{metadata} line 3: a caption with commas outside double quotes; the rest of the row is taken as "
        "the caption ('inkstyle, misty, river'). Put a caption that contains commas in double quotes: "
        'ink_05.png,"inkstyle, misty, river".'
    )

    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"warning: {expected}" in out
    assert out.rstrip().endswith("Ready to train (1 warning).")
    assert main(["check", "--config", str(config), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["warnings"] == [expected]
    assert {"tag": "misty", "count": 1} in facts["captions"]["top_tags"]

    assert main(["train", "--config", str(config)]) == 0
    assert f"warning: {expected}" in capsys.readouterr().err
    tags = json.loads(read_lora_metadata(tmp_path / "out" / "ink" / "ink.safetensors")["ss_tag_frequency"])
    assert tags == {"data": {"inkstyle": 3, "mountains": 1, "misty": 1, "river": 1}}


def test_a_row_that_cannot_be_told_apart_stops_check_and_train_alike(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = ['ink_04.png,"inkstyle, mountains",web', f"{ISSUE_ROW},web", "ink_06.png,inkstyle,scan"]
    config = _config(tmp_path, tiny_model, "file_name,text,source", rows)
    metadata = tmp_path / "data" / "metadata.csv"
    expected = (
        f"error: {metadata} line 3: more fields than the 3 columns of the header (file_name,text,source), so "
        "where the caption ends cannot be told; put a caption that contains commas in double quotes, e.g. "
        'ink_05.png,"a caption, with commas",….'
    )

    assert main(["check", "--config", str(config)]) == 2
    check_err = capsys.readouterr().err
    assert expected in check_err.splitlines()
    assert main(["train", "--config", str(config)]) == 2
    assert expected in capsys.readouterr().err.splitlines()
    assert not (tmp_path / "out").exists()
