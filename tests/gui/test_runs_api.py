"""The Train page's endpoints with real runs: each run is a `lora-scripts train` subprocess on the tiny model,
started, queued, stopped and resumed through the API, and watched through its output folder."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from lora_scripts.gui.app import create_app
from lora_scripts.gui.server import make_settings
from lora_scripts.models.tiny import build_tiny_sd
from tests.gui.conftest import BASE_URL, csrf_headers
from tests.training.conftest import make_dataset, tiny_run_settings, write_config

DEADLINE_S = 240


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "ink"
    make_dataset(folder)
    return folder


@pytest.fixture(autouse=True)
def one_thread_runs(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs' torch: tiny models go faster on one thread


def config(root: Path, model: Path, data: Path, name: str, **overrides) -> str:
    values = tiny_run_settings(data, model, output_dir=str(root / "output" / name), **overrides)
    write_config(root / "configs" / f"{name}.yaml", **values)
    return f"{root.name}/configs/{name}.yaml"


def post(client: TestClient, path: str, body: dict):
    return client.post(path, json=body, headers=csrf_headers(client))


def wait_for(client: TestClient, path: str, done) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        detail = client.get("/api/runs/detail", params={"path": path})
        if detail.status_code == 200 and done(detail.json()):
            return detail.json()
        time.sleep(0.3)
    raise AssertionError(f"{path}: still {client.get('/api/runs').json()}")


def test_runs_start_queue_and_show_curves_samples_and_log(client, root, tiny_model, tiny_data):
    first = config(
        root, tiny_model, tiny_data, "first", max_train_steps=4, save_steps=2, logging_steps=1,
        sample_prompts=["ink wash painting, a cat --s 2"], sample_every_n_steps=2,
    )  # fmt: skip
    second = config(root, tiny_model, tiny_data, "second", max_train_steps=2)
    started = post(client, "/api/runs", {"config": first})
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "starting" and started.json()["path"] == f"{root.name}/output/first"
    queued = post(client, "/api/runs", {"config": second})
    assert queued.json()["status"] == "queued"
    listing = client.get("/api/runs").json()
    assert [q["path"] for q in listing["queue"]] == [f"{root.name}/output/second"]
    assert first in listing["configs"] and second in listing["configs"]
    again = post(client, "/api/runs", {"config": second})
    assert again.status_code == 400 and "already queued" in again.json()["errors"][0]

    detail = wait_for(client, f"{root.name}/output/first", lambda d: d["status"] == "finished")
    assert (detail["step"], detail["total"], detail["steps"]) == (4, 4, [1, 2, 3, 4])
    assert len(detail["loss"]) == 4 and len(detail["lr"]["unet"]) == 4
    assert [s["step"] for s in detail["samples"]] == [2, 4]
    assert detail["log"] and (root / "output" / "first" / "train.log").is_file()
    image = client.get("/api/runs/sample", params={"path": detail["samples"][0]["path"]})
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"

    second_detail = wait_for(client, f"{root.name}/output/second", lambda d: d["status"] == "finished")
    first_events = client.get("/api/runs/events", params={"path": f"{root.name}/output/first"}).json()
    second_events = client.get("/api/runs/events", params={"path": f"{root.name}/output/second"}).json()
    assert first_events["events"][-1]["time"] <= second_events["events"][0]["time"]  # one after the other
    more = client.get(
        "/api/runs/events", params={"path": f"{root.name}/output/first", "offset": first_events["offset"]}
    )
    assert more.json() == {"events": [], "offset": first_events["offset"]}
    assert second_detail["step"] == 2

    restarted = TestClient(create_app(make_settings([root], listen=False)), base_url=BASE_URL)
    runs = {run["path"]: run for run in restarted.get("/api/runs").json()["runs"]}
    assert runs[f"{root.name}/output/first"]["status"] == "finished"
    assert runs[f"{root.name}/output/second"]["status"] == "finished"


def test_stop_saves_the_state_and_resume_finishes(client, root, tiny_model, tiny_data):
    name = config(root, tiny_model, tiny_data, "long", max_train_steps=400, logging_steps=1)
    path = f"{root.name}/output/long"
    assert post(client, "/api/runs", {"config": name}).status_code == 200
    wait_for(client, path, lambda d: d["status"] == "running" and (d["step"] or 0) >= 1)
    stop = post(client, "/api/runs/stop", {"path": path})
    assert stop.json()["stop"] == "requested"
    stopped = wait_for(client, path, lambda d: d["status"] == "stopped")
    assert stopped["resumable"] and stopped["states"][-1] == stopped["step"] < 400

    # A shorter run now, so the resume ends soon: the config is read again, as `--resume auto` does.
    file = root / "configs" / "long.yaml"
    values = yaml.safe_load(file.read_text(encoding="utf-8"))
    write_config(file, **(values | {"max_train_steps": stopped["step"] + 2}))
    resumed = post(client, "/api/runs/resume", {"path": path})
    assert resumed.status_code == 200 and resumed.json()["resume"] is True
    done = wait_for(client, path, lambda d: d["status"] == "finished")
    assert done["steps"] == list(range(1, stopped["step"] + 3))


def test_stop_takes_a_queued_run_out_of_the_queue(client, root, tiny_model, tiny_data):
    client.app.state  # noqa: B018 - the same app throughout
    first = config(root, tiny_model, tiny_data, "a", max_train_steps=2)
    second = config(root, tiny_model, tiny_data, "b", max_train_steps=2)
    post(client, "/api/runs", {"config": first})
    assert post(client, "/api/runs", {"config": second}).json()["status"] == "queued"
    out = post(client, "/api/runs/stop", {"path": f"{root.name}/output/b"})
    assert out.json()["stop"] == "dequeued"
    assert client.get("/api/runs").json()["queue"] == []
    wait_for(client, f"{root.name}/output/a", lambda d: d["status"] == "finished")
    assert not (root / "output" / "b").exists()


def test_refusals(client, root, tmp_path, tiny_model, tiny_data):
    outside = write_config(
        root / "configs" / "outside.yaml",
        **tiny_run_settings(tiny_data, tiny_model, output_dir=str(tmp_path / "x")),
    )
    assert outside.is_file()
    cases = [
        ("/api/runs", {"config": "/etc/passwd"}, "inside a root"),
        ("/api/runs", {"config": f"{root.name}/../x.yaml"}, "'..'"),
        ("/api/runs", {"config": f"{root.name}/data/ink/a.txt"}, "not a config file"),
        ("/api/runs", {"config": f"{root.name}/configs/outside.yaml"}, "outside every root"),
        ("/api/runs/stop", {"path": f"{root.name}/output"}, "no run is going"),
        ("/api/runs/resume", {"path": f"{root.name}/output"}, "no saved training state"),
    ]
    for endpoint, body, words in cases:
        answer = post(client, endpoint, body)
        assert answer.status_code == 400 and words in answer.json()["errors"][0], (body, answer.text)
    for get in ("/api/runs/detail", "/api/runs/events", "/api/runs/sample"):
        assert client.get(get, params={"path": "nowhere/x"}).status_code == 400
    not_sample = client.get("/api/runs/sample", params={"path": f"{root.name}/data/ink/a.png"})
    assert "not a sample image" in not_sample.json()["errors"][0]
    no_csrf = client.post("/api/runs", json={"config": f"{root.name}/configs/outside.yaml"})
    assert no_csrf.status_code == 403
    assert not (tmp_path / "x").exists()


def test_the_train_page_in_the_browser(root, tmp_path, tiny_model, tiny_data):
    from tests.gui.browser import require_chromium, screenshot_dir, served
    from tests.helpers.ports import free_port

    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    name = config(
        root, tiny_model, tiny_data, "page", max_train_steps=4, save_steps=2, logging_steps=1,
        sample_prompts=["ink wash painting, a cat --s 2"], sample_every_n_steps=2,
    )  # fmt: skip
    app = create_app(make_settings([root], listen=False))
    with served(app, free_port()) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "#train")
        page.wait_for_selector(f'#train-configs option[value="{name}"]', state="attached")
        page.fill("#train-config", name)
        page.click("#train-start")
        page.wait_for_selector("#train-samples img", timeout=DEADLINE_S * 1000)
        page.wait_for_function(
            "document.getElementById('train-name').textContent.includes('finished')",
            timeout=DEADLINE_S * 1000,
        )
        assert page.locator("#train-loss svg polyline").count() == 1
        assert page.locator("#train-lr svg polyline").count() >= 1
        assert page.locator("#train-samples img").count() == 2
        assert page.locator("#train-runs tbody tr").count() == 1
        assert page.locator("#train-log").inner_text().strip()
        assert page.locator("#train-stop").is_disabled() and not page.locator("#train-resume").is_disabled()
        page.screenshot(path=screenshot_dir(tmp_path) / "train.png", full_page=True)
        browser.close()
