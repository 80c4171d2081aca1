"""Small helpers that write test images in every layout the data module must read."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def write_image(path: Path, size: tuple[int, int] = (16, 12), color: tuple[int, int, int] = RED) -> Path:
    """Write a plain RGB image; the format follows the suffix. Returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def split_image(
    size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]
) -> Image.Image:
    """RGB image whose left half is `left` and right half is `right` (width must be even)."""
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels, mode="RGB")


def write_png_rgb16(path: Path, pixels: np.ndarray) -> Path:
    """Write a 16-bit-per-channel RGB PNG by hand (Pillow cannot write one). `pixels`: uint16 [H, W, 3]."""
    height, width, _ = pixels.shape
    big_endian = pixels.astype(">u2")
    raw = b"".join(b"\0" + big_endian[y].tobytes() for y in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, color type 2 = RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to `keep` of its length, as an interrupted download would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
