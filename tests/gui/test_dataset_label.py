"""`label` from the dataset page: a background job with progress, the CLI's options and caption rules."""

from __future__ import annotations

import threading
import time

from lora_scripts.captioning.labeler import CaptionerOptions
from lora_scripts.errors import UserError
from lora_scripts.gui import labeling
from lora_scripts.gui.dataset import DatasetState
from lora_scripts.gui.roots import Roots
from tests.captioning.blip_fixture import write_tiny_blip
from tests.captioning.helpers import write_images
from tests.gui.conftest import csrf_headers

WAIT_S = 120.0


def wait_for(client, job_id: str, done=lambda job: job["status"] != "running") -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not get there in {WAIT_S} s: {job}")


def start(client, **body):
    return client.post("/api/dataset/label", json=body, headers=csrf_headers(client))


def test_label_with_the_tiny_blip_writes_new_captions_and_keeps_hand_ones(client, root):
    write_tiny_blip(root / "models" / "tiny_blip")
    folder = root / "photos"
    write_images(folder, ["1.png", "2.png", "3.png"])
    hand = 'file_name,text\r\n2.png,"my own, hand-written caption"\r\n'
    (folder / "metadata.csv").write_bytes(hand.encode("utf-8"))

    response = start(
        client,
        path="work/photos",
        model="work/models/tiny_blip",
        device="cpu",
        max_new_tokens=6,
        batch_size=1,
    )
    assert response.status_code == 202
    job = response.json()["job"]
    assert (job["kind"], job["folder"], job["status"]) == ("label", "work/photos", "running")
    job = wait_for(client, job["id"])
    assert job["status"] == "done", job["errors"]
    assert (job["phase"], job["done"], job["total"]) == ("done", 2, 2)
    assert job["result"]["captioned"] == 2 and job["result"]["kept"] == 1 and job["result"]["backups"] == []

    written = (folder / "metadata.csv").read_bytes().decode("utf-8")
    assert written.startswith(hand)  # the hand-written row, byte for byte
    listed = client.get("/api/dataset", params={"path": "work/photos"}).json()
    captions = {image["file_name"]: image["caption"] for image in listed["images"]}
    assert captions["2.png"] == "my own, hand-written caption"
    assert captions["1.png"] and captions["3.png"]  # words of the tiny vocabulary
    assert all(
        finding["kind"] != "uncaptioned" for image in listed["images"] for finding in image["findings"]
    )
    assert listed["job"]["id"] == job["id"] and listed["job"]["status"] == "done"


class GatedCaptioner:
    """Captions one batch each time the test opens the gate, so the test sees every step of the job."""

    name = "fake"

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.batches = 0

    def caption(self, images: list) -> list[str]:
        assert self.gate.acquire(timeout=WAIT_S)
        self.batches += 1
        return [f"a fake caption {self.batches}" for _ in images]


def test_progress_reaches_done_and_captions_are_locked_meanwhile(client, root, monkeypatch):
    captioner = GatedCaptioner()
    loaded_with = []
    monkeypatch.setattr(labeling, "load_captioner", lambda options: loaded_with.append(options) or captioner)
    folder = root / "gated"
    write_images(folder, ["a.png", "b.png", "c.png"])
    (folder / "a.txt").write_text("hand caption", encoding="utf-8")

    job = start(
        client,
        path="work/gated",
        captioner="wd14",
        threshold=0.5,
        exclude_tags="simple background, solo",
        trigger="sks",
        batch_size=1,
        overwrite=True,
    ).json()["job"]
    job = wait_for(client, job["id"], lambda j: j["phase"] == "captioning")
    assert (job["status"], job["done"], job["total"]) == ("running", 0, 3)
    assert loaded_with == [
        CaptionerOptions(name="wd14", threshold=0.5, exclude_tags=("simple background", "solo"))
    ]

    # While it runs: no caption edits, no second job in the folder.
    edit = {"path": "work/gated", "file_name": "a.png", "caption": "x", "previous": "hand caption"}
    refused = client.put("/api/dataset/caption", json=edit, headers=csrf_headers(client))
    assert refused.json() == {
        "errors": ["'work/gated': label is writing its captions; edit them when it finishes."]
    }
    bulk = {"path": "work/gated", "operation": "add_trigger", "text": "z"}
    assert client.post("/api/dataset/bulk/apply", json=bulk, headers=csrf_headers(client)).status_code == 400
    second = start(client, path="work/gated")
    assert second.json() == {
        "errors": ["'work/gated': a label job is already running there; wait until it finishes."]
    }

    for step in (1, 2, 3):
        captioner.gate.release()
        job = wait_for(client, job["id"], lambda j, step=step: j["done"] == step)
    job = wait_for(client, job["id"])
    assert (job["status"], job["done"], job["total"]) == ("done", 3, 3)
    assert job["result"]["backups"] == ["work/gated/a.txt.bak"]  # --overwrite backs up first, as the CLI
    assert (folder / "a.txt.bak").read_text(encoding="utf-8") == "hand caption"
    assert [(folder / f"{n}.txt").read_text(encoding="utf-8") for n in "abc"] == [
        "sks, a fake caption 1",
        "sks, a fake caption 2",
        "sks, a fake caption 3",
    ]
    edit["previous"] = "sks, a fake caption 1"
    assert client.put("/api/dataset/caption", json=edit, headers=csrf_headers(client)).status_code == 200


def test_a_failing_job_reports_its_errors(client, root, monkeypatch):
    def no_model(options):
        raise UserError("--model: 'x' not found; give a folder or a hub id.")

    monkeypatch.setattr(labeling, "load_captioner", no_model)
    write_images(root / "fails", ["a.png"])
    job = wait_for(client, start(client, path="work/fails").json()["job"]["id"])
    assert (job["status"], job["errors"]) == (
        "failed",
        ["--model: 'x' not found; give a folder or a hub id."],
    )
    assert not (root / "fails" / "metadata.csv").exists()


def test_label_options_are_checked_before_a_job_starts(client, root):
    write_images(root / "opts", ["a.png"])
    (root / "empty").mkdir()
    cases = [
        (
            {"model": "../models/x"},
            "model: '../models/x' is neither a folder inside a root (ROOT/relative/path) "
            "nor a hub id (owner/name).",
        ),
        ({"model": "work/models/none"}, "'work/models/none': no such file or folder."),
        ({"batch_size": 0}, "batch_size: input should be greater than or equal to 1."),
        ({"captioner": "gpt"}, "captioner: input should be 'blip' or 'wd14'."),
    ]
    for extra, message in cases:
        response = start(client, path="work/opts", **extra)
        assert response.status_code == 400 and response.json() == {"errors": [message]}, extra
    empty = start(client, path="work/empty")
    assert empty.json() == {"errors": ["'work/empty': no images to label; upload some first."]}


def test_hub_ids_and_root_folders_name_models(root):
    (root / "blip").mkdir()
    state = DatasetState(roots=Roots([root]))
    assert labeling.model_source(state, None) is None
    assert labeling.model_source(state, " ") is None
    hub_id = "Salesforce/blip-image-captioning-base"
    assert labeling.model_source(state, hub_id) == hub_id
    assert labeling.model_source(state, "work/blip") == str((root / "blip").resolve())
