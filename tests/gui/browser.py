"""A real headless Chromium driving the web app: Debian's `chromium` through Playwright's Python API (its own
browser download cannot work offline), and the app served by uvicorn in a thread on a free port."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def chromium_path() -> str | None:
    """The Chromium to drive: $CHROMIUM, else the first of CHROMIUM_NAMES on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def require_chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (install Debian's chromium package or set $CHROMIUM)")
    return path


@contextmanager
def served(app, port: int) -> Iterator[str]:  # noqa: ANN001 - a FastAPI app
    """The app on http://127.0.0.1:port/ for the duration of the block."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def screenshot_dir(tmp_path: Path) -> Path:
    """Where the browser tests save screenshots: $LORA_SCRIPTS_SCREENSHOTS (docs/screenshots to refresh the
    README's), else the test's temporary folder."""
    folder = Path(os.environ.get("LORA_SCRIPTS_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
