"""The post-training tools on FLUX.1 LoRA files: inspect against the full-size modules, convert / resize /
merge exactly (the fused BFL `qkv` / `linear1` layers included, block-diagonal as we write them or dense as
sd-scripts does by default), and merge-checkpoint / extract on the tiny FLUX.1 as BFL single files."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lora_scripts.cli import main
from lora_scripts.errors import UserError
from lora_scripts.export.lora_layouts import kohya_tensors
from lora_scripts.export.lora_model import LoraModel, LoraModule
from lora_scripts.lora_tools.convert import convert
from lora_scripts.lora_tools.extract import extract_lora
from lora_scripts.lora_tools.files import open_lora
from lora_scripts.lora_tools.inspection import format_inspection, inspect_lora
from lora_scripts.lora_tools.merge_checkpoint import MergeInput, merge_into_checkpoint
from lora_scripts.lora_tools.merge_loras import merge_loras
from lora_scripts.lora_tools.resize import resize
from lora_scripts.models.checkpoint_layout import CheckpointLayout
from lora_scripts.models.lora_presets import FLUX_PRESETS, resolve_targets
from lora_scripts.models.meta_modules import MetaModel, meta_model
from lora_scripts.models.tiny import build_tiny_flux, build_tiny_flux_components
from tests.helpers.flux_files import write_flux_files
from tests.helpers.synthetic_lora import synthetic_kohya

CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
T5_ATTENTION = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")
FUSED = ("_qkv", "_linear1")
FLUX_META = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "tiny-flux")


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """The tiny FLUX.1 (seed 0) as BFL single files: transformer, all_in_one, ..."""
    return write_flux_files(build_tiny_flux_components(0), tmp_path_factory.mktemp("flux-files"))


def flux_lora(
    base: MetaModel,
    *,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    text_encoders: bool = True,
    blocks: tuple[str, ...] | None = None,
    dense: bool = False,
) -> dict[str, torch.Tensor]:
    """A float32 kohya FLUX LoRA on `base`: every Linear of the transformer's blocks (sd-scripts' network;
    only those under `blocks` when given), CLIP-L's and T5's attention with `text_encoders`. Written as we
    write it (q/k/v and linear1 block-diagonal), or `dense`: each fused layer one LoRA of rank `rank`
    (sd-scripts' default)."""
    generator = torch.Generator().manual_seed(seed)
    transformer, clip, t5 = (net.module for net in base.networks)
    paths = resolve_targets(
        transformer, "kohya", key="target_modules", component="transformer", presets=FLUX_PRESETS
    )
    layers = [("transformer", "", p) for p in paths if blocks is None or p.startswith(blocks)]
    if text_encoders:
        clip_prefix = base.networks[1].name_prefix
        layers += [
            ("text_encoder", clip_prefix, p) for p, _ in clip.named_modules() if p.endswith(CLIP_ATTENTION)
        ]
        layers += [("text_encoder_2", "", p) for p, _ in t5.named_modules() if p.endswith(T5_ATTENTION)]
    modules = []
    for component, prefix, path in layers:
        module = {"transformer": transformer, "text_encoder": clip, "text_encoder_2": t5}[component]
        layer = module.get_submodule(path)
        down = torch.randn(rank, layer.in_features, generator=generator) / rank
        up = torch.randn(layer.out_features, rank, generator=generator) * 0.05
        modules.append(LoraModule(component, prefix + path, down, up, alpha))
    tensors = kohya_tensors(LoraModel("FLUX.1", modules), list(base.networks))
    if dense:
        for stem in [k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")]:
            if stem.endswith(FUSED):
                rows, columns = (
                    tensors[f"{stem}.lora_up.weight"].shape[0],
                    tensors[f"{stem}.lora_down.weight"],
                )
                tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, columns.shape[1], generator=generator)
                tensors[f"{stem}.lora_up.weight"] = torch.randn(rows, rank, generator=generator) * 0.05
                tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    return tensors


def _write(path, tensors, metadata=None):
    safetensors.torch.save_file(tensors, str(path), metadata=metadata or {})
    return path


def _read(path):
    tensors = safetensors.torch.load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        return tensors, dict(fh.metadata() or {})


def _stems(tensors):
    return sorted(k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight"))


def _file_updates(tensors):
    """Each kohya module's update scale · up @ down, fused layers as the whole fused matrix (float64)."""
    out = {}
    for stem in _stems(tensors):
        down, up = tensors[f"{stem}.lora_down.weight"].double(), tensors[f"{stem}.lora_up.weight"].double()
        out[stem] = (up @ down) * (float(tensors[f"{stem}.alpha"]) / down.shape[0])
    return out


def _layer_updates(path, config_dir=None):
    """Each adapted layer's update (diffusers path), as the tools read the file."""
    return {m.name: m.update(torch.float64) for m in open_lora(path, config_dir=config_dir).model.modules}


# --- inspect ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True], ids=["ours-block-diagonal", "sd-scripts-dense"])
def test_inspect_resolves_a_flux_lora_on_the_full_size_modules(tmp_path, dense):
    base = meta_model("flux1")
    blocks = ("transformer_blocks.0.", "single_transformer_blocks.37.")
    tensors = flux_lora(base, rank=4, alpha=2.0, blocks=blocks, dense=dense)
    path = _write(tmp_path / "flux.safetensors", tensors, FLUX_META)
    ins = inspect_lora(path)
    assert (ins.version, ins.family, ins.layout, ins.network_type) == (
        "FLUX.1 dev",
        "FLUX.1",
        "kohya",
        "LoRA",
    )
    transformer, clip, t5 = ins.components
    # a double block: 14 Linears (q/k/v of both streams in 2 fused qkv), a single block: 6 (4 in linear1)
    assert (transformer.component, transformer.modules, transformer.kohya_prefix) == (
        "transformer",
        20,
        "lora_unet",
    )
    assert transformer.blocks == {"double_blocks": 14, "single_blocks": 6}
    assert transformer.ranks == {4: 20} and transformer.alphas == {2.0: 20}
    assert (clip.modules, clip.model, clip.kohya_prefix) == (12 * 4, "CLIPTextModel", "lora_te1")
    assert (t5.modules, t5.model, t5.kohya_prefix) == (24 * 4, "T5EncoderModel", "lora_te3")
    assert len(_stems(tensors)) == 10 + 3 + 48 + 96  # the fused layers are one file module each
    assert ins.loads_in["ComfyUI"] == f"yes, all {20 + 48 + 96} modules"
    text = format_inspection(ins)
    assert "FLUX.1 dev  (FLUX.1 family)" in text and "double_blocks 14, single_blocks 6" in text
    assert "(lora_te3: T5EncoderModel)" in text


def test_inspect_without_metadata_and_the_cli(tmp_path, capsys):
    base = meta_model("flux1")
    tensors = flux_lora(base, rank=2, blocks=("single_transformer_blocks.0.",), text_encoders=False)
    path = _write(tmp_path / "bare.safetensors", tensors)
    assert main(["inspect", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["version"] == "FLUX.1" and facts["components"][0]["blocks"] == {"single_blocks": 6}
    assert facts["components"][0]["ranks"] == {"2": 6}


# --- convert ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True], ids=["ours-block-diagonal", "sd-scripts-dense"])
def test_convert_kohya_diffusers_peft_and_back_is_exact(tmp_path, tiny_flux_dir, dense):
    base = meta_model("flux1", tiny_flux_dir)
    tensors = flux_lora(base, dense=dense)
    source = _write(tmp_path / "in.safetensors", tensors, FLUX_META)
    before = _layer_updates(source, tiny_flux_dir)
    assert len(before) == 2 * 14 + 2 * 6 + 2 * 4 + 2 * 4  # tiny: 2 + 2 blocks, 2 CLIP and 2 T5 layers
    convert(source, tmp_path / "d.safetensors", to="diffusers", config_dir=tiny_flux_dir)
    convert(source, tmp_path / "peft", to="peft", config_dir=tiny_flux_dir)
    diffusers, _ = _read(tmp_path / "d.safetensors")
    assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.") for k in diffusers)
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [
        "text_encoder",
        "text_encoder_2",
        "transformer",
    ]
    for converted in (tmp_path / "d.safetensors", tmp_path / "peft"):
        after = _layer_updates(converted, tiny_flux_dir)
        assert after.keys() == before.keys()
        for name, update in before.items():
            torch.testing.assert_close(after[name], update, rtol=0, atol=1e-12)
        back = tmp_path / f"back_{converted.stem}.safetensors"
        convert(converted, back, to="kohya", config_dir=tiny_flux_dir)
        again, meta = _read(back)
        # every module of the file, the fused layers whole, the same update; and the same ranks (a dense
        # qkv stays dense: its parts share one down)
        assert _stems(again) == _stems(tensors)
        for stem, update in _file_updates(tensors).items():
            torch.testing.assert_close(_file_updates(again)[stem], update, rtol=0, atol=1e-12)
            assert again[f"{stem}.lora_down.weight"].shape == tensors[f"{stem}.lora_down.weight"].shape
        assert (meta["ss_base_model_version"], meta["ss_network_module"]) == ("flux1", "networks.lora_flux")


# --- resize -----------------------------------------------------------------------------------------------


def _best(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The best rank-`rank` approximation of `update` and its error's Frobenius norm (the SVD bound)."""
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], float(s[rank:].pow(2).sum().sqrt())


def test_resize_a_block_diagonal_file_resizes_each_part(tmp_path, tiny_flux_dir):
    base = meta_model("flux1", tiny_flux_dir)
    source = _write(tmp_path / "in.safetensors", flux_lora(base, rank=4, alpha=2.0), FLUX_META)
    report = resize(source, tmp_path / "out.safetensors", rank=2, config_dir=tiny_flux_dir)
    before, after = (
        _layer_updates(source, tiny_flux_dir),
        _layer_updates(tmp_path / "out.safetensors", tiny_flux_dir),
    )
    assert after.keys() == before.keys() and len(report.modules) == len(before)
    for name, update in before.items():
        best, bound = _best(update, 2)
        torch.testing.assert_close(after[name], best, rtol=0, atol=1e-6)
        assert float(torch.linalg.matrix_norm(after[name] - update)) == pytest.approx(
            bound, rel=1e-5, abs=1e-9
        )
    out, meta = _read(tmp_path / "out.safetensors")
    # q/k/v: 3 parts of rank 2, linear1: 4; every part's scale kept (alpha 2 · 2/4 = 1 per part)
    assert out["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (6, 32)
    assert out["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape[0] == 8
    assert out["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"].shape[0] == 2
    assert all(
        m.rank == 2 and m.scale == pytest.approx(0.5)
        for m in open_lora(tmp_path / "out.safetensors", config_dir=tiny_flux_dir).model.modules
    )
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "1.0")


def test_resize_a_dense_file_resizes_each_fused_layer_as_one(tmp_path, tiny_flux_dir):
    base = meta_model("flux1", tiny_flux_dir)
    tensors = flux_lora(base, rank=4, alpha=2.0, dense=True, text_encoders=False)
    source = _write(tmp_path / "in.safetensors", tensors, FLUX_META)
    resize(source, tmp_path / "out.safetensors", rank=2, config_dir=tiny_flux_dir)
    out, _ = _read(tmp_path / "out.safetensors")
    assert _stems(out) == _stems(tensors)
    for stem, update in _file_updates(tensors).items():
        assert out[f"{stem}.lora_down.weight"].shape[0] == 2  # dense stays dense: rank 2, not 3 × 2
        best, bound = _best(update, 2)
        got = _file_updates(out)[stem]
        torch.testing.assert_close(got, best, rtol=0, atol=1e-6)
        assert float(torch.linalg.matrix_norm(got - update)) == pytest.approx(bound, rel=1e-5, abs=1e-9)
    parts = [
        m
        for m in open_lora(tmp_path / "out.safetensors", config_dir=tiny_flux_dir).model.modules
        if m.source.endswith("double_blocks_1_txt_attn_qkv")
    ]
    assert [m.path.rsplit(".", 1)[1] for m in parts] == ["add_q_proj", "add_k_proj", "add_v_proj"]
    assert all(torch.equal(m.down, parts[0].down) for m in parts)


# --- merge LoRAs ------------------------------------------------------------------------------------------


def test_merge_flux_loras_is_the_weighted_sum_and_refuses_sd(tmp_path, tiny_flux_dir, capsys):
    base = meta_model("flux1", tiny_flux_dir)
    a = _write(tmp_path / "a.safetensors", flux_lora(base, seed=1), FLUX_META)
    b = _write(tmp_path / "b.safetensors", flux_lora(base, seed=2, dense=True, blocks=("single",)), FLUX_META)
    report = merge_loras([(a, 0.7), (b, -0.4)], tmp_path / "m.safetensors", config_dir=tiny_flux_dir)
    ua, ub = _layer_updates(a, tiny_flux_dir), _layer_updates(b, tiny_flux_dir)
    merged = _layer_updates(tmp_path / "m.safetensors", tiny_flux_dir)
    assert merged.keys() == ua.keys() and report.version == "flux1"
    for name, update in merged.items():
        expected = 0.7 * ua[name] + (-0.4 * ub[name] if name in ub else 0)
        torch.testing.assert_close(update, expected, rtol=0, atol=1e-6)
    svd = merge_loras([(a, 0.7), (b, -0.4)], tmp_path / "s.safetensors", rank=2, config_dir=tiny_flux_dir)
    assert svd.ranks == (2, 2) and svd.least_retained.retained < 1
    full = flux_lora(
        meta_model("flux1"), rank=1, blocks=("single_transformer_blocks.0.",), text_encoders=False
    )
    flux = _write(tmp_path / "full.safetensors", full, FLUX_META)
    sd = _write(tmp_path / "sd.safetensors", synthetic_kohya(meta_model("sd_v1"), rank=1, text_encoder=False))
    with pytest.raises(
        UserError, match="sd.safetensors is an SD 1.x LoRA and --lora .*full.safetensors a FLUX.1 one"
    ):
        merge_loras([(flux, 1.0), (sd, 1.0)], tmp_path / "x.safetensors")


# --- merge into a checkpoint, extract ---------------------------------------------------------------------


def _tiny_lora_file(path, tiny_flux_dir, **kwargs):
    return _write(path, flux_lora(meta_model("flux1", tiny_flux_dir), **kwargs), FLUX_META)


def _check_fused_in(base_file, merged_file, loras, tiny_flux_dir, *, text_encoders):
    """Every weight of `merged_file` is the base's plus Σ weight · update of the LoRA layers stored there
    (a qkv / linear1 part in its rows); every other tensor is the base's, bit for bit."""
    before, _ = _read(base_file)
    after, _ = _read(merged_file)
    layout = CheckpointLayout.of(meta_model("flux1", tiny_flux_dir), before)
    expected = {k: v.double() for k, v in before.items()}
    changed = set()
    for path, te, unet in loras:
        for name, update in _layer_updates(path, tiny_flux_dir).items():
            weight = unet if name.startswith("transformer.") else te
            if weight == 0:
                continue
            where = layout[name]
            where.add(expected[where.key], weight * update)
            changed.add(where.key)
    assert after.keys() == before.keys()
    for key, value in after.items():
        if key in changed:
            torch.testing.assert_close(value.double(), expected[key], rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, before[key]), key
    assert any(k.endswith("img_attn.qkv.weight") for k in changed)
    assert any(k.endswith("linear1.weight") for k in changed)
    assert any(k.startswith("text_encoders.") for k in changed) == text_encoders
    return changed


def test_merge_into_a_bfl_transformer_file_and_an_all_in_one(tmp_path, tiny_flux_dir, flux_files):
    a = _tiny_lora_file(tmp_path / "a.safetensors", tiny_flux_dir, seed=1)
    b = _tiny_lora_file(tmp_path / "b.safetensors", tiny_flux_dir, seed=2, dense=True, text_encoders=False)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(
        UserError,
        match=r"holds no text_encoder or text_encoder_2 weights, which --lora .*a.safetensors adapts; give "
        "it a text-encoder weight of 0",
    ):
        merge_into_checkpoint(flux_files["transformer"], [MergeInput(a)], out, config_dir=tiny_flux_dir)
    report = merge_into_checkpoint(
        flux_files["transformer"],
        [MergeInput(a, 0.0, 0.8), MergeInput(b, 1.0, -0.5)],
        out,
        config_dir=tiny_flux_dir,
    )
    assert report.version == "flux1"
    changed = _check_fused_in(
        flux_files["transformer"], out, [(a, 0.0, 0.8), (b, 1.0, -0.5)], tiny_flux_dir, text_encoders=False
    )
    assert (
        report.changed == len(changed) == 2 * 10 + 2 * 3
    )  # 14 layers in 10 tensors per double block, 6 in 3
    aio = tmp_path / "aio.safetensors"
    merge_into_checkpoint(flux_files["all_in_one"], [MergeInput(a, 0.6, 0.8)], aio, config_dir=tiny_flux_dir)
    _check_fused_in(flux_files["all_in_one"], aio, [(a, 0.6, 0.8)], tiny_flux_dir, text_encoders=True)
    sd = _write(
        tmp_path / "sd.safetensors",
        synthetic_kohya(meta_model("sd_v1"), rank=1, text_encoder=False),
        {"ss_base_model_version": "sd_v1"},
    )
    with pytest.raises(UserError, match="is an SD 1.x LoRA and --base .* a FLUX.1 checkpoint"):
        merge_into_checkpoint(
            flux_files["transformer"], [MergeInput(sd)], tmp_path / "x.safetensors", config_dir=tiny_flux_dir
        )


def test_extract_recovers_the_lora_a_checkpoint_was_merged_with(tmp_path, tiny_flux_dir, flux_files):
    lora = _tiny_lora_file(
        tmp_path / "a.safetensors",
        tiny_flux_dir,
        seed=3,
        rank=2,
        blocks=("transformer_blocks.1.", "single_transformer_blocks.0."),
    )
    tuned = tmp_path / "tuned.safetensors"
    merge_into_checkpoint(
        flux_files["all_in_one"], [MergeInput(lora, 1.0, 1.0)], tuned, config_dir=tiny_flux_dir
    )
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(
        flux_files["all_in_one"], tuned, out, rank=4, min_diff=0.0, dtype=None, config_dir=tiny_flux_dir
    )
    applied = _layer_updates(lora, tiny_flux_dir)
    extracted = _layer_updates(out, tiny_flux_dir)
    assert extracted.keys() == applied.keys()
    # the other double and single block, CLIP's MLPs and T5's feed-forward layers (2 layers each)
    assert len(report.unchanged) == 14 + 6 + 2 * 2 + 2 * 3
    for name, update in applied.items():
        torch.testing.assert_close(extracted[name], update, rtol=0, atol=2e-6)
    assert min(m.retained for m in report.modules) == pytest.approx(1.0)
    tensors, meta = _read(out)
    qkv = tensors["lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight"]
    assert qkv.shape == (3 * 4, 32)  # rank 4 per part, block-diagonal
    assert meta["ss_base_model_version"] == "flux1"
    # a bare transformer file: its text encoders are left out
    bare = tmp_path / "bare_tuned.safetensors"
    merge_into_checkpoint(
        flux_files["transformer"], [MergeInput(lora, 0.0, 1.0)], bare, config_dir=tiny_flux_dir
    )
    report = extract_lora(
        flux_files["transformer"],
        bare,
        tmp_path / "t.safetensors",
        rank=4,
        dtype=None,
        config_dir=tiny_flux_dir,
    )
    assert {m.name.split(".")[0] for m in report.modules} == {"transformer"}
    with pytest.raises(UserError, match="--conv-rank 2: FLUX.1 models have no convolutions"):
        extract_lora(
            flux_files["transformer"],
            bare,
            tmp_path / "c.safetensors",
            rank=4,
            conv_rank=2,
            config_dir=tiny_flux_dir,
        )
    assert math.isfinite(report.mean_retained)
