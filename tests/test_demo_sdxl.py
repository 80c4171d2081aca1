"""`lora-scripts demo --family sdxl`: the demo on the tiny SDXL model, through the CLI entry point."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from lora_scripts.cli import build_parser
from lora_scripts.demo import DEMO_FAMILIES

LORA = "demo/output/ink_painting_demo_sdxl/ink_painting_demo_sdxl.safetensors"
CONFIG = "demo/configs/ink_painting_demo_sdxl.yaml"


def _lora_scripts(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lora_scripts", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def sdxl_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The folder the SDXL demo ran in and its closing lines (from "Left in demo to start from:")."""
    cwd = tmp_path_factory.mktemp("sdxl_demo")
    demo = _lora_scripts(["demo", "--dir", "demo", "--steps", "2", "--family", "sdxl"], cwd=cwd)
    assert demo.returncode == 0, demo.stderr[-3000:]
    lines = demo.stdout.splitlines()
    return cwd, lines[lines.index("Left in demo to start from:") :]


def test_the_cli_offers_every_demo_family() -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).family == "sd"
    for family in DEMO_FAMILIES:
        assert parser.parse_args(["demo", "--family", family]).family == family


def test_sdxl_demo_names_its_own_files(sdxl_demo: tuple[Path, list[str]]) -> None:
    cwd, lines = sdxl_demo
    assert lines[1].split()[:2] == ["model", "demo/models/tiny-sdxl"] and "SDXL" in lines[1]
    assert lines[2].split()[:2] == ["dataset", "demo/data/ink_painting"]
    assert lines[3].split() == ["config", CONFIG]
    assert shlex.split(lines[5]) == ["lora-scripts", "check", "--config", CONFIG]
    assert shlex.split(lines[6]) == ["lora-scripts", "train", "--config", CONFIG]
    generate = shlex.split(lines[7])
    assert generate[generate.index("--base-model") + 1] == "demo/models/tiny-sdxl"
    assert f"<lora:{LORA}:1>" in generate[generate.index("--prompt") + 1]
    assert (cwd / "demo/models/tiny-sdxl/text_encoder_2/config.json").is_file()
    assert not (cwd / "demo/models/tiny-sd").exists()  # only the family asked for is built


def test_sdxl_demo_lora_has_the_keys_its_config_asks_for(sdxl_demo: tuple[Path, list[str]]) -> None:
    cwd, _ = sdxl_demo
    config = yaml.safe_load((cwd / CONFIG).read_text(encoding="utf-8"))
    assert config["resolution"] == 64 and config["train_text_encoder"] is True
    te_rates = config["text_encoder_lr"]
    expected = {"lora_unet"} | {f"lora_te{i}" for i, rate in enumerate(te_rates, start=1) if rate > 0}
    assert expected == {"lora_unet", "lora_te1"}  # bigG stays frozen (rate 0)

    with safe_open(cwd / LORA, framework="pt") as lora:
        keys = list(lora.keys())
        metadata = lora.metadata()
    assert {key.split("_", 2)[0] + "_" + key.split("_", 2)[1] for key in keys} == expected
    assert any(key.startswith("lora_unet_input_blocks_") for key in keys)  # sgm names, as sd-scripts
    assert any(key.startswith("lora_te1_text_model_encoder_layers_") for key in keys)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_text_encoder_lr"] == "[0.0005, 0.0]"


def test_sdxl_demo_config_checks(sdxl_demo: tuple[Path, list[str]]) -> None:
    cwd, _ = sdxl_demo
    checked = _lora_scripts(["check", "--config", CONFIG], cwd=cwd)
    assert checked.returncode == 0 and "Ready to train" in checked.stdout, checked.stderr[-3000:]
    assert "SDXL" in checked.stdout


def test_sdxl_demo_generate_command_renders(sdxl_demo: tuple[Path, list[str]]) -> None:
    cwd, lines = sdxl_demo
    generate = shlex.split(lines[7])
    rendered = _lora_scripts([*generate[1:], "--steps", "2", "--seed", "1"], cwd=cwd)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert (cwd / "demo" / "renders" / "00000-1.png").is_file()
