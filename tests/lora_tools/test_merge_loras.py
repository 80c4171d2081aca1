"""`merge`: concatenation is exact (every module's update is Σ wᵢ·updateᵢ, per-module alphas included), an
SVD merge is the best low-rank approximation of that sum, and mixing base models is refused."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lora_scripts.errors import UserError
from lora_scripts.export.hashes import file_model_hash
from lora_scripts.lora_tools.files import HISTORY_KEY, open_lora
from lora_scripts.lora_tools.merge_loras import merge_loras
from lora_scripts.models.meta_modules import meta_model
from tests.helpers.synthetic_lora import synthetic_kohya

TIGHT = {"rtol": 1e-5, "atol": 1e-8}  # fp32, a few roundings of values around 1e-2


def _write(path, tensors, metadata=None):
    safetensors.torch.save_file(tensors, str(path), metadata=metadata or {})
    return path


def _metadata(path):
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _updates(path, config_dir=None):
    """Each module's update (fp32, the weight's shape) by name, as the loaders apply it."""
    return {m.name: m.update() for m in open_lora(path, config_dir=config_dir).model.modules}


def _weighted_sum(*weighted):
    """Σ w · update over (updates, w) pairs, by module name."""
    out: dict[str, torch.Tensor] = {}
    for updates, weight in weighted:
        for name, update in updates.items():
            out[name] = out[name] + weight * update if name in out else weight * update
    return out


@pytest.fixture
def two_tiny_loras(tmp_path, tiny_sd_dir):
    """a: rank 4 (alpha 2, every 3rd module 3), LoCon rank 2, text encoder; b: rank 3 (alpha 1, every 2nd 2),
    LoCon rank 3, no text encoder (so the text encoder's modules are a's only). fp32."""
    base = meta_model("sd_v1", tiny_sd_dir)
    a = synthetic_kohya(base, rank=4, alpha=2.0, conv_rank=2, odd_alpha_every=3, dtype=torch.float32, seed=1)
    b = synthetic_kohya(
        base,
        rank=3,
        alpha=1.0,
        conv_rank=3,
        text_encoder=False,
        odd_alpha_every=2,
        dtype=torch.float32,
        seed=2,
    )
    return _write(tmp_path / "a.safetensors", a), _write(tmp_path / "b.safetensors", b)


def test_concatenation_sums_every_update_exactly(tmp_path, tiny_sd_dir, two_tiny_loras):
    a, b = two_tiny_loras
    out = tmp_path / "ab.safetensors"
    report = merge_loras([(a, 0.6), (b, 0.4)], out, config_dir=tiny_sd_dir)
    ua, ub, merged = _updates(a, tiny_sd_dir), _updates(b, tiny_sd_dir), _updates(out, tiny_sd_dir)
    expected = _weighted_sum((ua, 0.6), (ub, 0.4))
    assert merged.keys() == expected.keys() == ua.keys()
    assert set(ua) - set(ub) and all(n.startswith("text_encoder.") for n in set(ua) - set(ub))
    for name, update in expected.items():
        torch.testing.assert_close(merged[name], update, **TIGHT, msg=name)
    assert report.method == "concat" and all(m.retained is None for m in report.modules)
    modules = {m.name: m for m in open_lora(out, config_dir=tiny_sd_dir).model.modules}
    a_modules = {m.name: m for m in open_lora(a, config_dir=tiny_sd_dir).model.modules}
    for entry in report.modules:
        module = modules[entry.name]
        if entry.sources == 2:  # ranks add up; alpha = rank (scale 1)
            assert module.rank == entry.rank == (4 + 3 if not module.is_conv else 2 + 3)
            assert module.alpha == module.rank
        else:  # a's own module, its up times the weight
            own = a_modules[entry.name]
            assert module.alpha == own.alpha and torch.equal(module.down, own.down)
            torch.testing.assert_close(module.up, own.up * 0.6, rtol=0, atol=0)


def test_applying_the_merged_file_equals_applying_both_loras(tmp_path, tiny_sd_dir, two_tiny_loras):
    a, b = two_tiny_loras
    out = merge_loras([(a, 0.6), (b, 0.4)], tmp_path / "ab.safetensors", config_dir=tiny_sd_dir).output
    files = {p: safetensors.torch.load_file(str(p)) for p in (a, b, out)}
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = next(
        k.rsplit(".", 2)[0] for k in files[a] if "resnets" in k and k.endswith("conv1.lora_down.weight")
    )
    for name in (stem, conv):
        down = files[a][f"{name}.lora_down.weight"]
        weight = torch.randn(
            files[a][f"{name}.lora_up.weight"].shape[0], *down.shape[1:], dtype=torch.float64
        )
        direct = weight + 0.6 * _kohya_update(files[a], name) + 0.4 * _kohya_update(files[b], name)
        fused = weight + _kohya_update(files[out], name)
        torch.testing.assert_close(fused, direct, rtol=1e-6, atol=1e-7)


def _kohya_update(tensors, stem):
    """alpha / rank · up @ down straight from a kohya state dict (float64; convs through conv2d)."""
    down = tensors[f"{stem}.lora_down.weight"].double()
    up = tensors[f"{stem}.lora_up.weight"].double()
    scale = float(tensors[f"{stem}.alpha"]) / down.shape[0]
    if down.dim() == 4:  # up ∘ down as one convolution: conv2d of down's kernels by the 1x1 up
        return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale
    return up @ down * scale


def test_svd_at_the_summed_rank_reproduces_the_sum(tmp_path, tiny_sd_dir, two_tiny_loras):
    a, b = two_tiny_loras
    out = tmp_path / "svd.safetensors"
    report = merge_loras([(a, 0.6), (b, 0.4)], out, rank=7, conv_rank=5, config_dir=tiny_sd_dir)
    expected = _weighted_sum((_updates(a, tiny_sd_dir), 0.6), (_updates(b, tiny_sd_dir), 0.4))
    merged = _updates(out, tiny_sd_dir)
    for name, update in expected.items():
        torch.testing.assert_close(merged[name], update, rtol=1e-4, atol=1e-6, msg=name)
    assert report.method == "svd"
    assert all(m.retained == pytest.approx(1.0, abs=1e-6) for m in report.modules)
    # a's text encoder modules (rank 4) are not padded to 7: no more rank than the update has
    assert {m.rank for m in report.modules if m.sources == 1} == {4}
    assert {m.alpha == m.rank for m in open_lora(out, config_dir=tiny_sd_dir).model.modules} == {True}


def test_svd_at_a_lower_rank_is_the_truncated_svd(tmp_path, tiny_sd_dir, two_tiny_loras):
    a, b = two_tiny_loras
    out = tmp_path / "svd.safetensors"
    report = merge_loras([(a, 0.6), (b, -0.4)], out, rank=3, conv_rank=2, config_dir=tiny_sd_dir)
    expected = _weighted_sum((_updates(a, tiny_sd_dir), 0.6), (_updates(b, tiny_sd_dir), -0.4))
    merged = _updates(out, tiny_sd_dir)
    retained = {m.name: m for m in report.modules}
    for name, update in expected.items():
        flat = update.flatten(1).double()
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        r = 2 if update.dim() == 4 and update.shape[-1] == 3 else 3
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert retained[name].rank == r
        torch.testing.assert_close(merged[name].flatten(1).double(), best, rtol=1e-4, atol=1e-6, msg=name)
        fraction = math.sqrt(float(s[:r].square().sum() / s.square().sum()))
        assert retained[name].retained == pytest.approx(fraction, rel=1e-5), name
        assert fraction < 0.9999  # really truncated
    assert report.least_retained.retained == min(m.retained for m in report.modules)


def test_only_conv_rank_svd_merges_the_3x3_convs_and_concatenates_the_rest(
    tmp_path, tiny_sd_dir, two_tiny_loras
):
    a, b = two_tiny_loras
    report = merge_loras(
        [(a, 1.0), (b, 1.0)], tmp_path / "o.safetensors", conv_rank=1, config_dir=tiny_sd_dir
    )
    modules = {m.name: m for m in open_lora(tmp_path / "o.safetensors", config_dir=tiny_sd_dir).model.modules}
    for entry in report.modules:
        spatial = modules[entry.name].is_conv and modules[entry.name].down.shape[-1] == 3
        assert (entry.retained is not None) == spatial
        assert entry.rank == (1 if spatial else 4 + 3 if entry.sources == 2 else 4)


def test_a_negative_weight_subtracts(tmp_path, tiny_sd_dir, two_tiny_loras):
    a, b = two_tiny_loras
    merge_loras([(a, 1.0), (b, -1.0)], tmp_path / "a-b.safetensors", config_dir=tiny_sd_dir)
    ua, ub = _updates(a, tiny_sd_dir), _updates(b, tiny_sd_dir)
    for name, update in _updates(tmp_path / "a-b.safetensors", tiny_sd_dir).items():
        torch.testing.assert_close(update, ua[name] - ub.get(name, 0), **TIGHT, msg=name)
    # a LoRA minus itself does nothing, concatenated or through the SVD
    for rank in (None, 2):
        out = tmp_path / f"zero-{rank}.safetensors"
        report = merge_loras([(a, 1.0), (a, -1.0)], out, rank=rank, config_dir=tiny_sd_dir)
        assert all(update.abs().max() < 1e-6 for update in _updates(out, tiny_sd_dir).values())
        assert all(m.retained in (None, 1.0) for m in report.modules)


def test_full_size_merge_keeps_the_dtype_and_writes_sd_scripts_metadata(tmp_path):
    base = meta_model("sd_v1")
    a = _write(
        tmp_path / "a.safetensors",
        synthetic_kohya(base, rank=8, alpha=4.0),
        {"ss_output_name": "a", "x": "1"},
    )
    b = _write(tmp_path / "b.safetensors", synthetic_kohya(base, seed=5), {"ss_output_name": "b", "x": "1"})
    out = tmp_path / "ab.safetensors"
    report = merge_loras([(a, 0.7), (b, 1.3)], out)
    assert report.version == "sd_v1" and report.ranks == (12, 12)
    tensors = safetensors.torch.load_file(str(out))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    meta = _metadata(out)
    assert meta["ss_network_dim"] == "12" and meta["ss_network_alpha"] == "12.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["x"] == "1" and "ss_output_name" not in meta
    (entry,) = json.loads(meta[HISTORY_KEY])
    assert entry["tool"] == "merge" and entry["params"]["method"] == "concat"
    assert [(i["file"], i["weight"], i["sshs_model_hash"]) for i in entry["inputs"]] == [
        ("a.safetensors", 0.7, file_model_hash(a)),
        ("b.safetensors", 1.3, file_model_hash(b)),
    ]
    assert meta["sshs_model_hash"] == file_model_hash(out)


def test_diffusers_layout_output(tmp_path, tiny_sd_dir, two_tiny_loras):
    a, b = two_tiny_loras
    out = tmp_path / "d.safetensors"
    merge_loras([(a, 0.5), (b, 0.5)], out, layout="diffusers", dtype=torch.float32, config_dir=tiny_sd_dir)
    assert open_lora(out, config_dir=tiny_sd_dir).model.layout == "diffusers"
    expected = _weighted_sum((_updates(a, tiny_sd_dir), 0.5), (_updates(b, tiny_sd_dir), 0.5))
    for name, update in _updates(out, tiny_sd_dir).items():
        torch.testing.assert_close(update, expected[name], **TIGHT, msg=name)


def test_mixing_sd15_and_sdxl_is_refused_in_one_sentence(tmp_path):
    sd = _write(tmp_path / "sd.safetensors", synthetic_kohya(meta_model("sd_v1"), rank=1, text_encoder=False))
    xl = _write(tmp_path / "xl.safetensors", synthetic_kohya(meta_model("sdxl"), rank=1, text_encoder=False))
    with pytest.raises(UserError) as err:
        merge_loras([(sd, 1.0), (xl, 1.0)], tmp_path / "out.safetensors")
    assert err.value.messages == [
        f"--lora {xl} is an SDXL LoRA and --lora {sd} an SD 1.x one; merge LoRAs made for one base model."
    ]
    assert not (tmp_path / "out.safetensors").exists()


def test_the_output_is_never_replaced_without_overwrite(tmp_path, tiny_sd_dir, two_tiny_loras):
    a, b = two_tiny_loras
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match=r"the file exists; .*--overwrite"):
        merge_loras([(a, 1.0), (b, 1.0)], out, config_dir=tiny_sd_dir)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(UserError, match="that is an input of this command"):
        merge_loras([(a, 1.0), (b, 1.0)], a, overwrite=True, config_dir=tiny_sd_dir)
    merge_loras([(a, 1.0), (b, 1.0)], out, overwrite=True, config_dir=tiny_sd_dir)
    assert safetensors.torch.load_file(str(out))


@pytest.mark.parametrize(("rank", "conv_rank", "option"), [(0, None, "--rank 0"), (4, -1, "--conv-rank -1")])
def test_a_rank_below_one_is_refused(tmp_path, two_tiny_loras, rank, conv_rank, option):
    a, b = two_tiny_loras
    with pytest.raises(UserError, match=f"^{option}: give a rank of 1 or more"):
        merge_loras([(a, 1.0), (b, 1.0)], tmp_path / "o.safetensors", rank=rank, conv_rank=conv_rank)


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_a_weight_that_is_no_number_is_refused(tmp_path, two_tiny_loras, weight):
    a, b = two_tiny_loras
    with pytest.raises(UserError, match="the weight must be a finite number"):
        merge_loras([(a, 1.0), (b, weight)], tmp_path / "o.safetensors")
