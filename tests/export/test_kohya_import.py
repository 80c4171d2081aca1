"""network_weights: LoRA files (sd-scripts', ours, diffusers') copied into fresh adapters reproduce each
module's update `(alpha_file / rank_file) * up @ down` under our own alpha; mismatches are UserErrors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from peft.utils import get_peft_model_state_dict

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import kohya_state_dict
from lora_scripts.export.kohya_import import ImportReport, load_network_weights
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec, NetworkKind
from tests.generation.kohya_files import (
    TEXT_ENCODER,
    UNET_ATTENTION,
    KohyaModule,
    kohya_key,
    make_modules,
    write_kohya_file,
)
from tests.models.test_lora_network import lora_layers, tiny_family

UNET_LOCON = ["down_blocks.0.resnets.0.conv1", "up_blocks.0.upsamplers.0.conv"]
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _randomise(networks, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in networks:
            for layer in lora_layers(net.module).values():
                for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)


def _layer(family, component: str, name: str):
    return getattr(family, component).get_submodule(name)


def _sd_scripts_modules(family, *, alpha: float, conv_alpha: float, rank: int = 4) -> list[KohyaModule]:
    # fp16 tensors in sd-scripts' layout, shapes taken from the tiny model's own layers.
    pipe = SimpleNamespace(unet=family.unet, text_encoder=family.text_encoder)
    return make_modules(pipe, UNET_ATTENTION, TEXT_ENCODER, rank=rank, alpha=alpha, seed=5) + make_modules(
        pipe, UNET_LOCON, [], rank=2, alpha=conv_alpha, seed=6
    )


def test_sd_scripts_file_reproduces_each_module_delta(tmp_path):
    family = tiny_family()
    modules = _sd_scripts_modules(family, alpha=2.0, conv_alpha=1.0)  # alpha ≠ rank
    path = write_kohya_file(tmp_path / "sd_scripts.safetensors", modules)
    # Our alphas differ from the file's (4 vs 2, 2 vs 1): every lora_B is rescaled.
    networks = family.add_lora(LoraTargets("kohya", "attn"), LoraSpec(4, 4.0, conv_rank=2, conv_alpha=2.0))
    report = load_network_weights(networks, path)
    # with conv_rank the kohya preset also adapts the resnets' 13 time_emb_proj/conv_shortcut, as sd-scripts
    ours = 48 + 18 + 2 * 4 + 13
    assert report == ImportReport(loaded=len(modules), rescaled=len(modules), not_in_file=ours - len(modules))
    for module in modules:
        layer = _layer(family, module.component, module.name)
        torch.testing.assert_close(layer.get_delta_weight("default"), module.delta(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.lora_A["default"].weight, module.down.float(), atol=0, rtol=0)
    fresh = _layer(family, "unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    assert torch.count_nonzero(fresh.lora_B["default"].weight) == 0  # not in the file: fresh init kept


def test_text_encoder_keys_without_text_model_load(tmp_path):
    family = tiny_family()
    (module,) = make_modules(
        SimpleNamespace(unet=family.unet, text_encoder=family.text_encoder),
        [],
        TEXT_ENCODER,
        rank=4,
        alpha=4.0,
        seed=7,
    )
    key = "lora_te_encoder_layers_0_self_attn_q_proj"  # some trainers drop `text_model_`
    assert kohya_key("text_encoder", module.name) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors = {f"{key}.lora_down.weight": module.down, f"{key}.lora_up.weight": module.up}  # no alpha: = rank
    safetensors.torch.save_file(tensors, str(tmp_path / "te.safetensors"))
    networks = family.add_lora(LoraTargets(["to_q"], ["q_proj"]), LoraSpec(4, 2.0))
    report = load_network_weights(networks, tmp_path / "te.safetensors")
    assert report == ImportReport(loaded=1, rescaled=1, not_in_file=8 + 2 - 1)
    layer = _layer(family, "text_encoder", module.name)
    torch.testing.assert_close(layer.get_delta_weight("default"), module.delta(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("alpha", "conv_alpha"), [(2.0, 1.0), (1.0, None)])
def test_our_own_file_round_trips(tmp_path, alpha, conv_alpha):
    spec = LoraSpec(4, 2.0, conv_rank=2, conv_alpha=1.0)
    source = tiny_family()
    networks = source.add_lora(LoraTargets("attn-ff", "attn-mlp"), spec)
    _randomise(networks, seed=3)
    path = tmp_path / "ours.safetensors"
    safetensors.torch.save_file(kohya_state_dict(networks, torch.float32), str(path))

    target = tiny_family(seed=1)  # another base model of the same shapes: only LoRA weights are copied
    target_networks = target.add_lora(
        LoraTargets("attn-ff", "attn-mlp"), LoraSpec(4, alpha, conv_rank=2, conv_alpha=conv_alpha)
    )
    report = load_network_weights(target_networks, path)
    total = 40 + 18 + 12
    assert report == ImportReport(loaded=total, rescaled=0 if alpha == 2.0 else total, not_in_file=0)
    for component in ("unet", "text_encoder"):
        theirs = lora_layers(getattr(target, component))
        for name, layer in lora_layers(getattr(source, component)).items():
            torch.testing.assert_close(
                theirs[name].get_delta_weight("default"),
                layer.get_delta_weight("default"),
                atol=1e-6,
                rtol=1e-5,
            )
            if alpha == 2.0 and layer.r["default"] == 4:  # same scale: the very same tensors
                assert torch.equal(theirs[name].lora_B["default"].weight, layer.lora_B["default"].weight)


def _diffusers_file(tmp_path, *, old_names: bool = False, metadata: dict | None = None) -> tuple[Path, dict]:
    """A diffusers/peft file of a UNet to_q/to_v + text-encoder q_proj LoRA (rank 4); returns its deltas."""
    source = tiny_family(seed=2)
    networks = source.add_lora(LoraTargets(["to_q", "to_v"], ["q_proj"]), LoraSpec(4, 4.0))
    _randomise(networks, seed=4)
    tensors, deltas = {}, {}
    for component, module in (("unet", source.unet), ("text_encoder", source.text_encoder)):
        for key, value in get_peft_model_state_dict(module).items():
            if component == "text_encoder":
                key = "text_model." + key  # diffusers names CLIP layers as transformers 4 did
            if old_names:
                key = key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
            tensors[f"{component}.{key}"] = value.contiguous()
        for name, layer in lora_layers(module).items():
            deltas[(component, name)] = layer.get_delta_weight("default")  # scale 1: alpha = rank
    path = tmp_path / "pytorch_lora_weights.safetensors"
    meta = {"format": "pt"}
    if metadata is not None:
        meta["lora_adapter_metadata"] = json.dumps(metadata)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    return path, deltas


@pytest.mark.parametrize("old_names", [False, True])
def test_diffusers_file_loads(tmp_path, old_names):
    path, deltas = _diffusers_file(tmp_path, old_names=old_names)
    family = tiny_family()
    networks = family.add_lora(LoraTargets("attn", "attn"), LoraSpec(4, 2.0))
    report = load_network_weights(networks, path)
    assert report == ImportReport(loaded=16 + 2, rescaled=16 + 2, not_in_file=32 + 8 - 18)
    for (component, name), delta in deltas.items():
        torch.testing.assert_close(_layer(family, component, name).get_delta_weight("default"), delta)


def test_diffusers_metadata_alpha_is_used(tmp_path):
    # diffusers records each component's LoraConfig; alpha 2 at rank 4 halves the file's update.
    metadata = {
        "unet.r": 4,
        "unet.lora_alpha": 2,
        "unet.alpha_pattern": {"attn2.to_v": 8},
        "text_encoder.r": 4,
    }
    path, deltas = _diffusers_file(tmp_path, metadata=metadata)
    family = tiny_family()
    networks = family.add_lora(LoraTargets(["to_q", "to_v"], ["q_proj"]), LoraSpec(4, 4.0))
    report = load_network_weights(networks, path)
    assert report.loaded == 18 and report.rescaled == 16  # the text encoder has no alpha: rank, as ours
    for (component, name), delta in deltas.items():
        scale = 1.0 if component == "text_encoder" else (2.0 if name.endswith("attn2.to_v") else 0.5)
        torch.testing.assert_close(_layer(family, component, name).get_delta_weight("default"), scale * delta)


# --- errors ----------------------------------------------------------------------------------------------


def _error(networks, path: Path) -> list[str]:
    with pytest.raises(UserError) as err:
        load_network_weights(networks, path)
    return err.value.messages


def _kohya(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _q_pair(rank: int, width: int = 32) -> dict[str, torch.Tensor]:
    stem = "lora_unet_" + Q.replace(".", "_")
    return {
        f"{stem}.lora_down.weight": torch.zeros(rank, width),
        f"{stem}.lora_up.weight": torch.zeros(32, rank),
    }


def test_unreadable_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("not a LoRA", encoding="utf-8")
    networks = tiny_family().add_lora(LoraTargets("attn", None), LoraSpec(4, 4.0))
    (message,) = _error(networks, path)
    assert message.startswith(f"network_weights: '{path}' cannot be read as a safetensors LoRA file (")
    (message,) = _error(networks, tmp_path / "missing.safetensors")
    assert "missing.safetensors' cannot be read" in message


@pytest.mark.parametrize(
    ("suffix", "kind"),
    [
        (".hada_t1", "LyCORIS LoHa with Tucker decomposition (use_tucker)"),
        (".oft_blocks", "LyCORIS OFT"),
        (".lora_magnitude_vector", "diffusers/peft DoRA (a magnitude per output channel)"),
    ],
)
def test_lycoris_files_we_cannot_apply_are_refused(tmp_path, suffix, kind):
    # LoHa, LoKr and (LyCORIS') DoRA files load: tests/training/test_network_types_e2e.py
    path = _kohya(tmp_path / "x.safetensors", {**_q_pair(4), f"lora_unet_x{suffix}": torch.zeros(2)})
    networks = tiny_family().add_lora(LoraTargets("attn", None), LoraSpec(4, 4.0))
    assert _error(networks, path) == [
        f"network_weights: '{path}' is a {kind} file, which lora-scripts cannot apply; give a LoRA, "
        "LoCon, LoHa, LoKr or DoRA file."
    ]


def test_a_loha_with_dora_magnitudes_is_refused(tmp_path):
    # LyCORIS' dora_wd on a LoHa: generate and merge --base apply it, training has no such network
    stem = "lora_unet_" + Q.replace(".", "_")
    loha = {f"{stem}.{name}": torch.zeros(32, 4) for name in ("hada_w1_a", "hada_w2_a")}
    loha |= {f"{stem}.{name}": torch.zeros(4, 32) for name in ("hada_w1_b", "hada_w2_b")}
    path = _kohya(tmp_path / "x.safetensors", {**loha, f"{stem}.dora_scale": torch.ones(1, 32)})
    networks = tiny_family().add_lora(LoraTargets("attn", None), LoraSpec(4, 4.0, kind=NetworkKind("loha")))
    assert _error(networks, path) == [
        f"network_weights: '{path}' is a LoHa file with DoRA magnitudes (e.g. {stem}), which lora-scripts "
        "does not train; continue from a LoRA, LoCon, LoHa, LoKr or DoRA file."
    ]


def test_rank_mismatch_names_the_key_to_set(tmp_path):
    stem = "lora_unet_" + Q.replace(".", "_")
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {
        **_q_pair(16),
        f"{conv}.lora_down.weight": torch.zeros(8, 32, 3, 3),
        f"{conv}.lora_up.weight": torch.zeros(32, 8, 1, 1),
    }
    path = _kohya(tmp_path / "r16.safetensors", tensors)
    networks = tiny_family().add_lora(LoraTargets("attn", None), LoraSpec(4, 4.0, conv_rank=2))
    assert _error(networks, path) == [
        f"network_weights: '{path}' has rank 16 at {stem} where this run has lora_rank 4; set lora_rank: 16.",
        f"network_weights: '{path}' has rank 8 at {conv} where this run has conv_rank 2; set conv_rank: 8.",
    ]


def test_file_for_another_base_model(tmp_path):
    stem = "lora_unet_" + Q.replace(".", "_")
    tensors = {
        **_q_pair(4, width=320),  # SD 1.5's width on the tiny model
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),  # CompVis / SDXL naming
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4),
    }
    path = _kohya(tmp_path / "sd15.safetensors", tensors)
    networks = tiny_family().add_lora(LoraTargets("attn", None), LoraSpec(4, 4.0))
    assert _error(networks, path) == [
        f"network_weights: '{path}' has 1 layer this base model lacks (lora_unet_input_blocks_1_1_proj_in); "
        "use a LoRA made for this base model (SD 1.x vs 2.x vs SDXL).",
        f"network_weights: '{path}' has 1 layer of another size than this base model's ({stem}); "
        "use a LoRA made for this base model (SD 1.x vs 2.x vs SDXL).",
    ]


def test_layers_this_run_does_not_train_suggest_the_setting(tmp_path):
    family = tiny_family()
    modules = _sd_scripts_modules(family, alpha=4.0, conv_alpha=2.0)  # attention + proj_in, TE q_proj, convs
    path = write_kohya_file(tmp_path / "locon.safetensors", modules)
    networks = family.add_lora(LoraTargets("attn", None), LoraSpec(4, 4.0))
    (message,) = _error(networks, path)
    uncovered = sorted(
        kohya_key(m.component, m.name) for m in modules if not m.name.endswith(("to_q", "to_k", "0"))
    )
    assert message == (
        f"network_weights: '{path}' trains 4 layers this run has no LoRA on ({', '.join(uncovered)}); set "
        "train_text_encoder: true and target_modules: kohya (or list these layers in target_modules) and "
        "conv_rank (LoCon)."
    )


def test_text_encoder_layers_outside_the_preset(tmp_path):
    family = tiny_family()
    pipe = SimpleNamespace(unet=family.unet, text_encoder=family.text_encoder)
    path = write_kohya_file(
        tmp_path / "mlp.safetensors",
        make_modules(pipe, [], ["encoder.layers.1.mlp.fc1"], rank=4, alpha=4.0, seed=8),
    )
    networks = family.add_lora(LoraTargets("attn", "attn"), LoraSpec(4, 4.0))
    (message,) = _error(networks, path)
    assert message.endswith(
        "(lora_te_text_model_encoder_layers_1_mlp_fc1); set text_encoder_target_modules: kohya."
    )


def test_damaged_and_foreign_key_files(tmp_path):
    networks = tiny_family().add_lora(LoraTargets("attn", None), LoraSpec(4, 4.0))
    stem = "lora_unet_" + Q.replace(".", "_")
    path = _kohya(tmp_path / "half.safetensors", {f"{stem}.lora_down.weight": torch.zeros(4, 32)})
    assert _error(networks, path) == [
        f"network_weights: '{path}' is not a complete LoRA file ('{stem}' lacks some of its weights); "
        "give another file."
    ]
    path = _kohya(tmp_path / "model.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(2)})
    assert _error(networks, path) == [
        f"network_weights: '{path}' holds keys that are not LoRA weights "
        "(e.g. 'model.diffusion_model.out.2.weight'); give a kohya or diffusers LoRA file."
    ]
