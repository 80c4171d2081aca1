"""SDXL base models load offline: detection of every kind of file, the tiny model's sgm single file and
diffusers folder loading bit-identically, the shipped full-size configs, and training still refusing SDXL.

Every test here runs with the network disabled (conftest's autouse `no_network`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_scripts.errors import UserError
from lora_scripts.models import sdxl_loading
from lora_scripts.models.detect import detect_model_version, detect_sd_version
from lora_scripts.models.registry import base_model_zero_terminal_snr, load_family
from lora_scripts.models.sd_loading import load_sd_components, shipped_config_dir
from lora_scripts.models.sdxl import SDXLFamily
from lora_scripts.models.sdxl_loading import SDXLComponents, load_sdxl_components
from lora_scripts.models.tiny import (
    TinySDXL,
    build_tiny_sd_components,
    build_tiny_sdxl,
    build_tiny_sdxl_components,
)
from tests.helpers.compvis import to_compvis_state_dict
from tests.helpers.hub_cache import hub_snapshot
from tests.helpers.sgm import to_sgm_state_dict, write_sgm_checkpoint

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")
FILE = Path("model.safetensors")
TRAINABLE = "lora-scripts trains SD 1.x, SD 2.x, SDXL and FLUX.1 base models"
NOT_SUPPORTED = f"{TRAINABLE}, and other model families are not supported yet."
TEXT_TO_IMAGE = "which is not supported yet; lora-scripts trains text-to-image models, so use the plain"


@pytest.fixture(scope="module")
def tiny_sdxl() -> TinySDXL:
    """The tiny SDXL model in memory: the reference every loaded tensor is compared with."""
    return build_tiny_sdxl_components()


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def tiny_sdxl_file(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl: TinySDXL) -> Path:
    """The tiny model as an sgm single-file .safetensors in fp32 (what a kohya fp32 save looks like)."""
    path = tmp_path_factory.mktemp("tiny_sdxl_file") / "tiny-sdxl.safetensors"
    return write_sgm_checkpoint(path, *(getattr(tiny_sdxl, name) for name in MODULES))


def sgm_state(tiny: TinySDXL) -> dict[str, torch.Tensor]:
    return to_sgm_state_dict(*(getattr(tiny, name).state_dict() for name in MODULES), layers_per_block=2)


def assert_same_weights(loaded: SDXLComponents, reference: TinySDXL, *, dtype: torch.dtype = torch.float32):
    """Every parameter and buffer of the four modules equals the reference (rounded through `dtype`)."""
    for name in MODULES:
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            expected = value.to(dtype).to(value.dtype) if value.is_floating_point() else value
            assert ours[key].dtype == value.dtype, key
            assert torch.equal(ours[key], expected), f"{name}: {key}"


def assert_ready_for_training(loaded: SDXLComponents) -> None:
    for name in MODULES:
        module = getattr(loaded, name)
        assert not module.training, name
        assert all(
            not p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu"
            for p in module.parameters()
        ), name
    assert isinstance(loaded.text_encoder, CLIPTextModel)
    assert isinstance(loaded.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(loaded.noise_scheduler, DDPMScheduler)
    assert loaded.noise_scheduler.config.prediction_type == loaded.prediction_type
    torch.testing.assert_close(loaded.noise_scheduler.betas[[0, -1]], torch.tensor([0.00085, 0.012]))


def assert_sdxl_tokenizers(loaded: SDXLComponents) -> None:
    """tokenizer pads with <|endoftext|> (49407), tokenizer_2 with "!" (0); same BPE ids otherwise."""
    ids = [49406, 320, 2368, 49407]  # <|startoftext|> a cat <|endoftext|>
    first = loaded.tokenizer("a cat", padding="max_length", max_length=6).input_ids
    second = loaded.tokenizer_2("a cat", padding="max_length", max_length=6).input_ids
    assert (loaded.tokenizer.pad_token, first) == ("<|endoftext|>", ids + [49407, 49407])
    assert (loaded.tokenizer_2.pad_token, second) == ("!", ids + [0, 0])
    assert loaded.tokenizer.model_max_length == loaded.tokenizer_2.model_max_length == 77


# --- detection --------------------------------------------------------------------------------------------


def sd_state(version: str) -> dict[str, torch.Tensor]:
    tiny = build_tiny_sd_components(version=version)
    return to_compvis_state_dict(
        tiny.unet.state_dict(),
        tiny.vae.state_dict(),
        tiny.text_encoder.state_dict(),
        layers_per_block=1,
        text_encoder="clip" if version == "sd_v1" else "open_clip",
    )


def with_conv_in_channels(state: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    key = "model.diffusion_model.input_blocks.0.0.weight"
    return {**state, key: torch.zeros(state[key].shape[0], channels, 3, 3)}


def fake_ldm(text_encoder: str, in_channels: int) -> dict[str, torch.Tensor]:
    """The keys detection reads, shaped as in SD 1.x (CLIP) or SD 2.x (OpenCLIP) files."""
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, in_channels, 3, 3),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
        text_encoder: torch.zeros(8, 768),
    }


SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"


def test_sdxl_base_is_detected_in_fp16_and_fp32_with_or_without_v_pred(tiny_sdxl):
    state = sgm_state(tiny_sdxl)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    for variant in (state, half, {**half, "v_pred": torch.tensor([])}):
        assert detect_model_version(variant, FILE) == "sdxl"
    assert (
        detect_model_version(sd_state("sd_v1"), FILE) == detect_sd_version(sd_state("sd_v1"), FILE) == "sd_v1"
    )
    assert (
        detect_model_version(sd_state("sd_v2"), FILE) == detect_sd_version(sd_state("sd_v2"), FILE) == "sd_v2"
    )


def test_sd_detection_names_sdxl_with_its_sentence(tiny_sdxl):
    with pytest.raises(UserError) as err:
        detect_sd_version(sgm_state(tiny_sdxl), FILE)
    assert err.value.messages == [
        "base_model: 'model.safetensors' is an SDXL checkpoint, not an SD 1.x/2.x one; load it as SDXL "
        "(models/registry.py load_family does)."
    ]


REFINER = {  # stable-diffusion-xl-refiner-1.0: bigG alone as embedders.0, 1280-wide context, 2560 adm input
    "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1536, 2560),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(768, 1280),
    "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1280),
    "conditioner.embedders.0.model.text_projection": torch.zeros(1280, 1280),
    "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
}
SD3 = {
    "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(1),
    "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 768),
}
FLUX_BFL = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1), "img_in.weight": torch.zeros(1)}
FLUX_COMFY = {"model.diffusion_model." + key: value for key, value in FLUX_BFL.items()}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (REFINER, f"is an SDXL refiner checkpoint, which is not supported yet; {TRAINABLE}."),
        (
            SD3,
            f"is a Stable Diffusion 3 checkpoint; {NOT_SUPPORTED}",
        ),
        (FLUX_BFL, f"is a FLUX checkpoint; {NOT_SUPPORTED}"),
        (FLUX_COMFY, f"is a FLUX checkpoint; {NOT_SUPPORTED}"),
        (
            {"single_blocks.0.linear1.weight": torch.zeros(1)},
            f"is a FLUX checkpoint; {NOT_SUPPORTED}",
        ),
        (
            fake_ldm(SD1_TEXT, 9),
            f"is an SD 1.x inpainting model (9-channel UNet input), {TEXT_TO_IMAGE} SD 1.x checkpoint.",
        ),
        (
            fake_ldm(SD2_TEXT, 5),
            f"is an SD 2.x depth-to-image model (5-channel UNet input), {TEXT_TO_IMAGE} SD 2.x checkpoint.",
        ),
        (
            fake_ldm(SD1_TEXT, 8),
            f"is an SD 1.x instruct-pix2pix model (8-channel UNet input), {TEXT_TO_IMAGE} SD 1.x checkpoint.",
        ),
        (
            {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)},  # a diffusers-layout UNet alone
            "is not a Stable Diffusion 1.x/2.x or SDXL checkpoint (it has no 'model.diffusion_model."
            "input_blocks.*' UNet weights); other model families are not supported yet.",
        ),
    ],
    ids=["refiner", "sd3", "flux", "flux_comfy", "flux_single", "sd1_inpaint", "sd2_depth", "ip2p", "other"],
)
def test_other_files_get_one_sentence_naming_them(state, message):
    for detect in (detect_model_version, detect_sd_version):  # loading and training say the same
        with pytest.raises(UserError) as err:
            detect(state, FILE)
        assert err.value.messages == [f"base_model: 'model.safetensors' {message}"]


def test_sdxl_inpainting_is_named(tiny_sdxl):
    with pytest.raises(UserError) as err:
        detect_model_version(with_conv_in_channels(sgm_state(tiny_sdxl), 9), FILE)
    assert err.value.messages == [
        "base_model: 'model.safetensors' is an SDXL inpainting model (9-channel UNet input), which is not "
        "supported yet; lora-scripts trains text-to-image models, so use the plain SDXL checkpoint."
    ]


# --- the tiny model ---------------------------------------------------------------------------------------


def test_tiny_sdxl_is_sdxl_shaped_deterministic_and_quick(tmp_path, tiny_sdxl, tiny_sdxl_dir):
    start = time.perf_counter()
    again = build_tiny_sdxl(tmp_path / "again")
    assert time.perf_counter() - start < 2.0
    files = sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    assert all((again / f).read_bytes() == (tiny_sdxl_dir / f).read_bytes() for f in files)
    assert {"text_encoder_2/config.json", "tokenizer_2/vocab.json", "scheduler/scheduler_config.json"} <= set(
        files
    )
    unet, te1, te2 = tiny_sdxl.unet.config, tiny_sdxl.text_encoder.config, tiny_sdxl.text_encoder_2.config
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert tiny_sdxl.vae.config.scaling_factor == 0.13025


def test_diffusers_sdxl_pipeline_generates_from_the_tiny_folder(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    image = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


# --- loading ----------------------------------------------------------------------------------------------


def test_sgm_single_file_round_trip_is_bit_identical(tiny_sdxl_file, tiny_sdxl_dir, tiny_sdxl):
    loaded = load_sdxl_components(str(tiny_sdxl_file), config_dir=tiny_sdxl_dir)
    assert (loaded.prediction_type, loaded.location.kind) == ("epsilon", "single_file")
    assert_same_weights(loaded, tiny_sdxl)
    assert_ready_for_training(loaded)
    assert_sdxl_tokenizers(loaded)


def test_half_precision_ckpt_with_v_pred_key(tmp_path, tiny_sdxl_dir, tiny_sdxl):
    path = write_sgm_checkpoint(
        tmp_path / "tiny-v.ckpt",
        *(getattr(tiny_sdxl, name) for name in MODULES),
        dtype=torch.float16,
        extra={"v_pred": torch.tensor([])},
    )
    loaded = load_sdxl_components(str(path), config_dir=tiny_sdxl_dir)
    assert loaded.prediction_type == "v_prediction"
    assert_same_weights(loaded, tiny_sdxl, dtype=torch.float16)
    assert_ready_for_training(loaded)
    forced = load_sdxl_components(str(path), config_dir=tiny_sdxl_dir, v_parameterization=False)
    assert forced.prediction_type == forced.noise_scheduler.config.prediction_type == "epsilon"


def test_ztsnr_key_marks_the_file_for_zero_terminal_snr(tmp_path, tiny_sdxl_dir, tiny_sdxl, tiny_sdxl_file):
    """NoobAI-XL v-pred's two empty markers, as ComfyUI reads them: `v_pred` and `ztsnr`."""
    markers = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    path = write_sgm_checkpoint(
        tmp_path / "noobai-v.safetensors", *(getattr(tiny_sdxl, name) for name in MODULES), extra=markers
    )
    loaded = load_sdxl_components(str(path), config_dir=tiny_sdxl_dir)
    assert (loaded.prediction_type, loaded.zero_terminal_snr) == ("v_prediction", True)
    assert_same_weights(loaded, tiny_sdxl)
    # the loader only reports the marker: training rescales the schedule (training/noise.py)
    assert loaded.noise_scheduler.alphas_cumprod[-1] > 0.004
    family = load_family(str(path), config_dir=tiny_sdxl_dir)
    assert family.info.zero_terminal_snr is True
    assert base_model_zero_terminal_snr(str(path), tiny_sdxl_dir) is True  # header only, as resume reads it
    # forcing epsilon does not hide the marker (training decides what to do with both)
    forced = load_sdxl_components(str(path), config_dir=tiny_sdxl_dir, v_parameterization=False)
    assert (forced.prediction_type, forced.zero_terminal_snr) == ("epsilon", True)

    plain = load_sdxl_components(str(tiny_sdxl_file), config_dir=tiny_sdxl_dir)
    assert plain.zero_terminal_snr is False
    assert load_family(str(tiny_sdxl_file), config_dir=tiny_sdxl_dir).info.zero_terminal_snr is False
    assert base_model_zero_terminal_snr(str(tiny_sdxl_file), tiny_sdxl_dir) is False
    v_only = write_sgm_checkpoint(
        tmp_path / "v-only.safetensors",
        *(getattr(tiny_sdxl, name) for name in MODULES),
        extra={"v_pred": torch.tensor([])},
    )
    assert load_sdxl_components(str(v_only), config_dir=tiny_sdxl_dir).zero_terminal_snr is False


def test_folder_scheduler_rescale_betas_zero_snr_marks_zero_terminal_snr(tmp_path, tiny_sdxl_dir):
    folder = build_tiny_sdxl(tmp_path / "tiny-zsnr", prediction_type="v_prediction")
    scheduler_json = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_json.read_text(encoding="utf-8"))
    scheduler_json.write_text(json.dumps({**config, "rescale_betas_zero_snr": True}), encoding="utf-8")
    loaded = load_sdxl_components(str(folder))
    assert (loaded.prediction_type, loaded.zero_terminal_snr) == ("v_prediction", True)
    assert load_family(str(folder)).info.zero_terminal_snr is True
    assert base_model_zero_terminal_snr(str(folder)) is True
    assert load_sdxl_components(str(tiny_sdxl_dir)).zero_terminal_snr is False
    assert base_model_zero_terminal_snr(str(tiny_sdxl_dir)) is False


def test_diffusers_folder_loads(tiny_sdxl_dir, tiny_sdxl):
    loaded = load_sdxl_components(str(tiny_sdxl_dir))
    assert (loaded.prediction_type, loaded.location.kind) == ("epsilon", "diffusers_folder")
    assert_same_weights(loaded, tiny_sdxl)
    assert_ready_for_training(loaded)
    assert_sdxl_tokenizers(loaded)
    assert load_sdxl_components(str(tiny_sdxl_dir), v_parameterization=True).prediction_type == "v_prediction"


def test_v_prediction_folder_without_tokenizer_folders(tmp_path, tiny_sdxl):
    folder = build_tiny_sdxl(tmp_path / "tiny-v", prediction_type="v_prediction")
    shutil.rmtree(folder / "tokenizer")
    shutil.rmtree(folder / "tokenizer_2")  # the shipped CLIP tokenizer stands in, each with its pad token
    loaded = load_sdxl_components(str(folder))
    assert loaded.prediction_type == "v_prediction"
    assert_same_weights(loaded, tiny_sdxl)
    assert_sdxl_tokenizers(loaded)


def test_cached_hub_id_loads_offline(tmp_path, monkeypatch, tiny_sdxl_dir, tiny_sdxl):
    shutil.copytree(tiny_sdxl_dir, hub_snapshot(tmp_path, monkeypatch, "someone/tiny-sdxl"))
    loaded = load_sdxl_components("someone/tiny-sdxl")
    assert loaded.location.kind == "hub_cache"
    assert_same_weights(loaded, tiny_sdxl)


# --- what loading refuses ---------------------------------------------------------------------------------


def test_tiny_file_without_its_config_meets_the_shipped_full_size_one(tiny_sdxl_file):
    with pytest.raises(UserError) as err:
        load_sdxl_components(str(tiny_sdxl_file))
    assert err.value.messages == [
        f"base_model: '{tiny_sdxl_file}' has a UNet with 80-wide cross-attention, but the config in "
        f"'{shipped_config_dir('sdxl')}' expects 2048; it is not a standard SDXL model, so convert it to a "
        "diffusers folder and load that instead."
    ]


def test_partial_and_wrong_files_are_refused(tmp_path, tiny_sdxl, tiny_sdxl_dir):
    from safetensors.torch import save_file

    state = sgm_state(tiny_sdxl)
    no_bigg = {k: v.contiguous() for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}
    save_file(no_bigg, tmp_path / "no-te2.safetensors")
    with pytest.raises(UserError) as err:
        load_sdxl_components(str(tmp_path / "no-te2.safetensors"), config_dir=tiny_sdxl_dir)
    assert err.value.messages == [
        f"base_model: '{tmp_path / 'no-te2.safetensors'}' is an SDXL checkpoint without its OpenCLIP "
        "ViT-bigG text encoder weights ('conditioner.embedders.1.model.*'); use a full SDXL base checkpoint."
    ]
    save_file({k: v.contiguous() for k, v in sd_state("sd_v1").items()}, tmp_path / "sd1.safetensors")
    with pytest.raises(UserError, match=r"is a Stable Diffusion 1\.x checkpoint, not an SDXL one\.$"):
        load_sdxl_components(str(tmp_path / "sd1.safetensors"))


def test_mismatched_tensor_names_the_text_encoder(tmp_path, tiny_sdxl, tiny_sdxl_dir):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in sgm_state(tiny_sdxl).items()}
    del state["conditioner.embedders.1.model.ln_final.bias"]
    save_file(state, tmp_path / "damaged.safetensors")
    with pytest.raises(UserError) as err:
        load_sdxl_components(str(tmp_path / "damaged.safetensors"), config_dir=tiny_sdxl_dir)
    assert err.value.messages == [
        "base_model: the second text encoder (OpenCLIP ViT-bigG) weights in "
        f"'{tmp_path / 'damaged.safetensors'}' do not match the expected architecture (1 missing, e.g. "
        "'text_model.final_layer_norm.bias'); the file is damaged or a variant that is not supported."
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (  # stable-diffusion-xl-refiner-1.0 lists no first text encoder or tokenizer
            {"text_encoder": [None, None], "tokenizer": [None, None]},
            f"is an SDXL refiner, which is not supported yet; {TRAINABLE}.",
        ),
        (
            {"text_encoder_2": None},
            "is not an SDXL model (its model_index.json lists no text_encoder_2); load it as Stable "
            "Diffusion 1.x/2.x.",
        ),
        (
            {"transformer": ["diffusers", "SD3Transformer2DModel"]},
            f"is a diffusion-transformer model (SD3, ...), not SDXL; {TRAINABLE}, and other model "
            "families are not supported yet.",
        ),
    ],
    ids=["refiner", "sd", "transformer"],
)
def test_other_folders_are_refused(tmp_path, tiny_sdxl_dir, changes, message):
    """changes: model_index.json entries to set (None: remove the entry)."""
    folder = Path(shutil.copytree(tiny_sdxl_dir, tmp_path / "edited"))
    index = {**json.loads((folder / "model_index.json").read_text()), **changes}
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if v is not None}))
    with pytest.raises(UserError) as err:
        load_sdxl_components(str(folder))
    assert err.value.messages == [f"base_model: '{folder}' {message}"]


def test_load_family_picks_sdxl_where_the_sd_loader_refuses_it(tiny_sdxl_file, tiny_sdxl_dir):
    with pytest.raises(UserError) as err:
        load_sd_components(str(tiny_sdxl_file), config_dir=tiny_sdxl_dir)
    assert err.value.messages == [
        f"base_model: '{tiny_sdxl_file}' is an SDXL checkpoint, not an SD 1.x/2.x one; load it as SDXL "
        "(models/registry.py load_family does)."
    ]
    with pytest.raises(UserError) as err:
        load_sd_components(str(tiny_sdxl_dir))
    assert err.value.messages == [
        f"base_model: '{tiny_sdxl_dir}' is not an SD 1.x/2.x model (its model_index.json lists "
        "text_encoder_2 or a transformer); load it through models/registry.py load_family, which picks its "
        "family."
    ]
    for source in (tiny_sdxl_file, tiny_sdxl_dir):
        family = load_family(str(source), config_dir=tiny_sdxl_dir if source == tiny_sdxl_file else None)
        assert isinstance(family, SDXLFamily) and family.info.base_model_version == "sdxl_base_v1-0"
        assert family.native_resolution == 1024 and len(family.text_encoders) == 2


# --- the shipped full-size configs ------------------------------------------------------------------------

# stabilityai/stable-diffusion-xl-base-1.0: UNet 2.567 B, VAE 83.65 M (as SD 1.x/2.x), CLIP ViT-L/14 text
# 123.06 M (as SD 1.x), OpenCLIP ViT-bigG/14 text with its projection 694.66 M.
EXPECTED_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def full_size_sdxl() -> dict[str, torch.nn.Module]:
    folder = shipped_config_dir("sdxl")
    with init_empty_weights():  # meta tensors: shapes only, nothing allocated
        return {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder, subfolder="unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
            ),
        }


def test_shipped_configs_build_sdxl_base_on_the_meta_device():
    modules = full_size_sdxl()
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert counts == EXPECTED_PARAMETERS
    assert all(p.device == torch.device("meta") for m in modules.values() for p in m.parameters())
    unet, te1, te2 = modules["unet"].config, modules["text_encoder"].config, modules["text_encoder_2"].config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size == 2048
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert (te1.hidden_act, te2.hidden_act, te2.num_hidden_layers, te2.num_attention_heads) == (
        "quick_gelu",
        "gelu",
        32,
        20,
    )
    vae = modules["vae"].config
    assert (vae.scaling_factor, vae.force_upcast, vae.sample_size) == (0.13025, True, 1024)
    index = json.loads((shipped_config_dir("sdxl") / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]


def test_shipped_scheduler_is_sdxl_base_euler():
    folder = shipped_config_dir("sdxl")
    euler = EulerDiscreteScheduler.from_config(
        EulerDiscreteScheduler.load_config(folder, subfolder="scheduler")
    )
    config = euler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.num_train_timesteps, config.steps_offset, config.timestep_spacing) == (1000, 1, "leading")
    assert config.prediction_type == "epsilon"


def test_full_size_sgm_layout_loads_with_the_shipped_configs(tmp_path, monkeypatch):
    """A full-size SDXL base file (meta tensors: real names and shapes, no memory) goes through the whole
    single-file path with no config_dir: every converted tensor lands in the shipped architecture."""
    modules = full_size_sdxl()
    state = to_sgm_state_dict(*(modules[name].state_dict() for name in MODULES), layers_per_block=2)
    assert state["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (
        3840,
        1280,
    )
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert state["model.diffusion_model.output_blocks.2.2.conv.weight"].shape == (1280, 1280, 3, 3)
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    path.write_bytes(b"\0")  # located as a file; its contents come from the patched reader
    monkeypatch.setattr(sdxl_loading, "read_checkpoint", lambda _: dict(state))
    loaded = load_sdxl_components(str(path))
    for name in MODULES:
        ours, theirs = getattr(loaded, name).state_dict(), modules[name].state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, name
    assert loaded.prediction_type == "epsilon"
    assert_sdxl_tokenizers(loaded)


def test_new_assets_are_packaged():
    """pyproject's package-data globs (expanded from the package folder, as setuptools does) cover every
    shipped SDXL file."""
    import glob
    import re

    repo = Path(__file__).resolve().parents[2]
    package = repo / "lora_scripts"
    pyproject = (repo / "pyproject.toml").read_text(encoding="utf-8")  # (no tomllib on Python 3.10)
    patterns = json.loads(
        re.search(r"^\[tool\.setuptools\.package-data\]\nlora_scripts = (\[.*\])$", pyproject, re.M)[1]
    )
    covered = {Path(p) for pattern in patterns for p in glob.glob(str(package / pattern), recursive=True)}
    shipped = {p for p in (package / "models" / "assets" / "sdxl").rglob("*") if p.is_file()}
    assert len(shipped) == 6 and shipped <= covered
