"""The web app under FastAPI's TestClient: a root folder with a few files, the app on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lora_scripts.gui.app import create_app
from lora_scripts.gui.security import CSRF_COOKIE
from lora_scripts.gui.server import make_settings

BASE_URL = "http://127.0.0.1:7860"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    (folder / "data" / "ink").mkdir(parents=True)
    (folder / "data" / "ink" / "a.png").write_bytes(b"")
    (folder / "data" / "ink" / "a.txt").write_text("ink wash", encoding="utf-8")
    (folder / "output").mkdir()
    return folder


@pytest.fixture
def client(root: Path) -> TestClient:
    """A client whose first GET got the CSRF cookie, as a page does; `csrf_headers(client)` sends it."""
    app = create_app(make_settings([root], listen=False))
    client = TestClient(app, base_url=BASE_URL)
    client.get("/")
    return client


def csrf_headers(client: TestClient) -> dict[str, str]:
    return {"X-CSRF-Token": client.cookies.get(CSRF_COOKIE)}
