"""process_caption: sd-scripts' per-step caption processing, checked with hand-computed cases."""

from __future__ import annotations

import random

import pytest

from lora_scripts.data.caption_ops import CaptionOptions, process_caption
from lora_scripts.errors import UserError

TAGS = ["sks", "1girl", "solo", "red hair", "smile", "outdoors"]
CAPTION = ", ".join(TAGS)


def run(caption: str, seed: int = 0, **options: object) -> str:
    return process_caption(caption, CaptionOptions(**options), random.Random(seed))  # type: ignore[arg-type]


def test_keep_tokens_with_shuffle_keeps_the_first_tags_in_place() -> None:
    orders = set()
    for seed in range(200):
        tags = run(CAPTION, seed, shuffle_caption=True, keep_tokens=2).split(", ")
        assert tags[:2] == ["sks", "1girl"]
        assert sorted(tags) == sorted(TAGS)  # every tag still present, once
        orders.add(tuple(tags))
    assert len(orders) > 12  # the 4 flexible tags really are shuffled (4! = 24 orders)


def test_shuffle_without_keep_tokens_moves_the_first_tag() -> None:
    firsts = {run(CAPTION, seed, shuffle_caption=True).split(", ")[0] for seed in range(100)}
    assert firsts == set(TAGS)


def test_caption_dropout_rate_one_gives_empty_caption() -> None:
    for seed in range(20):
        assert run(CAPTION, seed, caption_dropout_rate=1.0, caption_prefix="sks", shuffle_caption=True) == ""


def test_caption_dropout_rate_drops_about_that_fraction() -> None:
    rng = random.Random(0)
    options = CaptionOptions(caption_dropout_rate=0.25)
    dropped = sum(process_caption("a, b", options, rng) == "" for _ in range(4000))
    assert 900 < dropped < 1100  # 1000 expected; binomial sd about 27


def test_tag_dropout_one_keeps_only_kept_tokens() -> None:
    for seed in range(20):
        assert run(CAPTION, seed, caption_tag_dropout_rate=1.0, keep_tokens=2) == "sks, 1girl"
    assert run(CAPTION, caption_tag_dropout_rate=1.0) == ""


def test_tag_dropout_keeps_order_without_shuffle() -> None:
    for seed in range(50):
        tags = run(CAPTION, seed, caption_tag_dropout_rate=0.5, keep_tokens=1).split(", ")
        assert tags[0] == "sks"
        assert tags == [t for t in TAGS if t in tags]  # a subsequence: only drops, no reordering


def test_rates_zero_never_change_the_caption() -> None:
    messy = " 1girl,solo ,, red hair\n"
    for seed in range(20):
        assert run(messy, seed) == messy
        assert (
            run(messy, seed, keep_tokens=3, caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0) == messy
        )


def test_shuffling_strips_tags_and_drops_empty_ones() -> None:
    assert run(" b ,, a ,", shuffle_caption=True, keep_tokens=5) == "b, a"


def test_prefix_and_suffix_are_tags_of_their_own() -> None:
    assert (
        run("1girl, solo", caption_prefix="sks", caption_suffix="masterpiece")
        == "sks, 1girl, solo, masterpiece"
    )
    assert run("", caption_prefix="sks") == "sks"  # no dangling separator


def test_keep_tokens_counts_the_prefix() -> None:
    for seed in range(50):
        tags = run("1girl, solo, smile", seed, caption_prefix="sks", shuffle_caption=True, keep_tokens=1)
        assert tags.split(", ")[0] == "sks"
        assert sorted(tags.split(", ")) == ["1girl", "sks", "smile", "solo"]


def test_custom_separator() -> None:
    options = {"caption_separator": "|", "shuffle_caption": True, "keep_tokens": 1}
    for seed in range(30):
        tags = run("a cat| on a mat |at night", seed, **options).split("| ")
        assert tags[0] == "a cat" and sorted(tags) == ["a cat", "at night", "on a mat"]
    assert (
        run("x | y", caption_separator=" | ", caption_prefix="p", caption_tag_dropout_rate=1e-9)
        == "p | x | y"
    )
    # The comma is just text when another separator is set.
    assert run("a, b|c", caption_separator="|", caption_tag_dropout_rate=1e-9) == "a, b| c"


@pytest.mark.parametrize(
    "options, static",
    [
        ({}, True),
        ({"keep_tokens": 2, "caption_prefix": "sks", "caption_suffix": "x"}, True),
        ({"shuffle_caption": True}, False),
        ({"caption_dropout_rate": 0.1}, False),
        ({"caption_tag_dropout_rate": 0.1}, False),
        ({"shuffle_caption": True, "caption_dropout_rate": 0.1, "caption_tag_dropout_rate": 0.1}, False),
    ],
)
def test_is_static(options: dict[str, object], static: bool) -> None:
    assert CaptionOptions(**options).is_static is static  # type: ignore[arg-type]


def test_same_seed_same_output_and_rng_is_the_only_randomness() -> None:
    options = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.1)
    first = [process_caption(CAPTION, options, random.Random(7)) for _ in range(3)]
    random.seed(123)  # the global generator must not matter
    second = process_caption(CAPTION, options, random.Random(7))
    assert first == [second] * 3
    outputs = {process_caption(CAPTION, options, random.Random(seed)) for seed in range(50)}
    assert len(outputs) > 10


def test_static_options_draw_nothing_from_the_rng() -> None:
    rng = random.Random(5)
    process_caption(CAPTION, CaptionOptions(keep_tokens=2, caption_prefix="p"), rng)
    assert rng.random() == random.Random(5).random()


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"keep_tokens": -1}, "keep_tokens: -1 is negative"),
        ({"caption_separator": ""}, "caption_separator: is empty"),
        ({"caption_dropout_rate": 1.5}, "caption_dropout_rate: 1.5 is not a probability"),
        ({"caption_tag_dropout_rate": -0.1}, "caption_tag_dropout_rate: -0.1 is not a probability"),
    ],
)
def test_bad_options_are_user_errors(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(UserError) as caught:
        CaptionOptions(**options)  # type: ignore[arg-type]
    [message] = caught.value.messages
    assert message.startswith(fragment)
