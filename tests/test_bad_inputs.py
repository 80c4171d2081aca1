"""Broken inputs through `lora-scripts train`: each row is one mistake, the exact `error:` lines it gives,
exit code 2, and nothing written (no output folder, every input file byte for byte as before).

A second table holds inputs that look odd but must work (a BOM before the CSV header, unicode and spaces in
file names, a 1x1 image, CMYK / 16-bit / palette images): `check` accepts each, and one short training run
takes them all. Most rows stop before any model loads; the model rows point base_model at a broken file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image

from lora_scripts.cli import main
from lora_scripts.models.tiny import build_tiny_sd
from lora_scripts.training.output_dir import STATE_FOLDER
from lora_scripts.training.state import FORMAT_VERSION, PROGRESS_FILE, state_name

RESOLUTION = 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@dataclass
class Env:
    """One case's folder: `data/` with two captioned images and metadata.csv, and the config values."""

    root: Path
    values: dict[str, Any] = field(default_factory=dict)
    yaml_text: str | None = None  # written instead of `values` when set

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def csv(self) -> Path:
        return self.data / "metadata.csv"

    @property
    def out(self) -> Path:
        return self.root / "out" / "run"

    @property
    def cfg(self) -> Path:
        return self.root / "config.yaml"

    def line(self, template: str) -> str:
        return template.format(cfg=self.cfg, data=self.data, csv=self.csv, out=self.out, root=self.root)


def picture(seed: int, size: tuple[int, int] = (RESOLUTION, RESOLUTION)) -> Image.Image:
    """A smooth random RGB picture (different seeds: unrelated pictures, no duplicate warnings)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))  # uint8 HxWx3: RGB
    return coarse.resize(size, Image.Resampling.BICUBIC)


def write_csv(
    env: Env, rows: list[list[str]], *, header: str = "file_name,text", encoding: str = "utf-8"
) -> None:
    lines = [header] + [",".join(_cell(c) for c in row) for row in rows]
    env.csv.write_bytes(("\n".join(lines) + "\n").encode(encoding))


def _cell(text: str) -> str:
    return f'"{text}"' if "," in text else text


def baseline(env: Env, model: Path) -> None:
    env.data.mkdir(parents=True)
    for i, name in enumerate(("a.png", "b.png")):
        picture(i).save(env.data / name)
    write_csv(env, [["a.png", "ink painting, a"], ["b.png", "ink painting, b"]])
    env.values = {
        "train_data_dir": str(env.data),
        "metadata_path": str(env.csv),
        "base_model": str(model),
        "output_dir": str(env.out),
        "resolution": RESOLUTION,
        "batch_size": 1,
        "max_train_steps": 1,
    }


def write(env: Env) -> Path:
    text = env.yaml_text if env.yaml_text is not None else yaml.safe_dump(env.values, sort_keys=False)
    env.cfg.write_text(text, encoding="utf-8")
    return env.cfg


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root`: path -> sha256 of the bytes ("dir" for folders)."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


# --- setups: each breaks one thing in the baseline ---------------------------------------------------------


def values(**changes: Any) -> Callable[[Env], None]:
    def apply(env: Env) -> None:
        env.values.update(changes)

    return apply


def without(*keys: str) -> Callable[[Env], None]:
    def apply(env: Env) -> None:
        for key in keys:
            env.values.pop(key)

    return apply


def yaml_text(template: str) -> Callable[[Env], None]:
    def apply(env: Env) -> None:
        env.yaml_text = env.line(template)

    return apply


def csv_rows(*rows: tuple[str, str], header: str = "file_name,text", encoding: str = "utf-8") -> Callable:
    def apply(env: Env) -> None:
        write_csv(env, [list(row) for row in rows], header=header, encoding=encoding)

    return apply


def file_bytes(name: str, content: bytes) -> Callable[[Env], None]:
    def apply(env: Env) -> None:
        (env.data / name).write_bytes(content)

    return apply


def truncated_jpeg(env: Env) -> None:
    """b.png replaced by b.jpg cut off halfway (an interrupted download or copy)."""
    (env.data / "b.png").unlink()
    picture(7).save(env.data / "b.jpg", format="JPEG", quality=95)
    (env.data / "b.jpg").write_bytes(
        (env.data / "b.jpg").read_bytes()[: (env.data / "b.jpg").stat().st_size // 2]
    )
    write_csv(env, [["a.png", "ink painting, a"], ["b.jpg", "ink painting, b"]])


def txt_captions(extension: str) -> Callable[[Env], None]:
    """Drop metadata.csv; captions in `<stem><extension>` files beside the images."""

    def apply(env: Env) -> None:
        env.csv.unlink()
        env.values.pop("metadata_path")
        for stem in ("a", "b"):
            (env.data / f"{stem}{extension}").write_text(f"ink painting, {stem}", encoding="utf-8")

    return apply


def model_file(name: str, content: Callable[[Path], None]) -> Callable[[Env], None]:
    """base_model: a file `models/<name>` written by `content(path)`."""

    def apply(env: Env) -> None:
        path = env.root / "models" / name
        path.parent.mkdir(parents=True)
        content(path)
        env.values["base_model"] = str(path)

    return apply


def text_file(path: Path) -> None:
    path.write_text("https://civitai.com/api/download/models/12345\n", encoding="utf-8")


def tensors(*keys: str) -> dict[str, torch.Tensor]:
    return {key: torch.zeros(2, 2) for key in keys}


def truncated_safetensors(path: Path) -> None:
    safetensors.torch.save_file(tensors("model.diffusion_model.input_blocks.0.0.weight", "x"), path)
    path.write_bytes(path.read_bytes()[:-20])


def sdxl_checkpoint(path: Path) -> None:
    keys = ("model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.x.weight")
    safetensors.torch.save_file(tensors(*keys), path)


def lora_as_base_model(path: Path) -> None:
    keys = ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",)
    safetensors.torch.save_file(tensors(*keys), path)


def pickled_ckpt(path: Path) -> None:
    # The training arguments some trainers pickle next to the weights: not a tensor, so weights_only refuses.
    torch.save(
        {
            "state_dict": tensors("model.diffusion_model.input_blocks.0.0.weight"),
            "args": argparse.Namespace(lr=1),
        },
        path,
    )


def earlier_run(*, with_state: bool) -> Callable[[Env], None]:
    def apply(env: Env) -> None:
        env.out.mkdir(parents=True)
        (env.out / "config.yaml").write_text("lora_rank: 8\n", encoding="utf-8")
        (env.out / "run.safetensors").write_bytes(b"earlier LoRA")
        (env.out / "logs").mkdir()
        if with_state:
            state = env.out / STATE_FOLDER / state_name(10)
            state.mkdir(parents=True)
            progress = {"format": FORMAT_VERSION, "global_step": 10}
            (state / PROGRESS_FILE).write_text(json.dumps(progress), encoding="utf-8")

    return apply


def output_is_a_file(env: Env) -> None:
    env.out.parent.mkdir(parents=True)
    env.out.write_text("not a folder", encoding="utf-8")


# --- the table ----------------------------------------------------------------------------------------------

Row = tuple[str, Callable[[Env], None], list[str]]
CFG = "error: {cfg}: "
UNREADABLE = "; re-save it as PNG or JPEG, or remove it."
BAD_CONFIGS: list[Row] = [
    ("wrong type", values(lora_rank="eight"), [CFG + "lora_rank: 'eight' is not an integer"]),
    ("out of range", values(lora_rank=0), [CFG + "lora_rank: 0 is out of range (must be ≥ 1)"]),
    (
        "negative learning rate",
        values(learning_rate=-1e-4),
        [CFG + "learning_rate: -0.0001 is out of range (must be > 0)"],
    ),
    (
        "unknown key",
        values(learnig_rate=1e-4),
        [CFG + "learnig_rate: unknown key (did you mean 'learning_rate'?)"],
    ),
    (
        "sd-scripts name",
        values(network_dim=8),
        [CFG + "network_dim: unknown key (did you mean 'lora_rank'?)"],
    ),
    (
        "not a choice",
        values(mixed_precision="fp17"),
        [CFG + "mixed_precision: 'fp17' is not one of 'no', 'fp16', 'bf16' (did you mean 'fp16'?)"],
    ),
    ("not a bool", values(cache_latents="maybe"), [CFG + "cache_latents: 'maybe' is not true or false"]),
    (
        "cache_latents with random_crop",
        values(cache_latents=True, random_crop=True),
        [
            CFG + "cache_latents: cannot be used with random crops (random_crop): a cached latent has one "
            "fixed crop; turn off the random crop or set cache_latents: false"
        ],
    ),
    (
        "missing base_model",
        without("base_model"),
        [
            CFG + "base_model: missing required key (the Stable Diffusion checkpoint to train on: a "
            ".safetensors file or a diffusers folder)"
        ],
    ),
    (
        "missing train_data_dir",
        without("train_data_dir"),
        [CFG + "train_data_dir: missing required key (the folder of training images)"],
    ),
    (
        "no such folder",
        values(train_data_dir="./nowhere"),
        [CFG + "train_data_dir: folder './nowhere' does not exist"],
    ),
    (
        "YAML syntax error",
        yaml_text("train_data_dir: {data}\nlora_rank: [8\n"),
        [
            CFG + "line 3, column 1: YAML syntax error (expected ',' or ']', but got '<stream end>'); check "
            "the indentation, colons and quotes there"
        ],
    ),
    (
        "duplicate key",
        yaml_text(
            "train_data_dir: {data}\nmetadata_path: {csv}\nbase_model: BASE\noutput_dir: {out}\n"
            "lora_rank: 8\nlora_rank: 16\n"
        ),
        [CFG + "lora_rank: duplicate key (lines 5 and 6); keep only one"],
    ),
    ("empty file", yaml_text("  \n"), [CFG + "the file is empty; write one 'key: value' line per setting"]),
    (
        "a list, not a mapping",
        yaml_text("- train_data_dir: {data}\n"),
        [CFG + "the top level must be a mapping of 'key: value' lines, not a list"],
    ),
    (
        "every mistake at once",
        values(batch_size="four", lora_rank=0, learnig_rate=1),
        [
            CFG + "batch_size: 'four' is not an integer",
            CFG + "lora_rank: 0 is out of range (must be ≥ 1)",
            CFG + "learnig_rate: unknown key (did you mean 'learning_rate'?)",
        ],
    ),
]
BAD_DATASETS: list[Row] = [
    (
        "image named by metadata.csv is missing",
        csv_rows(("a.png", "a"), ("b.png", "b"), ("c.png", "c")),
        ["error: {csv} line 4: 'c.png' does not exist in {data}; fix the file_name or remove the row."],
    ),
    (
        "corrupt image",
        file_bytes("b.png", b"\x89PNG\r\n\x1a\n garbage"),
        ["error: {data}/b.png: cannot be read as an image (Truncated File Read)" + UNREADABLE],
    ),
    (
        "truncated JPEG",
        truncated_jpeg,
        [
            "error: {data}/b.jpg: cannot be read as an image (image file is truncated (36 bytes not "
            "processed))" + UNREADABLE
        ],
    ),
    (
        "zero-byte image",
        file_bytes("b.png", b""),
        ["error: {data}/b.png: cannot be read as an image (cannot identify image file 'b.png')" + UNREADABLE],
    ),
    (
        "image without a caption",
        lambda env: picture(3).save(env.data / "c.png"),
        [
            "error: {data}/c.png: image without a caption (no row in metadata.csv); add a row for 'c.png' or "
            "remove the image."
        ],
    ),
    (
        "captions with another extension",
        txt_captions(".caption"),
        [
            "error: found 2 .caption files beside the images in {data} but no .txt ones; set "
            "caption_extension: .caption.",
            "error: {data}/a.png: image without a caption (no a.txt beside it); write its caption in "
            "{data}/a.txt or remove the image.",
            "error: {data}/b.png: image without a caption (no b.txt beside it); write its caption in "
            "{data}/b.txt or remove the image.",
        ],
    ),
    (
        "CSV row escaping with ../",
        csv_rows(("a.png", "a"), ("b.png", "b"), ("../secret.png", "c")),
        [
            "error: {csv} line 4: file_name '../secret.png' points outside train_data_dir; use a path "
            "relative to {data}."
        ],
    ),
    (
        "CSV row with an absolute path",
        csv_rows(("a.png", "a"), ("b.png", "b"), ("/etc/passwd.png", "c")),
        [
            "error: {csv} line 4: file_name '/etc/passwd.png' points outside train_data_dir; use a path "
            "relative to {data}."
        ],
    ),
    (
        "duplicate rows",
        csv_rows(("a.png", "a"), ("b.png", "b"), ("a.png", "again")),
        ["error: {csv} lines 2, 4: several rows for 'a.png'; keep one row per image."],
    ),
    (
        "empty caption",
        csv_rows(("a.png", "a"), ("b.png", "  ")),
        ["error: {csv} line 3: 'b.png' has an empty caption; write one in the text column."],
    ),
    (
        "semicolon-separated CSV",
        csv_rows(("a.png;a",), ("b.png;b",), header="file_name;text"),
        [
            "error: {csv}: the columns are separated by semicolons; save it as a comma-separated CSV "
            "(file_name,text)."
        ],
    ),
    (
        "unclosed quote",
        lambda env: env.csv.write_text('file_name,text\na.png,"ink painting\nb.png,b\n', encoding="utf-8"),
        [
            "error: {csv} line 2: not valid CSV (unexpected end of data); put a caption containing commas in "
            'double quotes, write a quote inside it as "", and close every quote.'
        ],
    ),
    (
        "CSV not in UTF-8",
        csv_rows(("a.png", "café"), ("b.png", "b"), encoding="latin-1"),
        ["error: {csv}: not UTF-8 text; save it as a UTF-8 CSV."],
    ),
    (
        "no images",
        lambda env: [p.unlink() for p in env.data.glob("*.png")],
        [
            "error: {data}: no images found (looked for .jpg, .jpeg, .png, .webp, .bmp files, in subfolders "
            "too); put your training images there or fix train_data_dir."
        ],
    ),
]
BAD_MODELS: list[Row] = [
    (
        "text file named .safetensors",
        model_file("model.safetensors", text_file),
        [
            "error: base_model: '{root}/models/model.safetensors' is a text file (it starts with "
            "'https://civitai.com/api/download/models/12345'), not a checkpoint; a failed download or a Git "
            "LFS pointer leaves such a file, so download the model again."
        ],
    ),
    (
        "truncated safetensors",
        model_file("model.safetensors", truncated_safetensors),
        [
            "error: base_model: '{root}/models/model.safetensors' is not a readable .safetensors file "
            "(Error while deserializing header: incomplete metadata, file not fully covered); it may be "
            "truncated or corrupt, so download it again."
        ],
    ),
    (
        "partial SDXL checkpoint",
        model_file("sdxl.safetensors", sdxl_checkpoint),
        [
            "error: base_model: '{root}/models/sdxl.safetensors' is an SDXL checkpoint without its VAE "
            "weights ('first_stage_model.*'); use a full SDXL base checkpoint."
        ],
    ),
    (
        "a LoRA as base_model",
        model_file("lora.safetensors", lora_as_base_model),
        [
            "error: base_model: '{root}/models/lora.safetensors' is a LoRA, not a base model; point "
            "base_model at the Stable Diffusion checkpoint the LoRA was trained on."
        ],
    ),
    (
        "pickle needing full unpickling",
        model_file("model.ckpt", pickled_ckpt),
        [
            "error: base_model: '{root}/models/model.ckpt' contains pickled Python objects besides tensors, "
            "which are refused because loading them can run arbitrary code; use the .safetensors release of "
            "this model or convert the file to .safetensors with a tool you trust."
        ],
    ),
    (
        "not a checkpoint file",
        model_file("model.txt", text_file),
        [
            CFG + "base_model: '{root}/models/model.txt' is not a checkpoint file (expected one of "
            ".safetensors, .ckpt, .pt, .pth, .bin) nor a diffusers folder."
        ],
    ),
]
BAD_OUTPUTS: list[Row] = [
    (
        "output_dir holding another run",
        earlier_run(with_state=False),
        [
            "error: output_dir: '{out}' already holds a run (config.yaml, logs/, run.safetensors); set "
            "overwrite: true to replace it (the old files are moved to {out}/previous_runs/; it has no saved "
            "state to resume), or choose another output_dir."
        ],
    ),
    (
        "output_dir holding a resumable run",
        earlier_run(with_state=True),
        [
            "error: output_dir: '{out}' already holds a run (config.yaml, logs/, run.safetensors, state/); "
            "set resume: auto to continue it, overwrite: true to start again (the old files are moved to "
            "{out}/previous_runs/), or choose another output_dir."
        ],
    ),
    (
        "output_dir is a file",
        output_is_a_file,
        ["error: output_dir: '{out}' is a file, not a folder; choose a folder for the run's files."],
    ),
]
BAD_INPUTS = BAD_CONFIGS + BAD_DATASETS + BAD_MODELS + BAD_OUTPUTS


@pytest.mark.parametrize(("setup", "expected"), [r[1:] for r in BAD_INPUTS], ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_is_refused_and_nothing_is_written(
    tmp_path: Path,
    tiny_model: Path,
    capsys: pytest.CaptureFixture[str],
    setup: Callable[[Env], None],
    expected: list[str],
) -> None:
    env = Env(tmp_path)
    baseline(env, tiny_model)
    setup(env)
    if env.yaml_text is not None:
        env.yaml_text = env.yaml_text.replace("BASE", str(tiny_model))
    write(env)
    before, model_before = snapshot(tmp_path), snapshot(tiny_model)

    code = main(["train", "--config", str(env.cfg)])

    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        env.line(t) for t in expected
    ]
    assert snapshot(tmp_path) == before  # no output folder, every input byte-identical
    assert snapshot(tiny_model) == model_before


# --- inputs that look odd but must work ---------------------------------------------------------------------


def bom_csv(env: Env) -> None:
    """Excel's "CSV UTF-8" puts a byte-order mark before the header."""
    env.csv.write_bytes(b"\xef\xbb\xbf" + env.csv.read_bytes())


def unicode_and_spaces(env: Env) -> None:
    for old, new in (("a.png", "café au lait.png"), ("b.png", "写真 2 (コピー).png")):
        (env.data / old).rename(env.data / new)
    write_csv(
        env, [["café au lait.png", "ink painting, café"], ["写真 2 (コピー).png", "ink painting, 写真"]]
    )


def image_as(mode_image: Callable[[Image.Image], Image.Image], **save: Any) -> Callable[[Env], None]:
    """b.png replaced by b.png (or the format in `save`) converted by `mode_image`."""

    def apply(env: Env) -> None:
        name = "b.jpg" if save.get("format") == "JPEG" else "b.png"
        (env.data / "b.png").unlink()
        mode_image(picture(5)).save(env.data / name, **save)
        write_csv(env, [["a.png", "ink painting, a"], [name, "ink painting, b"]])

    return apply


def sixteen_bit(img: Image.Image) -> Image.Image:
    gray = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    return Image.fromarray(gray)  # uint16: mode I;16


GOOD_INPUTS: list[tuple[str, Callable[[Env], None]]] = [
    ("BOM before the CSV header", bom_csv),
    ("unicode and spaces in file names", unicode_and_spaces),
    ("1x1 image", image_as(lambda img: img.resize((1, 1)))),
    ("CMYK JPEG", image_as(lambda img: img.convert("CMYK"), format="JPEG")),
    ("16-bit grayscale PNG", image_as(sixteen_bit)),
    ("palette PNG with transparency", image_as(lambda img: img.convert("P"), transparency=0)),
]


@pytest.mark.parametrize("setup", [r[1] for r in GOOD_INPUTS], ids=[r[0] for r in GOOD_INPUTS])
def test_odd_but_valid_input_is_accepted(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str], setup: Callable[[Env], None]
) -> None:
    env = Env(tmp_path)
    baseline(env, tiny_model)
    setup(env)
    code = main(["check", "--config", str(write(env))])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "2 found, 2 captioned" in out


def test_odd_but_valid_inputs_train(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """All of the above in one dataset: one training step reads every image and writes a finite LoRA."""
    env = Env(tmp_path)
    baseline(env, tiny_model)
    odd = {
        "café au lait.png": picture(10).resize((1, 1)),
        "写真 (CMYK).jpg": picture(11).convert("CMYK"),
        "sixteen bit.png": sixteen_bit(picture(12)),
        "palette.png": picture(13).convert("P"),
    }
    for name, img in odd.items():
        img.save(env.data / name, **({"transparency": 0} if name == "palette.png" else {}))
    write_csv(env, [[name, f"ink painting, {i}"] for i, name in enumerate(["a.png", "b.png", *odd])])
    bom_csv(env)
    env.values.update(batch_size=6, max_train_steps=1)

    assert main(["train", "--config", str(write(env))]) == 0, capsys.readouterr().err
    assert "Done: 1 steps." in capsys.readouterr().out
    lora = safetensors.torch.load_file(env.out / "pytorch_lora_weights.safetensors")
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
