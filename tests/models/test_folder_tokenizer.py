"""A diffusers folder's own tokenizer, in either format, checked against its text encoder at load.

The tokenizers here are saved with the installed transformers' `save_pretrained` (transformers 5 writes
tokenizer.json + tokenizer_config.json, no vocab.json), around tiny models whose vocabulary is not CLIP's.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizerFast, PreTrainedTokenizerBase

from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.generation.generate import run_generate
from lora_scripts.generation.options import GenerateOptions
from lora_scripts.models.sd_loading import CLIP_TOKENIZER_DIR, load_clip_tokenizer, load_sd_components
from lora_scripts.models.stable_diffusion import StableDiffusionFamily
from lora_scripts.models.tiny import TINY_CONTEXT_DIM, build_tiny_sd, build_tiny_sd_components
from lora_scripts.training import loop
from tests.helpers.compvis import write_compvis_checkpoint
from tests.training.conftest import make_dataset, tiny_run_settings, write_config

CAPTION = "a photo of a cat on a mountain, ink wash painting"
CORPUS = [
    f"{style} of a {subject} on a {place}, monochrome"
    for style in ("a photo", "ink wash painting", "a sketch")
    for subject in ("cat", "dog", "temple", "bird")
    for place in ("mountain", "river", "roof")
]


@pytest.fixture(scope="module")
def small_tokenizer() -> PreTrainedTokenizerBase:
    """CLIP's BPE pipeline trained afresh on a few captions: the same kind of tokenizer with its own,
    much smaller vocabulary (specials first, so even <|startoftext|> has another id than in CLIP's)."""
    clip = CLIPTokenizerFast.from_pretrained(CLIP_TOKENIZER_DIR)
    return clip.train_new_from_iterator(CORPUS, vocab_size=300)


def text_encoder_with_vocab(num_embeddings: int) -> CLIPTextModel:
    """The tiny model's text encoder (seed 0), its token embedding table cut or grown to `num_embeddings`."""
    text_encoder = build_tiny_sd_components().text_encoder
    text_encoder.resize_token_embeddings(num_embeddings)
    return text_encoder


def tiny_folder(
    path: Path, tokenizer: PreTrainedTokenizerBase | None, *, num_embeddings: int | None = None
) -> Path:
    """The tiny SD folder with `tokenizer` saved by `save_pretrained` as its tokenizer/ (None: no tokenizer
    folder at all) and, given `num_embeddings`, a text encoder with that many token embeddings."""
    folder = build_tiny_sd(path)
    shutil.rmtree(folder / "tokenizer")  # the copied CLIP vocab.json/merges.txt
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / "tokenizer")
    if num_embeddings is not None:
        text_encoder_with_vocab(num_embeddings).save_pretrained(folder / "text_encoder")
    return folder


def ids(tokenizer: PreTrainedTokenizerBase, text: str = CAPTION) -> list[int]:
    return tokenizer(text).input_ids


def test_tokenizer_json_folder_loads_its_own_vocabulary(tmp_path, small_tokenizer):
    folder = tiny_folder(tmp_path / "small", small_tokenizer, num_embeddings=len(small_tokenizer))
    for name in ("vocab.json", "merges.txt"):  # transformers 5 never writes them; 4.x might
        (folder / "tokenizer" / name).unlink(missing_ok=True)
    assert (folder / "tokenizer" / "tokenizer.json").is_file()

    loaded = load_sd_components(str(folder))
    assert len(loaded.tokenizer) == len(small_tokenizer) == 300
    assert ids(loaded.tokenizer) == ids(small_tokenizer) != ids(load_clip_tokenizer("sd_v1"))
    assert loaded.tokenizer.model_max_length == 77

    family = StableDiffusionFamily(loaded)
    assert max(family.tokenize([CAPTION])[0].tolist()) < 300
    hidden = family.encode_prompts([CAPTION, "a dog"], torch.device("cpu"))["encoder_hidden_states"]
    assert hidden.shape == (2, 77, TINY_CONTEXT_DIM) and torch.isfinite(hidden).all()


def test_vocab_json_folder_still_loads(tmp_path, small_tokenizer, tiny_sd_dir):
    """The layout of hub downloads and transformers 4: vocab.json + merges.txt + tokenizer_config.json."""
    folder = tiny_folder(tmp_path / "small", small_tokenizer, num_embeddings=len(small_tokenizer))
    tokenizer_dir = folder / "tokenizer"
    model = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tokenizer_dir / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (tokenizer_dir / "tokenizer.json").unlink()

    loaded = load_sd_components(str(folder))
    assert ids(loaded.tokenizer) == ids(small_tokenizer)
    # The CLIP vocabulary copied by build_tiny_sd, as before.
    assert ids(load_sd_components(str(tiny_sd_dir)).tokenizer) == ids(load_clip_tokenizer("sd_v1"))


def test_tokenizer_json_without_its_config_gets_the_text_encoders_length(tmp_path, small_tokenizer):
    folder = tiny_folder(tmp_path / "small", small_tokenizer, num_embeddings=len(small_tokenizer))
    (folder / "tokenizer" / "tokenizer_config.json").unlink()
    loaded = load_sd_components(str(folder))
    assert ids(loaded.tokenizer) == ids(small_tokenizer)
    assert loaded.tokenizer.model_max_length == 77  # not 1e30, which padding="max_length" would allocate
    assert StableDiffusionFamily(loaded).tokenize([CAPTION]).shape == (1, 77)


def test_added_tokens_count_and_load_when_the_text_encoder_has_them(tmp_path):
    clip = CLIPTokenizerFast.from_pretrained(CLIP_TOKENIZER_DIR)
    clip.add_tokens(["<ohwx>", "<sks>"])
    folder = tiny_folder(tmp_path / "added", clip, num_embeddings=49410)
    loaded = load_sd_components(str(folder))
    assert ids(loaded.tokenizer, "a <sks> cat") == [49406, 320, 49409, 2368, 49407]


def test_more_tokens_than_embeddings_is_one_sentence(tmp_path):
    clip = CLIPTokenizerFast.from_pretrained(CLIP_TOKENIZER_DIR)
    clip.add_tokens(["<ohwx>", "<sks>"])
    folder = tiny_folder(tmp_path / "added", clip)  # text encoder: CLIP's 49408 embeddings
    with pytest.raises(UserError) as err:
        load_sd_components(str(folder))
    assert err.value.messages == [
        f"base_model: the tokenizer in '{folder / 'tokenizer'}' has 49410 tokens but the text encoder of "
        f"'{folder}' has only 49408 token embeddings; put the tokenizer that was saved with this text "
        f"encoder in '{folder / 'tokenizer'}'."
    ]


def test_no_tokenizer_folder_keeps_the_shipped_one_but_checks_it(tmp_path):
    folder = tiny_folder(tmp_path / "none", None)
    assert ids(load_sd_components(str(folder)).tokenizer) == ids(load_clip_tokenizer("sd_v1"))

    small = tiny_folder(tmp_path / "small-none", None, num_embeddings=300)
    with pytest.raises(UserError) as err:
        load_sd_components(str(small))
    assert err.value.messages == [
        "base_model: the standard CLIP tokenizer (the model has no tokenizer folder) has 49408 tokens but "
        f"the text encoder of '{small}' has only 300 token embeddings; put the tokenizer that was saved "
        f"with this text encoder in '{small / 'tokenizer'}'."
    ]


def test_single_file_uses_and_checks_the_config_folders_tokenizer(tmp_path, small_tokenizer):
    tiny = build_tiny_sd_components()
    text_encoder = text_encoder_with_vocab(len(small_tokenizer))
    path = write_compvis_checkpoint(tmp_path / "small.safetensors", tiny.unet, tiny.vae, text_encoder)
    config_dir = tiny_folder(tmp_path / "config", small_tokenizer, num_embeddings=len(small_tokenizer))
    loaded = load_sd_components(str(path), config_dir=config_dir)
    assert ids(loaded.tokenizer) == ids(small_tokenizer)
    assert torch.equal(
        loaded.text_encoder.get_input_embeddings().weight, text_encoder.get_input_embeddings().weight
    )

    shutil.rmtree(config_dir / "tokenizer")  # the shipped CLIP tokenizer stands in, and does not fit
    with pytest.raises(
        UserError, match=r"has 49408 tokens but the text encoder of '.*small\.safetensors' has only 300"
    ):
        load_sd_components(str(path), config_dir=config_dir)


def _corrupt_tokenizer_json(tokenizer_dir: Path) -> None:
    (tokenizer_dir / "tokenizer.json").write_text("{not json", encoding="utf-8")


def _corrupt_vocab_json(tokenizer_dir: Path) -> None:
    # The hub layout (no tokenizer.json); the tokenizers library reports this one with a bare Exception.
    (tokenizer_dir / "tokenizer.json").unlink()
    shutil.copy(CLIP_TOKENIZER_DIR / "merges.txt", tokenizer_dir / "merges.txt")
    (tokenizer_dir / "vocab.json").write_text("{bad", encoding="utf-8")


@pytest.mark.parametrize(
    "damage", [_corrupt_tokenizer_json, _corrupt_vocab_json], ids=["tokenizer.json", "vocab.json"]
)
def test_unreadable_tokenizer_folder_is_a_user_error(tmp_path, small_tokenizer, damage):
    folder = tiny_folder(tmp_path / "broken", small_tokenizer, num_embeddings=len(small_tokenizer))
    damage(folder / "tokenizer")
    with pytest.raises(UserError) as err:
        load_sd_components(str(folder))
    (message,) = err.value.messages
    assert message.startswith(f"base_model: could not read the tokenizer in '{folder / 'tokenizer'}' (")
    assert message.endswith(
        "; the files may be incomplete or corrupt, so copy the model's tokenizer files there again."
    )


def test_tokenizer_folder_without_tokenizer_files_is_a_user_error(tmp_path):
    folder = tiny_folder(tmp_path / "empty", None)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "special_tokens_map.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_sd_components(str(folder))
    assert err.value.messages == [
        f"base_model: '{folder / 'tokenizer'}' holds neither tokenizer.json nor vocab.json and merges.txt; "
        "copy the model's tokenizer files there, or remove the folder to use the standard CLIP tokenizer."
    ]


def test_a_model_with_its_own_small_vocabulary_trains_and_generates(tmp_path, small_tokenizer):
    """Before, the CLIP tokenizer's ids ran past the 300 embeddings: "IndexError: index out of range"."""
    folder = tiny_folder(tmp_path / "small", small_tokenizer, num_embeddings=len(small_tokenizer))
    data = tmp_path / "data"
    make_dataset(data, n=2)
    settings = tiny_run_settings(data, folder, max_train_steps=1, train_text_encoder=True)
    config = write_config(tmp_path / "run.yaml", **settings, output_dir=str(tmp_path / "out"))
    assert math.isfinite(loop.train(load_config(config)).last_loss)

    options = GenerateOptions(
        base_model=str(folder),
        prompt=CAPTION,
        output=tmp_path / "renders",
        steps=1,
        width=64,
        height=64,
        seed=1,
        sampler="euler",
        progress=False,
    )
    assert [path.suffix for path in run_generate(options).files] == [".png"]
