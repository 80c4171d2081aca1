"""Image facts: identical files, perceptual near-duplicates, sizes that get upscaled or cropped hard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from lora_scripts.checks.images import (
    NEAR_DUPLICATE_MAX_DISTANCE,
    analyze_images,
    hamming_distance,
    phash,
    scan_images,
)
from tests.checks.conftest import distinct_image, make_problem_dataset


def _hash(img: Image.Image) -> int:
    value = phash(img.convert("L"))
    assert value is not None
    return value


def test_problem_dataset_findings(tmp_path: Path) -> None:
    data = make_problem_dataset(tmp_path)
    names = sorted(p.name for p in data.iterdir() if p.suffix != ".txt")
    report = analyze_images(data, names, resolution=64)
    assert report.scanned == 10 and report.unreadable == []
    assert report.exact_duplicates == [["a.png", "a_copy.png"]]
    # the identical pair is not repeated as a near-duplicate
    assert [(p.first, p.second) for p in report.near_duplicates] == [("b.png", "b_resaved.jpg")]
    assert report.near_duplicates[0].distance <= NEAR_DUPLICATE_MAX_DISTANCE
    assert [(f.file_name, f.width, f.height) for f in report.too_small] == [("small.png", 40, 40)]
    assert [(f.file_name, f.width, f.height) for f in report.extreme_aspect] == [("wide.png", 300, 96)]


def test_phash_survives_jpeg_and_resizing_but_tells_pictures_apart(tmp_path: Path) -> None:
    for seed in range(5):
        original = distinct_image(seed, (256, 192))
        original.resize((230, 173)).save(tmp_path / "copy.jpg", quality=70)
        with Image.open(tmp_path / "copy.jpg") as copy:
            assert hamming_distance(_hash(original), _hash(copy)) <= NEAR_DUPLICATE_MAX_DISTANCE
    hashes = [_hash(distinct_image(seed)) for seed in range(20)]
    distances = [hamming_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) > NEAR_DUPLICATE_MAX_DISTANCE
    assert 20 < float(np.mean(distances)) < 44  # unrelated pictures differ in about half of the 64 bits


def test_phash_ignores_brightness_and_flat_images_have_none() -> None:
    img = distinct_image(3).convert("L")
    brighter = img.point(lambda v: min(255, int(v * 0.8) + 40))
    assert hamming_distance(_hash(img), _hash(brighter)) <= 2
    assert phash(Image.new("L", (64, 64), 128)) is None


def test_exif_rotated_size_and_unreadable_file(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    distinct_image(1, (120, 60)).save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rotated, broken = scan_images(tmp_path, ["rotated.jpg", "broken.png"])
    assert (rotated.width, rotated.height) == (60, 120) and rotated.error is None
    assert broken.error is not None and broken.phash is None
    assert analyze_images(tmp_path, ["rotated.jpg", "broken.png"], 64).unreadable == ["broken.png"]


def test_large_jpeg_is_decoded_at_reduced_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = distinct_image(9, (4000, 3000))
    big.save(tmp_path / "big.jpg", quality=90)
    big.resize((400, 300)).save(tmp_path / "small.png")
    decoded_sizes: list[tuple[int, int]] = []
    original_draft = JpegImageFile.draft

    def spy(self: JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        result = original_draft(self, mode, size)
        decoded_sizes.append(self.size)  # what the decoder will produce after draft()
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    big_facts, small_facts = scan_images(tmp_path, ["big.jpg", "small.png"])
    assert decoded_sizes == [(500, 375)]  # JPEG's 1/8 scale: 64 times fewer pixels than a full decode
    assert (big_facts.width, big_facts.height) == (4000, 3000)  # the sizes reported are the real ones
    assert hamming_distance(big_facts.phash or 0, small_facts.phash or 0) <= NEAR_DUPLICATE_MAX_DISTANCE
