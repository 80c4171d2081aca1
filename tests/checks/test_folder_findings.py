"""The check's findings image by image for one folder (the dataset page's badges)."""

from __future__ import annotations

from lora_scripts.checks.folder import FINDING_KINDS, findings_by_image, folder_findings
from lora_scripts.checks.images import scan_images
from tests.checks.conftest import LONG_CAPTION_TOKENS, RESOLUTION, make_problem_dataset


def test_every_finding_lands_on_its_image(tmp_path):
    folder = make_problem_dataset(tmp_path / "data")
    names = sorted(p.name for p in folder.iterdir() if p.suffix != ".txt")
    captions = {name: (folder / name).with_suffix(".txt").read_text(encoding="utf-8") for name in names}
    captions["e.png"] = "  "  # an empty caption counts as none
    (folder / "bad.png").write_bytes(b"no image")
    names.append("bad.png")
    found = folder_findings(folder, names, captions, resolution=RESOLUTION)
    kinds = {name: [f.kind for f in findings] for name, findings in found.items()}
    assert kinds == {
        "a.png": ["duplicate"],
        "a_copy.png": ["duplicate"],
        "b.png": ["near_duplicate"],
        "b_resaved.jpg": ["near_duplicate"],
        "c.png": [],
        "d.png": [],
        "e.png": ["uncaptioned"],
        "long.png": ["too_long"],
        "small.png": ["too_small"],
        "wide.png": ["extreme_aspect"],
        "bad.png": ["unreadable", "uncaptioned"],
    }
    facts = {name: [f.facts for f in findings] for name, findings in found.items()}
    assert facts["a.png"] == [{"of": ["a_copy.png"]}]
    assert facts["b.png"][0]["of"] == ["b_resaved.jpg"] and 0 <= facts["b.png"][0]["distance"] <= 6
    assert facts["small.png"] == [{"width": 40, "height": 40, "resolution": RESOLUTION}]
    assert facts["wide.png"] == [{"width": 300, "height": 96, "ratio": 3.12}]
    assert facts["long.png"] == [
        {"tokens": LONG_CAPTION_TOKENS, "limit": 75, "cut_off": " ".join(["red"] * 25)}
    ]
    assert set(FINDING_KINDS) == {kind for kinds_of in kinds.values() for kind in kinds_of}


def test_the_token_limit_follows_max_token_length(tmp_path):
    folder = make_problem_dataset(tmp_path / "data")
    facts = scan_images(folder, ["long.png"])
    captions = {"long.png": (folder / "long.txt").read_text(encoding="utf-8")}
    assert findings_by_image(facts, captions, resolution=RESOLUTION, token_limit=150) == {"long.png": []}
