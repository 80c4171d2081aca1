"""Caption facts: CLIP token counts and what is cut, tag and word frequencies, the trigger word."""

from __future__ import annotations

from pathlib import Path

from lora_scripts.checks.captions import CLIP_CAPTION_TOKENS, analyze_captions, trigger_pattern
from lora_scripts.data import CaptionedImage
from tests.checks.conftest import long_caption


def _items(*captions: str) -> list[CaptionedImage]:
    return [CaptionedImage(Path(f"{i}.png"), caption, f"{i}.png") for i, caption in enumerate(captions)]


def test_long_captions_are_counted_worst_first_with_what_is_cut() -> None:
    report = analyze_captions(
        _items("sks, short", long_caption(100), long_caption(80), "sks " + "blue " * 74), trigger_word=None
    )
    assert [(c.file_name, c.tokens) for c in report.too_long] == [("1.png", 100), ("2.png", 80)]
    assert report.too_long[0].cut_off == " ".join(["red"] * (100 - CLIP_CAPTION_TOKENS))
    assert report.longest_tokens == 100  # "sks" + 74 x "blue" is exactly 75 tokens: not cut


def test_trigger_word_missing_and_cut_off() -> None:
    late = " ".join(["red"] * 80) + " sks"
    report = analyze_captions(
        _items("SKS, a dog", "a dog", "sksdog", late, "a photo of sks"), trigger_word="sks"
    )
    assert report.without_trigger == ["1.png", "2.png"]  # whole words only; case does not matter
    assert report.trigger_cut_off == ["3.png"]  # token 81: CLIP never reads it


def test_trigger_phrase_matches_any_spacing() -> None:
    pattern = trigger_pattern("sks  dog")
    assert pattern.search("a photo of SKS\tdog, outdoors")
    assert not pattern.search("a photo of sks dogs")


def test_tags_and_words_by_frequency() -> None:
    report = analyze_captions(
        _items("ink wash, mountain, monochrome", "ink wash, river", "ink wash, Mountain, the mountain"), None
    )
    assert report.top_tags[:2] == [("ink wash", 3), ("mountain", 1)]
    # words count captions, not occurrences; stopwords ("the") are left out; ties in a-z order
    assert report.top_words[:4] == [("ink", 3), ("wash", 3), ("mountain", 2), ("monochrome", 1)]
    assert report.count == 3 and report.trigger_word is None and report.without_trigger == []
