"""docs/config.md is the generated reference, and it documents every key of the schema."""

from __future__ import annotations

import pytest

from lora_scripts.config import SECTIONS, TrainConfig
from lora_scripts.config.reference import allowed_text, default_text, main, render_reference, type_text

from .conftest import REPO


def test_docs_match_the_generated_reference() -> None:
    docs = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert docs == render_reference(), (
        "docs/config.md is out of date: run `python -m lora_scripts.config.reference > docs/config.md`"
    )


def test_every_field_is_documented_with_its_description() -> None:
    reference = render_reference()
    for name, field in TrainConfig.model_fields.items():
        assert f"| `{name}` |" in reference, name
        assert field.description and field.description in reference, name


def test_fields_are_grouped_in_the_documented_sections() -> None:
    groups = TrainConfig.fields_by_section()
    assert list(groups) == list(SECTIONS)
    assert sorted(n for names in groups.values() for n in names) == sorted(TrainConfig.model_fields)
    assert groups["data"][:4] == ["train_data_dir", "metadata_path", "resolution", "trigger_word"]
    assert "caption_extension" in groups["data"] and "reg_data_dir" in groups["data"]
    assert groups["buckets"][0] == "enable_bucket" and groups["caching"][0] == "cache_latents"
    assert "min_snr_gamma" in groups["loss"] and "conv_rank" in groups["network"]


def test_cells_for_some_keys() -> None:
    assert (type_text("lora_rank"), default_text("lora_rank"), allowed_text("lora_rank")) == (
        "integer",
        "`8`",
        "≥ 1",
    )
    assert type_text("lora_alpha") == "number or null" and default_text("lora_alpha") == "same as lora_rank"
    assert allowed_text("resolution") == "≥ 64, multiple of 8"
    assert (
        default_text("train_data_dir") == "required, unless datasets is given"
        and allowed_text("train_data_dir") == "an existing folder"
    )
    assert allowed_text("mixed_precision") == "`no`, `fp16`, `bf16`"
    assert type_text("target_modules") == "string or list of strings"
    assert type_text("datasets") == "list of mappings or null"
    assert type_text("optimizer_args") == "mapping"


def test_module_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    main()  # what `python -m lora_scripts.config.reference` runs
    assert capsys.readouterr().out == render_reference()
