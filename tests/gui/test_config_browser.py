"""The Config and Check parts in a real headless Chromium: the form built from the schema, a preset loaded,
the loader's sentence at its field, and the check's bucket chart."""

from __future__ import annotations

from pathlib import Path

from lora_scripts.checks import check_config_file, report_to_json
from lora_scripts.config import TrainConfig
from lora_scripts.gui.app import create_app
from lora_scripts.gui.server import make_settings
from tests.checks.conftest import RESOLUTION, distinct_image, tiny_model, write_config, write_pair
from tests.gui.browser import require_chromium, screenshot_dir, served
from tests.helpers.ports import free_port

__all__ = ["tiny_model"]


def test_config_form_and_check_in_the_browser(root: Path, tmp_path: Path, tiny_model: Path):
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    data = root / "data" / "tiny"
    for i in range(4):
        write_pair(data, f"{i}.png", distinct_image(i, (96, 64) if i % 2 else (64, 64)), f"thing {i}")
    write_config(
        root / "run.yaml",
        train_data_dir=data,
        base_model=tiny_model,
        resolution=RESOLUTION,
        output_dir=root / "output" / "run",
    )
    app = create_app(make_settings([root], listen=False))
    with served(app, free_port()) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#config-key-learning_rate", state="attached")
        assert page.locator("#config-form .config-row").count() == len(TrainConfig.model_fields)
        page.select_option("#config-preset", "style_lora")
        page.click("#config-preset-load")
        page.wait_for_function("document.getElementById('config-key-lora_rank').value === '8'")
        page.uncheck("#config-check-paths")
        page.wait_for_function("document.getElementById('config-status').textContent !== ''")
        page.fill("#config-key-lora_rank", "0")
        page.click("#config-validate")
        error = page.locator("#config-error-lora_rank li")
        error.wait_for()
        assert error.inner_text().startswith("config: lora_rank: ")
        page.screenshot(path=screenshot_dir(tmp_path) / "config.png", full_page=True)

        page.fill("#check-path", "work/run.yaml")
        page.click("#check-file")
        page.wait_for_selector("#check-buckets svg rect")
        facts = report_to_json(check_config_file(root / "run.yaml"))
        buckets = facts["plan"]["buckets"]
        assert page.locator("#check-buckets svg rect").count() == len(buckets) >= 1
        assert page.locator("#check-plan tr").count() == 9
        rows = {row.split("\t")[0].strip(): row for row in page.locator("#check-plan tr").all_inner_texts()}
        assert rows["Network type"].split("\t")[-1].strip() == facts["network"]["network_type"]
        size = facts["network"]["file"]["bytes"]
        assert rows["LoRA file size (without metadata)"].endswith(f"{size / 2**10:.1f} KiB") and size < 2**20
        page.screenshot(path=screenshot_dir(tmp_path) / "check.png", full_page=True)
        browser.close()
