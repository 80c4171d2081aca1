"""`lora-scripts label` and `tools/auto_label.py` end to end with a tiny random BLIP (real transformers)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lora_scripts.captioning.blip import load_blip
from lora_scripts.cli import main
from lora_scripts.data import collect_dataset, load_rgb
from tests.captioning.helpers import label, write_images

REPO = Path(__file__).resolve().parents[2]
SUFFIX = ", ink wash painting, monochrome, traditional Chinese art"


def read_csv(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8", newline="") as f:
        return {row["file_name"]: row["text"] for row in csv.DictReader(f)}


def run_auto_label(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "auto_label.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_auto_label_script_captions_every_image(tiny_blip, tmp_path):
    data = tmp_path / "ink_painting"
    write_images(data, ["001.jpg", "002.png", "003.webp"])
    proc = run_auto_label(
        tmp_path,
        *("--input", "ink_painting", "--output", "ink_painting/metadata.csv", "--model", str(tiny_blip)),
        *("--max-new-tokens", "6", "--trigger", "inkstyle", "--prefix", "art of ", "--suffix", SUFFIX),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    captions = read_csv(data / "metadata.csv")
    assert sorted(captions) == ["001.jpg", "002.png", "003.webp"]
    for caption in captions.values():
        assert caption.startswith("inkstyle, art of ") and caption.endswith(SUFFIX)
        assert caption.removeprefix("inkstyle, art of ").removesuffix(SUFFIX).strip()  # BLIP's own words
    assert "Captioned 3 images with blip" in proc.stdout
    assert "img/s" in proc.stderr  # the progress bar
    # The trainer reads what the labeller wrote.
    assert [item.caption for item in collect_dataset(data, data / "metadata.csv")] == list(captions.values())


def test_cli_greedy_captions_are_deterministic_and_batch_independent(tiny_blip, tmp_path, capsys):
    names = [f"{i}.png" for i in range(5)]
    write_images(tmp_path / "a", names)
    write_images(tmp_path / "b", names)
    assert label(tiny_blip, tmp_path / "a", "--batch-size", "2") == 0
    assert label(tiny_blip, tmp_path / "b", "--batch-size", "8", "--device", "cpu") == 0
    first, second = read_csv(tmp_path / "a" / "metadata.csv"), read_csv(tmp_path / "b" / "metadata.csv")
    assert first == second and all(first.values())
    assert len(set(first.values())) > 1  # the captions depend on the image
    out = capsys.readouterr().out
    assert "Captioned 5 images with blip" in out and "Most frequent words:" in out

    # The captioner on its own: one image at a time gives the batch's captions.
    captioner = load_blip(str(tiny_blip), max_new_tokens=6)
    images = [load_rgb(tmp_path / "a" / name) for name in names]
    one_by_one = [captioner.caption([img])[0] for img in images]
    assert captioner.caption(images) == one_by_one == list(first.values())


def test_beam_search_runs(tiny_blip, tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    assert label(tiny_blip, tmp_path, "--num-beams", "3") == 0
    assert all(read_csv(tmp_path / "metadata.csv").values())


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE=1", "hub unreachable"])
def test_missing_model_offline_gives_one_message(network, tmp_path, monkeypatch, capsys):
    """An empty Hugging Face cache and no hub: one `error:` line with the download command, exit 2."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    if network == "HF_HUB_OFFLINE=1":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # a refused connection, as on a machine without internet: the cache is tried instead
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    write_images(tmp_path / "data", ["a.png"])
    assert main(["label", "--input", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "hf download Salesforce/blip-image-captioning-base" in errors[0]
    assert "--model <folder>" in errors[0]
    assert not (tmp_path / "data" / "metadata.csv").exists()


def test_model_option_mistakes(tmp_path, capsys):
    write_images(tmp_path, ["a.png"])
    assert label(tmp_path / "no_such_model", tmp_path) == 2
    assert "no_such_model' not found" in capsys.readouterr().err
    (tmp_path / "not_a_model").mkdir()
    assert label(tmp_path / "not_a_model", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "is not a BLIP captioning model folder" in err
    assert label(tmp_path / "not_a_model", tmp_path, "--device", "cuda:7") == 2
    assert "--device: 'cuda:7'" in capsys.readouterr().err


def test_wd14_captioner_through_label(tmp_path, capsys):
    """`--captioner wd14` goes through the WD14 factory with the tag options; an empty tag list is skipped."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tests.captioning.wd14_fixture import write_tiny_wd14

    model = write_tiny_wd14(tmp_path / "wd14")
    data = tmp_path / "data"
    for name, colour in {"blue.png": (0, 0, 255), "red.png": (255, 0, 0), "black.png": (0, 0, 0)}.items():
        data.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(data / name)
    args = ["label", "--input", str(data), "--captioner", "wd14", "--model", str(model), "--device", "cpu"]
    assert main([*args, "--exclude-tags", "long_hair, simple background", "--trigger", "zk"]) == 0
    assert read_csv(data / "metadata.csv") == {
        "blue.png": "zk, hatsune miku, blue theme, ^_^",
        "red.png": "zk, saber (fate), red theme",
    }
    out = capsys.readouterr().out
    assert "Captioned 2 images with wd14" in out
    assert "  black.png: wd14 gave no caption; write one by hand" in out
    assert "Most frequent tags: zk (2), hatsune miku (1)" in out
