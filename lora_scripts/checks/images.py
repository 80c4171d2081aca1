"""Facts about the training images that do not stop training but change what it learns.

Identical files (sha256 of the bytes) and near-duplicates (a perceptual hash) weigh double in training;
images smaller than `resolution` are upscaled (blurry); very long or tall images lose most of themselves to
the centre crop. Each image is read once, at a reduced size where the format allows it, so a few hundred
4k photos take seconds.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lora_scripts.data import to_rgb

# pHash: a 32 x 32 grayscale thumbnail, its 2-D DCT-II, and one bit per coefficient of the top-left 8 x 8
# block (the lowest frequencies): above or below their median. Low frequencies are the layout of the
# picture, which JPEG re-compression, resizing and small colour changes keep, and the median threshold makes
# the bits independent of brightness and contrast. Two unrelated images differ in about half of the 64 bits;
# a re-saved or slightly resized copy in only a few, so at most 6 differing bits (imagehash's usual
# threshold for "the same picture") counts as a near-duplicate.
HASH_INPUT_SIZE = 32
HASH_BLOCK = 8
NEAR_DUPLICATE_MAX_DISTANCE = 6
# Images are shrunk to fit this many pixels before hashing; JPEG draft mode and PIL's reduce() get there
# by skipping pixels while decoding, which is what keeps a 4k photo cheap.
_DECODE_SIZE = 4 * HASH_INPUT_SIZE
# The centre crop keeps 1/ratio of a long image; at 2.5:1 that is 40%, so most of the picture is lost.
EXTREME_ASPECT_RATIO = 2.5
# A flat image (one colour) has no structure for the hash to describe; all of them would hash alike.
_FLAT_STD = 1.0
_MAX_THREADS = 8
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
_POPCOUNT_8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class ImageFacts:
    """One image as the check sees it. `width`/`height` are the displayed (EXIF-rotated) size in pixels;
    `phash` is None for flat or unreadable images; `error` is the reason an image could not be read."""

    file_name: str
    width: int
    height: int
    sha256: str
    phash: int | None
    error: str | None = None


@dataclass(frozen=True)
class NearDuplicate:
    """Two images whose perceptual hashes differ in `distance` of 64 bits (not identical files)."""

    first: str
    second: str
    distance: int


@dataclass(frozen=True)
class ImageReport:
    """What `analyze_images` found; every list is sorted by file name."""

    scanned: int
    unreadable: list[str]
    exact_duplicates: list[list[str]]  # groups of files with the same bytes
    near_duplicates: list[NearDuplicate]
    too_small: list[ImageFacts]  # shorter side < resolution: upscaled for training
    extreme_aspect: list[ImageFacts]  # longer / shorter side > EXTREME_ASPECT_RATIO


def analyze_images(root: Path, file_names: list[str], resolution: int) -> ImageReport:
    """Hash and measure every image `root / name` and group the findings (see ImageReport)."""
    return image_report(scan_images(root, file_names), resolution)


def image_report(facts: list[ImageFacts], resolution: int) -> ImageReport:
    """Group the facts of `scan_images` into findings (the web app keeps facts of unchanged files)."""
    readable = [f for f in facts if f.error is None]
    return ImageReport(
        scanned=len(facts),
        unreadable=[f.file_name for f in facts if f.error is not None],
        exact_duplicates=exact_duplicates(readable),
        near_duplicates=near_duplicates(readable),
        too_small=[f for f in readable if min(f.width, f.height) < resolution],
        extreme_aspect=[f for f in readable if aspect_ratio(f) > EXTREME_ASPECT_RATIO],
    )


def aspect_ratio(facts: ImageFacts) -> float:
    """Longer side / shorter side (>= 1)."""
    return max(facts.width, facts.height) / max(1, min(facts.width, facts.height))


def scan_images(root: Path, file_names: list[str]) -> list[ImageFacts]:
    """ImageFacts of each `root / name`, in input order (threads: decoding and hashing release the GIL)."""
    with ThreadPoolExecutor(max_workers=min(_MAX_THREADS, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda name: _image_facts(root / name, name), file_names))


def _image_facts(path: Path, file_name: str) -> ImageFacts:
    try:
        digest = _sha256(path)
    except OSError as exc:
        return ImageFacts(file_name, 0, 0, "", None, exc.strerror or type(exc).__name__)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS:
                width, height = height, width
            # thumbnail() uses JPEG draft mode and reduce() before resampling: no full-size decode of a JPEG.
            img.thumbnail((_DECODE_SIZE, _DECODE_SIZE), reducing_gap=2.0)
            small = ImageOps.exif_transpose(img)
            gray = to_rgb(small).convert("L")
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types; collect_dataset reports the details
        return ImageFacts(file_name, 0, 0, digest, None, str(exc) or type(exc).__name__)
    return ImageFacts(file_name, width, height, digest, phash(gray))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis [n, n]: `D @ x` is the DCT of a column vector x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    basis = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    return basis


_DCT = _dct_matrix(HASH_INPUT_SIZE)


def phash(gray: Image.Image) -> int | None:
    """64-bit perceptual hash of a grayscale image (see HASH_INPUT_SIZE), or None for a flat image.

    Bit 63 - (row * 8 + col) is set when DCT coefficient (row, col) is above the block's median.
    """
    pixels = np.asarray(
        gray.resize((HASH_INPUT_SIZE, HASH_INPUT_SIZE), Image.Resampling.LANCZOS), dtype=np.float64
    )
    if pixels.std() < _FLAT_STD:
        return None
    coefficients = _DCT @ pixels @ _DCT.T  # 2-D DCT-II: rows, then columns
    block = coefficients[:HASH_BLOCK, :HASH_BLOCK].ravel()
    bits = block > np.median(block)
    return int("".join("1" if bit else "0" for bit in bits), 2)


def hamming_distance(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return (a ^ b).bit_count()


def exact_duplicates(facts: list[ImageFacts]) -> list[list[str]]:
    """Groups (2 or more, sorted) of images with identical bytes, sorted by their first file name."""
    by_digest: dict[str, list[str]] = {}
    for item in facts:
        by_digest.setdefault(item.sha256, []).append(item.file_name)
    return sorted(sorted(names) for names in by_digest.values() if len(names) > 1)


def near_duplicates(
    facts: list[ImageFacts], max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE
) -> list[NearDuplicate]:
    """Pairs of images whose hashes differ in at most `max_distance` bits, identical files excluded.

    All pairs are compared (n^2 / 2 XORs of 64-bit words, vectorised per row: 1,000 images take a few
    milliseconds), because near-duplicates have no order that a sort could exploit.
    """
    hashed = sorted((f for f in facts if f.phash is not None), key=lambda f: f.file_name)
    if len(hashed) < 2:
        return []
    hashes = np.array([f.phash for f in hashed], dtype=np.uint64)
    pairs: list[NearDuplicate] = []
    for i in range(len(hashed) - 1):
        xor = hashes[i] ^ hashes[i + 1 :]
        distances = _POPCOUNT_8[xor.view(np.uint8)].reshape(-1, 8).sum(axis=1)
        for offset in np.flatnonzero(distances <= max_distance):
            other = hashed[i + 1 + int(offset)]
            if other.sha256 != hashed[i].sha256:
                pairs.append(NearDuplicate(hashed[i].file_name, other.file_name, int(distances[offset])))
    return pairs
