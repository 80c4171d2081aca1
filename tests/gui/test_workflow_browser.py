"""The whole workflow in a real headless Chromium, as a user without a terminal goes through it: create a
dataset folder and upload images into it, caption them in place and add a trigger word to all, fill the
config form and save it, check it, train it (loss chart and a sample image appear), stop and resume the
run, and generate a picture with the LoRA it made. Screenshots of each page go to screenshot_dir."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from lora_scripts.generation.infotext import parse_infotext
from lora_scripts.gui.app import create_app
from lora_scripts.gui.server import make_settings
from lora_scripts.models.tiny import build_tiny_sd
from tests.checks.conftest import distinct_image
from tests.gui.browser import require_chromium, screenshot_dir, served
from tests.helpers.ports import free_port

RUN_TIMEOUT_MS = 240_000


@pytest.fixture(autouse=True)
def one_thread_runs(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the run's torch: the tiny model goes faster on one thread


def test_the_whole_workflow_in_the_browser(root: Path, tmp_path: Path, tmp_path_factory):
    executable = require_chromium()
    from playwright.sync_api import expect, sync_playwright

    shutil.copytree(build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd"), root / "models" / "tiny-sd")
    images = []
    for i in range(4):
        path = tmp_path / "camera" / f"photo_{i}.png"
        path.parent.mkdir(exist_ok=True)
        distinct_image(i, (80, 64) if i % 2 else (64, 64)).save(path)
        images.append(str(path))
    shots = screenshot_dir(tmp_path)
    data, output = root / "ink", root / "output" / "ink"

    app = create_app(make_settings([root], listen=False))
    with served(app, free_port()) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)

        # Dataset: a new folder, four images uploaded, each captioned in place, a trigger word added to all.
        page.fill("#dataset-new-folder-name", "ink")
        page.click("#dataset-new-folder-create")
        expect(page.locator("#dataset-breadcrumbs .crumb.current")).to_have_text("ink")
        page.set_input_files("#dataset-upload-input", images)
        expect(page.locator("#dataset-grid .dataset-card")).to_have_count(4)
        for i in range(4):
            box = page.locator(
                f'#dataset-grid .dataset-card[data-file-name="photo_{i}.png"] .dataset-caption'
            )
            box.fill(f"ink wash painting, subject {i}")
            box.press("Enter")
            expect(
                page.locator(f'.dataset-card[data-file-name="photo_{i}.png"] .dataset-caption-state')
            ).not_to_be_empty()
        page.wait_for_function(
            "() => document.querySelectorAll('#dataset-grid .dataset-card.saving').length === 0"
        )
        page.select_option("#dataset-bulk-operation", "add_trigger")
        page.fill("#dataset-bulk-text", "inkstyle")
        page.click("#dataset-bulk-preview")
        page.click("#dataset-bulk-apply")
        expect(page.locator('.dataset-card[data-file-name="photo_0.png"] .dataset-caption')).to_have_value(
            "inkstyle, ink wash painting, subject 0"
        )
        with open(data / "metadata.csv", encoding="utf-8", newline="") as fh:
            captions = {row["file_name"]: row["text"] for row in csv.DictReader(fh)}
        assert captions == {f"photo_{i}.png": f"inkstyle, ink wash painting, subject {i}" for i in range(4)}
        page.locator("#part-dataset").screenshot(path=shots / "dataset.png")

        # Config: the form filled and saved under the root; the file is what `train --config` reads.
        values = {
            "base_model": str(root / "models" / "tiny-sd"),
            "train_data_dir": str(data),
            "metadata_path": str(data / "metadata.csv"),
            "output_dir": str(output),
            "resolution": "64",
            "batch_size": "2",
            "max_train_steps": "10000",
            "learning_rate": "0.001",
            "save_steps": "1000",
            "sample_prompts": json.dumps(["inkstyle, a temple --s 2"]),
            "sample_every_n_steps": "5",
        }
        page.locator("#config-key-learning_rate").wait_for(state="attached")
        for key, value in values.items():
            field = page.locator(f"#config-key-{key}")
            if not field.is_visible():  # its group is folded: open it as a user would
                field.locator("xpath=ancestor::details[1]/summary").click()
            field.fill(value)
        page.fill("#config-export-path", f"{root.name}/configs/ink.yaml")
        page.click("#config-export")
        expect(page.locator("#config-status")).not_to_be_empty()
        page.wait_for_function("() => true")
        _wait_file(page, root / "configs" / "ink.yaml")
        page.locator("#part-config").screenshot(path=shots / "config_form.png")

        # Check: the plan of the form's config, with its bucket chart.
        page.click("#check-form")
        page.wait_for_selector("#check-buckets svg rect")
        assert (
            "10,000" in page.locator("#check-plan").inner_text()
            or "10000" in page.locator("#check-plan").inner_text()
        )
        page.locator("#part-check").screenshot(path=shots / "check_plan.png")

        # Train: started and watched (loss curve, samples), stopped as Ctrl-C, resumed from its saved state,
        # stopped again. The run is long (10,000 steps) so that each stop comes in the middle of it.
        page.fill("#train-config", f"{root.name}/configs/ink.yaml")
        page.click("#train-start")
        page.wait_for_selector("#train-loss polyline", timeout=RUN_TIMEOUT_MS)
        _wait_step(page, above=2)
        page.click("#train-stop")
        expect(page.locator("#train-name")).to_contain_text("stopped", timeout=RUN_TIMEOUT_MS)
        stopped_at = _step(page)
        expect(page.locator("#train-resume")).to_be_enabled()
        page.click("#train-resume")
        expect(page.locator("#train-name")).to_contain_text("running", timeout=RUN_TIMEOUT_MS)
        _wait_step(page, above=stopped_at + 4)
        # Every sample shown, and loaded (an <img> is in the page before its picture has arrived).
        page.wait_for_function(
            "() => { const imgs = [...document.querySelectorAll('#train-samples img')];"
            " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth === 64); }",
            timeout=RUN_TIMEOUT_MS,
        )
        page.locator("#part-train").screenshot(path=shots / "train.png")
        page.click("#train-stop")
        expect(page.locator("#train-name")).to_contain_text("stopped", timeout=RUN_TIMEOUT_MS)
        events = [json.loads(line) for line in (output / "progress.jsonl").read_text().splitlines()]
        starts = [e["resumed_from"] for e in events if e["event"] == "start"]
        ends = [(e["status"], e["step"]) for e in events if e["event"] == "end"]
        assert starts == [None, stopped_at] and ends[0] == ("stopped", stopped_at)
        assert ends[1][0] == "stopped" and ends[1][1] > stopped_at + 4
        lora_name = f"ink-step{ends[1][1]:08d}"  # a stopped run's LoRA file carries its step
        assert (output / f"{lora_name}.safetensors").is_file()

        # Generate: the run's LoRA picked from the library's names, one picture with its infotext.
        page.goto(url + "#generate")
        page.wait_for_selector(f'#generate-lora option[value="{lora_name}"]', state="attached")
        expect(page.locator("#generate-base-model")).to_have_value(f"{root.name}/models/tiny-sd")
        page.fill("#generate-prompt", "inkstyle, ancient temple on mountain peak")
        page.select_option("#generate-lora", lora_name)
        page.fill("#generate-lora-weight", "0.7")
        page.click("#generate-lora-add")
        expect(page.locator("#generate-prompt")).to_have_value(
            f"inkstyle, ancient temple on mountain peak, <lora:{lora_name}:0.7>"
        )
        for field, value in (("steps", "2"), ("seed", "7"), ("width", "64"), ("height", "64")):
            page.fill(f"#generate-{field}", value)
        page.click("#generate-start")
        item = page.locator("#generate-gallery .gallery-item").first
        item.wait_for(timeout=RUN_TIMEOUT_MS)
        fields = parse_infotext(item.locator("pre.infotext").inner_text())
        assert (fields["Seed"], fields["Steps"], fields["Size"]) == ("7", "2", "64x64")
        assert fields["Prompt"].endswith(f"<lora:{lora_name}:0.7>") and lora_name in fields["Lora hashes"]
        expect(item.locator("img")).to_have_js_property("naturalWidth", 64)  # waits for the picture to load
        expect(page.locator("#generate-status")).to_contain_text("seed 7")
        assert sorted(p.name for p in (root / "renders").iterdir()) == ["00000-7.png"]
        page.locator("#part-generate").screenshot(path=shots / "generate.png")
        browser.close()


def _wait_file(page, path: Path) -> None:
    for _ in range(100):
        if path.is_file():
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"{path} was not written")


def _wait_step(page, above: int) -> None:
    shown = "Number((document.getElementById('train-numbers').textContent.match(/\\d+/) || [0])[0])"
    page.wait_for_function(f"() => {shown} > {above}", timeout=RUN_TIMEOUT_MS)


def _step(page) -> int:
    """The step the Train page shows ("12 / 24 ...")."""
    match = re.match(r"\D*(\d+)", page.locator("#train-numbers").inner_text())
    assert match, page.locator("#train-numbers").inner_text()
    return int(match.group(1))
