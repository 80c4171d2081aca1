"""Where rendered images go, and writing them as PNGs that carry their infotext.

`--output` is a `.png` path (one image there; several become `name-0001.png`, `name-0002.png`, …) or a folder,
where files are numbered WebUI-style, `00000-<seed>.png`, continuing after the highest number already there
so that nothing is overwritten. A `.png` path you name is replaced, like any output file you name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic
from lora_scripts.generation.infotext import PNG_TEXT_KEY

_NUMBERED = re.compile(r"^(\d+)-")
_OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class OutputTarget:
    """A resolved `--output`: a single file name (`is_file`) or a folder."""

    path: Path
    is_file: bool


def resolve_output(output: Path) -> OutputTarget:
    """Tell a `.png` file from a folder; UserError for another image type or a folder that is a file."""
    if output.suffix.lower() == ".png":
        if output.is_dir():
            raise UserError(f"--output: '{output}' is a folder; give a file name or the folder without .png.")
        return OutputTarget(output, is_file=True)
    if output.suffix.lower() in _OTHER_IMAGE_SUFFIXES:
        raise UserError(f"--output: '{output}': images are written as PNG (with their infotext); use .png.")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output: '{output}' is an existing file, not a folder.")
    return OutputTarget(output, is_file=False)


def next_number(folder: Path) -> int:
    """1 + the highest `NNNNN-` prefix of the files in `folder` (0 for an empty or missing folder)."""
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def image_paths(target: OutputTarget, seeds: list[int], suffix: str = "") -> list[Path]:
    """One path per image: `name.png` / `name-0001.png`… for a file target, `NNNNN-<seed><suffix>.png` in a
    folder, numbered after the files already there."""
    if target.is_file:
        if len(seeds) == 1:
            return [target.path]
        stem, parent = target.path.stem, target.path.parent
        return [parent / f"{stem}-{i + 1:04d}{target.path.suffix}" for i in range(len(seeds))]
    start = next_number(target.path)
    return [target.path / f"{start + i:05d}-{seed}{suffix}.png" for i, seed in enumerate(seeds)]


def save_png(path: Path, image: Image.Image, infotext: str) -> None:
    """Write `image` as a PNG with `infotext` in its `parameters` text chunk, atomically (parents created)."""
    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, infotext)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_infotext(path: Path) -> str | None:
    """The `parameters` text of a PNG (what WebUI's PNG Info tab shows), or None."""
    with Image.open(path) as image:
        image.load()
        return image.info.get(PNG_TEXT_KEY)
