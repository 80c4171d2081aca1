"""A tiny BLIP captioning model with random weights, saved like a hub download (no network needed).

Vision and text towers of 2 layers and width 32 on 32x32 images, and a BERT WordPiece tokenizer over a
few dozen whole words, so captions decode to real words. The weights are initialised with a large
spread (initializer_range 0.5) so that different images give different greedy captions.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "a an the of on in with mountain river tree temple ink painting black white bird boat moon mist pine "
    "rock bridge cloud house"
).split()
# BLIP starts every caption with [DEC] (id 30522 in the real vocab); here it is the last token.
VOCAB = [*SPECIAL_TOKENS, *WORDS, "[DEC]"]
IMAGE_SIZE = 32


def write_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """Save a tiny BlipForConditionalGeneration + BlipProcessor into `folder`; returns `folder`."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab_dir = folder / "vocab"
    vocab_dir.mkdir(exist_ok=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(vocab_dir, bos_token="[DEC]")
    assert len(tokenizer) == len(VOCAB)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = BlipConfig(
        text_config={
            **tower,
            "vocab_size": len(VOCAB),
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "bos_token_id": VOCAB.index("[DEC]"),
            "pad_token_id": VOCAB.index("[PAD]"),
            "sep_token_id": VOCAB.index("[SEP]"),
            "eos_token_id": VOCAB.index("[SEP]"),
            "initializer_range": 0.5,
        },
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": 8, "initializer_range": 0.5},
        projection_dim=32,
        image_text_hidden_size=32,
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    # Without torchvision, transformers 5 builds the PIL image processor (BlipImageProcessorPil) here.
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
