"""`lora-scripts generate` on the tiny SDXL model: a StableDiffusionXLPipeline, its 1024 px default size,
infotext, seeds, LoRA tags and weight grids with a LoRA our trainer made, kohya files on both text encoders
(`W + w * (alpha / rank) * up @ down`), diffusers files, and LoRAs of the other family refused by name."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image

from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.export.hashes import file_model_hash
from lora_scripts.generation import generate
from lora_scripts.generation.generate import run_generate
from lora_scripts.generation.infotext import VERSION, parse_infotext, parse_lora_hashes
from lora_scripts.generation.lora_apply import load_lora, set_lora_weights
from lora_scripts.generation.options import GenerateOptions
from lora_scripts.generation.outputs import read_png_infotext
from lora_scripts.generation.pipeline import load_pipeline
from lora_scripts.generation.samplers import resolve_sampler
from lora_scripts.models.tiny import build_tiny_sdxl, build_tiny_sdxl_components
from lora_scripts.training.loop import train
from tests.generation.conftest import make_pipe
from tests.generation.kohya_files import KohyaModule
from tests.helpers.sgm import write_sgm_checkpoint
from tests.training.conftest import make_dataset, tiny_run_settings, write_config

TOL = dict(atol=1e-5, rtol=0)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: torch's threads cost more than they give (4x here). Every
    image compared bit for bit is rendered in this module, at this thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("xl_model") / "tiny-sdxl")


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory) -> Path:
    """The tiny SDXL model as one sgm .safetensors file (what civitai has)."""
    tiny = build_tiny_sdxl_components()
    path = tmp_path_factory.mktemp("xl_file") / "tiny-xl.safetensors"
    return write_sgm_checkpoint(path, tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)


@pytest.fixture(scope="module")
def xl_lora_dir(tmp_path_factory, xl_dir) -> Path:
    """A folder with `ink_xl.safetensors`: trained by our trainer on the tiny SDXL model (UNet and both text
    encoders, 4 steps at a high learning rate so that it shows; saved in fp32)."""
    root = tmp_path_factory.mktemp("xl_train")
    data = root / "data"
    make_dataset(data, n=4)
    settings = tiny_run_settings(
        data,
        xl_dir,
        output_dir=str(root / "out"),
        output_name="ink_xl",
        max_train_steps=4,
        learning_rate=2e-2,
        train_text_encoder=True,
        mixed_precision="no",
        save_precision="fp32",
    )
    train(load_config(write_config(root / "config.yaml", **settings)))
    folder = root / "loras"
    folder.mkdir()
    (folder / "ink_xl.safetensors").write_bytes((root / "out" / "ink_xl.safetensors").read_bytes())
    return folder


def _generate(base_model, output, prompt, **options):
    values = dict(steps=2, width=64, height=64, seed=7, sampler="euler", progress=False)
    values.update(options)
    return run_generate(GenerateOptions(base_model=str(base_model), prompt=prompt, output=output, **values))


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def _xl_pipe(xl_dir):
    loaded = load_pipeline(
        str(xl_dir), resolve_sampler("euler_a"), device=torch.device("cpu"), dtype=torch.float32
    )
    return loaded.pipe


# --- pipeline, sizes, infotext, seeds ---------------------------------------------------------------------


def test_sdxl_base_gets_an_sdxl_pipeline_and_renders_the_requested_size(xl_dir, tmp_path):
    pipe = _xl_pipe(xl_dir)
    assert type(pipe) is StableDiffusionXLPipeline
    assert pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    assert pipe.config.force_zeros_for_empty_prompt and pipe.watermark is None
    result = _generate(xl_dir, tmp_path / "wide.png", "a cat", width=96, height=64)
    assert Image.open(result.files[0]).size == (96, 64)


def test_default_size_is_the_family_native_one(xl_dir, tiny_dir, tmp_path, monkeypatch):
    """Without --width/--height: 1024 px for SDXL, 512 for SD 1.x (read from the model, asked of the pipeline
    and written in the infotext; rendering is stubbed, sizes are rendered for real above)."""
    asked = []

    def render(pipe, prompt, settings, seed, *, progress, on_step):
        asked.append((type(pipe).__name__, settings.width, settings.height))
        return Image.new("RGB", (settings.width, settings.height))

    monkeypatch.setattr(generate, "render_image", render)
    xl = _generate(xl_dir, tmp_path / "xl.png", "a cat", width=None, height=None)
    sd = _generate(tiny_dir, tmp_path / "sd.png", "a cat", width=None, height=None)
    tall = _generate(xl_dir, tmp_path / "tall.png", "a cat", width=None, height=1536)
    assert asked == [
        ("StableDiffusionXLPipeline", 1024, 1024),
        ("StableDiffusionPipeline", 512, 512),
        ("StableDiffusionXLPipeline", 1024, 1536),
    ]
    sizes = [parse_infotext(r.infotexts[0])["Size"] for r in (xl, sd, tall)]
    assert sizes == ["1024x1024", "512x512", "1024x1536"]


def test_single_file_cli_infotext_and_seeds(xl_dir, xl_file, tmp_path, capsys):
    out = tmp_path / "renders"
    argv = ["generate", "--base-model", str(xl_file), "--base-model-config", str(xl_dir)]
    argv += ["--prompt", "a temple, misty", "--negative-prompt", "blurry", "--steps", "2"]
    argv += ["--cfg-scale", "5.5", "--seed", "11", "--width", "64", "--height", "48"]
    argv += ["--sampler", "DPM++ 2M Karras", "--num-images", "2", "--output", f"{out}/"]
    assert main(argv) == 0
    assert "Seed: 11\n" in capsys.readouterr().out
    files = sorted(out.iterdir())
    assert [p.name for p in files] == ["00000-11.png", "00001-12.png"]
    model_hash = hashlib.sha256(xl_file.read_bytes()).hexdigest()[:10]
    for path, seed in zip(files, ("11", "12"), strict=True):
        info = parse_infotext(read_png_infotext(path))
        assert (info["Prompt"], info["Negative prompt"]) == ("a temple, misty", "blurry")
        assert (info["Steps"], info["Sampler"], info["CFG scale"], info["Seed"]) == (
            "2",
            "DPM++ 2M Karras",
            "5.5",
            seed,
        )
        assert (info["Size"], info["Model hash"], info["Model"]) == ("64x48", model_hash, "tiny-xl")
        assert info["Version"] == VERSION and "Clip skip" not in info
        assert Image.open(path).size == (64, 48)
    # Image 1 of seed 11 is the image of seed 12 alone; the folder model and the file are the same model.
    alone = argv[:-1] + [str(tmp_path / "alone.png")]
    alone[alone.index("--seed") + 1], alone[alone.index("--num-images") + 1] = "12", "1"
    alone[alone.index("--base-model") + 1] = str(xl_dir)
    assert main(alone) == 0
    assert np.array_equal(_pixels(files[1]), _pixels(tmp_path / "alone.png"))
    assert not np.array_equal(_pixels(files[0]), _pixels(files[1]))


# --- a LoRA our trainer made ------------------------------------------------------------------------------


def test_trained_lora_changes_the_image_and_weight_zero_is_the_base(xl_dir, xl_lora_dir, tmp_path):
    lora = xl_lora_dir / "ink_xl.safetensors"
    base = _generate(xl_dir, tmp_path / "base.png", "a temple", seed=3).files[0]
    zero = _generate(
        xl_dir, tmp_path / "zero.png", "a temple, <lora:ink_xl:0>", lora_dirs=[xl_lora_dir], seed=3
    )
    full = _generate(
        xl_dir, tmp_path / "full.png", "a temple, <lora:ink_xl:1>", lora_dirs=[xl_lora_dir], seed=3
    )
    te_only = _generate(
        xl_dir, tmp_path / "te.png", "a temple, <lora:ink_xl:1:0>", lora_dirs=[xl_lora_dir], seed=3
    )
    assert np.array_equal(_pixels(base), _pixels(zero.files[0]))
    changed = np.abs(_pixels(full.files[0]) - _pixels(base)).mean()
    assert changed > 5.0, changed
    assert not np.array_equal(_pixels(te_only.files[0]), _pixels(base))  # the text-encoder part acts too
    info = parse_infotext(full.infotexts[0])
    assert info["Prompt"] == "a temple, <lora:ink_xl:1>"
    assert parse_lora_hashes(info["Lora hashes"]) == {"ink_xl": file_model_hash(lora)[:12]}


def test_trained_lora_touches_unet_and_both_text_encoders(xl_dir, xl_lora_dir):
    names = safetensors.torch.load_file(xl_lora_dir / "ink_xl.safetensors").keys()
    assert {name.split("_", 2)[1] for name in names} == {"unet", "te1", "te2"}
    assert any(name.startswith("lora_unet_input_blocks_") for name in names)  # sgm names, sd-scripts'
    pipe = _xl_pipe(xl_dir)
    lora = load_lora(pipe, xl_lora_dir / "ink_xl.safetensors", adapter="ink")
    assert lora.components == set(COMPONENTS)


def test_weight_grid(xl_dir, xl_lora_dir, tmp_path):
    result = _generate(
        xl_dir, tmp_path / "grid", "a temple, <lora:ink_xl:0.7>", lora_dirs=[xl_lora_dir], lora_weights=[0, 1]
    )
    grid = _pixels(result.files[0])
    assert grid.shape[1] == 2 * 64 and 64 < grid.shape[0] < 2 * 64
    base = _generate(xl_dir, tmp_path / "base.png", "a temple").files[0]
    full = _generate(xl_dir, tmp_path / "full.png", "a temple, <lora:ink_xl:1>", lora_dirs=[xl_lora_dir])
    assert np.array_equal(grid[:64, :64], _pixels(base))
    assert np.array_equal(grid[:64, 64:], _pixels(full.files[0]))
    assert parse_infotext(read_png_infotext(result.files[0]))["Lora weights"] == "0, 1"


# --- kohya and diffusers files, layer by layer ------------------------------------------------------------

# sd-scripts' names for modules of the tiny SDXL model, and the module each must reach.
KOHYA_SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    ),
    "lora_unet_output_blocks_2_2_conv": ("unet", "up_blocks.0.upsamplers.0.conv"),  # LoCon 3x3
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
        "text_encoder",
        "encoder.layers.0.self_attn.q_proj",
    ),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1"),
}


def _kohya_sdxl_file(path: Path, pipe, *, rank: int = 4, alpha: float = 2.0) -> dict[str, KohyaModule]:
    """An sd-scripts SDXL file (fp16, no metadata) with one module per entry of KOHYA_SDXL; its modules."""
    generator = torch.Generator().manual_seed(0)
    tensors, modules = {}, {}
    for key, (component, name) in KOHYA_SDXL.items():
        weight = getattr(pipe, component).get_submodule(name).weight
        if weight.dim() == 4:
            down_shape, up_shape = (rank, *weight.shape[1:]), (weight.shape[0], rank, 1, 1)
        else:
            down_shape, up_shape = (rank, weight.shape[1]), (weight.shape[0], rank)
        down = (torch.randn(down_shape, generator=generator) * 0.3).half()
        up = (torch.randn(up_shape, generator=generator) * 0.3).half()
        modules[key] = KohyaModule(component, name, down, up, alpha)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    safetensors.torch.save_file(tensors, str(path))
    return modules


def _weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}


def _check_fused(pipe, loras, base, expected):
    """Fuse the active adapters; each weight must be base + expected delta ({(component, module): delta})."""
    pipe.fuse_lora(
        components=list(COMPONENTS), lora_scale=1.0, adapter_names=[lora.adapter for lora in loras]
    )
    pipe.unload_lora_weights()
    for component in COMPONENTS:
        for key, value in getattr(pipe, component).state_dict().items():
            delta = expected.get((component, key.removesuffix(".weight")))
            if key.endswith(".weight") and delta is not None:
                torch.testing.assert_close(value, base[component][key] + delta, **TOL)
            else:
                assert torch.equal(value, base[component][key]), (component, key)


def test_kohya_sdxl_file_changes_both_text_encoders_by_exactly_its_delta(xl_dir, tmp_path):
    pipe = _xl_pipe(xl_dir)
    modules = _kohya_sdxl_file(tmp_path / "kohya_xl.safetensors", pipe)
    encoders = {c: copy.deepcopy(getattr(pipe, c)) for c in ("text_encoder", "text_encoder_2")}
    ids = pipe.tokenizer(["a temple on a mountain"], padding="max_length", return_tensors="pt").input_ids
    before = {c: encoder(ids).last_hidden_state for c, encoder in encoders.items()}
    lora = load_lora(pipe, tmp_path / "kohya_xl.safetensors", adapter="kohya")
    assert lora.components == set(COMPONENTS)
    te_weight, unet_weight = 0.6, 1.3
    set_lora_weights(pipe, [lora], [(te_weight, unet_weight)])
    with torch.no_grad():
        for component, encoder in encoders.items():
            (module,) = [m for m in modules.values() if m.component == component]
            encoder.get_submodule(module.name).weight += te_weight * module.delta()
            after = getattr(pipe, component)(ids).last_hidden_state
            torch.testing.assert_close(after, encoder(ids).last_hidden_state, atol=1e-5, rtol=0)
            assert (after - before[component]).abs().max() > 1e-3, component
    expected = {
        (m.component, m.name): (unet_weight if m.component == "unet" else te_weight) * m.delta()
        for m in modules.values()
    }
    _check_fused(pipe, [lora], _weights(_xl_pipe(xl_dir)), expected)


def test_diffusers_sdxl_file_loads_with_its_metadata_alphas(xl_dir, tmp_path):
    """A file saved by diffusers' StableDiffusionXLPipeline.save_lora_weights (unet, text_encoder and
    text_encoder_2 keys, alphas in lora_adapter_metadata) applies at alpha / rank on all three."""
    source = _xl_pipe(xl_dir)
    torch.manual_seed(0)
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False),
        "text_encoder": LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False),
        "text_encoder_2": LoraConfig(r=2, lora_alpha=1, target_modules=["fc1"], init_lora_weights=False),
    }
    for component, config in configs.items():
        inject_adapter_in_model(config, getattr(source, component))
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(source.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(source.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(source.text_encoder_2),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict(),
    )
    expected = {}
    for component, config in configs.items():
        for name, layer in getattr(source, component).named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                product = layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()
                expected[(component, name)] = 0.5 * (config.lora_alpha / config.r) * product
    assert {c for c, _ in expected} == set(COMPONENTS)
    pipe = _xl_pipe(xl_dir)
    base = _weights(pipe)
    lora = load_lora(pipe, tmp_path / "pytorch_lora_weights.safetensors", adapter="diffusers")
    assert lora.components == set(COMPONENTS)
    set_lora_weights(pipe, [lora], [(0.5, 0.5)])
    _check_fused(pipe, [lora], base, expected)


# --- the other family's LoRAs -------------------------------------------------------------------------------


def _sentence(label: str, path: Path, made_for: str, base: str) -> str:
    return (
        f"LoRA '{label}' ('{path}') was made for {made_for} but the base model is {base}; use it with an "
        f"{made_for} base model, or use a LoRA made for {base}."
    )


def test_sd_loras_on_an_sdxl_base_are_refused_with_one_sentence(xl_dir, lora_dir, tiny_dir, tmp_path):
    pipe = _xl_pipe(xl_dir)
    sd, xl = "SD 1.x/2.x", "SDXL"
    # by its lora_te_ keys; by its UNet names once they do not fit (a UNet-only file, no metadata)
    for name in ("ink_style.safetensors", "unet-only.v2.safetensors"):
        with pytest.raises(UserError) as caught:
            load_lora(pipe, lora_dir / name, adapter="x", label="ink")
        assert caught.value.messages == [_sentence("ink", lora_dir / name, sd, xl)]
    # by its metadata, whatever its names
    tagged = tmp_path / "tagged.safetensors"
    tensors = safetensors.torch.load_file(lora_dir / "unet-only.v2.safetensors")
    safetensors.torch.save_file(tensors, str(tagged), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(UserError, match="was made for SD 1.x/2.x but the base model is SDXL"):
        load_lora(pipe, tagged, adapter="y")
    assert not pipe.get_list_adapters()
    # The same files still apply to the SD base they were made for.
    assert load_lora(make_pipe(tiny_dir), tagged, adapter="z").components == {"unet"}


def test_sdxl_loras_on_an_sd_base_are_refused_with_one_sentence(tiny_dir, xl_dir, xl_lora_dir, tmp_path):
    pipe = make_pipe(tiny_dir)
    ours = xl_lora_dir / "ink_xl.safetensors"  # ss_base_model_version sdxl_base_v1-0
    with pytest.raises(UserError) as caught:
        load_lora(pipe, ours, adapter="x", label="ink_xl")
    assert caught.value.messages == [_sentence("ink_xl", ours, "SDXL", "SD 1.x/2.x")]
    bare = tmp_path / "kohya_xl.safetensors"  # sd-scripts' names, no metadata
    _kohya_sdxl_file(bare, _xl_pipe(xl_dir))
    with pytest.raises(UserError) as caught:
        load_lora(pipe, bare, adapter="y", label="bare")
    assert caught.value.messages == [_sentence("bare", bare, "SDXL", "SD 1.x/2.x")]
    assert not pipe.get_list_adapters()


def test_cli_names_the_file_and_both_families_before_loading(xl_dir, lora_dir, tmp_path, capsys):
    """Found from the model's configs and the LoRA's header, so reported with the other mistakes, at once."""
    argv = ["generate", "--base-model", str(xl_dir), "--lora-dir", str(lora_dir), "--steps", "0"]
    argv += ["--prompt", "a cat, <lora:ink_style:0.8>", "--output", str(tmp_path / "o.png")]
    assert main(argv) == 2
    sentence = _sentence("ink_style", lora_dir / "ink_style.safetensors", "SD 1.x/2.x", "SDXL")
    assert capsys.readouterr().err.splitlines() == [
        "error: --steps: 0 is out of range (must be ≥ 1).",
        f"error: {sentence}",
    ]
    assert not (tmp_path / "o.png").exists()


def test_a_ztsnr_file_samples_with_the_zero_terminal_snr_schedule(xl_dir, tmp_path):
    """NoobAI-XL v-pred files carry `v_pred` and `ztsnr`: generate samples them as ComfyUI does, v-prediction
    on the rescaled schedule (the last timestep pure noise)."""
    tiny = build_tiny_sdxl_components()
    markers = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    modules = (tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
    marked = write_sgm_checkpoint(tmp_path / "noobai-v.safetensors", *modules, extra=markers)
    plain = write_sgm_checkpoint(tmp_path / "plain.safetensors", *modules)
    cpu = torch.device("cpu")
    sampler = resolve_sampler("euler")
    pipe = load_pipeline(str(marked), sampler, device=cpu, dtype=torch.float32, config_dir=str(xl_dir)).pipe
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr is True
    assert float(pipe.scheduler.alphas_cumprod[-1]) < 1e-6  # diffusers' Euler keeps 2**-24 to stay finite
    pipe = load_pipeline(str(plain), sampler, device=cpu, dtype=torch.float32, config_dir=str(xl_dir)).pipe
    assert not pipe.scheduler.config.get("rescale_betas_zero_snr")
    assert float(pipe.scheduler.alphas_cumprod[-1]) > 0.004
