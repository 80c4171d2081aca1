"""`lora-scripts generate` end to end on the tiny model (64x64, 2 steps): files, infotext, grids, errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_scripts.cli import main
from lora_scripts.export.hashes import file_model_hash
from lora_scripts.generation.generate import run_generate
from lora_scripts.generation.infotext import VERSION, parse_infotext, parse_lora_hashes
from lora_scripts.generation.options import GenerateOptions
from lora_scripts.generation.outputs import read_png_infotext

REPO = Path(__file__).resolve().parents[2]
PROMPT = "ancient temple on mountain peak, <lora:ink_painting_v1:0.7>, ink wash painting, misty atmosphere"
NEGATIVE = "modern, cartoon, bright colors, text, signature"


def _generate(base_model, output, prompt, **options):
    values = dict(steps=2, width=64, height=64, seed=7, sampler="euler", progress=False)
    values.update(options)
    return run_generate(GenerateOptions(base_model=str(base_model), prompt=prompt, output=output, **values))


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_cli_writes_numbered_pngs_with_webui_infotext(tiny_file, tiny_dir, lora_dir, tmp_path, capsys):
    out = tmp_path / "renders"
    argv = ["generate", "--base-model", str(tiny_file), "--lora-dir", str(lora_dir), "--prompt", PROMPT]
    argv += ["--base-model-config", str(tiny_dir)]  # the tiny single file is not SD 1.5-sized
    argv += ["--negative-prompt", NEGATIVE, "--steps", "2", "--cfg-scale", "7", "--seed", "42"]
    argv += [
        "--width",
        "64",
        "--height",
        "64",
        "--sampler",
        "Euler a",
        "--num-images",
        "2",
        "--output",
        f"{out}/",
    ]
    assert main(argv) == 0
    assert "Seed: 42\n" in capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000-42.png", "00001-43.png"]
    model_hash = hashlib.sha256(tiny_file.read_bytes()).hexdigest()[:10]
    lora_hash = file_model_hash(lora_dir / "ink_style.safetensors")[:12]
    for name, seed in zip(files, ("42", "43"), strict=True):
        parsed = parse_infotext(read_png_infotext(out / name))
        assert parsed["Prompt"] == PROMPT and parsed["Negative prompt"] == NEGATIVE
        assert (parsed["Steps"], parsed["Sampler"], parsed["CFG scale"], parsed["Seed"]) == (
            "2",
            "Euler a",
            "7",
            seed,
        )
        assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "64")
        assert (parsed["Model hash"], parsed["Model"]) == (model_hash, "tiny-v1")
        assert parse_lora_hashes(parsed["Lora hashes"]) == {"ink_painting_v1": lora_hash}
        assert parsed["Version"] == VERSION
    assert not np.array_equal(_pixels(out / files[0]), _pixels(out / files[1]))


def test_weight_zero_is_the_base_image_and_image_i_uses_seed_plus_i(tiny_dir, lora_dir, tmp_path):
    base = _generate(tiny_dir, tmp_path / "base.png", "a temple, misty", seed=11, num_images=2).files
    zero = _generate(
        tiny_dir,
        tmp_path / "zero.png",
        "a temple, <lora:ink_style:0>, <lora:locon:0:0>, misty",
        lora_dirs=[lora_dir],
        seed=12,
    ).files
    on = _generate(
        tiny_dir, tmp_path / "on.png", "a temple, <lora:ink_style:0.8>, misty", lora_dirs=[lora_dir], seed=12
    )
    assert [p.name for p in base] == ["base-0001.png", "base-0002.png"]
    assert np.array_equal(_pixels(base[1]), _pixels(zero[0]))  # seed 11 + 1 == 12, LoRAs at 0
    assert not np.array_equal(_pixels(base[1]), _pixels(on.files[0]))


def test_folder_numbering_continues_and_never_overwrites(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00007-1.png").write_bytes(b"keep me")
    (out / "notes.txt").write_text("not numbered")
    first = _generate(tiny_dir, out, "a boat", seed=5, num_images=2, steps=1).files
    second = _generate(tiny_dir, out, "a boat", seed=5, steps=1).files
    assert [p.name for p in first + second] == ["00008-5.png", "00009-6.png", "00010-5.png"]
    assert (out / "00007-1.png").read_bytes() == b"keep me"
    assert np.array_equal(_pixels(first[0]), _pixels(second[0]))


def test_lora_weight_grid(tiny_dir, lora_dir, tmp_path):
    out = tmp_path / "grid"
    result = _generate(
        tiny_dir, out, "a temple, <lora:locon:0.7>, misty", lora_dirs=[lora_dir], lora_weights=[0, 0.5, 1.0]
    )
    assert [p.name for p in result.files] == ["00000-7-grid.png"]
    grid = _pixels(result.files[0])
    assert grid.shape[1] == 3 * 64 and 64 < grid.shape[0] < 2 * 64  # one row of 3 cells, a label band
    cells = [grid[:64, 64 * i : 64 * (i + 1)] for i in range(3)]
    assert all(not np.array_equal(cells[i], cells[j]) for i, j in ((0, 1), (1, 2), (0, 2)))
    assert (grid[64:, :] < 128).any(), "the weight labels are drawn under the cells"
    base = _generate(tiny_dir, tmp_path / "base.png", "a temple, misty").files[0]
    assert np.array_equal(cells[0], _pixels(base))  # weight 0 with the same seed is the base image
    parsed = parse_infotext(read_png_infotext(result.files[0]))
    assert parsed["Prompt"] == "a temple, <lora:locon:0.7>, misty" and parsed["Seed"] == "7"
    assert parsed["Lora weights"] == "0, 0.5, 1"


def test_unknown_lora_lists_the_loras_found_before_loading(tiny_dir, lora_dir, tmp_path, capsys):
    argv = [
        "generate",
        "--base-model",
        str(tiny_dir),
        "--lora-dir",
        str(lora_dir),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--prompt", "a cat, <lora:watercolor:0.7>"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "error: <lora:watercolor>: no LoRA named 'watercolor'" in err
    assert "LoRAs found: ink_painting_v1, ink_style, locon, unet-only.v2." in err
    assert not (tmp_path / "o").exists()


def test_every_mistake_is_reported_at_once(tiny_dir, tmp_path, capsys):
    argv = ["generate", "--base-model", str(tmp_path / "missing.safetensors"), "--prompt", "a <lora:x:high>"]
    argv += ["--steps", "0", "--width", "65", "--sampler", "plms", "--lora-weights", "0,1"]
    argv += ["--negative-prompt", "<lora:y:1>", "--output", str(tmp_path / "o.jpg")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    expected = [
        "weight 'high' is not a number",
        "--negative-prompt: LoRA tags are applied from --prompt only",
        "unknown sampler 'plms'",
        "images are written as PNG",
        "missing.safetensors' does not exist",
        "--steps: 0 is out of range",
        "--width: 65 must be a positive multiple of 8",
    ]
    assert len(lines) == len(expected), lines
    for fragment in expected:
        assert any(fragment in line for line in lines), fragment
    assert (
        main(["generate", "--base-model", str(tiny_dir), "--prompt", "a cat", "--lora-weights", "0,1"]) == 2
    )
    assert "needs exactly one <lora:NAME> tag in --prompt (found 0)" in capsys.readouterr().err
    assert (
        main(["generate", "--base-model", str(tiny_dir), "--prompt", "<lora:a>", "--lora-weights", "0,x"])
        == 2
    )
    assert "--lora-weights: 'x' is not a number" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["dpm++ 2m karras", "ddim"])
def test_other_samplers_run(tiny_dir, tmp_path, sampler):
    result = _generate(tiny_dir, tmp_path / "s.png", "a cat", sampler=sampler, steps=2)
    assert parse_infotext(read_png_infotext(result.files[0]))["Sampler"] in ("DPM++ 2M Karras", "DDIM")


def test_installed_command_in_a_subprocess(tiny_dir, lora_dir, tmp_path):
    out = tmp_path / "one.png"
    cmd = [
        sys.executable,
        "-m",
        "lora_scripts",
        "generate",
        "--base-model",
        str(tiny_dir),
        "--lora-dir",
        str(lora_dir),
    ]
    cmd += ["--prompt", "a temple, <lora:locon:0.6:0.9>", "--steps", "1", "--width", "64", "--height", "64"]
    cmd += ["--seed", "-1", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seed = proc.stdout.splitlines()[0].removeprefix("Seed: ").removesuffix(" (random)")
    assert proc.stdout.startswith(f"Seed: {seed} (random)")
    parsed = parse_infotext(read_png_infotext(out))
    assert parsed["Seed"] == seed and parsed["Sampler"] == "Euler a" and parsed["Model"] == "tiny-sd"
