"""The Train page's queue survives a restart of the app: queued runs wait (and then start) in the new
server, runs that ended before writing progress stay listed, a run taken out of the queue is not a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi.testclient import TestClient

from lora_scripts.gui import launcher
from lora_scripts.gui.app import create_app
from lora_scripts.gui.launch_record import RECORD_FILE, RECORD_FOLDER, LaunchStore
from lora_scripts.gui.server import make_settings
from tests.gui.conftest import BASE_URL, csrf_headers


class FakeProcess:
    """A run's process as the launcher sees it: going until `end(code)`."""

    def __init__(self) -> None:
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def end(self, code: int) -> None:
        self.returncode = code

    def terminate(self) -> None:
        self.end(-15)


def fake_spawns(monkeypatch) -> dict[str, FakeProcess]:
    started: dict[str, FakeProcess] = {}

    def spawn(launch):
        started[launch.output_dir.name] = FakeProcess()
        return started[launch.output_dir.name]

    monkeypatch.setattr(launcher, "_spawn", spawn)
    return started


def wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_restarted_launcher_goes_on_with_the_queue(tmp_path: Path, monkeypatch):
    started = fake_spawns(monkeypatch)
    store = LaunchStore(tmp_path)
    first = launcher.RunLauncher(store=store)
    first.submit(tmp_path / "a.yaml", tmp_path / "a", resume=False)
    first.submit(tmp_path / "b.yaml", tmp_path / "b", resume=True)
    first.submit(tmp_path / "c.yaml", tmp_path / "c", resume=False)
    assert first.stop(tmp_path / "c") == "dequeued"
    saved = json.loads((tmp_path / RECORD_FOLDER / RECORD_FILE).read_text())
    assert [(r["output_dir"], r["state"]) for r in saved["launches"]] == [
        (str(tmp_path / "c"), "ended"),
        (str(tmp_path / "a"), "running"),
        (str(tmp_path / "b"), "queued"),
    ]
    assert list(started) == ["a"]

    # The server stops while a runs; the new one takes b from the record and starts it (nothing holds a
    # run lock here), and knows a only as "was going": its outcome is unknown.
    again = launcher.RunLauncher(store=LaunchStore(tmp_path))
    wait_until(lambda: "b" in started)
    launches = {launch.output_dir.name: launch for launch in again.launches()}
    assert launches["b"].state == "running" and launches["b"].resume
    assert (launches["a"].state, launches["a"].returncode) == ("ended", None)
    assert launches["c"].dequeued
    started["b"].end(1)
    wait_until(lambda: again.launches()[0].state == "ended")
    third = launcher.RunLauncher(store=LaunchStore(tmp_path))
    assert {launch.output_dir.name: launch.returncode for launch in third.launches()} == {
        "a": None, "b": 1, "c": None,
    }  # fmt: skip


def test_a_damaged_record_is_set_aside(tmp_path: Path):
    record = tmp_path / RECORD_FOLDER / RECORD_FILE
    record.parent.mkdir()
    record.write_text("{not json", encoding="utf-8")
    assert LaunchStore(tmp_path).load() == []
    assert not record.exists() and record.with_name(RECORD_FILE + ".damaged").read_text() == "{not json"


def test_the_runs_list_after_a_restart(root: Path, monkeypatch):
    started = fake_spawns(monkeypatch)
    (root / "configs").mkdir()
    for name in ("broken", "waiting", "dropped"):
        (root / "configs" / f"{name}.yaml").write_text(
            f"train_data_dir: {root / 'data' / 'ink'}\nbase_model: x\noutput_dir: {root / 'output' / name}\n",
            encoding="utf-8",
        )
    monkeypatch.setattr("lora_scripts.gui.runs_api.load_config", _output_dir_only)
    client = _client(root)
    for name in ("broken", "waiting", "dropped"):
        answer = client.post(
            "/api/runs", json={"config": f"work/configs/{name}.yaml"}, headers=csrf_headers(client)
        )
        assert answer.status_code == 200, answer.text
    client.post("/api/runs/stop", json={"path": "work/output/dropped"}, headers=csrf_headers(client))
    started["broken"].end(2)  # a config error: it ends before writing any progress
    wait_until(lambda: "waiting" in started)
    started["waiting"].end(0)
    statuses = lambda: {run["path"]: run["status"] for run in client.get("/api/runs").json()["runs"]}  # noqa: E731
    wait_until(lambda: statuses().get("work/output/waiting") == "finished")

    listing = _client(root).get("/api/runs").json()
    runs = {run["path"]: run["status"] for run in listing["runs"]}
    assert runs == {"work/output/broken": "failed", "work/output/waiting": "finished"}  # not "dropped"
    assert listing["queue"] == []


def _client(root: Path) -> TestClient:
    client = TestClient(create_app(make_settings([root], listen=False)), base_url=BASE_URL)
    client.get("/")
    return client


def _output_dir_only(path: Path):
    """load_config for these configs: only output_dir matters to the launcher (the base model is fake)."""
    import yaml

    class Config:
        output_dir = yaml.safe_load(Path(path).read_text(encoding="utf-8"))["output_dir"]

    return Config()
