"""The check's findings image by image, for one folder and its captions: the web app's badges.

`lora-scripts check` reports findings grouped by kind over a whole config (run.py, findings.py); a dataset
page shows them on each image. Both come from the same analyses, which need no config: `image_report`
(checks/images.py: unreadable, identical and near-identical files, too small, extreme aspect) and
`analyze_captions` (checks/captions.py: longer than CLIP reads). Uncaptioned images are those training
refuses: no caption, or an empty one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from lora_scripts.checks.captions import CLIP_CAPTION_TOKENS, analyze_captions
from lora_scripts.checks.images import ImageFacts, aspect_ratio, image_report, scan_images
from lora_scripts.data import CaptionedImage

FINDING_KINDS = (
    "unreadable",
    "duplicate",
    "near_duplicate",
    "too_small",
    "extreme_aspect",
    "uncaptioned",
    "too_long",
)


@dataclass(frozen=True)
class ImageFinding:
    """One finding about one image: `kind` (one of FINDING_KINDS) and the facts a badge shows.

    unreadable: reason. duplicate: of (the other file names with the same bytes). near_duplicate: of,
    distance (smallest, in bits of 64). too_small: width, height, resolution. extreme_aspect: width,
    height, ratio. uncaptioned: nothing. too_long: tokens, limit, cut_off (the text CLIP never reads).
    """

    kind: str
    facts: dict[str, Any] = field(default_factory=dict)


def folder_findings(
    image_dir: Path,
    images: list[str],
    captions: Mapping[str, str],
    *,
    resolution: int,
    token_limit: int = CLIP_CAPTION_TOKENS,
) -> dict[str, list[ImageFinding]]:
    """Findings of every image of `images` (names relative to `image_dir`); see `findings_by_image`."""
    facts = scan_images(image_dir, images)
    return findings_by_image(facts, captions, resolution=resolution, token_limit=token_limit)


def findings_by_image(
    facts: list[ImageFacts],
    captions: Mapping[str, str],
    *,
    resolution: int,
    token_limit: int = CLIP_CAPTION_TOKENS,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, list[ImageFinding]]:
    """file_name -> its findings (in FINDING_KINDS order; [] for a fine image), for the images of `facts`
    (from `scan_images`) and their `captions` (file_name -> caption; absent or "" is uncaptioned)."""
    found: dict[str, list[ImageFinding]] = {f.file_name: [] for f in facts}
    report = image_report(facts, resolution)
    by_name = {f.file_name: f for f in facts}
    for name in report.unreadable:
        found[name].append(ImageFinding("unreadable", {"reason": by_name[name].error}))
    for group in report.exact_duplicates:
        for name in group:
            found[name].append(ImageFinding("duplicate", {"of": [other for other in group if other != name]}))
    near: dict[str, dict[str, int]] = {}
    for pair in report.near_duplicates:
        near.setdefault(pair.first, {})[pair.second] = pair.distance
        near.setdefault(pair.second, {})[pair.first] = pair.distance
    for name, others in sorted(near.items()):
        found[name].append(
            ImageFinding("near_duplicate", {"of": sorted(others), "distance": min(others.values())})
        )
    for f in report.too_small:
        found[f.file_name].append(
            ImageFinding("too_small", {"width": f.width, "height": f.height, "resolution": resolution})
        )
    for f in report.extreme_aspect:
        facts_of = {"width": f.width, "height": f.height, "ratio": round(aspect_ratio(f), 2)}
        found[f.file_name].append(ImageFinding("extreme_aspect", facts_of))
    captioned = [
        CaptionedImage(path=Path(name), caption=captions[name], file_name=name)
        for name in found
        if captions.get(name, "").strip()
    ]
    for name in found:
        if not captions.get(name, "").strip():
            found[name].append(ImageFinding("uncaptioned"))
    if captioned:
        long = analyze_captions(captioned, None, tokenizer, token_limit).too_long
        for caption in long:
            facts_of = {"tokens": caption.tokens, "limit": token_limit, "cut_off": caption.cut_off}
            found[caption.file_name].append(ImageFinding("too_long", facts_of))
    return found
