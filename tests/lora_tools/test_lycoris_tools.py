"""The post-training tools on LyCORIS files (LoHa, LoKr with decomposed and with full factors, DoRA) as
training writes them: inspect names the type and counts what each module stores; `merge --base` fuses each
module exactly (W + m·update, a DoRA module's on the weight as the LoRAs before it left it); merging into one
LoRA, resize and convert to diffusers / peft either apply a type exactly or refuse it with one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lora_scripts.cli import main
from lora_scripts.errors import UserError
from lora_scripts.export.kohya import kohya_state_dict
from lora_scripts.export.lycoris import input_norms
from lora_scripts.lora_tools.convert import convert
from lora_scripts.lora_tools.files import open_lora
from lora_scripts.lora_tools.inspection import format_inspection, inspect_lora
from lora_scripts.lora_tools.merge_checkpoint import MergeInput, merge_into_checkpoint
from lora_scripts.lora_tools.merge_loras import merge_loras
from lora_scripts.lora_tools.resize import resize
from lora_scripts.models.checkpoint_layout import CheckpointLayout
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec, NetworkKind
from lora_scripts.models.meta_modules import meta_model
from lora_scripts.models.tiny import build_tiny_sd_components
from tests.helpers.compvis import write_compvis_checkpoint
from tests.helpers.synthetic_lora import synthetic_kohya
from tests.models.test_lora_network import tiny_family

KINDS = {
    "loha": NetworkKind("loha"),
    "lokr": NetworkKind("lokr", lokr_factor=4),  # decomposed where the layer is large enough
    "lokr_full": NetworkKind("lokr", lokr_full_matrix=True),  # both factors full everywhere
    "dora": NetworkKind("dora"),
}
TYPE_NAMES = {"loha": "LoHa", "lokr": "LoKr", "lokr_full": "LoKr", "dora": "DoRA"}
# The tiny SD 1.x model, "kohya" targets: 61 UNet attention / 1x1 layers and 18 3x3 convs (conv_rank 2),
# CLIP's 12 attention / MLP layers.
UNET_MODULES, CONVS, TE_MODULES = 79, 18, 12


@pytest.fixture(scope="module")
def lycoris_files(tmp_path_factory) -> dict[str, Path]:
    """One file of each type, as training saves it (fp32, random trained weights), without metadata but
    the base model version."""
    folder = tmp_path_factory.mktemp("lycoris")
    files = {}
    for name, kind in KINDS.items():
        family = tiny_family()
        spec = LoraSpec(4, 2.0, conv_rank=2, conv_alpha=1.0, kind=kind)
        networks = family.add_lora(LoraTargets("kohya", "kohya"), spec)
        torch.manual_seed(1)
        with torch.no_grad():
            for net in networks:
                for param in net.module.parameters():
                    if param.requires_grad:
                        param.add_(torch.randn_like(param) * 0.1)
        files[name] = folder / f"{name}.safetensors"
        tensors = kohya_state_dict(networks, torch.float32)
        safetensors.torch.save_file(tensors, str(files[name]), metadata={"ss_base_model_version": "sd_v1"})
    return files


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}, dict(fh.metadata() or {})


def _base_file(path: Path) -> Path:
    """The tiny SD 1.x model (seed 0, the one tiny_family() and tiny_sd_dir hold) as a CompVis checkpoint."""
    tiny = build_tiny_sd_components()
    return write_compvis_checkpoint(path, tiny.unet, tiny.vae, tiny.text_encoder, text_encoder_kind="clip")


# --- inspect ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KINDS))
def test_inspect_names_the_type_and_counts_its_parameters(lycoris_files, tiny_sd_dir, name):
    path = lycoris_files[name]
    ins = inspect_lora(path, config_dir=tiny_sd_dir)
    tensors, _ = _read(path)
    stored = sum(t.numel() for key, t in tensors.items() if not key.endswith(".alpha"))
    assert ins.network_type == TYPE_NAMES[name]
    assert ins.parameters == stored == sum(c.parameters for c in ins.components)
    unet, te = ins.components
    assert (unet.modules, unet.conv_modules, te.modules) == (UNET_MODULES, CONVS, TE_MODULES)
    ranks = {"unet": unet.ranks, "text_encoder": te.ranks}
    if name == "lokr_full":  # no decomposed factor: applied at scale 1 whatever alpha says
        assert ranks == {"unet": {"full": UNET_MODULES}, "text_encoder": {"full": TE_MODULES}}
    elif name == "lokr":  # decomposed where the layer is large enough, else full
        assert set(unet.ranks) == {2, 4, "full"} and sum(unet.ranks.values()) == UNET_MODULES
    else:
        assert ranks == {"unet": {2: CONVS, 4: UNET_MODULES - CONVS}, "text_encoder": {4: TE_MODULES}}
    report = format_inspection(ins)
    assert f"network     {TYPE_NAMES[name]}\nparameters  {stored:,}\n" in report
    assert ins.notes and all(f"  {note}" in report for note in ins.notes)
    assert ins.loads_in["A1111/Forge"] == f"yes, all {UNET_MODULES + TE_MODULES} modules"
    assert ins.loads_in["diffusers"].startswith("no (")


def test_inspect_of_a_dora_file_says_what_needs_the_base(lycoris_files, tiny_sd_dir, capsys):
    path = lycoris_files["dora"]
    assert main(["inspect", str(path), "--json", "--base-config", str(tiny_sd_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["network_type"], report["parameters"]) == ("DoRA", 60288)
    assert report["notes"][0].startswith(
        "DoRA: each module also rescales its layer's weight per input channel (dora_scale), so its update "
        "depends on the base model's weights, which inspect does not read"
    )
    assert report["components"][0]["ranks"] == {"2": CONVS, "4": UNET_MODULES - CONVS}


def test_inspect_of_a_plain_lora_and_locon_is_unchanged(tmp_path, tiny_sd_dir):
    base = meta_model("sd_v1", tiny_sd_dir)
    for conv_rank, expected in ((None, "LoRA"), (2, "LoCon")):
        path = tmp_path / f"{expected}.safetensors"
        safetensors.torch.save_file(synthetic_kohya(base, conv_rank=conv_rank), str(path))
        ins = inspect_lora(path, config_dir=tiny_sd_dir)
        assert (ins.network_type, ins.notes) == (expected, [])
        assert ins.loads_in["diffusers"] == "yes (load_lora_weights)"


# --- merge --base ---------------------------------------------------------------------------------------


def _check_fused(base_path, merged_path, loras, folder):
    """Every adapted weight is the base's with each LoRA's update added in order, W ← W + m·update(W) in
    fp32, every other tensor the base's bit for bit. loras: (path, te weight, unet weight). Returns the
    layers' final weights by module name."""
    base, _ = _read(base_path)
    merged, _ = _read(merged_path)
    assert merged.keys() == base.keys()
    layout = CheckpointLayout.of(meta_model("sd_v1", folder))
    expected = {key: value.float().clone() for key, value in base.items()}
    changed, weights = set(), {}
    for path, te, unet in loras:
        for module in open_lora(path, config_dir=folder).model.modules:
            where = layout[module.name]
            multiplier = unet if module.component == "unet" else te
            current = where.weight(expected[where.key]).clone()
            where.add(expected[where.key], multiplier * module.update(torch.float32, weight=current))
            changed.add(where.key)
    for key, value in merged.items():
        if key in changed:
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
            assert not torch.equal(value, base[key]), key
        else:
            assert torch.equal(value, base[key]), key
    for path, _, _ in loras:
        for module in open_lora(path, config_dir=folder).model.modules:
            weights[module.name] = layout[module.name].weight(merged[layout[module.name].key])
    return weights


@pytest.mark.parametrize("name", list(KINDS))
def test_merge_base_fuses_each_type_exactly(tmp_path, lycoris_files, tiny_sd_dir, name):
    base = _base_file(tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    lora = lycoris_files[name]
    report = merge_into_checkpoint(base, [MergeInput(lora, 0.5, 0.8)], out, config_dir=tiny_sd_dir)
    assert report.modules == UNET_MODULES + TE_MODULES
    _check_fused(base, out, [(lora, 0.5, 0.8)], tiny_sd_dir)


def test_merge_base_dora_at_weight_one_gives_each_input_channel_its_magnitude(
    tmp_path, lycoris_files, tiny_sd_dir
):
    """At multiplier 1 a DoRA layer's fused weight has the file's dora_scale as its per-input-channel norms
    (their absolute values: the random "training" turns a few negative); after a LoKr fused first it is the
    DoRA weight of that weight, so still those norms."""
    base = _base_file(tmp_path / "base.safetensors")
    out = tmp_path / "merged.safetensors"
    lokr, dora = lycoris_files["lokr"], lycoris_files["dora"]
    inputs = [MergeInput(lokr, 0.7, -0.6), MergeInput(dora)]
    merge_into_checkpoint(base, inputs, out, config_dir=tiny_sd_dir)
    weights = _check_fused(base, out, [(lokr, 0.7, -0.6), (dora, 1.0, 1.0)], tiny_sd_dir)
    for module in open_lora(dora, config_dir=tiny_sd_dir).model.modules:
        norms = input_norms(weights[module.name])
        torch.testing.assert_close(norms, module.dora_scale.abs(), rtol=1e-5, atol=1e-6, msg=module.name)


# --- merge into one LoRA ----------------------------------------------------------------------------------


def test_merge_refuses_concatenating_loha_and_lokr(tmp_path, lycoris_files, tiny_sd_dir):
    for name in ("loha", "lokr"):
        lora = lycoris_files[name]
        with pytest.raises(UserError) as err:
            merge_loras([(lora, 1.0)], tmp_path / "out.safetensors", config_dir=tiny_sd_dir)
        assert str(err.value) == (
            f"--lora {lora}: '{lora}' is a {TYPE_NAMES[name]} file; merging by concatenation is exact for "
            "plain LoRA only; give --rank N (and --conv-rank N) to merge it by SVD of the summed update, or "
            "fuse it into a checkpoint with `merge --base`."
        )
    assert not (tmp_path / "out.safetensors").exists()


def test_merge_refuses_dora_even_by_svd(tmp_path, lycoris_files, tiny_sd_dir):
    dora = lycoris_files["dora"]
    with pytest.raises(UserError) as err:
        merge_loras([(dora, 1.0)], tmp_path / "out.safetensors", rank=4, config_dir=tiny_sd_dir)
    assert str(err.value) == (
        f"--lora {dora}: '{dora}' is a DoRA file; its update depends on the base weights, so it cannot be "
        "merged into a LoRA; fuse it into a checkpoint with `merge --base` instead."
    )


def test_merge_by_svd_makes_a_plain_lora_of_the_summed_updates(tmp_path, lycoris_files, tiny_sd_dir):
    """At a rank above every layer's, the SVD keeps the summed update whole: a plain LoRA whose update is
    Σ w·update of a LoHa, a LoKr and a plain LoRA; at rank 2 it is an approximation, and says so."""
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(
        synthetic_kohya(meta_model("sd_v1", tiny_sd_dir), conv_rank=2, dtype=torch.float32), str(plain)
    )
    inputs = [(lycoris_files["loha"], 0.7), (lycoris_files["lokr_full"], -0.5), (plain, 0.3)]
    out = tmp_path / "merged.safetensors"
    report = merge_loras(inputs, out, rank=10_000, config_dir=tiny_sd_dir)
    assert report.method == "svd" and all(m.retained == pytest.approx(1.0) for m in report.modules)
    opened = open_lora(out, config_dir=tiny_sd_dir)
    assert opened.model.plain
    merged = {m.name: m for m in opened.model.modules}
    expected: dict[str, torch.Tensor] = {}
    for path, weight in inputs:
        for module in open_lora(path, config_dir=tiny_sd_dir).model.modules:
            expected[module.name] = expected.get(module.name, 0) + weight * module.update()
    assert merged.keys() == expected.keys()
    for name, update in expected.items():
        torch.testing.assert_close(merged[name].update(), update, rtol=1e-4, atol=1e-5, msg=name)
    _, metadata = _read(out)
    assert metadata["ss_network_module"] == "networks.lora"
    assert "algo" not in json.loads(metadata["ss_network_args"])

    small = merge_loras(inputs[:1], tmp_path / "small.safetensors", rank=2, config_dir=tiny_sd_dir)
    assert {m.rank for m in small.modules} == {2}
    assert small.least_retained.retained < 0.99


# --- resize and convert ---------------------------------------------------------------------------------


def test_resize_refuses_lycoris_files(tmp_path, lycoris_files, tiny_sd_dir):
    out = tmp_path / "small.safetensors"
    loha, dora = lycoris_files["loha"], lycoris_files["dora"]
    with pytest.raises(UserError) as err:
        resize(loha, out, rank=2, config_dir=tiny_sd_dir)
    assert str(err.value) == (
        f"resize: '{loha}' is a LoHa file; resize works on a plain LoRA's up @ down; to make a plain LoRA of "
        f"rank N from it, use `lora-scripts merge --lora {loha} --rank N -o OUT.safetensors` (the SVD of its "
        "update)."
    )
    with pytest.raises(UserError) as err:
        resize(dora, out, rank=2, config_dir=tiny_sd_dir)
    assert str(err.value) == (
        f"resize: '{dora}' is a DoRA file; resize works on a plain LoRA's up @ down, and a DoRA file's "
        "update depends on the base weights; fuse it into a checkpoint with `merge --base` instead."
    )
    assert not out.exists()


@pytest.mark.parametrize("to", ["diffusers", "peft"])
def test_convert_refuses_the_diffusers_and_peft_layouts(tmp_path, lycoris_files, tiny_sd_dir, to):
    for name in ("loha", "lokr", "dora"):
        lora = lycoris_files[name]
        with pytest.raises(UserError) as err:
            convert(lora, tmp_path / "out", to=to, config_dir=tiny_sd_dir)
        assert str(err.value) == (
            f"convert: '{lora}' is a {TYPE_NAMES[name]} file; the diffusers and peft layouts hold plain LoRA "
            "only; keep the kohya layout, which A1111, Forge and ComfyUI load."
        )
    assert not (tmp_path / "out").exists()


CONV = {"conv_dim": "2", "conv_alpha": "1.0"}
EXPECTED_ARGS = {  # LyCORIS' network_args; a full LoKr's convs have no rank (0)
    "loha": {"algo": "loha", **CONV},
    "lokr": {"algo": "lokr", "factor": "4", **CONV},
    "lokr_full": {"algo": "lokr", "factor": "-1", "full_matrix": "True", **CONV, "conv_dim": "0"},
    "dora": {"algo": "lora", "dora_wd": "True", "wd_on_output": "False", **CONV},
}


@pytest.mark.parametrize("name", list(KINDS))
def test_convert_kohya_to_kohya_keeps_the_tensors_and_says_lycoris(
    tmp_path, lycoris_files, tiny_sd_dir, name
):
    source = lycoris_files[name]
    out = tmp_path / "out.safetensors"
    convert(source, out, to="kohya", config_dir=tiny_sd_dir)
    before, _ = _read(source)
    after, metadata = _read(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == EXPECTED_ARGS[name]

    half = tmp_path / "half.safetensors"
    convert(source, half, to="kohya", dtype=torch.float16, config_dir=tiny_sd_dir)
    tensors, _ = _read(half)
    assert before.keys() == tensors.keys() and {t.dtype for t in tensors.values()} == {torch.float16}


def test_the_command_line_refuses_with_the_sentence_and_merges_by_svd(
    tmp_path, lycoris_files, tiny_sd_dir, capsys
):
    loha = lycoris_files["loha"]
    config = ["--base-config", str(tiny_sd_dir)]
    out = tmp_path / "out.safetensors"
    assert main(["merge", "--lora", str(loha), "-o", str(out), *config]) == 2
    assert f"'{loha}' is a LoHa file; merging by concatenation is exact" in capsys.readouterr().err
    assert main(["merge", "--lora", f"{loha}:0.5", "-o", str(out), "--rank", "3", *config]) == 0
    assert {m.rank for m in open_lora(out, config_dir=tiny_sd_dir).model.modules} == {3}
