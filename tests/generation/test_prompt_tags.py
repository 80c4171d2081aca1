"""`<lora:…>` tags: parsed as A1111 parses them, removed from the text, malformed ones reported by name."""

from __future__ import annotations

import pytest

from lora_scripts.errors import UserError
from lora_scripts.generation.prompt_tags import parse_prompt

# prompt -> (text the encoder sees, [(name, te_weight, unet_weight), ...])
CASES = [
    (
        "ancient temple on mountain peak, <lora:ink_painting_v1:0.7>, ink wash painting, misty atmosphere",
        "ancient temple on mountain peak, ink wash painting, misty atmosphere",
        [("ink_painting_v1", 0.7, 0.7)],
    ),
    ("a cat", "a cat", []),
    ("<lora:style>", "", [("style", 1.0, 1.0)]),
    ("<lora:style>, a cat", "a cat", [("style", 1.0, 1.0)]),
    ("a cat, <lora:style:.5>", "a cat", [("style", 0.5, 0.5)]),
    ("a cat <lora:style:1.25> sitting", "a cat sitting", [("style", 1.25, 1.25)]),
    ("a cat,<lora:a:1>,<lora:b:0.3>, sitting", "a cat, sitting", [("a", 1.0, 1.0), ("b", 0.3, 0.3)]),
    (
        "x, <lora:a:0.5>, <lora:b:-0.8>, <lora:c:2e-1>, y",
        "x, y",
        [("a", 0.5, 0.5), ("b", -0.8, -0.8), ("c", 0.2, 0.2)],
    ),
    # A1111's order: text encoder first, then UNet; the UNet weight defaults to the TE weight.
    ("p, <lora:split:0.3:1.2>", "p", [("split", 0.3, 1.2)]),
    ("p, <lora:split:0:1>", "p", [("split", 0.0, 1.0)]),
    ("p, <lora:named:unet=0.4>", "p", [("named", 1.0, 0.4)]),
    # As in A1111, te= replaces the positional TE weight before the UNet weight defaults to it.
    ("p, <lora:named:0.9:te=0.1>", "p", [("named", 0.1, 0.1)]),
    ("p, <lora: spaced name : 0.6 >", "p", [("spaced name", 0.6, 0.6)]),
    ("p, <lora:ink.v1-final:0.7>", "p", [("ink.v1-final", 0.7, 0.7)]),
    ("p, <lora:my style v2:1>", "p", [("my style v2", 1.0, 1.0)]),
    ("p, <lyco:locon:0.5>", "p", [("locon", 0.5, 0.5)]),
    ("p, <lora:./loras/x.safetensors:0.5>", "p", [("./loras/x.safetensors", 0.5, 0.5)]),
    ("line one, <lora:a:1>\nline two", "line one,\nline two", [("a", 1.0, 1.0)]),
    ("a,  b ,, c", "a, b, c", []),  # the tidying applies to the whole text
]


@pytest.mark.parametrize(("prompt", "text", "loras"), CASES, ids=[c[0][:40] for c in CASES])
def test_tags_are_parsed_and_removed(prompt, text, loras):
    parsed = parse_prompt(prompt)
    assert parsed.text == text
    assert [(t.name, t.te_weight, t.unet_weight) for t in parsed.loras] == loras


def test_tag_keeps_its_original_spelling():
    parsed = parse_prompt("a, <lora:ink:0.70>, b")
    assert parsed.loras[0].tag == "<lora:ink:0.70>"


# prompt -> a fragment every error message must contain
MALFORMED = [
    ("a, <lora:ink:strong>", "'<lora:ink:strong>': weight 'strong' is not a number"),
    ("a, <lora:ink:0.5:lots>", "weight 'lots' is not a number"),
    ("a, <lora:ink:>", "weight '' is not a number"),
    ("a, <lora:ink:nan>", "not a finite number"),
    ("a, <lora:ink:inf>", "not a finite number"),
    ("a, <lora::0.5>", "has no LoRA name"),
    ("a, <lora:ink:0.5", "not closed"),
    ("a, <lora:>", "not closed or has no name"),
    ("a, <lora:ink:1:1:8>", "too many values"),
    ("a, <lora:ink:dyn=8>", "unknown argument 'dyn='"),
    ("a, <hypernet:agm:1.1>", "'hypernet' extra networks are not supported"),
    ("a, <lora:ink:0.5>, <lora:ink:0.7>", "used twice"),
]


@pytest.mark.parametrize(("prompt", "fragment"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_tags_name_the_tag(prompt, fragment):
    with pytest.raises(UserError) as info:
        parse_prompt(prompt)
    assert len(info.value.messages) == 1
    message = info.value.messages[0]
    assert message.startswith("--prompt: ")
    assert fragment in message


def test_every_malformed_tag_is_reported_at_once():
    with pytest.raises(UserError) as info:
        parse_prompt("<lora:a:x>, <lora:b:y>, <hypernet:h:1>")
    assert len(info.value.messages) == 3
