"""The page in a real headless Chromium: it loads without any external request and switches to Simplified
Chinese."""

from __future__ import annotations

from lora_scripts.gui.app import create_app
from lora_scripts.gui.server import make_settings
from tests.gui.browser import require_chromium, screenshot_dir, served
from tests.helpers.ports import free_port


def test_the_page_loads_offline_and_switches_language(root, tmp_path):
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    app = create_app(make_settings([root], listen=False))
    port = free_port()
    with served(app, port) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        outside, failed = [], []
        page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
        page.on(
            "request", lambda request: None if request.url.startswith(url) else outside.append(request.url)
        )
        page.goto(url)
        assert page.locator("nav a[data-part=dataset]").inner_text() == "Dataset"
        page.wait_for_selector("#generate-sampler option", state="attached")  # every part has loaded
        assert page.evaluate("document.querySelector('link[rel=icon]').href").endswith("/static/favicon.svg")
        page.screenshot(path=screenshot_dir(tmp_path) / "start.png")
        with page.expect_navigation():  # the page reloads in the chosen language
            page.select_option("#language", "zh")
        assert page.locator("nav a[data-part=dataset]").inner_text() == "数据集"
        browser.close()
    assert outside == []  # no CDN, no fonts from elsewhere: it works offline
    assert failed == []  # and nothing it asks for is missing
