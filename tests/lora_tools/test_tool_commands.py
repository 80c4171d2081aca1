"""The post-training tools through `lora-scripts` itself: arguments, output lines, exit codes."""

from __future__ import annotations

import safetensors.torch
import torch

from lora_scripts.cli import main
from lora_scripts.lora_tools.files import open_lora
from lora_scripts.models.meta_modules import meta_model
from tests.helpers.synthetic_lora import synthetic_kohya


def _lora(path, base, **options):
    safetensors.torch.save_file(synthetic_kohya(base, **options), str(path))
    return path


def test_merge_resize_and_inspect_from_the_command_line(tmp_path, tiny_sd_dir, capsys):
    base = meta_model("sd_v1", tiny_sd_dir)
    a = _lora(tmp_path / "a.safetensors", base, rank=4, seed=1, dtype=torch.float32)
    b = _lora(tmp_path / "b.safetensors", base, rank=4, seed=2, dtype=torch.float32)
    config = ["--base-config", str(tiny_sd_dir)]
    merged = tmp_path / "ab.safetensors"
    assert main(["merge", "--lora", f"{a}:0.6", "--lora", f"{b}:-0.4", "-o", str(merged), *config]) == 0
    assert "ranks 8 (concatenated: exact)." in capsys.readouterr().out
    opened = {m.name: m for m in open_lora(merged, config_dir=tiny_sd_dir).model.modules}
    first = {m.name: m for m in open_lora(a, config_dir=tiny_sd_dir).model.modules}
    second = {m.name: m for m in open_lora(b, config_dir=tiny_sd_dir).model.modules}
    for name, module in opened.items():
        expected = 0.6 * first[name].update() - 0.4 * second[name].update()
        torch.testing.assert_close(module.update(), expected, rtol=1e-5, atol=1e-6)

    small = tmp_path / "ab_r2.safetensors"
    assert main(["resize", str(merged), "-o", str(small), "--rank", "2", *config]) == 0
    assert "ab_r2.safetensors" in capsys.readouterr().out
    assert {m.rank for m in open_lora(small, config_dir=tiny_sd_dir).model.modules} == {2}

    assert main(["inspect", str(small), *config]) == 0
    report = capsys.readouterr().out
    assert "resize" in report and "merge" in report  # the history of both tools

    assert main(["merge", "--lora", f"{a}:x", "-o", str(tmp_path / "c.safetensors"), *config]) == 2
    assert "'x' is not a number" in capsys.readouterr().err
    assert (
        main(["resize", str(a), "-o", str(tmp_path / "d.safetensors"), "--rank", "2", "--dynamic", "sv_fro"])
        == 2
    )
    assert "--dynamic sv_fro needs --dynamic-param" in capsys.readouterr().err


def test_merge_into_a_checkpoint_and_extract_it_back_from_the_command_line(tmp_path, tiny_sd_dir, capsys):
    from lora_scripts.models.tiny import build_tiny_sd_components
    from tests.helpers.compvis import write_compvis_checkpoint

    tiny = build_tiny_sd_components()
    base_file = write_compvis_checkpoint(
        tmp_path / "base.safetensors", tiny.unet, tiny.vae, tiny.text_encoder
    )
    base = meta_model("sd_v1", tiny_sd_dir)
    lora = _lora(tmp_path / "a.safetensors", base, rank=4, dtype=torch.float32, odd_alpha_every=10**6)
    config = ["--base-config", str(tiny_sd_dir)]
    merged = tmp_path / "merged.safetensors"
    args = ["merge", "--base", str(base_file), "--lora", f"{lora}:1:0.5", "-o", str(merged), *config]
    assert main(args) == 0
    assert "LoRA modules fused into" in capsys.readouterr().out
    assert main([*args, "--rank", "4"]) == 2  # a LoRA-merge option with --base
    assert "--rank: only for merging LoRAs into one LoRA" in capsys.readouterr().err

    extracted = tmp_path / "extracted.safetensors"
    extract = ["extract", "--base", str(base_file), "--tuned", str(merged), "-o", str(extracted)]
    assert main([*extract, "--rank", "4", "--precision", "fp32", "--min-diff", "0", *config]) == 0
    assert "Frobenius norm kept" in capsys.readouterr().out
    got = {m.name: m for m in open_lora(extracted, config_dir=tiny_sd_dir).model.modules}
    for module in open_lora(lora, config_dir=tiny_sd_dir).model.modules:
        weight = 0.5 if module.component == "unet" else 1.0  # PATH:TE:UNET
        torch.testing.assert_close(got[module.name].update(), weight * module.update(), rtol=1e-3, atol=1e-4)


def test_pickle_inputs_need_allow_pickle(tmp_path, tiny_sd_dir, capsys):
    base = meta_model("sd_v1", tiny_sd_dir)
    tensors = synthetic_kohya(base, rank=2, dtype=torch.float32)
    torch.save(tensors, tmp_path / "old.pt")
    out = tmp_path / "new.safetensors"
    config = ["--base-config", str(tiny_sd_dir)]
    assert main(["convert", str(tmp_path / "old.pt"), "-o", str(out), "--to", "kohya", *config]) == 2
    assert "is a pickle file, refused" in capsys.readouterr().err and not out.exists()
    assert (
        main(
            ["convert", str(tmp_path / "old.pt"), "-o", str(out), "--to", "kohya", "--allow-pickle", *config]
        )
        == 0
    )
    written = safetensors.torch.load_file(str(out))
    assert written.keys() == tensors.keys() and all(torch.equal(written[k], v) for k, v in tensors.items())


def test_a_lora_given_as_the_base_checkpoint_is_named_by_its_option(tmp_path, capsys):
    lora = _lora(tmp_path / "a.safetensors", meta_model("sd_v1"), rank=2, text_encoder=False)
    out = tmp_path / "out.safetensors"
    assert main(["merge", "--base", str(lora), "--lora", str(lora), "-o", str(out)]) == 2
    assert f"error: --base: '{lora}' is a LoRA, not a base model" in capsys.readouterr().err
    assert main(["extract", "--base", str(lora), "--tuned", str(lora), "-o", str(out), "--rank", "2"]) == 2
    assert f"error: --base: '{lora}' is a LoRA, not a base model" in capsys.readouterr().err
    assert not out.exists()
