"""Dataset folders for the dataset page's tests: images of known sizes, captions as .txt or CSV."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from lora_scripts.data import collect_dataset


def picture(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A smooth random picture; different seeds give unrelated pictures (not near-duplicates)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8))
    return coarse.resize(size, Image.Resampling.BICUBIC)


def write_picture(folder: Path, name: str, seed: int, size: tuple[int, int] = (96, 96)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    picture(seed, size).save(folder / name)
    return folder / name


def png_bytes(seed: int = 0, size: tuple[int, int] = (32, 24)) -> bytes:
    out = io.BytesIO()
    picture(seed, size).save(out, format="PNG")
    return out.getvalue()


def txt_folder(root: Path) -> Path:
    """work/txtset: a.png, b.png captioned by .txt; small.png (40x40) and bare.png without a caption."""
    folder = root / "txtset"
    write_picture(folder, "a.png", 1)
    write_picture(folder, "b.png", 2)
    write_picture(folder, "small.png", 3, (40, 40))
    write_picture(folder, "bare.png", 4)
    (folder / "a.txt").write_text("sks, ink, mountain", encoding="utf-8")
    (folder / "b.txt").write_text("ink, river, boat", encoding="utf-8")
    (folder / "small.txt").write_text("sks, moon", encoding="utf-8")
    return folder


CSV_TEXT = (
    "file_name,text\r\n"
    'a.png,"ink, mountain, mist"\r\n'
    "b.png,ink wash of a river\r\n"
    'c.png,"ink, ""old"" pine"\r\n'
)


def csv_folder(root: Path) -> Path:
    """work/csvset: a.png, b.png, c.png captioned in a CRLF metadata.csv with quoted captions."""
    folder = root / "csvset"
    for seed, name in enumerate(["a.png", "b.png", "c.png"], start=10):
        write_picture(folder, name, seed)
    (folder / "metadata.csv").write_bytes(CSV_TEXT.encode("utf-8"))
    return folder


def trained_captions(folder: Path, *, csv: bool) -> dict[str, str]:
    """The captions as training reads them (every image must have one)."""
    metadata = folder / "metadata.csv" if csv else None
    return {item.file_name: item.caption for item in collect_dataset(folder, metadata)}


def txt_captions(folder: Path) -> dict[str, str]:
    return {p.with_suffix(".png").name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}
