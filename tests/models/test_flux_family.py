"""The FLUX.1 family on the tiny FLUX model: its conditioning is diffusers' FluxPipeline's, its loss is the
reference rectified-flow loss computed by hand, `model_prediction_type` reads the output as documented, and
LoRA training lowers the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline

from lora_scripts.models.family import LoraTargets
from lora_scripts.models.flow_matching import FlowSettings, image_ids, pack_latents, unpack_latents
from lora_scripts.models.flux import FluxFamily, FluxOptions
from lora_scripts.models.flux_loading import load_flux_components
from lora_scripts.models.lora import LoraSpec
from lora_scripts.models.tiny import build_tiny_flux
from lora_scripts.training.losses import LossSettings
from lora_scripts.training.step import diffusion_loss

CAPTIONS = ["ink wash painting, a temple", "a cat"]


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-schnell", variant="schnell")


def family(folder: Path, **options) -> FluxFamily:
    return FluxFamily(load_flux_components(str(folder)), FluxOptions(**options))


def test_conditioning_is_flux_pipelines(flux_dir, schnell_dir):
    for folder, length in ((flux_dir, 512), (schnell_dir, 256)):
        fam = family(folder)
        cond = fam.encode_prompts(CAPTIONS, torch.device("cpu"))
        pipe = FluxPipeline(
            scheduler=None, vae=fam.vae, text_encoder=fam.text_encoder, tokenizer=fam.tokenizer,
            text_encoder_2=fam.text_encoder_2, tokenizer_2=fam.tokenizer_2, transformer=fam.transformer,
        )  # fmt: skip
        hidden, pooled, _ = pipe.encode_prompt(CAPTIONS, max_sequence_length=length)
        assert cond["encoder_hidden_states"].shape[1] == length
        torch.testing.assert_close(cond["encoder_hidden_states"], hidden)
        torch.testing.assert_close(cond["pooled_projections"], pooled)


def _reference_loss(
    fam: FluxFamily, latents, cond, seed, settings: FlowSettings, guidance: float
) -> torch.Tensor:
    """The rectified-flow loss written out as sd-scripts' flux_train_network computes it (raw prediction)."""
    torch.manual_seed(seed)
    noise = torch.randn(latents.shape)
    normal = torch.randn(latents.shape[0])
    sigmas = torch.sigmoid(settings.sigmoid_scale * normal)
    shift = settings.discrete_flow_shift
    sigmas = (sigmas * shift) / (1 + (shift - 1) * sigmas)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    h, w = latents.shape[-2:]
    out = fam.transformer(
        hidden_states=pack_latents(noisy),
        encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"],
        timestep=sigmas,
        img_ids=image_ids((h, w), torch.device("cpu"), torch.float32),
        txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3),
        guidance=torch.full((latents.shape[0],), guidance),
        return_dict=False,
    )[0]
    return F.mse_loss(unpack_latents(out, (h, w)), noise - latents)


def test_the_loss_is_the_reference_formula(flux_dir):
    fam = family(flux_dir, guidance_scale=3.5)
    latents = torch.randn(2, 16, 8, 6)
    cond = fam.encode_prompts(CAPTIONS, torch.device("cpu"))
    torch.manual_seed(7)
    ours = diffusion_loss(fam, latents, cond, LossSettings())
    reference = _reference_loss(fam, latents, cond, 7, FlowSettings(), guidance=3.5)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert fam.info.base_model_version == "flux1" and fam.info.modelspec_architecture == "flux-1-dev"


def test_prediction_types_read_the_output_as_documented(flux_dir):
    latents, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigmas = torch.tensor([0.3, 0.8])
    raw = family(flux_dir, t5_max_token_length=32)
    cond = raw.encode_prompts(CAPTIONS, torch.device("cpu"))
    noisy = raw.add_noise(latents, noise, sigmas)
    output = raw.predict(noisy, sigmas, cond)
    additive = family(flux_dir, flow=FlowSettings(model_prediction_type="additive"), t5_max_token_length=32)
    torch.testing.assert_close(additive.predict(noisy, sigmas, cond), output + noisy)
    scaled = family(flux_dir, flow=FlowSettings(model_prediction_type="sigma_scaled"), t5_max_token_length=32)
    torch.testing.assert_close(scaled.predict(noisy, sigmas, cond), noisy - sigmas.view(-1, 1, 1, 1) * output)
    torch.testing.assert_close(scaled.training_target(latents, noise, sigmas), latents)
    torch.testing.assert_close(raw.training_target(latents, noise, sigmas), noise - latents)
    # A perfect velocity makes the sigma_scaled estimate the clean latents.
    torch.testing.assert_close(noisy - sigmas.view(-1, 1, 1, 1) * (noise - latents), latents)


def test_schnell_gets_no_guidance_and_shorter_t5(schnell_dir):
    fam = family(schnell_dir)
    assert fam.variant == "schnell" and fam.t5_max_length == 256
    cond = fam.encode_prompts(CAPTIONS, torch.device("cpu"))
    latents = torch.randn(2, 16, 4, 4)
    assert fam.predict(latents, torch.tensor([0.5, 0.5]), cond).shape == latents.shape


def test_lora_training_lowers_the_loss(flux_dir):
    fam = family(flux_dir, flow=FlowSettings(timestep_sampling="uniform"), t5_max_token_length=32)
    networks = fam.add_lora(LoraTargets(unet="attn", text_encoder=None), LoraSpec(rank=4, alpha=4.0))
    assert [n.kohya_prefix for n in networks] == ["lora_unet"]
    trainable = [p for p in fam.transformer.parameters() if p.requires_grad]
    assert trainable and all(p.requires_grad for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = {k: v.detach() for k, v in fam.encode_prompts(CAPTIONS, torch.device("cpu")).items()}

    def fixed_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return diffusion_loss(fam, latents, cond, LossSettings()).item()

    before = fixed_loss()
    for step in range(20):
        torch.manual_seed(step)
        loss = diffusion_loss(fam, latents, cond, LossSettings())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.9 * before


def test_full_size_modules_on_the_meta_device():
    """What `check` and the LoRA tools size LoRAs with: FLUX.1-dev's transformer and both encoders from the
    shipped configs, without memory."""
    from lora_scripts.models.flux_loading import shipped_flux_config_dir

    transformer, encoders = FluxFamily.meta_modules(shipped_flux_config_dir("dev"))
    assert len(transformer.transformer_blocks) == 19 and len(transformer.single_transformer_blocks) == 38
    assert [type(e).__name__ for e in encoders] == ["CLIPTextModel", "T5EncoderModel"]
    assert transformer.x_embedder.weight.is_meta
    assert FluxFamily.diffusers_parts() == ("transformer", "vae", "text_encoder", "text_encoder_2")
    bare, none = FluxFamily.meta_modules(shipped_flux_config_dir("schnell"), text_encoders=False)
    assert none == [] and not bare.config.guidance_embeds


def test_latents_are_shifted_then_scaled(flux_dir):
    """FLUX.1's VAE latents: (z - shift_factor) * scaling_factor (0.1159, 0.3611), as FluxPipeline undoes."""
    fam = family(flux_dir)
    moments = torch.randn(1, 32, 4, 4)
    mean = moments[:, :16]
    torch.testing.assert_close(fam.mean_latents(moments), (mean - 0.1159) * 0.3611)
