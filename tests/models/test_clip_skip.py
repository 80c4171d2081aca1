"""clip_skip in `StableDiffusionFamily.encode_prompts`: the n-th hidden state from the end through the final
layer norm (sd-scripts' and A1111's rule), computed here by hand from the text encoder itself."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPTextModel

from lora_scripts.errors import UserError
from lora_scripts.models.sd_loading import SDComponents
from lora_scripts.models.stable_diffusion import StableDiffusionFamily
from lora_scripts.models.tiny import TinySD, build_tiny_sd_components

CAPTIONS = ["ink wash painting, a heron", "a cat"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, two threads fighting over cores make this 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> TinySD:
    return build_tiny_sd_components()


def _family(tiny: TinySD, clip_skip: int | None, layers: int = 4) -> StableDiffusionFamily:
    """The tiny model with a `layers`-deep text encoder (weights fixed by seed 0); only the text encoder is
    new, the other modules are shared (encode_prompts does not touch them)."""
    config = copy.deepcopy(tiny.text_encoder.config)
    config.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(config).eval()
    components = SDComponents(
        unet=tiny.unet,
        vae=tiny.vae,
        text_encoder=text_encoder,
        tokenizer=tiny.tokenizer,
        noise_scheduler=None,
        version="sd_v1",
        prediction_type="epsilon",
        location="memory",
    )
    return StableDiffusionFamily(components, clip_skip=clip_skip)


def _layer_outputs(family: StableDiffusionFamily) -> list[torch.Tensor]:
    """The output of each encoder layer, in order, for CAPTIONS: [B, 77, C] each (before any layer norm)."""
    encoder = family.text_encoder
    outputs: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_hook(keep) for layer in encoder.encoder.layers]
    try:
        with torch.no_grad():
            encoder(family.tokenize(CAPTIONS))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip_is_the_nth_last_hidden_state_through_the_final_layer_norm(tiny, clip_skip):
    family = _family(tiny, clip_skip)
    got = family.encode_prompts(CAPTIONS, CPU)["encoder_hidden_states"]
    encoder = family.text_encoder
    with torch.no_grad():
        hidden_states = encoder(family.tokenize(CAPTIONS), output_hidden_states=True).hidden_states
        by_hand = encoder.final_layer_norm(hidden_states[-clip_skip])
        # the same tensor from the layers themselves: hidden_states[-n] is the output of the n-th last layer
        from_layer = encoder.final_layer_norm(_layer_outputs(family)[-clip_skip])
    assert got.shape == (2, 77, 32)
    torch.testing.assert_close(got, by_hand, atol=0, rtol=0)
    torch.testing.assert_close(got, from_layer, atol=1e-6, rtol=1e-5)
    plain = _family(tiny, None).encode_prompts(CAPTIONS, CPU)["encoder_hidden_states"]
    assert (got - plain).abs().max() > 1e-2  # a skipped layer changes the conditioning


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_clip_skip_1_is_the_plain_output(tiny, clip_skip):
    family = _family(tiny, clip_skip)
    got = family.encode_prompts(CAPTIONS, CPU)["encoder_hidden_states"]
    with torch.no_grad():
        plain = family.text_encoder(family.tokenize(CAPTIONS))[0]
        last_layer = family.text_encoder.final_layer_norm(_layer_outputs(family)[-1])
    torch.testing.assert_close(got, plain, atol=0, rtol=0)
    torch.testing.assert_close(got, last_layer, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("layers", "clip_skip"), [(2, 2), (4, 4), (4, 7)])
def test_clip_skip_at_or_beyond_the_layer_count_is_a_user_error(tiny, layers, clip_skip):
    with pytest.raises(UserError) as info:
        _family(tiny, clip_skip, layers=layers)
    (message,) = info.value.messages
    assert message.startswith(
        f"clip_skip: {clip_skip} is too large for this text encoder ({layers} layers); use a value below "
        f"{layers}"
    )


def test_clip_skip_just_below_the_layer_count_is_allowed(tiny):
    assert _family(tiny, 3, layers=4).clip_skip == 3
