"""Facts about the captions: what the text encoder will not read, how consistent the wording is, the trigger
word, and metadata.csv rows whose caption has commas outside double quotes.

SD 1.x/2.x's and SDXL's CLIP reads 77 positions: a start token, 75 caption tokens and an end token (or
max_token_length's 150 / 225 in chunks). FLUX.1 reads the caption with T5-XXL: 512 positions for dev, 256
for schnell (or t5xxl_max_token_length), one of them the end token; CLIP-L gives only its pooled embedding.
Training cuts every caption there (as every trainer does), so words past the limit teach nothing; a trigger
word past it is never seen at all. Which encoder and limit apply is the model family's (`caption_reader`).
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
from lora_scripts.errors import UserError
from lora_scripts.models.family import CaptionReader, ModelFamily
from lora_scripts.models.registry import family_of
from lora_scripts.models.sd_loading import load_clip_tokenizer

CLIP_CAPTION_TOKENS = 75  # 77 positions minus the start and end tokens
TOP_COUNT = 15  # how many of the most frequent tags and words are reported


@dataclass(frozen=True)
class LongCaption:
    """A caption longer than the text encoder reads: its token count and the text after the cut (as the
    encoder's tokenizer spells it)."""

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
    token_limit: int = CLIP_CAPTION_TOKENS  # caption tokens training reads (max_token_length; FLUX.1: T5's)
    text_encoder: str = "CLIP"  # the encoder whose tokens are counted ("T5-XXL" for FLUX.1)


def caption_reader_for(config: TrainConfig) -> CaptionReader:
    """The family's reader of the run's captions (FLUX.1: T5-XXL; SD, SDXL: CLIP). A base model that cannot
    be read gets CLIP's; check reports why it cannot elsewhere."""
    values = config.changed_values()
    try:
        return family_of(config.base_model, fallback=True).caption_reader(config.base_model, values)
    except (UserError, OSError):
        return ModelFamily.caption_reader(config.base_model, values)


def analyze_run_captions(items: Sequence[CaptionedImage], config: TrainConfig) -> CaptionReport:
    """`analyze_captions` of a run's captions, counted with its family's tokenizer against its limit."""
    reader = caption_reader_for(config)
    return analyze_captions(
        items, config.trigger_word, reader.tokenizer(), reader.tokens, text_encoder=reader.encoder
    )


def analyze_captions(
    items: Sequence[CaptionedImage],
    trigger_word: str | None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    token_limit: int = CLIP_CAPTION_TOKENS,
    *,
    text_encoder: str = "CLIP",
) -> CaptionReport:
    """Token counts, tag and word frequencies and trigger-word presence of `items`' captions.

    `tokenizer` defaults to the shipped CLIP tokenizer (SD 1.x and 2.x share its vocabulary), so nothing
    but a few small files is loaded. `token_limit`: the caption tokens training reads (75, or the run's
    max_token_length 150 / 225; FLUX.1: T5's length less the end token). `text_encoder` names the encoder
    the tokenizer is for, in the findings' text.
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
        text_encoder=text_encoder,
        without_trigger=sorted(without_trigger),
        trigger_cut_off=sorted(trigger_cut_off),
    )


def _tokens_before(tokenizer: PreTrainedTokenizerBase, caption: str, position: int) -> int:
    """Tokens of `caption[:position]`: where a word starting at `position` lands."""
    return len(tokenizer(caption[:position], add_special_tokens=False, verbose=False)["input_ids"])


def metadata_csv_warnings(config: TrainConfig) -> list[str]:
    """Warnings about the metadata CSVs the run reads (its datasets' and validation_data_dir's), each file
    once: rows whose caption has commas outside double quotes, which training takes whole."""
    paths = [d.metadata_path for d in dataset_settings(config)]
    if config.validation_data_dir is not None:
        paths.append(validation_spec(config).metadata_path)
    files = dict.fromkeys(Path(path) for path in paths if path is not None)
    return [warning for path in files for warning in metadata_warnings(path)]
