"""`resize`: each module's update replaced by its best approximation of the new rank, with its scale
(alpha / rank) kept, in the input's layout, with sd-scripts' metadata."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lora_scripts.errors import UserError
from lora_scripts.lora_tools.convert import convert
from lora_scripts.lora_tools.files import HISTORY_KEY, open_lora
from lora_scripts.lora_tools.resize import format_report, resize
from lora_scripts.models.meta_modules import meta_model
from tests.helpers.synthetic_lora import synthetic_kohya

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TO_Q_KOHYA = "lora_unet_" + TO_Q.replace(".", "_")
SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625]


def _write(path, tensors, metadata=None):
    safetensors.torch.save_file(tensors, str(path), metadata=metadata or {})
    return path


def _metadata(path):
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _modules(path, config_dir=None):
    return {m.name: m for m in open_lora(path, config_dir=config_dir).model.modules}


def _orthonormal(rows, cols, seed):
    q, _ = torch.linalg.qr(
        torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


@pytest.fixture
def tiny_lora(tmp_path, tiny_sd_dir):
    """A rank-8 LoRA with 3x3 LoCon modules of rank 4 on the tiny SD model, float32, whose to_q module has
    update U diag(SPECTRUM) Vᵀ · 4/8 (alpha 4)."""
    tensors = synthetic_kohya(meta_model("sd_v1", tiny_sd_dir), rank=8, conv_rank=4, dtype=torch.float32)
    u, v = _orthonormal(32, 8, 1), _orthonormal(32, 8, 2)
    tensors[f"{TO_Q_KOHYA}.lora_up.weight"] = (
        (u * torch.tensor(SPECTRUM, dtype=torch.float64)).float().contiguous()
    )
    tensors[f"{TO_Q_KOHYA}.lora_down.weight"] = v.T.float().contiguous()
    tensors[f"{TO_Q_KOHYA}.alpha"] = torch.tensor(4.0)
    meta = {"ss_training_comment": "my comment", "ss_network_dim": "8", "ss_network_alpha": "2.0"}
    return _write(tmp_path / "in.safetensors", tensors, meta), (u, v)


def test_resizing_to_the_files_own_rank_reproduces_every_update(tmp_path, tiny_sd_dir, tiny_lora):
    source, _ = tiny_lora
    report = resize(source, tmp_path / "out.safetensors", rank=8, conv_rank=4, config_dir=tiny_sd_dir)
    before, after = _modules(source, tiny_sd_dir), _modules(tmp_path / "out.safetensors", tiny_sd_dir)
    assert after.keys() == before.keys() and len(report.modules) == len(before) == 60
    for name, module in before.items():
        assert (after[name].rank, after[name].alpha) == (module.rank, module.alpha), name
        torch.testing.assert_close(after[name].update(), module.update(), rtol=0, atol=2e-6)
    assert all(row.fro_retained == pytest.approx(1.0) for row in report.modules)
    assert report.mean_fro_retained == pytest.approx(1.0)


def test_a_known_spectrum_keeps_its_top_singular_values(tmp_path, tiny_sd_dir, tiny_lora):
    source, (u, v) = tiny_lora
    report = resize(source, tmp_path / "out.safetensors", rank=4, config_dir=tiny_sd_dir)
    module = _modules(tmp_path / "out.safetensors", tiny_sd_dir)[f"unet.{TO_Q}"]
    assert (module.rank, module.alpha) == (4, 2.0)  # alpha · 4/8: the scale stays 0.5
    best = 0.5 * u[:, :4] @ torch.diag(torch.tensor(SPECTRUM[:4], dtype=torch.float64)) @ v[:, :4].T
    torch.testing.assert_close(module.update().double(), best, rtol=0, atol=1e-6)
    error = module.update().double() - 0.5 * u @ torch.diag(torch.tensor(SPECTRUM, dtype=torch.float64)) @ v.T
    assert float(torch.linalg.matrix_norm(error)) == pytest.approx(
        0.5 * math.sqrt(sum(x * x for x in SPECTRUM[4:]))
    )
    row = next(r for r in report.modules if r.name == f"unet.{TO_Q}")
    assert (row.old_rank, row.new_rank, row.alpha) == (8, 4, 2.0)
    assert row.fro_retained == pytest.approx(
        math.sqrt(sum(x * x for x in SPECTRUM[:4]) / sum(x * x for x in SPECTRUM))
    )


def test_every_module_keeps_its_scale_and_locon_takes_conv_rank(tmp_path, tiny_sd_dir):
    base = meta_model("sd_v1", tiny_sd_dir)
    source = _write(
        tmp_path / "in.safetensors", synthetic_kohya(base, rank=8, conv_rank=8, dtype=torch.float32)
    )
    report = resize(source, tmp_path / "out.safetensors", rank=4, conv_rank=2, config_dir=tiny_sd_dir)
    before, after = _modules(source, tiny_sd_dir), _modules(tmp_path / "out.safetensors", tiny_sd_dir)
    conv = [name for name, m in before.items() if m.is_conv]
    assert len(conv) == 20
    for name, module in before.items():
        new = after[name]
        expected_rank = 2 if name in conv else 4
        assert new.rank == expected_rank and new.scale == pytest.approx(module.scale, rel=1e-7), name
        if name in conv:
            assert new.down.shape == (2, *module.down.shape[1:]) and new.up.shape == (
                module.up.shape[0],
                2,
                1,
                1,
            )
        # the best approximation of that rank, from an SVD of the whole update
        u, s, vh = torch.linalg.svd(module.update(torch.float64).flatten(1), full_matrices=False)
        best = (u[:, :expected_rank] * s[:expected_rank]) @ vh[:expected_rank]
        torch.testing.assert_close(new.update(torch.float64).flatten(1), best, rtol=0, atol=1e-6)
    meta = _metadata(tmp_path / "out.safetensors")
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 4 (conv: 2); "
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "1.0")  # alpha 2 · 4/8
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.25"}  # alpha 1 · 2/8
    assert {r.new_rank for r in report.modules} == {2, 4}


def test_a_module_never_grows(tmp_path, tiny_sd_dir, tiny_lora):
    source, _ = tiny_lora
    resize(source, tmp_path / "out.safetensors", rank=16, config_dir=tiny_sd_dir)
    before, after = _modules(source, tiny_sd_dir), _modules(tmp_path / "out.safetensors", tiny_sd_dir)
    assert all(after[name].rank == m.rank for name, m in before.items())
    assert _metadata(tmp_path / "out.safetensors")["ss_network_dim"] == "8"


def test_dynamic_ranks_follow_the_spectrum(tmp_path, tiny_sd_dir, tiny_lora):
    source, _ = tiny_lora
    # SPECTRUM's squares: 64 16 4 1 ...; sum 85.33; cumulative fractions .750 .9375 .984 .996 ...
    # sv_fro 0.95 → .9025: searchsorted gives 1 (.9375), sd-scripts' index 2, rank 3 (alpha 4 · 3/8).
    report = resize(
        source,
        tmp_path / "out.safetensors",
        rank=6,
        dynamic="sv_fro",
        dynamic_param=0.95,
        config_dir=tiny_sd_dir,
    )
    rows = {r.name: r for r in report.modules}
    assert (rows[f"unet.{TO_Q}"].new_rank, rows[f"unet.{TO_Q}"].alpha) == (3, 1.5)
    assert all(r.new_rank <= (4 if r.old_rank == 4 else 6) for r in report.modules)
    assert len({r.new_rank for r in report.modules}) > 1  # random modules get other ranks
    after = _modules(tmp_path / "out.safetensors", tiny_sd_dir)
    assert all(
        after[name].rank == row.new_rank and after[name].alpha == row.alpha for name, row in rows.items()
    )
    meta = _metadata(tmp_path / "out.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert meta["ss_training_comment"] == "Dynamic resize with sv_fro: 0.95 from 8; my comment"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "Dynamic"
    history = json.loads(meta[HISTORY_KEY])
    assert history[-1]["tool"] == "resize"
    assert history[-1]["params"] == {
        "rank": 6,
        "conv_rank": 6,
        "dynamic": "sv_fro",
        "dynamic_param": 0.95,
        "dtype": None,
    }
    assert history[-1]["inputs"][0]["file"] == "in.safetensors"


@pytest.mark.parametrize("layout", ["diffusers", "peft"])
def test_the_output_keeps_the_inputs_layout(tmp_path, tiny_sd_dir, tiny_lora, layout):
    source, _ = tiny_lora
    converted = tmp_path / ("in_d.safetensors" if layout == "diffusers" else "in_peft")
    convert(source, converted, to=layout, config_dir=tiny_sd_dir)
    output = tmp_path / ("out.safetensors" if layout == "diffusers" else "out_peft")
    args = {"rank": 6, "dynamic": "sv_ratio", "dynamic_param": 20.0, "config_dir": tiny_sd_dir}
    report = resize(converted, output, **args)
    resize(source, tmp_path / "kohya.safetensors", **args)
    assert report.layout == layout and (output.is_dir() == (layout == "peft"))
    opened = open_lora(output, config_dir=tiny_sd_dir)
    assert opened.model.layout == layout
    kohya = _modules(tmp_path / "kohya.safetensors", tiny_sd_dir)
    for module in opened.model.modules:  # per-module ranks and alphas (peft's rank_pattern / alpha_pattern)
        assert (module.rank, module.alpha) == (kohya[module.name].rank, kohya[module.name].alpha), module.name
        torch.testing.assert_close(module.update(), kohya[module.name].update(), rtol=0, atol=1e-6)
    assert len({m.rank for m in opened.model.modules}) > 1


def test_full_size_sd15_unet_keeps_names_dtype_and_takes_precision(tmp_path):
    original = synthetic_kohya(meta_model("sd_v1"), rank=8, text_encoder=False)  # float16
    source = _write(tmp_path / "in.safetensors", original, {"ss_network_dim": "8", "ss_network_alpha": "2.0"})
    resize(source, tmp_path / "fp16.safetensors", rank=4)
    resize(source, tmp_path / "bf16.safetensors", rank=4, dtype=torch.bfloat16)
    fp16 = safetensors.torch.load_file(str(tmp_path / "fp16.safetensors"))
    bf16 = safetensors.torch.load_file(str(tmp_path / "bf16.safetensors"))
    assert fp16.keys() == bf16.keys() == original.keys()
    for key, value in original.items():
        assert fp16[key].dtype == torch.float16 and bf16[key].dtype == torch.bfloat16, key
        if key.endswith(".lora_down.weight"):
            assert fp16[key].shape == (4, *value.shape[1:])
        if key.endswith(".alpha"):
            assert float(fp16[key]) == float(value) / 2
    meta = _metadata(tmp_path / "fp16.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "1.0")
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["sshs_model_hash"] != _metadata(tmp_path / "bf16.safetensors")["sshs_model_hash"]


def test_format_report_lists_every_module_and_the_mean(tmp_path, tiny_sd_dir, tiny_lora):
    source, _ = tiny_lora
    report = resize(source, tmp_path / "out.safetensors", rank=4, conv_rank=2, config_dir=tiny_sd_dir)
    text = format_report(report)
    line = next(line for line in text.splitlines() if line.startswith(f"unet.{TO_Q} "))
    row = next(r for r in report.modules if r.name == f"unet.{TO_Q}")
    assert line.split()[1:] == ["8", "→", "4", "2", f"{row.fro_retained:.2%}"]
    assert f"mean {report.mean_fro_retained:.2%}" in text
    assert "60 modules (sd_v1, kohya layout), ranks 4–8 → 2–4 (fixed" in text


def test_outputs_are_never_replaced_without_overwrite(tmp_path, tiny_sd_dir, tiny_lora):
    source, _ = tiny_lora
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    with pytest.raises(UserError, match=r"the file exists; .*--overwrite"):
        resize(source, tmp_path / "out.safetensors", rank=4, config_dir=tiny_sd_dir)
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"
    with pytest.raises(UserError, match="that is an input of this command"):
        resize(source, source, rank=4, overwrite=True, config_dir=tiny_sd_dir)
    resize(source, tmp_path / "out.safetensors", rank=4, overwrite=True, config_dir=tiny_sd_dir)
    assert safetensors.torch.load_file(str(tmp_path / "out.safetensors"))


def test_bad_arguments_are_reported_together(tmp_path, tiny_lora):
    source, _ = tiny_lora
    with pytest.raises(UserError) as err:
        resize(source, tmp_path / "out.safetensors", rank=0, conv_rank=-1, dynamic="sv_fro")
    assert err.value.messages == [
        "--rank 0: give a rank of 1 or more.",
        "--conv-rank -1: give a rank of 1 or more.",
        "--dynamic sv_fro needs --dynamic-param: the fraction of each module's Frobenius norm to keep, "
        "in (0, 1] (e.g. 0.9).",
    ]
    with pytest.raises(UserError, match=r"--dynamic-param 1.5: sv_cumulative takes .* in \(0, 1\]"):
        resize(source, tmp_path / "out.safetensors", rank=4, dynamic="sv_cumulative", dynamic_param=1.5)
    with pytest.raises(UserError, match=r"--dynamic-param 0.5: sv_ratio takes .* 1 or more"):
        resize(source, tmp_path / "out.safetensors", rank=4, dynamic="sv_ratio", dynamic_param=0.5)
    with pytest.raises(UserError, match="--dynamic-param 0.9: give --dynamic too"):
        resize(source, tmp_path / "out.safetensors", rank=4, dynamic_param=0.9)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpus_result(tmp_path, tiny_sd_dir, tiny_lora):
    source, _ = tiny_lora
    args = {"rank": 6, "dynamic": "sv_fro", "dynamic_param": 0.9, "config_dir": tiny_sd_dir}
    cpu = resize(source, tmp_path / "cpu.safetensors", device="cpu", **args)
    cuda = resize(source, tmp_path / "cuda.safetensors", device="cuda", **args)
    assert [r.new_rank for r in cpu.modules] == [r.new_rank for r in cuda.modules]
    a, b = (
        _modules(tmp_path / "cpu.safetensors", tiny_sd_dir),
        _modules(tmp_path / "cuda.safetensors", tiny_sd_dir),
    )
    for name, module in a.items():
        torch.testing.assert_close(b[name].update(), module.update(), rtol=0, atol=1e-6)
