"""FLUX.1 base models load offline: the tiny model from every kind of file ComfyUI users have (BFL
transformer, fp8, ae.safetensors, clip_l, t5xxl, all-in-one) and from a diffusers folder, tensor for tensor;
detection from headers; one-sentence refusals; the shipped full-size configs; the shipped T5 tokenizer.

Every test here runs with the network disabled (conftest's autouse `no_network`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from lora_scripts.errors import UserError
from lora_scripts.models.detect import (
    VERSION_NAMES,
    checkpoint_shapes,
    detect_model_version,
    detect_sd_version,
    flux_variant,
)
from lora_scripts.models.flux_loading import (
    T5_TOKENIZER_DIR,
    FluxComponents,
    load_flux_components,
    shipped_flux_config_dir,
    t5_tokenizer,
)
from lora_scripts.models.flux_weights import PartFile, transformer_weights
from lora_scripts.models.tiny import TinyFlux, build_tiny_flux, build_tiny_flux_components
from tests.helpers.flux_files import to_bfl_transformer, write_flux_files

MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2")
REPO = Path(__file__).resolve().parents[2]
SD_FILE_NOTE = "lora-scripts trains SD 1.x, SD 2.x, SDXL and FLUX.1 base models"


@pytest.fixture(scope="module")
def tiny_flux() -> TinyFlux:
    return build_tiny_flux_components()


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "tiny-flux")


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory: pytest.TempPathFactory, tiny_flux: TinyFlux) -> dict[str, Path]:
    return write_flux_files(tiny_flux, tmp_path_factory.mktemp("flux_files"))


def assert_same_weights(loaded: FluxComponents, reference: TinyFlux, *, through: torch.dtype | None = None):
    """Every tensor of the four modules equals the reference's (the transformer's rounded via `through`)."""
    for name in MODULES:
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            expected = value.to(through).to(value.dtype) if through and name == "transformer" else value
            assert ours[key].dtype == value.dtype, key
            assert torch.equal(ours[key], expected), f"{name}: {key}"


def assert_ready(loaded: FluxComponents) -> None:
    for name in MODULES:
        module = getattr(loaded, name)
        assert not module.training, name
        assert not any(p.requires_grad for p in module.parameters()), name
    assert loaded.text_encoder_2.shared.weight is loaded.text_encoder_2.encoder.embed_tokens.weight


def test_tiny_flux_builds_fast_and_deterministically():
    start = time.perf_counter()
    first = build_tiny_flux_components(seed=3)
    assert time.perf_counter() - start < 1.0
    second = build_tiny_flux_components(seed=3)
    for name in MODULES:
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    assert first.transformer.config.in_channels == 64 and first.vae.config.latent_channels == 16
    assert first.text_encoder.config.vocab_size == 49408 and first.text_encoder_2.config.vocab_size == 32128
    assert (first.vae.config.scaling_factor, first.vae.config.shift_factor) == (0.3611, 0.1159)


def test_bfl_layout_converts_back_to_the_same_tensors(tiny_flux, flux_files):
    """The tests' BFL writer is the exact inverse of the loader's (diffusers') conversion."""
    config = dict(tiny_flux.transformer.config)
    converted = transformer_weights(PartFile(flux_files["transformer"], "base_model"), config, torch.float32)
    reference = tiny_flux.transformer.state_dict()
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[key], reference[key]) for key in reference)


@pytest.mark.parametrize(
    ("base", "parts"),
    [
        ("transformer", {"vae": "ae", "clip_l": "clip_l", "t5xxl": "t5xxl"}),
        ("transformer", {"vae": "ae", "clip_l": "clip_l", "t5xxl": "t5xxl_embed"}),
        ("all_in_one", {}),
        ("all_in_one", {"vae": "ae", "clip_l": "clip_l", "t5xxl": "t5xxl"}),
        ("transformer", {"vae": "all_in_one", "clip_l": "all_in_one", "t5xxl": "all_in_one"}),
    ],
    ids=["separate_files", "t5_embed_tokens_only", "all_in_one", "all_in_one_overridden", "parts_from_aio"],
)
def test_single_files_load_the_tiny_model(tiny_flux, tiny_flux_dir, flux_files, base, parts):
    loaded = load_flux_components(
        str(flux_files[base]),
        config_dir=tiny_flux_dir,
        **{key: str(flux_files[name]) for key, name in parts.items()},
    )
    assert_same_weights(loaded, tiny_flux)
    assert_ready(loaded)
    assert loaded.variant == "dev" and loaded.location.kind == "single_file"
    assert loaded.scheduler_config["shift"] == 3.0 and loaded.scheduler_config["use_dynamic_shifting"]


def test_fp8_transformer_is_upcast_within_fp8_rounding(tiny_flux, tiny_flux_dir, flux_files):
    loaded = load_flux_components(
        str(flux_files["transformer_fp8"]),
        vae=str(flux_files["ae"]),
        clip_l=str(flux_files["clip_l"]),
        t5xxl=str(flux_files["t5xxl"]),
        config_dir=tiny_flux_dir,
    )
    assert all(p.dtype == torch.float32 for p in loaded.transformer.parameters())
    assert_same_weights(loaded, tiny_flux, through=torch.float8_e4m3fn)


def test_dtype_is_applied_to_every_module(tiny_flux_dir, flux_files):
    loaded = load_flux_components(
        str(flux_files["all_in_one"]), config_dir=tiny_flux_dir, dtype=torch.bfloat16
    )
    for name in MODULES:
        assert {p.dtype for p in getattr(loaded, name).parameters()} == {torch.bfloat16}, name


def test_diffusers_folder_loads_with_its_tokenizers_and_scheduler(tiny_flux, tiny_flux_dir):
    loaded = load_flux_components(str(tiny_flux_dir))
    assert_same_weights(loaded, tiny_flux)
    assert_ready(loaded)
    assert loaded.location.kind == "diffusers_folder" and loaded.variant == "dev"
    assert loaded.tokenizer("a cat").input_ids == tiny_flux.tokenizer("a cat").input_ids
    assert loaded.tokenizer_2("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert loaded.scheduler_config["base_shift"] == 0.5 and loaded.scheduler_config["max_shift"] == 1.15


def test_folder_parts_can_be_replaced_by_files(tiny_flux_dir, flux_files):
    other = build_tiny_flux_components(seed=1)
    paths = write_flux_files(other, flux_files["ae"].parent / "seed1")
    loaded = load_flux_components(
        str(tiny_flux_dir), vae=str(paths["ae"]), clip_l=str(paths["clip_l"]), t5xxl=str(paths["t5xxl"])
    )
    for name in ("vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(other, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name


def test_schnell_is_told_by_its_missing_guidance_embedding(tmp_path, tiny_flux):
    schnell = build_tiny_flux_components(variant="schnell")
    paths = write_flux_files(schnell, tmp_path)
    assert flux_variant(checkpoint_shapes(paths["transformer"])) == "schnell"
    assert flux_variant(checkpoint_shapes(paths["all_in_one"])) == "schnell"
    # the dev tiny folder's configs: the file's guidance embedding decides, not config_dir's
    loaded = load_flux_components(str(paths["all_in_one"]), config_dir=build_tiny_flux(tmp_path / "dev"))
    assert loaded.variant == "schnell" and not loaded.transformer.config.guidance_embeds
    assert loaded.scheduler_config["shift"] == 3.0  # config_dir's scheduler wins over the shipped one
    assert load_flux_components(str(build_tiny_flux(tmp_path / "s", variant="schnell"))).variant == "schnell"


def test_flux_files_are_detected_from_their_headers(flux_files):
    for name in ("transformer", "transformer_fp8", "all_in_one"):
        shapes = checkpoint_shapes(flux_files[name])
        assert detect_model_version(shapes, flux_files[name]) == "flux1"
        assert flux_variant(shapes) == "dev"
    assert VERSION_NAMES["flux1"] == "FLUX.1"
    with pytest.raises(UserError) as err:
        detect_sd_version(checkpoint_shapes(flux_files["transformer"]), Path("flux1-dev.safetensors"))
    assert err.value.messages == [
        "base_model: 'flux1-dev.safetensors' is a FLUX.1 checkpoint, not an SD 1.x/2.x one; load it as "
        "FLUX.1 (models/flux_loading.py load_flux_components does)."
    ]


FLUX1 = {
    "double_blocks.0.img_attn.qkv.weight": torch.zeros(1),
    "double_blocks.0.img_mod.lin.weight": torch.zeros(1),
    "vector_in.in_layer.weight": torch.zeros(1),
}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            {**FLUX1, "img_in.weight": torch.zeros(3072, 384)},
            "is a FLUX.1 Fill model (384-channel transformer input), which is not supported yet; "
            "lora-scripts trains text-to-image models, so use FLUX.1-dev or FLUX.1-schnell.",
        ),
        (
            {"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), "single_stream_modulation.lin.weight": 0},
            f"is a FLUX.2 checkpoint; {SD_FILE_NOTE}, and other model families are not supported yet.",
        ),
        (
            {
                "double_blocks.0.img_attn.qkv.weight": torch.zeros(1),
                "distilled_guidance_layer.in_proj.bias": 0,
            },
            f"is a Chroma checkpoint; {SD_FILE_NOTE}, and other model families are not supported yet.",
        ),
    ],
    ids=["fill", "flux2", "chroma"],
)
def test_other_flux_like_files_are_refused(state, message):
    with pytest.raises(UserError) as err:
        detect_model_version(state, Path("m.safetensors"))
    assert err.value.messages == [f"base_model: 'm.safetensors' {message}"]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (
            {"clip_l": "clip_l", "t5xxl": "t5xxl"},
            "vae: '{transformer}' has no VAE (FLUX transformer files carry none); set vae: to ae.safetensors "
            "(ComfyUI's models/vae).",
        ),
        (
            {"vae": "ae", "t5xxl": "t5xxl"},
            "clip_l: '{transformer}' has no CLIP-L text encoder (FLUX transformer files carry none); set "
            "clip_l: to clip_l.safetensors (ComfyUI's models/text_encoders).",
        ),
        (
            {"vae": "ae", "clip_l": "clip_l"},
            "t5xxl: '{transformer}' has no T5-XXL text encoder (FLUX transformer files carry none); set "
            "t5xxl: to t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (ComfyUI's "
            "models/text_encoders).",
        ),
        (
            {"vae": "ae", "clip_l": "t5xxl", "t5xxl": "t5xxl"},
            "clip_l: '{t5xxl}' holds no CLIP-L text encoder weights ('embeddings.token_embedding.weight'); "
            "set clip_l: to clip_l.safetensors (ComfyUI's models/text_encoders).",
        ),
        (
            {"vae": "clip_l", "clip_l": "clip_l", "t5xxl": "t5xxl"},
            "vae: '{clip_l}' holds no VAE weights ('decoder.conv_out.weight'); set vae: to ae.safetensors "
            "(ComfyUI's models/vae).",
        ),
        (
            {"vae": "ae", "clip_l": "clip_l", "t5xxl": "transformer"},
            "t5xxl: '{transformer}' is a FLUX.1 transformer checkpoint, not a T5-XXL text encoder; set "
            "t5xxl: to t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (ComfyUI's "
            "models/text_encoders).",
        ),
        (
            {"vae": "ae", "clip_l": "sd", "t5xxl": "t5xxl"},
            "clip_l: '{sd}' is a Stable Diffusion checkpoint, not a CLIP-L text encoder; set clip_l: to "
            "clip_l.safetensors (ComfyUI's models/text_encoders).",
        ),
        (
            {"vae": "sd", "clip_l": "clip_l", "t5xxl": "t5xxl"},
            "vae: '{sd}' is a Stable Diffusion checkpoint, not a VAE; set vae: to ae.safetensors (ComfyUI's "
            "models/vae).",
        ),
        (
            {"vae": "missing", "clip_l": "clip_l", "t5xxl": "t5xxl"},
            "vae: '{missing}' does not exist; check the path (relative paths start from the current "
            "directory).",
        ),
    ],
    ids=[
        "no_vae",
        "no_clip_l",
        "no_t5xxl",
        "t5_as_clip",
        "clip_as_vae",
        "transformer_as_t5",
        "sd_as_clip",
        "sd_as_vae",
        "missing_file",
    ],
)
def test_missing_or_wrong_parts_get_one_sentence(tiny_flux_dir, flux_files, tiny_sd_file, parts, message):
    paths = {**flux_files, "sd": tiny_sd_file, "missing": flux_files["ae"].parent / "nope.safetensors"}
    with pytest.raises(UserError) as err:
        load_flux_components(
            str(paths["transformer"]),
            config_dir=tiny_flux_dir,
            **{k: str(paths[v]) for k, v in parts.items()},
        )
    assert err.value.messages == [message.format(**{k: str(v) for k, v in paths.items()})]


def test_an_sd_vae_is_refused_by_its_latent_channels(tmp_path, tiny_flux_dir, flux_files, tiny_sd):
    from tests.helpers.flux_files import to_bfl_vae

    sd_vae = tmp_path / "sd_vae.safetensors"
    save_file(to_bfl_vae(tiny_sd.vae.state_dict()), sd_vae)
    with pytest.raises(UserError) as err:
        load_flux_components(
            str(flux_files["transformer"]),
            vae=str(sd_vae),
            clip_l=str(flux_files["clip_l"]),
            t5xxl=str(flux_files["t5xxl"]),
            config_dir=tiny_flux_dir,
        )
    assert err.value.messages == [
        f"vae: '{sd_vae}' is a 4-channel VAE where FLUX.1's has 16 latent channels; set vae: to "
        "ae.safetensors (ComfyUI's models/vae)."
    ]


def test_other_models_are_refused_as_base_model(tiny_sd_file, tiny_sd_dir):
    with pytest.raises(UserError) as err:
        load_flux_components(str(tiny_sd_file))
    assert err.value.messages == [f"base_model: '{tiny_sd_file}' is an SD 1.x checkpoint, not a FLUX.1 one."]
    with pytest.raises(UserError) as err:
        load_flux_components(str(tiny_sd_dir))
    assert err.value.messages == [
        f"base_model: '{tiny_sd_dir}' is not a FLUX.1 model (its model_index.json lists no "
        "FluxTransformer2DModel transformer)."
    ]


# Measured on the meta device with the shipped configs (diffusers 0.42, transformers 5.25); T5's token
# embedding counted once (shared and encoder.embed_tokens are one tied parameter).
FULL_SIZE_PARAMETERS = {
    ("dev", "transformer"): 11_901_408_320,
    ("schnell", "transformer"): 11_891_178_560,
    ("dev", "vae"): 83_819_683,
    ("dev", "text_encoder"): 123_060_480,
    ("dev", "text_encoder_2"): 4_762_310_656,
}


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_shipped_configs_build_the_full_size_architectures(variant):
    folder = shipped_flux_config_dir(variant)
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(folder, subfolder="transformer")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        t5 = T5EncoderModel(T5Config.from_pretrained(folder, subfolder="text_encoder_2"))
    t5.tie_weights()

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(transformer) == FULL_SIZE_PARAMETERS[(variant, "transformer")]
    assert count(vae) == FULL_SIZE_PARAMETERS[("dev", "vae")]
    assert count(clip) == FULL_SIZE_PARAMETERS[("dev", "text_encoder")]
    assert count(t5) == FULL_SIZE_PARAMETERS[("dev", "text_encoder_2")]
    assert transformer.config.guidance_embeds == (variant == "dev")
    assert len(transformer.transformer_blocks) == 19 and len(transformer.single_transformer_blocks) == 38
    assert (vae.config.latent_channels, vae.config.scaling_factor, vae.config.shift_factor) == (
        16,
        0.3611,
        0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.load_config(folder, subfolder="scheduler")
    )
    assert (scheduler.config.shift, scheduler.config.use_dynamic_shifting) == (
        (3.0, True) if variant == "dev" else (1.0, False)
    )


def test_shipped_t5_tokenizer_gives_t5_ids():
    tokenizer = t5_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == 32100 and tokenizer.convert_tokens_to_ids("<extra_id_0>") == 32099
    assert tokenizer.model_max_length == 512


def test_bfl_writer_matches_diffusers_converter_at_full_width():
    """At FLUX.1's own width (3072) diffusers' converter alone reads the tests' BFL layout back exactly."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(
            num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
    reference = model.state_dict()
    converted = convert_flux_transformer_checkpoint_to_diffusers(to_bfl_transformer(reference))
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[key], reference[key]) for key in reference)


SDCPP_SDIST = Path(
    os.environ.get("SDCPP_SDIST", "/tmp/sdcpp/stable_diffusion_cpp_python-0.4.7.tar.gz")
)  # tools/make_t5_tokenizer.py's input


def _t5_tool():
    spec = importlib.util.spec_from_file_location(
        "make_t5_tokenizer", REPO / "tools" / "make_t5_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t5_tool_reads_the_c_byte_array():
    header = (
        "static const unsigned char other[] = {0x41};\n"
        "static const unsigned char t5_tokenizer_json_str[] = {\n    0x7b,\n    0x7d,\n    0x00,\n};\n"
    )
    assert _t5_tool().extract_array(header) == b"{}"


@pytest.mark.skipif(not SDCPP_SDIST.is_file(), reason="stable-diffusion-cpp-python 0.4.7 sdist not available")
def test_t5_tool_regenerates_the_committed_tokenizer(tmp_path):
    tool = _t5_tool()
    data = tool.extract_array(tool.read_header(SDCPP_SDIST))
    tool.check_tokenizer_json(data)
    assert data == (T5_TOKENIZER_DIR / "tokenizer.json").read_bytes()
