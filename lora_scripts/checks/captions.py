"""Facts about the captions: what CLIP will not read, how consistent the wording is, the trigger word, and
metadata.csv rows whose caption has commas outside double quotes.

SD 1.x/2.x's text encoder reads 77 positions: a start token, 75 caption tokens and an end token. Training
cuts every caption there (as every SD trainer does), so words past the 75th token teach nothing; a trigger
word past it is never seen at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lora_scripts.config import TrainConfig
from lora_scripts.config.datasets import dataset_settings
from lora_scripts.data import CaptionedImage, caption_words, tag_frequency
from lora_scripts.data.captions import metadata_warnings, trigger_pattern
from lora_scripts.data.training_set import validation_spec
from lora_scripts.models.sd_loading import load_clip_tokenizer

CLIP_CAPTION_TOKENS = 75  # 77 positions minus the start and end tokens
TOP_COUNT = 15  # how many of the most frequent tags and words are reported


@dataclass(frozen=True)
class LongCaption:
    """A caption longer than CLIP reads: its token count and the text after the cut (as CLIP spells it)."""

    file_name: str
    tokens: int
    cut_off: str


@dataclass(frozen=True)
class CaptionReport:
    """What `analyze_captions` found. Lists of file names are sorted; `too_long` is longest first."""

    count: int
    longest_tokens: int  # tokens of the longest caption (without the start and end tokens)
    too_long: list[LongCaption]
    top_tags: list[tuple[str, int]]  # comma-separated tags, as kohya's ss_tag_frequency counts them
    top_words: list[
        tuple[str, int]
    ]  # lower-cased words, how many captions use them (ties: a-z); no stopwords
    trigger_word: str | None
    without_trigger: list[str]  # captions that never mention trigger_word
    trigger_cut_off: list[str]  # captions that mention it only after the token_limit-th token
    token_limit: int = CLIP_CAPTION_TOKENS  # caption tokens training reads (max_token_length)


def analyze_captions(
    items: Sequence[CaptionedImage],
    trigger_word: str | None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    token_limit: int = CLIP_CAPTION_TOKENS,
) -> CaptionReport:
    """Token counts, tag and word frequencies and trigger-word presence of `items`' captions.

    `tokenizer` defaults to the shipped CLIP tokenizer (SD 1.x and 2.x share its vocabulary), so nothing
    but a few small files is loaded. `token_limit`: the caption tokens training reads (75, or the run's
    max_token_length 150 / 225).
    """
    tokenizer = tokenizer if tokenizer is not None else load_clip_tokenizer("sd_v1")
    captions = [item.caption for item in items]
    # verbose=False: transformers would warn about every caption longer than 77 tokens, which is the point.
    token_ids = tokenizer(captions, add_special_tokens=False, verbose=False)["input_ids"] if captions else []
    too_long = [
        LongCaption(item.file_name, len(ids), tokenizer.decode(ids[token_limit:]).strip())
        for item, ids in zip(items, token_ids, strict=True)
        if len(ids) > token_limit
    ]
    too_long.sort(key=lambda caption: (-caption.tokens, caption.file_name))

    without_trigger: list[str] = []
    trigger_cut_off: list[str] = []
    if trigger_word is not None:
        pattern = trigger_pattern(trigger_word)
        long_names = {caption.file_name for caption in too_long}
        for item in items:
            found = pattern.search(item.caption)
            if found is None:
                without_trigger.append(item.file_name)
            elif item.file_name in long_names and _tokens_before(tokenizer, item.caption, found.start()) >= (
                token_limit
            ):
                trigger_cut_off.append(item.file_name)

    words: Counter[str] = Counter()
    for caption in captions:
        # Each caption counts once per word: the question is how consistently captions use it.
        words.update(set(caption_words(caption)))
    return CaptionReport(
        count=len(items),
        longest_tokens=max((len(ids) for ids in token_ids), default=0),
        too_long=too_long,
        top_tags=list(tag_frequency(items).items())[:TOP_COUNT],
        top_words=sorted(words.items(), key=lambda item: (-item[1], item[0]))[:TOP_COUNT],
        trigger_word=trigger_word,
        token_limit=token_limit,
        without_trigger=sorted(without_trigger),
        trigger_cut_off=sorted(trigger_cut_off),
    )


def _tokens_before(tokenizer: PreTrainedTokenizerBase, caption: str, position: int) -> int:
    """CLIP tokens of `caption[:position]`: where a word starting at `position` lands."""
    return len(tokenizer(caption[:position], add_special_tokens=False, verbose=False)["input_ids"])


def metadata_csv_warnings(config: TrainConfig) -> list[str]:
    """Warnings about the metadata CSVs the run reads (its datasets' and validation_data_dir's), each file
    once: rows whose caption has commas outside double quotes, which training takes whole."""
    paths = [d.metadata_path for d in dataset_settings(config)]
    if config.validation_data_dir is not None:
        paths.append(validation_spec(config).metadata_path)
    files = dict.fromkeys(Path(path) for path in paths if path is not None)
    return [warning for path in files for warning in metadata_warnings(path)]
