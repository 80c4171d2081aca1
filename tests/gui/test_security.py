"""The guards: Host header (DNS rebinding), access token with --listen, CSRF on state-changing requests."""

from __future__ import annotations

from fastapi.testclient import TestClient

from lora_scripts.gui.app import create_app
from lora_scripts.gui.security import CSRF_COOKIE, TOKEN_COOKIE, host_name
from lora_scripts.gui.server import make_settings
from tests.gui.conftest import BASE_URL, csrf_headers


def test_the_page_loads_with_its_csrf_token_and_no_cdn(client):
    page = client.get("/")
    assert page.status_code == 200
    token = client.cookies.get(CSRF_COOKIE)
    assert token and f'<meta name="csrf-token" content="{token}">' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # every script and style ships inside
    assert client.get("/static/app.js").status_code == 200


def test_requests_for_another_host_are_refused(root):
    client = TestClient(create_app(make_settings([root], listen=False)), base_url="http://evil.example:7860")
    response = client.get("/api/roots")
    assert response.status_code == 400
    assert response.json()["errors"] == [
        "This server answers only to its own address; open the address it printed at start."
    ]
    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860"):
        assert client.get("/api/roots", headers={"host": host}).status_code == 200


def test_host_names_are_read_without_their_port():
    assert host_name("LocalHost:7860") == "localhost"
    assert host_name("[::1]:7860") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("evil.example") == "evil.example"


def test_state_changing_requests_need_the_csrf_token(client):
    response = client.post("/api/i18n/en")  # any non-GET: refused before routing
    assert response.status_code == 403
    assert "CSRF token" in response.json()["errors"][0]
    wrong = client.post("/api/i18n/en", headers={"X-CSRF-Token": "guess"})
    assert wrong.status_code == 403
    right = client.post("/api/i18n/en", headers=csrf_headers(client))
    assert right.status_code == 405  # past the guard: the route only answers GET


def test_listen_needs_the_access_token_on_every_request(root):
    settings = make_settings([root], listen=True, allow_hosts=("testserver",))
    token = settings.security.access_token
    assert token and len(token) >= 24
    client = TestClient(create_app(settings), base_url=BASE_URL)
    refused = client.get("/api/roots")
    assert refused.status_code == 401 and "access token" in refused.json()["errors"][0]
    assert client.get("/api/roots?token=wrong").status_code == 401
    assert client.get(f"/?token={token}").status_code == 200
    assert client.cookies.get(TOKEN_COOKIE) == token  # kept, so the page's own requests pass
    assert client.get("/api/roots").status_code == 200
    bearer = TestClient(create_app(settings), base_url=BASE_URL)
    assert bearer.get("/api/roots", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_without_listen_there_is_no_token_and_only_loopback_names(root):
    settings = make_settings([root], listen=False)
    assert settings.security.access_token is None
    assert settings.security.allowed_hosts == {"127.0.0.1", "localhost", "::1"}


def test_a_missing_parameter_is_one_sentence_in_the_error_shape(client):
    response = client.get("/api/files")
    assert response.status_code == 400
    assert response.json() == {"errors": ["path: Field required."]}
