"""A base model's own tokenizer, read in whichever format it was saved, and checked against its text encoder.

transformers 4 (and the hub's SD repos) store a CLIP tokenizer as vocab.json + merges.txt; transformers 5's
`save_pretrained` writes tokenizer.json (+ tokenizer_config.json) only. A model whose vocabulary differs from
CLIP's needs its own tokenizer: an id past the text encoder's embedding table fails deep inside training or
generation with "IndexError: index out of range in self", so the sizes are compared once, at load.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn
from transformers import CLIPTokenizer, CLIPTokenizerFast, PreTrainedTokenizerBase

from lora_scripts.errors import UserError

logger = logging.getLogger(__name__)


def load_folder_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `tokenizer_dir` (a diffusers folder's tokenizer/).

    vocab.json + merges.txt load as CLIPTokenizer (as before); tokenizer.json alone as CLIPTokenizerFast,
    which reads it in transformers 4 and is the tokenizers-backed CLIPTokenizer itself in transformers 5.
    Raises UserError naming the folder when it holds neither, or they cannot be read.
    """
    if (tokenizer_dir / "vocab.json").is_file() and (tokenizer_dir / "merges.txt").is_file():
        tokenizer_class: type[PreTrainedTokenizerBase] = CLIPTokenizer
    elif (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer_class = CLIPTokenizerFast
    else:
        # Checked here: transformers 5 quietly builds an empty tokenizer from an empty folder.
        raise UserError(
            f"base_model: '{tokenizer_dir}' holds neither tokenizer.json nor vocab.json and merges.txt; copy "
            "the model's tokenizer files there, or remove the folder to use the standard CLIP tokenizer."
        )
    return read_tokenizer(tokenizer_class, tokenizer_dir)


def read_tokenizer(
    tokenizer_class: type[PreTrainedTokenizerBase], tokenizer_dir: Path, what: str = "tokenizer"
) -> PreTrainedTokenizerBase:
    """`tokenizer_class` read from `tokenizer_dir`; a file it cannot read is a UserError naming the folder
    (`what`: how the message names the tokenizer, e.g. "T5 tokenizer")."""
    try:
        return tokenizer_class.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"base_model: could not read the {what} in '{tokenizer_dir}' ({first_line}); the files may be "
            "incomplete or corrupt, so copy the model's tokenizer files there again."
        ) from err


def fit_tokenizer_to_text_encoder(
    tokenizer: PreTrainedTokenizerBase, text_encoder: nn.Module, tokenizer_dir: Path, model_path: Path
) -> None:
    """Refuse a tokenizer whose ids (0 .. len(tokenizer) - 1, added tokens included) overrun the text
    encoder's token embedding table; cap an unset or too long `model_max_length` at the encoder's positions.

    tokenizer_dir: where the model's tokenizer is (or would be, when the shipped CLIP tokenizer stands in).
    model_path: the base model (file or folder) the text encoder came from, for the message.
    """
    num_tokens = len(tokenizer)
    num_embeddings = text_encoder.get_input_embeddings().num_embeddings
    if num_tokens > num_embeddings:
        which = (
            f"the tokenizer in '{tokenizer_dir}'"
            if tokenizer_dir.is_dir()
            else "the standard CLIP tokenizer (the model has no tokenizer folder)"
        )
        raise UserError(
            f"base_model: {which} has {num_tokens} tokens but the text encoder of '{model_path}' has only "
            f"{num_embeddings} token embeddings; put the tokenizer that was saved with this text encoder in "
            f"'{tokenizer_dir}'."
        )
    # A tokenizer.json saved without its tokenizer_config.json has no length (1e30): captions would be padded
    # to that. The text encoder cannot read past its position embeddings anyway (77 in SD).
    max_positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > max_positions:
        logger.info(
            "%s: tokenizer length %s capped at the text encoder's %d positions",
            tokenizer_dir,
            tokenizer.model_max_length,
            max_positions,
        )
        tokenizer.model_max_length = max_positions
