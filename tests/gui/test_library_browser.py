"""The LoRA library part in a real headless Chromium: a run's LoRA listed with its rank and steps, its
details, copied into the WebUI folder, and its tag sent to the Generate page's prompt."""

from __future__ import annotations

from pathlib import Path

from lora_scripts.gui.app import create_app
from lora_scripts.gui.server import make_settings
from tests.gui.browser import require_chromium, screenshot_dir, served
from tests.gui.test_library_api import lora_tensors, make_run
from tests.helpers.ports import free_port

__all__ = ["lora_tensors"]


def test_the_library_lists_details_and_copies_a_lora(root: Path, tmp_path: Path, lora_tensors):
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    make_run(root, lora_tensors)
    webui = tmp_path / "webui" / "models" / "Lora"
    webui.mkdir(parents=True)
    app = create_app(make_settings([root], listen=False, webui_lora_dir=webui))
    with served(app, free_port()) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "#library")
        item = page.locator(".library-item").first
        item.wait_for()
        text = item.inner_text()
        assert "<lora:pytorch_lora_weights>" in text and "4 / 2" in text and "120 / 3" in text
        assert "inkstyle" in text and "SD 1.x" in text

        item.locator("details summary").click()
        page.wait_for_selector(".library-report")
        assert "yes, all 128 modules" in item.locator(".library-report").inner_text()

        item.locator(".library-copy").click()
        result = item.locator(".library-copy-result")
        page.wait_for_function("document.querySelector('.library-copy-result').textContent !== ''")
        assert "WebUI/ink_painting_v1.safetensors" in result.inner_text()
        assert sorted(p.name for p in webui.iterdir()) == [
            "ink_painting_v1.json",
            "ink_painting_v1.preview.png",
            "ink_painting_v1.safetensors",
        ]
        page.locator("#part-library").screenshot(path=screenshot_dir(tmp_path) / "library.png")

        page.click("#library-refresh")  # the WebUI copy is listed too, and the run's file knows of it
        page.wait_for_function("document.querySelectorAll('.library-item').length === 2")
        page.fill("#library-filter", "WebUI/")
        page.wait_for_function("document.querySelectorAll('.library-item').length === 1")
        shown = page.locator(".library-item").first.get_attribute("data-path")
        assert shown == "WebUI/ink_painting_v1.safetensors"

        page.evaluate("""() => {
            if (!document.getElementById('generate-prompt')) {
                const made = Object.assign(document.createElement('textarea'), {id: 'generate-prompt'});
                document.body.append(made);
            }
            const prompt = document.getElementById('generate-prompt');
            prompt.value = 'ink wash, a cat';
            prompt.addEventListener('input', () => { window.promptInput = prompt.value; });
        }""")
        page.locator(".library-use").first.click()
        page.wait_for_function("location.hash === '#generate'")
        assert page.evaluate("window.promptInput") == "ink wash, a cat <lora:ink_painting_v1:1>"
        browser.close()
