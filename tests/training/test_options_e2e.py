"""Training options through the real entry points (`train()` and the CLI) on the tiny model: LoCon and text-
encoder files, continuing from `network_weights`, each optimizer, the loss/noise options, zero terminal SNR
and fractional warmup. Each run is 1-4 steps at 64 px; the checks are on the files and numbers it leaves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import CLIPTextConfig, CLIPTextModel

import lora_scripts.training.loop as loop
from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.export.kohya import count_modules
from lora_scripts.export.lora_file import read_lora_metadata
from lora_scripts.models.tiny import build_tiny_sd, build_tiny_sd_components
from lora_scripts.training.noise import TERMINAL_ALPHA_BAR
from tests.generation.kohya_files import TEXT_ENCODER, UNET_ATTENTION, make_modules, write_kohya_file
from tests.training.conftest import tiny_run_settings, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The LoCon network of these tests: rank/alpha for Linear and 1x1 layers, conv_rank/conv_alpha for 3x3 convs.
LOCON = dict(
    lora_rank=4,
    lora_alpha=2,
    conv_rank=2,
    conv_alpha=1,
    target_modules="kohya",
    train_text_encoder=True,
    text_encoder_target_modules="kohya",
)
# Modules of the tiny UNet / text encoder that LOCON adapts, as sd-scripts' networks/lora.py picks them with
# conv_dim: in the 4 transformer blocks 40 Linears (attn1/attn2 q, k, v, out; ff) and 8 proj_in/proj_out
# (1x1 convs); in the 8 ResNet blocks and 2 samplers 18 3x3 convs, 8 time_emb_proj and 5 conv_shortcut
# (1x1, where the channel count changes) at the linear rank; in the 2 text-encoder layers q, k, v, out_proj,
# fc1, fc2.
LOCON_CONV_3X3 = 18
LOCON_MODULES = 40 + 8 + LOCON_CONV_3X3 + 8 + 5 + 2 * 6


def _settings(data: Path, model: Path, **overrides) -> dict:
    return tiny_run_settings(data, model, **overrides)


def _train(folder: Path, name: str, settings: dict) -> Path:
    """Train with `settings` into folder/name; the final LoRA file."""
    cfg = write_config(folder / f"{name}.yaml", **settings, output_dir=str(folder / name))
    result = loop.train(load_config(cfg))
    assert math.isfinite(result.last_loss)
    return folder / name / f"{name}.safetensors"


def _cli_train(config: Path, capsys) -> tuple[int, str]:
    """`lora-scripts train --config …` in this process: (exit code, stderr). The CLI reconfigures logging
    for the user; the test process's logging is restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = main(["train", "--config", str(config)])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, capsys.readouterr().err


def _scalars(logging_dir: Path, tag: str) -> list[tuple[int, float]]:
    (events,) = list(logging_dir.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _deltas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module stem: (alpha / rank) * up @ down} in fp32, shaped like the module's weight
    ([out, in], or [out, in, kh, kw] for convs)."""
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            down, up = tensors[key].float(), tensors[f"{stem}.lora_up.weight"].float()
            product = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
            out[stem] = tensors[f"{stem}.alpha"].item() / down.shape[0] * product
    return out


# --- LoCon + text encoder -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locon_file(tmp_path_factory, tiny_model_dir, dataset_dir) -> Path:
    return _train(tmp_path_factory.mktemp("locon"), "locon", _settings(dataset_dir, tiny_model_dir, **LOCON))


def test_locon_text_encoder_file_layout(locon_file):
    sd = safetensors.torch.load_file(locon_file)
    assert count_modules(sd) == LOCON_MODULES
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 conv with 32 in/out channels
    assert sd[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert sd[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert sd[f"{conv}.alpha"].item() == 1.0
    convs = [k for k, v in sd.items() if k.endswith("lora_down.weight") and v.shape[2:] == (3, 3)]
    assert len(convs) == LOCON_CONV_3X3
    assert all(sd[k.replace("lora_down.weight", "alpha")].item() == 1.0 for k in convs)
    linear = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{linear}.lora_down.weight"].shape == (4, 32) and sd[f"{linear}.alpha"].item() == 2.0
    stems = {k.split(".")[0] for k in sd}
    assert len([s for s in stems if s.endswith("_time_emb_proj")]) == 8
    shortcut = "lora_unet_up_blocks_1_resnets_0_conv_shortcut"  # 1x1, 96 -> 32 channels: the linear rank
    assert sum(s.endswith("_conv_shortcut") for s in stems) == 5
    assert sd[f"{shortcut}.lora_down.weight"].shape == (4, 96, 1, 1) and sd[f"{shortcut}.alpha"].item() == 2.0
    te_stems = {s for s in stems if s.startswith("lora_te")}
    assert len(te_stems) == 2 * 6
    assert all(stem.startswith("lora_te_text_model_encoder_layers_") for stem in te_stems)
    # every module trained: the up weights left their zero init (conv and text encoder included)
    assert all(v.abs().max() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    meta = read_lora_metadata(locon_file)
    args = json.loads(meta["ss_network_args"])
    assert args["conv_dim"] == "2" and args["conv_alpha"] == "1.0"
    assert args["target_modules"] == "kohya" and args["text_encoder_target_modules"] == "kohya"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_network_train_unet_only"] == "False"


def test_locon_file_loads_into_a_diffusers_pipeline(locon_file, tiny_model_dir):
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    from lora_scripts.generation.lora_apply import load_lora

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    loaded = load_lora(pipe, locon_file, "ours")  # raises unless every module of the file is applied
    assert loaded.components == {"unet", "text_encoder"}
    layers = {
        f"{part}.{name}": module
        for part in ("unet", "text_encoder")
        for name, module in getattr(pipe, part).named_modules()
        if isinstance(module, LoraLayer) and "ours" in module.lora_A
    }
    assert len(layers) == LOCON_MODULES
    # a 3x3 conv applies the file's (conv_alpha / conv_rank) * up @ down, reshaped to the kernel
    file_delta = _deltas(safetensors.torch.load_file(locon_file))["lora_unet_down_blocks_0_resnets_0_conv1"]
    applied = layers["unet.down_blocks.0.resnets.0.conv1"].get_delta_weight("ours")
    assert applied.shape == (32, 32, 3, 3)
    torch.testing.assert_close(applied, file_delta, atol=1e-6, rtol=1e-4)


# --- network_weights ----------------------------------------------------------------------------------------

# Nothing moves at this rate (SGD: w - 1e-20 * g rounds back to w), so the saved file is the loaded one.
FROZEN = dict(optimizer_type="SGD", learning_rate=1e-20, max_train_steps=1)


def test_network_weights_continues_from_our_own_file(tmp_path, locon_file, tiny_model_dir, dataset_dir):
    settings = _settings(dataset_dir, tiny_model_dir, **LOCON, **FROZEN, network_weights=str(locon_file))
    continued = _train(tmp_path, "continued", settings)
    before = _deltas(safetensors.torch.load_file(locon_file))
    after = _deltas(safetensors.torch.load_file(continued))
    assert before.keys() == after.keys() and len(before) == LOCON_MODULES
    for stem, delta in before.items():
        assert delta.abs().max() > 0, stem
        torch.testing.assert_close(after[stem], delta, atol=1e-4, rtol=1e-3)
    assert read_lora_metadata(continued)["ss_optimizer"] == "torch.optim.sgd.SGD"


def test_network_weights_continues_from_an_sd_scripts_file(tmp_path, tiny_model_dir, dataset_dir):
    tiny = build_tiny_sd_components()  # the module shapes of tiny_model_dir
    shortcut = ["up_blocks.1.resnets.0.conv_shortcut"]  # a 1x1 conv: the linear rank, with LoCon
    # sd-scripts' alphas differ from this run's (1 vs lora_alpha 2, 2 vs conv_alpha 1): loading rescales up
    linear = make_modules(tiny, UNET_ATTENTION + shortcut, TEXT_ENCODER, rank=4, alpha=1.0, seed=3)
    convs = make_modules(
        tiny, ["down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv1"], [], rank=2, alpha=2.0, seed=4
    )
    kohya = write_kohya_file(tmp_path / "sd_scripts.safetensors", linear + convs)
    settings = _settings(dataset_dir, tiny_model_dir, **LOCON, **FROZEN, network_weights=str(kohya))
    after = _deltas(safetensors.torch.load_file(_train(tmp_path, "continued", settings)))
    expected = _deltas(safetensors.torch.load_file(kohya))
    assert len(expected) == 8 and len(after) == LOCON_MODULES
    for stem, delta in after.items():
        if stem in expected:
            torch.testing.assert_close(delta, expected[stem], atol=1e-4, rtol=1e-3)
        else:  # not in the file: fresh init, lora_up zero
            assert delta.abs().max() == 0, stem


def test_network_weights_rank_mismatch_is_one_line_through_the_cli(
    tmp_path, locon_file, tiny_model_dir, dataset_dir, capsys
):
    out = tmp_path / "wrong_rank"
    settings = _settings(dataset_dir, tiny_model_dir, **LOCON) | {"lora_rank": 8}
    cfg = write_config(
        tmp_path / "wrong.yaml", **settings, network_weights=str(locon_file), output_dir=str(out)
    )
    code, err = _cli_train(cfg, capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"error: network_weights: '{locon_file}' has rank 4 at lora_")
    assert errors[0].endswith("where this run has lora_rank 8; set lora_rank: 4.")
    assert "Traceback" not in err
    assert not out.exists()  # nothing written before the error


# --- optimizers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "learning_rate", "class_name"),
    [
        ("AdamW", 1e-3, "torch.optim.adamw.AdamW"),
        ("Lion", 1e-4, "lion_pytorch.lion_pytorch.Lion"),
        ("Prodigy", 1.0, "prodigyopt.prodigy.Prodigy"),
        ("Adafactor", 1e-3, "transformers.optimization.Adafactor"),  # relative_step: its own step size
        ("SGD", 1e-2, "torch.optim.sgd.SGD"),
    ],
)
def test_each_optimizer_trains(tmp_path, tiny_model_dir, dataset_dir, optimizer, learning_rate, class_name):
    settings = _settings(
        dataset_dir,
        tiny_model_dir,
        optimizer_type=optimizer.lower(),  # any case, as sd-scripts users write it
        learning_rate=learning_rate,
        save_precision="fp32",
    )
    path = _train(tmp_path, "run", settings)
    sd = safetensors.torch.load_file(path)
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert ups and all(v.abs().max() > 0 for v in ups)  # every lora_up left its zero init
    assert read_lora_metadata(path)["ss_optimizer"] == class_name


def test_adamw8bit_without_cuda_is_a_config_error(tmp_path, tiny_model_dir, dataset_dir, capsys):
    settings = _settings(dataset_dir, tiny_model_dir, optimizer_type="AdamW8bit")
    cfg = write_config(tmp_path / "8bit.yaml", **settings, output_dir=str(tmp_path / "out"))
    code, err = _cli_train(cfg, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"error: {cfg}: optimizer_type: AdamW8bit (bitsandbytes) needs a CUDA GPU" in err
    assert not (tmp_path / "out").exists()


# --- loss, noise, prediction --------------------------------------------------------------------------------


def _tiny_model_with_text_layers(folder: Path, layers: int) -> Path:
    """The tiny model with a `layers`-deep text encoder (the stock one has 2, too few for clip_skip 2)."""
    build_tiny_sd(folder)
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    config.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    return folder


def _spy(monkeypatch, name: str) -> list:
    """Record what `loop.<name>` returns during a run."""
    results = []
    original = getattr(loop, name)

    def spy(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(loop, name, spy)
    return results


def test_loss_options_together(tmp_path, dataset_dir, monkeypatch):
    model = _tiny_model_with_text_layers(tmp_path / "tiny-3-layer-te", layers=3)
    families = _spy(monkeypatch, "load_family")
    options = dict(
        min_snr_gamma=5,
        noise_offset=0.05,
        multires_noise_iterations=6,
        loss_type="huber",
        clip_skip=2,
    )
    path = _train(tmp_path, "loss", _settings(dataset_dir, model, max_train_steps=3, **options))
    assert families[0].clip_skip == 2
    losses = _scalars(tmp_path / "loss" / "logs", "loss")
    assert [step for step, _ in losses] == [1, 2, 3]
    assert all(math.isfinite(value) and value > 0 for _, value in losses)
    meta = read_lora_metadata(path)
    assert meta["ss_min_snr_gamma"] == "5.0"
    assert meta["ss_noise_offset"] == "0.05"
    assert meta["ss_multires_noise_iterations"] == "6"
    assert meta["ss_multires_noise_discount"] == "0.3"
    assert meta["ss_loss_type"] == "huber"
    assert meta["ss_huber_schedule"] == "snr" and meta["ss_huber_c"] == "0.1"
    assert meta["ss_clip_skip"] == "2"


def test_zero_terminal_snr_with_v_prediction(tmp_path, dataset_dir, monkeypatch):
    model = build_tiny_sd(tmp_path / "tiny-v", version="sd_v2", prediction_type="v_prediction")
    families = _spy(monkeypatch, "load_family")  # the loop sets the schedule it trains with on the family
    path = _train(tmp_path, "ztsnr", _settings(dataset_dir, model, max_train_steps=3, zero_terminal_snr=True))
    (scheduler,) = (family.noise_scheduler for family in families)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(TERMINAL_ALPHA_BAR)  # ~pure noise at t=T
    losses = _scalars(tmp_path / "ztsnr" / "logs", "loss")
    assert len(losses) == 3 and all(math.isfinite(value) for _, value in losses)
    meta = read_lora_metadata(path)
    assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_v_parameterization"] == "True"


def test_folder_marked_rescale_betas_zero_snr_sets_the_default(tmp_path, dataset_dir, monkeypatch):
    """A diffusers folder whose scheduler config has rescale_betas_zero_snr: true trains with zero terminal
    SNR when the key is left out, and on the plain schedule with an explicit false (which also undoes the
    rescale diffusers makes from that config, alpha_bar[-1] exactly 0)."""
    model = build_tiny_sd(tmp_path / "tiny-v", version="sd_v2", prediction_type="v_prediction")
    scheduler_json = model / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_json.read_text(encoding="utf-8"))
    scheduler_json.write_text(json.dumps({**config, "rescale_betas_zero_snr": True}), encoding="utf-8")
    families = _spy(monkeypatch, "load_family")
    marked = _train(tmp_path, "marked", _settings(dataset_dir, model))
    off = _train(tmp_path, "off", _settings(dataset_dir, model, zero_terminal_snr=False))
    rescaled, plain = (family.noise_scheduler for family in families)
    assert rescaled.alphas_cumprod[-1].item() == pytest.approx(TERMINAL_ALPHA_BAR)
    assert plain.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=1e-4)  # SD's scaled_linear schedule
    assert not plain.config.rescale_betas_zero_snr
    assert read_lora_metadata(marked)["ss_zero_terminal_snr"] == "True"
    assert read_lora_metadata(off)["ss_zero_terminal_snr"] == "False"


def test_fractional_warmup(tmp_path, tiny_model_dir, dataset_dir):
    settings = _settings(
        dataset_dir,
        tiny_model_dir,
        learning_rate=2e-4,
        lr_scheduler="linear",
        lr_warmup_steps=0.5,
        max_train_steps=4,
    )
    path = _train(tmp_path, "warmup", settings)
    assert read_lora_metadata(path)["ss_lr_warmup_steps"] == "2"  # int(0.5 * 4)
    # the rate each update used: up from 0 over 2 updates, then down to 0 at update 4
    lrs = _scalars(tmp_path / "warmup" / "logs", "lr")
    assert [step for step, _ in lrs] == [1, 2, 3, 4]
    assert [value for _, value in lrs] == pytest.approx([0.0, 1e-4, 2e-4, 1e-4])
