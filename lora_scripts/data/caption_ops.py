"""Per-step caption processing: prefix/suffix, caption dropout, tag shuffling and tag dropout.

This is sd-scripts' `BaseDataset.process_caption` (library/train_util.py) with the options LoRA users rely
on. Wildcards, `keep_tokens_separator`, `secondary_separator`, `caption_dropout_every_n_epochs` and token
warm-up are not implemented. All randomness comes from the `random.Random` passed in, so a run is
reproducible and each DataLoader worker can own a seeded generator (sd-scripts uses the global `random`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lora_scripts.errors import UserError


@dataclass(frozen=True)
class CaptionOptions:
    """How a caption is changed each time its image is drawn (sd-scripts' option names).

    shuffle_caption: shuffle the tags (the parts between `caption_separator`s) after the first `keep_tokens`.
    keep_tokens: how many leading tags stay in place and are never dropped (e.g. the trigger word).
    caption_separator: what splits a caption into tags.
    caption_prefix, caption_suffix: added to every caption as tags of their own (see `process_caption`).
    caption_dropout_rate: probability in [0, 1] that the whole caption becomes "" (unconditional training).
    caption_tag_dropout_rate: probability in [0, 1] that each tag after the first `keep_tokens` is dropped.
    """

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.keep_tokens < 0:
            problems.append(f"keep_tokens: {self.keep_tokens} is negative; set 0 or more.")
        if not self.caption_separator:
            problems.append("caption_separator: is empty; set the text between tags, e.g. ','.")
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            rate = getattr(self, key)
            if not 0.0 <= rate <= 1.0:
                problems.append(f"{key}: {rate} is not a probability; set a value from 0 to 1.")
        if problems:
            raise UserError(problems)

    @property
    def is_static(self) -> bool:
        """True when `process_caption` returns the same text on every call (captions can be cached)."""
        return (
            not self.shuffle_caption and self.caption_dropout_rate == 0 and self.caption_tag_dropout_rate == 0
        )

    @property
    def tag_joiner(self) -> str:
        """What joins tags back together: the separator plus a space (", "), unless it ends in whitespace."""
        separator = self.caption_separator
        return separator if separator[-1].isspace() else separator + " "


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """The caption the text encoder sees at this step.

    Order as in sd-scripts: prefix and suffix are added; the whole caption is dropped (-> "") with
    `caption_dropout_rate`; otherwise, when shuffling or tag dropout is on, the caption is split on
    `caption_separator`, tags are stripped and empty ones dropped, the first `keep_tokens` tags stay fixed,
    the rest are shuffled (if `shuffle_caption`), then each of them is dropped with
    `caption_tag_dropout_rate`, and the tags are joined with `options.tag_joiner` (", ").

    Unlike sd-scripts, which joins them with a space ("sks" + "1girl, solo" -> "sks 1girl, solo"), the
    prefix and suffix are joined as tags of their own ("sks, 1girl, solo"), so that `keep_tokens: 1` keeps
    exactly the prefix trigger word in front and the prefix never merges into the first tag. A prefix that
    itself contains the separator counts as several tags.

    With no randomness on (`options.is_static`), the caption comes back untouched apart from the prefix and
    suffix. `rng` is the only source of randomness.
    """
    parts = (options.caption_prefix, caption, options.caption_suffix)
    caption = options.tag_joiner.join(part for part in parts if part)
    # Draw only when the rate is on, as sd-scripts does, so that turning an option off does not shift the
    # random stream of the others.
    if options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate:
        return ""
    if not (options.shuffle_caption or options.caption_tag_dropout_rate > 0):
        return caption
    tags = [tag.strip() for tag in caption.split(options.caption_separator)]
    tags = [tag for tag in tags if tag]
    fixed, flexible = tags[: options.keep_tokens], tags[options.keep_tokens :]
    if options.shuffle_caption:
        rng.shuffle(flexible)
    if options.caption_tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= options.caption_tag_dropout_rate]
    return options.tag_joiner.join(fixed + flexible)
