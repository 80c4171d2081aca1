"""`merge --base`: LoRAs fused into a single-file checkpoint in its own layout. Every adapted weight becomes
W + m·(alpha/rank)·up@down (OpenCLIP's fused q/k/v rows included), every other tensor is written through
bit for bit, and the result loads and runs as the base with the LoRA fused by diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lora_scripts.errors import UserError
from lora_scripts.export.hashes import file_model_hash
from lora_scripts.lora_tools.files import HISTORY_KEY, open_lora
from lora_scripts.lora_tools.merge_checkpoint import MergeInput, merge_into_checkpoint, parse_merge_input
from lora_scripts.models.checkpoint_layout import CheckpointLayout
from lora_scripts.models.meta_modules import meta_model
from lora_scripts.models.registry import load_family
from lora_scripts.models.tiny import build_tiny_sd, build_tiny_sd_components, build_tiny_sdxl_components
from tests.helpers.compvis import to_compvis_state_dict, write_compvis_checkpoint
from tests.helpers.sgm import write_sgm_checkpoint
from tests.helpers.synthetic_lora import synthetic_kohya

FP32 = {"rtol": 1e-6, "atol": 1e-6}  # one fp32 sum of values around 1e-2 .. 1


@pytest.fixture(scope="module")
def tiny_sd2_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "tiny-sd2", version="sd_v2")


@pytest.fixture
def folders(tiny_sd_dir, tiny_sd2_dir, tiny_sdxl_dir):
    return {"sd_v1": tiny_sd_dir, "sd_v2": tiny_sd2_dir, "sdxl": tiny_sdxl_dir}


def _base_file(path, version, *, dtype=None, extra=None):
    """The tiny model of `version` (seed 0, as the fixtures' folders) as the single file users have."""
    if version == "sdxl":
        tiny = build_tiny_sdxl_components()
        modules = (tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
        return write_sgm_checkpoint(path, *modules, dtype=dtype, extra=extra)
    tiny = build_tiny_sd_components(version=version)
    kind = "open_clip" if version == "sd_v2" else "clip"
    return write_compvis_checkpoint(
        path, tiny.unet, tiny.vae, tiny.text_encoder, text_encoder_kind=kind, extra=extra
    )


def _lora_file(path, folder, version, *, seed=0, conv_rank=2, metadata=None, odd_alpha_every=5):
    """A random fp32 LoRA on the tiny model's attention (and 3x3 convs: conv_rank), text encoders too."""
    lora = synthetic_kohya(
        meta_model(version, folder),
        conv_rank=conv_rank,
        odd_alpha_every=odd_alpha_every,
        dtype=torch.float32,
        seed=seed,
    )
    safetensors.torch.save_file(lora, str(path), metadata=metadata or {})
    return path


def _read(path):
    with safe_open(str(path), framework="pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}, dict(fh.metadata() or {})


def _check_merged(base_path, merged_path, parts, folder, version):
    """Every adapted weight is W + Σ m·update (fp32, then the stored dtype); every other tensor is the
    base's, bit for bit. parts: (lora path, te weight, unet weight). Returns the module names checked."""
    base, _ = _read(base_path)
    merged, _ = _read(merged_path)
    assert merged.keys() == base.keys()
    layout = CheckpointLayout.of(meta_model(version, folder))
    expected = {key: value.float().clone() for key, value in base.items()}
    changed, names = set(), []
    for path, te, unet in parts:
        for module in open_lora(path, config_dir=folder).model.modules:
            where = layout[module.name]
            weight = unet if module.component == "unet" else te
            where.add(expected[where.key], weight * module.update())
            names.append(module.name)
            if weight:
                changed.add(where.key)
    for key, value in merged.items():
        if key in changed:
            assert value.dtype == base[key].dtype, key
            tolerance = FP32 if value.dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-3}
            torch.testing.assert_close(value.float(), expected[key], **tolerance, msg=key)
            assert not torch.equal(value, base[key]), key
        else:
            assert value.dtype == base[key].dtype and torch.equal(value, base[key]), key
    return names


@pytest.mark.parametrize(
    ("version", "dtype"),
    [("sd_v1", None), ("sd_v2", None), ("sdxl", torch.float16)],
    ids=["sd15-compvis", "sd2-openclip", "sdxl-sgm-fp16"],
)
def test_each_adapted_weight_is_w_plus_the_weighted_update(tmp_path, folders, version, dtype):
    folder = folders[version]
    base = _base_file(tmp_path / "base.safetensors", version, dtype=dtype)
    a = _lora_file(tmp_path / "a.safetensors", folder, version, seed=1)
    b = _lora_file(tmp_path / "b.safetensors", folder, version, seed=2, conv_rank=None)
    out = tmp_path / "merged.safetensors"
    inputs = [MergeInput(a, 0.7, 0.7), MergeInput(b, -0.4, 0.25)]
    report = merge_into_checkpoint(base, inputs, out, config_dir=folder)
    names = _check_merged(base, out, [(a, 0.7, 0.7), (b, -0.4, 0.25)], folder, version)
    assert report.version == version and report.modules == len(names)
    if version != "sd_v1":  # OpenCLIP: q, k and v are rows of one in_proj_weight
        encoder = "text_encoder_2" if version == "sdxl" else "text_encoder"
        qkv = [n for n in names if n.startswith(f"{encoder}.") and n.endswith(("q_proj", "k_proj", "v_proj"))]
        assert len(qkv) == 2 * 3 * (3 if version == "sdxl" else 2)  # two LoRAs, q/k/v, every layer


def test_text_encoder_and_unet_weights_apply_separately(tmp_path, tiny_sd_dir):
    base = _base_file(tmp_path / "base.safetensors", "sd_v1")
    lora = _lora_file(tmp_path / "a.safetensors", tiny_sd_dir, "sd_v1")
    out = tmp_path / "merged.safetensors"
    merge_into_checkpoint(
        base, [MergeInput(lora, te_weight=0.0, unet_weight=1.5)], out, config_dir=tiny_sd_dir
    )
    merged, _ = _read(out)
    before, _ = _read(base)
    text = [k for k in before if k.startswith("cond_stage_model.")]
    assert text and all(torch.equal(merged[k], before[k]) for k in text)  # te weight 0: untouched
    _check_merged(base, out, [(lora, 0.0, 1.5)], tiny_sd_dir, "sd_v1")
    merge_into_checkpoint(
        base, [MergeInput(lora, te_weight=-0.3, unet_weight=0.0)], out, config_dir=tiny_sd_dir, overwrite=True
    )
    merged, _ = _read(out)
    unet = [k for k in before if k.startswith("model.diffusion_model.")]
    assert all(torch.equal(merged[k], before[k]) for k in unet)
    _check_merged(base, out, [(lora, -0.3, 0.0)], tiny_sd_dir, "sd_v1")


def _unet_inputs(version):
    generator = torch.Generator().manual_seed(0)
    width = 80 if version == "sdxl" else 32
    kwargs = {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 77, width, generator=generator),
    }
    if version == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 40, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    return kwargs


@pytest.mark.parametrize("version", ["sd_v1", "sdxl"])
def test_merged_file_runs_as_the_base_with_the_lora_fused_by_diffusers(tmp_path, folders, version):
    from diffusers import DiffusionPipeline

    folder = folders[version]
    base = _base_file(tmp_path / "base.safetensors", version)
    # One alpha for all modules: diffusers' kohya loader (0.42) drops per-module alphas (its alpha_pattern
    # keys do not match the layers), which tests/lora_tools/test_convert.py covers in the diffusers layout.
    lora = _lora_file(tmp_path / "a.safetensors", folder, version, conv_rank=None, odd_alpha_every=10**9)
    out = tmp_path / "merged.safetensors"
    merge_into_checkpoint(base, [MergeInput(lora, 0.8, 0.8)], out, config_dir=folder)

    pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    parts = ["unet", "text_encoder", *(["text_encoder_2"] if version == "sdxl" else [])]
    pipe.load_lora_weights(str(lora), adapter_name="a")
    pipe.fuse_lora(components=parts, lora_scale=0.8, adapter_names=["a"])
    pipe.unload_lora_weights()
    family = load_family(str(out), config_dir=folder)

    ids = torch.tensor([[0, 320, 1125, 539, 2] + [1] * 72])
    with torch.no_grad():
        for part in parts:
            ours, theirs = getattr(family, part), getattr(pipe, part)
            for key, value in theirs.state_dict().items():
                torch.testing.assert_close(ours.state_dict()[key], value, **FP32, msg=f"{part}.{key}")
            if part != "unet":
                torch.testing.assert_close(ours(ids)[0], theirs(ids)[0], rtol=1e-5, atol=1e-5)
        inputs = _unet_inputs(version)
        torch.testing.assert_close(
            family.unet(**inputs).sample, pipe.unet(**inputs).sample, rtol=1e-5, atol=1e-5
        )


def test_every_other_tensor_and_the_metadata_pass_through(tmp_path, tiny_sd_dir):
    """EMA weights, v-prediction / zero-SNR markers and unknown keys are written as they were; the base's
    metadata is kept and a history entry names the base and the LoRA with weights and hashes."""
    tiny = build_tiny_sd_components()
    state = to_compvis_state_dict(
        tiny.unet.state_dict(), tiny.vae.state_dict(), tiny.text_encoder.state_dict(), layers_per_block=1
    )
    extra = {
        "v_pred": torch.tensor([]),
        "ztsnr": torch.tensor([]),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        "model_ema.diffusion_modelinput_blocks00weight": torch.randn(32, 4, 3, 3).half(),
        "some.unknown.mask": torch.tensor([True, False]),
    }
    base = tmp_path / "base.safetensors"
    base_meta = {"format": "pt", "modelspec.title": "tiny", "sshs_model_hash": "stale"}
    safetensors.torch.save_file({k: v.contiguous() for k, v in {**state, **extra}.items()}, base, base_meta)
    lora = _lora_file(tmp_path / "a.safetensors", tiny_sd_dir, "sd_v1", metadata={"sshs_model_hash": "x"})
    out = tmp_path / "merged.safetensors"
    merge_into_checkpoint(base, [MergeInput(lora, 0.5, 0.75)], out, config_dir=tiny_sd_dir)
    _check_merged(base, out, [(lora, 0.5, 0.75)], tiny_sd_dir, "sd_v1")
    merged, meta = _read(out)
    for key, value in extra.items():
        assert merged[key].dtype == value.dtype and torch.equal(merged[key], value), key
    assert meta["format"] == "pt" and meta["modelspec.title"] == "tiny"
    assert meta["sshs_model_hash"] == file_model_hash(out)  # the merged file's own, not the base's
    (entry,) = json.loads(meta[HISTORY_KEY])
    assert entry["tool"] == "merge"
    assert [(i["file"], i["weight"], i["sshs_model_hash"]) for i in entry["inputs"]] == [
        ("base.safetensors", None, file_model_hash(base)),
        ("a.safetensors", 0.75, file_model_hash(lora)),
    ]
    assert entry["params"]["te_weights"] == [0.5] and entry["params"]["unet_weights"] == [0.75]


def test_precision_casts_every_floating_point_tensor(tmp_path, tiny_sd_dir):
    base = _base_file(tmp_path / "base.safetensors", "sd_v1")
    lora = _lora_file(tmp_path / "a.safetensors", tiny_sd_dir, "sd_v1")
    out = tmp_path / "merged.safetensors"
    merge_into_checkpoint(base, [MergeInput(lora)], out, dtype=torch.bfloat16, config_dir=tiny_sd_dir)
    merged, _ = _read(out)
    fp32 = tmp_path / "fp32.safetensors"
    merge_into_checkpoint(base, [MergeInput(lora)], fp32, config_dir=tiny_sd_dir)
    reference, _ = _read(fp32)
    for key, value in merged.items():
        if reference[key].is_floating_point():
            assert value.dtype == torch.bfloat16 and torch.equal(value, reference[key].bfloat16()), key
        else:  # position_ids
            assert torch.equal(value, reference[key]), key


def test_an_existing_output_is_kept_without_overwrite(tmp_path, tiny_sd_dir):
    base = _base_file(tmp_path / "base.safetensors", "sd_v1")
    lora = _lora_file(tmp_path / "a.safetensors", tiny_sd_dir, "sd_v1")
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="the file exists; give another name, or add --overwrite"):
        merge_into_checkpoint(base, [MergeInput(lora)], out, config_dir=tiny_sd_dir)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(UserError, match="that is an input of this command"):
        merge_into_checkpoint(base, [MergeInput(lora)], base, config_dir=tiny_sd_dir, overwrite=True)
    merge_into_checkpoint(base, [MergeInput(lora)], out, config_dir=tiny_sd_dir, overwrite=True)
    _check_merged(base, out, [(lora, 1.0, 1.0)], tiny_sd_dir, "sd_v1")


def test_a_pickle_base_needs_allow_pickle(tmp_path, tiny_sd_dir):
    ckpt = _base_file(tmp_path / "base.ckpt", "sd_v1")
    lora = _lora_file(tmp_path / "a.safetensors", tiny_sd_dir, "sd_v1")
    out = tmp_path / "merged.safetensors"
    with pytest.raises(UserError, match=r"a pickle checkpoint is refused.*\(--allow-pickle\)"):
        merge_into_checkpoint(ckpt, [MergeInput(lora)], out, config_dir=tiny_sd_dir)
    assert not out.exists()
    merge_into_checkpoint(ckpt, [MergeInput(lora)], out, allow_pickle=True, config_dir=tiny_sd_dir)
    safetensors_base = _base_file(tmp_path / "base.safetensors", "sd_v1")
    _check_merged(safetensors_base, out, [(lora, 1.0, 1.0)], tiny_sd_dir, "sd_v1")


def test_a_lora_for_another_version_is_refused(tmp_path, tiny_sd_dir, tiny_sdxl_dir):
    base = _base_file(tmp_path / "xl.safetensors", "sdxl")
    lora = _lora_file(tmp_path / "sd.safetensors", tiny_sd_dir, "sd_v1")
    with pytest.raises(UserError) as caught:
        merge_into_checkpoint(base, [MergeInput(lora)], tmp_path / "o.safetensors", config_dir=tiny_sdxl_dir)
    assert caught.value.messages == [
        f"--lora {lora} is an SD 1.x/2.x LoRA and --base {base} an SDXL checkpoint; merge a LoRA into the "
        "kind of model it was made for."
    ]
    sd1 = _lora_file(
        tmp_path / "v1.safetensors", tiny_sd_dir, "sd_v1", metadata={"ss_base_model_version": "sd_v1"}
    )
    sd2_base = _base_file(tmp_path / "sd2.safetensors", "sd_v2")
    with pytest.raises(UserError, match=r"is an SD 1\.x LoRA and --base .* an SD 2\.x checkpoint"):
        merge_into_checkpoint(sd2_base, [MergeInput(sd1)], tmp_path / "o.safetensors", config_dir=tiny_sd_dir)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_base_without_the_layer_is_named_before_anything_is_written(tmp_path, tiny_sd_dir):
    base = _base_file(tmp_path / "base.safetensors", "sd_v1")
    tensors, _ = _read(base)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    del tensors[key]
    safetensors.torch.save_file(tensors, base)
    lora = _lora_file(tmp_path / "a.safetensors", tiny_sd_dir, "sd_v1")
    with pytest.raises(UserError, match=rf"--base {base}: the file has no '{key}', where unet\.down_blocks"):
        merge_into_checkpoint(base, [MergeInput(lora)], tmp_path / "o.safetensors", config_dir=tiny_sd_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "base.safetensors"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a.safetensors", MergeInput(Path("a.safetensors"))),
        ("a.safetensors:0.7", MergeInput(Path("a.safetensors"), 0.7, 0.7)),
        ("a.safetensors:0.5:-1", MergeInput(Path("a.safetensors"), 0.5, -1.0)),
        (r"C:\loras\a.safetensors:1e-1", MergeInput(Path(r"C:\loras\a.safetensors"), 0.1, 0.1)),
        (r"C:\loras\a.safetensors", MergeInput(Path(r"C:\loras\a.safetensors"))),
    ],
)
def test_lora_specs_read_as_a1111_writes_them(spec, expected):
    assert parse_merge_input(spec) == expected


def test_a_weight_that_is_not_a_number_is_named():
    with pytest.raises(UserError, match="--lora a.safetensors:x: 'x' is not a number"):
        parse_merge_input("a.safetensors:x")
