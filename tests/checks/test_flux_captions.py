"""The caption check asks the model family what reads the captions: FLUX.1 counts T5-XXL tokens against T5's
length (512 for dev, 256 for schnell, or t5xxl_max_token_length; less the end token), SD keeps CLIP's 75."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lora_scripts.checks.captions import caption_reader_for
from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.models.flux_loading import t5_tokenizer
from lora_scripts.models.tiny import build_tiny_flux, build_tiny_flux_components
from tests.checks.conftest import RESOLUTION, TRIGGER, distinct_image, long_caption, write_config, write_pair
from tests.helpers.flux_files import write_flux_files

# "red" is one token for CLIP and for T5; "sks" is one for CLIP and four for T5.
CAPTIONS = {
    "clip100.png": long_caption(100),  # 100 CLIP tokens: too long for CLIP, not for T5
    "t5long.png": f"{TRIGGER} " + "red " * 600,  # 604 T5 tokens
    "t5late.png": "red " * 520 + TRIGGER,  # the trigger at T5 token 521
}


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")


def _t5_tokens(caption: str) -> int:
    return len(t5_tokenizer()(caption, add_special_tokens=False)["input_ids"])


def _config(tmp_path: Path, base_model: Path, **values: object) -> Path:
    data = tmp_path / "data"
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        write_pair(data, name, distinct_image(i + 1), caption)
    return write_config(
        tmp_path / "config.yaml",
        train_data_dir=data,
        base_model=base_model,
        resolution=RESOLUTION,
        trigger_word=TRIGGER,
        output_dir=tmp_path / "out",
        **values,
    )


def _check_json(config: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["check", "--config", str(config), "--json"]) in (0, 1)
    return json.loads(capsys.readouterr().out)


def test_flux_counts_t5_tokens_against_t5s_length(flux_dev, tmp_path, capsys):
    assert _t5_tokens(CAPTIONS["t5long.png"]) == 604
    facts = _check_json(_config(tmp_path, flux_dev), capsys)
    captions = facts["captions"]
    assert (captions["text_encoder"], captions["token_limit"]) == ("T5-XXL", 511)  # 512 less the end token
    assert [(c["file_name"], c["tokens"]) for c in captions["too_long"]] == [
        ("t5long.png", 604),
        ("t5late.png", 524),  # 520 x "red" and "sks" in four pieces
    ]
    assert captions["trigger_cut_off"] == ["t5late.png"]
    too_long = [w for w in facts["warnings"] if "longer than" in w]
    assert too_long == [
        "2 captions are longer than the 511 T5-XXL tokens training reads and will be cut: t5long.png "
        "(604 tokens), t5late.png (524 tokens); shorten or put what matters first."
    ]
    assert any(
        "comes after the 511th token in 1 caption, where T5-XXL never reads it" in w
        for w in facts["warnings"]
    )

    assert main(["check", "--config", str(tmp_path / "config.yaml")]) in (0, 1)
    assert "longest 604 T5-XXL tokens" in capsys.readouterr().out


def test_t5xxl_max_token_length_sets_the_limit(flux_dev, tmp_path, capsys):
    captions = _check_json(_config(tmp_path, flux_dev, t5xxl_max_token_length=128), capsys)["captions"]
    assert captions["token_limit"] == 127
    assert {c["file_name"] for c in captions["too_long"]} == {"t5long.png", "t5late.png"}
    short = _config(tmp_path / "short", flux_dev, t5xxl_max_token_length=64)
    too_long = _check_json(short, capsys)["captions"]["too_long"]
    assert {c["file_name"] for c in too_long} == set(CAPTIONS)  # 100 "red"s are over 63 T5 tokens too


def test_a_schnell_single_file_reads_256_t5_positions(tmp_path):
    files = write_flux_files(build_tiny_flux_components(variant="schnell"), tmp_path / "comfy")
    config = load_config(_config(tmp_path, files["transformer"]))
    reader = caption_reader_for(config)
    assert (reader.encoder, reader.tokens) == ("T5-XXL", 255)


def test_sd_stays_at_clips_75_tokens(tiny_model, tmp_path, capsys):
    captions = _check_json(_config(tmp_path, tiny_model), capsys)["captions"]
    assert (captions["text_encoder"], captions["token_limit"], captions["clip_token_limit"]) == (
        "CLIP",
        75,
        75,
    )
    assert {c["file_name"] for c in captions["too_long"]} == set(CAPTIONS)
    long_clip = _config(tmp_path / "long", tiny_model, max_token_length=150)
    assert caption_reader_for(load_config(long_clip)).tokens == 150
