"""`lora-scripts demo` ends by naming what it left (model, dataset, config) and commands that work on them."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lora_scripts(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lora_scripts", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_demo_names_what_it_left_and_its_commands_run(tmp_path: Path) -> None:
    demo = _lora_scripts(["demo", "--dir", "demo", "--steps", "2"], cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-3000:]
    lines = demo.stdout.splitlines()
    start = lines.index("Left in demo to start from:")
    assert lines[start + 1].split()[:2] == ["model", "demo/models/tiny-sd"]
    assert lines[start + 2].split()[:2] == ["dataset", "demo/data/ink_painting"]
    assert lines[start + 3].split() == ["config", "demo/configs/ink_painting_demo.yaml"]
    assert (tmp_path / "demo/models/tiny-sd/model_index.json").is_file()
    assert (tmp_path / "demo/data/ink_painting/metadata.csv").is_file()
    assert (tmp_path / "demo/configs/ink_painting_demo.yaml").is_file()

    check, train, generate = (shlex.split(line) for line in lines[start + 5 : start + 8])
    assert check == ["lora-scripts", "check", "--config", "demo/configs/ink_painting_demo.yaml"]
    assert train == ["lora-scripts", "train", "--config", "demo/configs/ink_painting_demo.yaml"]
    assert (
        "<lora:demo/output/ink_painting_demo/ink_painting_demo.safetensors:1>"
        in generate[generate.index("--prompt") + 1]
    )
    quick_start = (REPO / "README.md").read_text(encoding="utf-8").split("## Quick start", 1)[1]
    quick_start = quick_start.split("\n## ", 1)[0]
    for line in lines[start + 5 : start + 7]:  # check and train as the README shows them
        assert line.strip() in quick_start
    for path in ("demo/models/tiny-sd", "demo/data/ink_painting", "demo/configs/ink_painting_demo.yaml"):
        assert f"`{path}`" in quick_start
    assert "<lora:demo/output/ink_painting_demo/ink_painting_demo.safetensors:1>" in quick_start

    checked = _lora_scripts(check[1:], cwd=tmp_path)
    assert checked.returncode == 0 and "Ready to train" in checked.stdout, checked.stderr[-3000:]
    rendered = _lora_scripts([*generate[1:], "--steps", "2", "--seed", "1"], cwd=tmp_path)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert (tmp_path / "demo" / "renders" / "00000-1.png").is_file()
