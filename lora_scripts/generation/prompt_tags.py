"""`<lora:NAME:WEIGHT>` tags in a prompt, read as AUTOMATIC1111's WebUI reads them.

A1111's syntax (extensions-builtin/Lora/extra_networks_lora.py):

    <lora:NAME>                    both weights 1
    <lora:NAME:W>                  text encoder and UNet at W
    <lora:NAME:TE_W:UNET_W>        text encoder first, then UNet
    <lora:NAME:te=0.5:unet=1>      named forms, which override the positional ones

`<lyco:…>` is A1111's alias of `<lora:…>`. Tags are removed from the text before it is encoded. A1111 only
deletes the tag, so `temple, <lora:ink:0.7>, misty` becomes `temple, , misty`; we also drop the empty item
and the spaces left behind (`temple, misty`). The text seen by CLIP then has no stray comma token; there is
no exact parity with A1111 to keep anyway, since diffusers does not read A1111's `(word:1.2)` emphasis.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lora_scripts.errors import UserError

# A1111's extra-network pattern (modules/extra_networks.py): `<type:args>`, args without '>'.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_TYPES = ("lora", "lyco")
_NAMED_KEYS = ("te", "unet")


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:…>` tag: the name as written (stripped) and its two multipliers."""

    name: str
    te_weight: float
    unet_weight: float
    tag: str  # the tag exactly as it appears in the prompt


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt with its LoRA tags taken out: `text` is what the text encoder sees."""

    text: str
    loras: tuple[LoraTag, ...]


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Split `prompt` into the text to encode and its LoRA tags, in order of appearance.

    Raises UserError naming every malformed tag (non-numeric or non-finite weight, unknown named argument,
    an unclosed `<lora:`, a non-LoRA extra network such as `<hypernet:…>`, the same LoRA twice).
    """
    tags: list[LoraTag] = []
    problems: list[str] = []

    def take(match: re.Match[str]) -> str:
        kind, args = match.group(1), match.group(2)
        if kind.lower() not in _LORA_TYPES:
            problems.append(
                f"'{match.group(0)}': '{kind}' extra networks are not supported, only <lora:NAME:WEIGHT>; "
                "remove the tag."
            )
            return ""
        try:
            tags.append(_parse_tag(match.group(0), args))
        except ValueError as err:
            problems.append(f"'{match.group(0)}': {err}")
        return ""

    text = _EXTRA_NETWORK.sub(take, prompt)
    unclosed = re.search(r"<(?:lora|lyco)\b[^>,]*", text, flags=re.IGNORECASE)
    if unclosed:
        problems.append(
            f"'{unclosed.group(0).strip()}': the LoRA tag is not closed or has no name; "
            "write <lora:NAME:WEIGHT>."
        )
    seen: set[str] = set()
    for tag in tags:
        if tag.name in seen:
            problems.append(f"'{tag.tag}': LoRA '{tag.name}' is used twice in the prompt; keep one tag.")
        seen.add(tag.name)
    if problems:
        raise UserError([f"--prompt: {p}" for p in problems])
    return ParsedPrompt(text=tidy_prompt_text(text), loras=tuple(tags))


def _parse_tag(tag: str, args: str) -> LoraTag:
    """`args` is everything after `<lora:`; A1111 splits it on ':' and reads `key=value` items as named."""
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        key, sep, value = item.partition("=")
        if sep and "=" not in value:  # A1111: exactly one '=' makes a named argument
            key = key.strip().lower()
            if key not in _NAMED_KEYS:
                raise ValueError(f"unknown argument '{key}=' (only te= and unet= are supported)")
            named[key] = value
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    if not name:
        raise ValueError("the tag has no LoRA name; write <lora:NAME:WEIGHT>")
    if len(positional) > 3:
        raise ValueError(
            "too many values; write <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT> "
            "(DyLoRA's dyn dimension is not supported)"
        )
    te = _weight(positional[1]) if len(positional) > 1 else 1.0
    te = _weight(named["te"]) if "te" in named else te
    unet = _weight(positional[2]) if len(positional) > 2 else te
    unet = _weight(named["unet"]) if "unet" in named else unet
    return LoraTag(name=name, te_weight=te, unet_weight=unet, tag=tag)


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"weight '{text.strip()}' is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"weight '{text.strip()}' is not a finite number")
    return value


def tidy_prompt_text(text: str) -> str:
    """Remove what a deleted tag leaves behind: empty comma items, spaces before commas, double spaces.

    Spaces carry no meaning for CLIP's tokenizer (it splits on whitespace), but a stray comma is a token.
    Newlines inside the text are kept (A1111 users write multi-line prompts); commas and whitespace at the
    very start or end are dropped.
    """
    text = re.sub(r",(?:[ \t]*,)+", ",", text)
    text = re.sub(r"[ \t]+,", ",", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+(?=\n)", "", text)
    return text.strip(" \t\r\n,")


def has_lora_tags(text: str) -> bool:
    """Whether `text` contains something like a LoRA tag (they are rejected in negative prompts)."""
    return re.search(r"<(?:lora|lyco):", text, flags=re.IGNORECASE) is not None
