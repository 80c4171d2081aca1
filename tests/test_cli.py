"""CLI entry points: a user mistake gives one line per problem, exit code 2, no traceback, no files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_scripts.cli import main
from tests.training.conftest import make_dataset, write_config

REPO = Path(__file__).resolve().parents[1]


def _run_train_py(cwd: Path, config: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", config],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_config_errors_all_reported_without_traceback(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "bad.yaml").write_text(
        'train_data_dir: "./data"\n'
        'base_model: "./models/v1-5-pruned.safetensors"\n'
        "lora_rank: 0\n"
        "learnig_rate: 2e-4\n"
        'output_dir: "./output/x"\n'
    )
    proc = _run_train_py(tmp_path, "bad.yaml")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 3, proc.stderr
    assert "error: bad.yaml: learnig_rate: unknown key (did you mean 'learning_rate'?)" in lines
    assert any(line.startswith("error: bad.yaml: lora_rank: 0 is out of range") for line in lines)
    assert any("base_model" in line and "./models/v1-5-pruned.safetensors" in line for line in lines)
    assert not (tmp_path / "output").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml" in err


def test_dataset_problems_stop_before_the_model_loads(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, n=3)
    (data / "img_1.png").unlink()  # listed in metadata.csv but gone
    (data / "img_2.png").write_bytes(b"not an image")
    (data / "extra.png").write_bytes((data / "img_0.png").read_bytes())  # no caption row
    cfg = write_config(
        tmp_path / "c.yaml",
        train_data_dir=str(data),
        metadata_path=str(data / "metadata.csv"),
        # an empty diffusers folder: loading it would fail, so reaching the model is detectable
        base_model=str(_fake_model_dir(tmp_path)),
        output_dir=str(tmp_path / "out"),
    )
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "img_1.png" in err and "img_2.png" in err and "extra.png" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _fake_model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "fake_model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "--config" in capsys.readouterr().out or argv == ["--help"]


def test_demo_through_the_installed_command(tmp_path):
    """`lora-scripts demo` (the README's first command) trains end to end and leaves the LoRA files."""
    import shutil

    exe = shutil.which("lora-scripts")
    cmd = [exe] if exe else [sys.executable, "-m", "lora_scripts"]
    proc = subprocess.run(
        [*cmd, "demo", "--dir", str(tmp_path / "demo"), "--steps", "6"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo" / "output" / "ink_painting_demo"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "ink_painting_demo-step00000002.safetensors",
        "ink_painting_demo-step00000004.safetensors",
        "ink_painting_demo-step00000006.safetensors",
        "ink_painting_demo.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    assert (out / "config.yaml").is_file()
    assert "pytorch_lora_weights.safetensors" in proc.stdout
