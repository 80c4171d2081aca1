"""A1111 infotext: written in WebUI's layout, read back by the port of its parser."""

from __future__ import annotations

import hashlib

from lora_scripts.generation.infotext import (
    VERSION,
    build_infotext,
    checkpoint_short_hash,
    format_number,
    parse_infotext,
    parse_lora_hashes,
)

PROMPT = "ancient temple on mountain peak, <lora:ink_painting_v1:0.7>, ink wash painting, misty atmosphere"
NEGATIVE = "modern, cartoon, bright colors, text, signature"


def _text(**overrides) -> str:
    values = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        steps=30,
        sampler="Euler a",
        cfg_scale=7.0,
        seed=42,
        width=512,
        height=512,
        model_hash="6ce0161689",
        model_name="v1-5-pruned",
        lora_hashes={"ink_painting_v1": "0123456789ab", "lo:co,n": "ba9876543210"},
    )
    values.update(overrides)
    return build_infotext(**values)


def test_layout_matches_webui():
    assert _text().split("\n") == [
        PROMPT,
        f"Negative prompt: {NEGATIVE}",
        "Steps: 30, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 6ce0161689, "
        'Model: v1-5-pruned, Lora hashes: "ink_painting_v1: 0123456789ab, locon: ba9876543210", '
        f"Version: {VERSION}",
    ]
    assert VERSION == "lora-scripts 0.1.0"


def test_round_trip():
    parsed = parse_infotext(_text(cfg_scale=7.5, sampler="DPM++ 2M Karras", width=768, height=512))
    assert parsed["Prompt"] == PROMPT
    assert parsed["Negative prompt"] == NEGATIVE
    assert parsed["Steps"] == "30" and parsed["CFG scale"] == "7.5" and parsed["Seed"] == "42"
    assert parsed["Sampler"] == "DPM++ 2M Karras"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("768", "512")
    assert parsed["Model hash"] == "6ce0161689" and parsed["Model"] == "v1-5-pruned"
    assert parse_lora_hashes(parsed["Lora hashes"]) == {
        "ink_painting_v1": "0123456789ab",
        "locon": "ba9876543210",
    }
    assert parsed["Version"] == VERSION


def test_no_negative_prompt_no_model_hash_multiline_prompt():
    text = _text(prompt="line one\nline two", negative_prompt="", model_hash=None, lora_hashes=None)
    assert "Negative prompt" not in text and "Model hash" not in text and "Lora hashes" not in text
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two" and parsed["Negative prompt"] == ""
    assert parsed["Model"] == "v1-5-pruned"


def test_parses_a_webui_infotext():
    text = (
        "masterpiece, 1girl, <lora:add_detail:0.5>\n"
        "Negative prompt: lowres, bad anatomy\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3601468271, "
        "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
        'Lora hashes: "add_detail: 7c6bad76eb54", '
        "Version: v1.10.1"
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "masterpiece, 1girl, <lora:add_detail:0.5>"
    assert parsed["Schedule type"] == "Karras" and parsed["Size-2"] == "768"
    assert parse_lora_hashes(parsed["Lora hashes"]) == {"add_detail": "7c6bad76eb54"}


def test_number_format():
    assert [format_number(x) for x in (7.0, 7.5, 0.1, -1.0, 12.25)] == ["7", "7.5", "0.1", "-1", "12.25"]


def test_checkpoint_hash_is_sha256_of_the_whole_file(tmp_path):
    path = tmp_path / "model.safetensors"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert checkpoint_short_hash(path) == hashlib.sha256(data).hexdigest()[:10]
