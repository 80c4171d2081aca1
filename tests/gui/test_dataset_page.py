"""The Dataset page's markup and scripts: every string they name exists (in both languages, test_i18n), the
elements the scripts and the browser tests drive are there, and nothing loads from elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

from lora_scripts.captioning.edits import EDIT_OPERATIONS
from lora_scripts.checks.folder import FINDING_KINDS
from lora_scripts.gui.i18n import strings

GUI = Path(__file__).parents[2] / "lora_scripts" / "gui"
SCRIPTS = sorted((GUI / "static").glob("*.js"))


def test_every_string_the_page_names_exists():
    english = strings("en")
    template = (GUI / "templates" / "index.html").read_text(encoding="utf-8")
    named = set(re.findall(r"t\['([\w.]+)'\]", template))
    for script in SCRIPTS:
        named |= set(re.findall(r"\bt\(\"([\w.]+)\"", script.read_text(encoding="utf-8")))
    # Keys the scripts build from the server's words.
    named |= {f"finding.{kind}" for kind in FINDING_KINDS} | {
        f"finding.{kind}.detail" for kind in FINDING_KINDS
    }
    named |= {f"bulk.hint.{operation}" for operation in EDIT_OPERATIONS}
    named |= {f"bulk.text.{operation}" for operation in EDIT_OPERATIONS if operation != "replace"}
    named |= {"bulk.skipped.no_caption", "bulk.skipped.would_be_empty"}
    named |= {f"label.phase.{phase}" for phase in ("starting", "loading", "captioning")}
    assert len(named) > 100
    assert sorted(named - english.keys()) == []


def test_the_page_has_the_dataset_elements(client):
    page = client.get("/").text
    for element_id in (
        "dataset-breadcrumbs",
        "dataset-folders",
        "dataset-new-folder-name",
        "dataset-caption-format",
        "dataset-resolution",
        "dataset-drop",
        "dataset-upload-input",
        "dataset-bulk-operation",
        "dataset-bulk-text",
        "dataset-bulk-find",
        "dataset-bulk-replace",
        "dataset-bulk-preview",
        "dataset-bulk-apply",
        "dataset-tags",
        "dataset-label-captioner",
        "dataset-label-start",
        "dataset-label-progress",
        "dataset-findings",
        "dataset-grid",
    ):
        assert f'id="{element_id}"' in page, element_id
    for script in SCRIPTS:
        served = client.get(f"/static/{script.name}")
        assert served.status_code == 200 and "javascript" in served.headers["content-type"]
        assert not re.search(r"https?://", served.text), script.name  # no CDN: the page works offline
        imports = re.findall(r'from "(\./[\w.]+)"', served.text)
        assert all((GUI / "static" / name).is_file() for name in imports), script.name
