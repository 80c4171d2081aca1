"""`extract`: a LoRA from tuned − base by SVD. A base with a LoRA merged in gives that LoRA's updates back at
its rank (OpenCLIP's fused q/k/v rows included); a lower rank keeps the top singular values (Eckart–Young);
a text encoder that barely changed is left out, as sd-scripts does."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lora_scripts.errors import UserError
from lora_scripts.export.hashes import file_model_hash
from lora_scripts.lora_tools.extract import extract_lora
from lora_scripts.lora_tools.files import HISTORY_KEY, open_lora
from lora_scripts.lora_tools.merge_checkpoint import MergeInput, merge_into_checkpoint
from lora_scripts.models.meta_modules import meta_model
from lora_scripts.models.tiny import build_tiny_sd_components, build_tiny_sdxl_components
from tests.helpers.compvis import write_compvis_checkpoint
from tests.helpers.sgm import write_sgm_checkpoint
from tests.helpers.synthetic_lora import synthetic_kohya


def _base(path, version):
    if version == "sdxl":
        tiny = build_tiny_sdxl_components()
        return write_sgm_checkpoint(path, tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
    tiny = build_tiny_sd_components()
    return write_compvis_checkpoint(path, tiny.unet, tiny.vae, tiny.text_encoder)


def _tuned(tmp_path, folder, version, *, conv_rank=None, te_weight=1.0, rank=4):
    """(base, base + LoRA, the LoRA's modules by name): a fine-tune whose difference is a known LoRA."""
    base = _base(tmp_path / "base.safetensors", version)
    lora = tmp_path / "lora.safetensors"
    tensors = synthetic_kohya(
        meta_model(version, folder), rank=rank, conv_rank=conv_rank, dtype=torch.float32
    )
    safetensors.torch.save_file(tensors, str(lora))
    tuned = tmp_path / "tuned.safetensors"
    merge_into_checkpoint(base, [MergeInput(lora, te_weight, 1.0)], tuned, config_dir=folder)
    modules = {m.name: m for m in open_lora(lora, config_dir=folder).model.modules}
    return base, tuned, modules


def _extracted(path, folder):
    return {m.name: m for m in open_lora(path, config_dir=folder).model.modules}


@pytest.mark.parametrize("version", ["sd_v1", "sdxl"])
def test_at_the_lora_rank_each_update_comes_back(tmp_path, tiny_sd_dir, tiny_sdxl_dir, version):
    folder = tiny_sd_dir if version == "sd_v1" else tiny_sdxl_dir
    conv_rank = 2 if version == "sd_v1" else None
    base, tuned, lora = _tuned(tmp_path, folder, version, conv_rank=conv_rank)
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(
        base, tuned, out, rank=4, conv_rank=conv_rank, min_diff=0, dtype=torch.float32, config_dir=folder
    )
    extracted = _extracted(out, folder)
    # The synthetic LoCon also adapts conv_in / conv_out, which sd-scripts' extract does not target.
    assert set(extracted) == {n for n in lora if not n.startswith(("unet.conv_in", "unet.conv_out"))}
    for name, module in extracted.items():
        assert module.rank == lora[name].rank and module.alpha == module.rank, name
        torch.testing.assert_close(module.update(), lora[name].update(), rtol=1e-4, atol=2e-6, msg=name)
    assert {m.name for m in report.modules} == set(extracted)
    assert all(m.retained == pytest.approx(1.0, abs=1e-6) for m in report.modules)
    assert report.unchanged and not set(report.unchanged) & set(extracted)  # ff, proj_in, ...: no change
    if version == "sdxl":  # OpenCLIP bigG's q / k / v, each from its rows of in_proj_weight
        qkv = [
            n
            for n in extracted
            if n.startswith("text_encoder_2.") and n.endswith(("q_proj", "k_proj", "v_proj"))
        ]
        assert len(qkv) == 3 * 3


def test_a_lower_rank_keeps_the_top_singular_values(tmp_path, tiny_sd_dir):
    base, tuned, lora = _tuned(tmp_path, tiny_sd_dir, "sd_v1", conv_rank=3)
    out = tmp_path / "rank2.safetensors"
    report = extract_lora(
        base, tuned, out, rank=2, conv_rank=1, min_diff=0, dtype=torch.float32, config_dir=tiny_sd_dir
    )
    retained = {m.name: m.retained for m in report.modules}
    for name, module in _extracted(out, tiny_sd_dir).items():
        keep = 1 if module.is_conv and module.down.shape[-1] == 3 else 2
        assert module.rank == keep, name
        truth = torch.linalg.svdvals(lora[name].update().flatten(1).double())
        ours = torch.linalg.svdvals(module.update().flatten(1).double())
        torch.testing.assert_close(ours[:keep], truth[:keep], rtol=1e-4, atol=1e-6, msg=name)
        assert float(ours[keep:].abs().max()) < 1e-5 * float(truth[0]), name
        error = torch.linalg.norm((module.update() - lora[name].update()).double())
        assert float(error) == pytest.approx(float(truth[keep:].norm()), rel=1e-3, abs=1e-6), name
        fraction = float((truth[:keep].square().sum() / truth.square().sum()).sqrt())
        assert retained[name] == pytest.approx(fraction, rel=1e-4), name
    assert report.mean_retained == pytest.approx(sum(retained.values()) / len(retained))
    assert 0 < report.least_retained.retained < 1


def test_a_text_encoder_that_barely_changed_is_left_out(tmp_path, tiny_sd_dir):
    """sd-scripts' min_diff: a text encoder whose largest |ΔW| is at most 0.01 counts as unchanged."""
    base, tuned, lora = _tuned(tmp_path, tiny_sd_dir, "sd_v1", te_weight=1e-3)
    report = extract_lora(base, tuned, tmp_path / "unet.safetensors", rank=4, config_dir=tiny_sd_dir)
    assert list(report.text_encoders_left_out) == ["text_encoder"]
    assert 0 < report.text_encoders_left_out["text_encoder"] <= 0.01
    names = set(_extracted(tmp_path / "unet.safetensors", tiny_sd_dir))
    assert names == {n for n in lora if n.startswith("unet.")}
    everything = extract_lora(
        base, tuned, tmp_path / "all.safetensors", rank=4, min_diff=0, config_dir=tiny_sd_dir
    )
    assert not everything.text_encoders_left_out
    assert {n for n in _extracted(tmp_path / "all.safetensors", tiny_sd_dir)} == set(lora)


def test_the_file_says_what_it_is_and_where_it_came_from(tmp_path, tiny_sd_dir):
    base, tuned, _ = _tuned(tmp_path, tiny_sd_dir, "sd_v1", conv_rank=2)
    out = tmp_path / "x.safetensors"
    extract_lora(base, tuned, out, rank=4, conv_rank=2, config_dir=tiny_sd_dir)
    with safe_open(str(out), framework="pt") as fh:
        meta = dict(fh.metadata())
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}
        keys = list(fh.keys())
    assert dtypes == {torch.float16}  # the default, as training saves
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in keys)  # kohya, A1111's layout
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    (entry,) = json.loads(meta[HISTORY_KEY])
    assert entry["tool"] == "extract" and entry["params"] == {"rank": 4, "conv_rank": 2, "min_diff": 0.01}
    assert [(i["file"], i["sshs_model_hash"]) for i in entry["inputs"]] == [
        ("base.safetensors", file_model_hash(base)),
        ("tuned.safetensors", file_model_hash(tuned)),
    ]


def test_refusals(tmp_path, tiny_sd_dir, tiny_sdxl_dir):
    base, tuned, _ = _tuned(tmp_path, tiny_sd_dir, "sd_v1")
    xl = _base(tmp_path / "xl.safetensors", "sdxl")
    with pytest.raises(
        UserError, match=r"--tuned .*xl.safetensors is an SDXL checkpoint and --base .* an SD 1\.x"
    ):
        extract_lora(base, xl, tmp_path / "o.safetensors", rank=4, config_dir=tiny_sd_dir)
    with pytest.raises(UserError, match="no layer differs from --base"):
        extract_lora(
            base, tmp_path / "base.safetensors", tmp_path / "o.safetensors", rank=4, config_dir=tiny_sd_dir
        )
    (tmp_path / "o.safetensors").write_bytes(b"keep")
    with pytest.raises(UserError, match="the file exists"):
        extract_lora(base, tuned, tmp_path / "o.safetensors", rank=4, config_dir=tiny_sd_dir)
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep"
    with pytest.raises(UserError) as caught:
        extract_lora(
            base, tuned, tmp_path / "p.safetensors", rank=0, conv_rank=-1, min_diff=-1, config_dir=tiny_sd_dir
        )
    assert len(caught.value.messages) == 3
    ckpt = _base(tmp_path / "base.ckpt", "sd_v1")
    with pytest.raises(UserError, match=r"--base .*base\.ckpt: a pickle checkpoint is refused"):
        extract_lora(ckpt, tuned, tmp_path / "p.safetensors", rank=4, config_dir=tiny_sd_dir)
    report = extract_lora(
        ckpt, tuned, tmp_path / "p.safetensors", rank=4, allow_pickle=True, config_dir=tiny_sd_dir
    )
    assert report.modules
