"""Uploads: kept only when they decode as images, never over an existing file, never over the size limit."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lora_scripts.gui import dataset_api
from lora_scripts.gui.app import create_app
from lora_scripts.gui.server import make_settings
from tests.gui.conftest import BASE_URL, csrf_headers
from tests.gui.dataset_helpers import png_bytes

LIMIT = 4000  # bytes: the test PNGs are about 2 KB


@pytest.fixture
def client(root) -> TestClient:
    settings = make_settings([root], listen=False, max_upload_mb=LIMIT / 2**20)  # --max-upload-mb
    client = TestClient(create_app(settings), base_url=BASE_URL)
    client.get("/")
    return client


def upload(client: TestClient, folder: str, *files: tuple[str, bytes]):
    return client.post(
        "/api/dataset/upload",
        params={"path": folder},
        files=[("files", (name, data, "image/png")) for name, data in files],
        headers=csrf_headers(client),
    )


def visible(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def every_file(folder) -> list[str]:
    """Hidden ones too: a refused upload leaves no temporary file behind."""
    return sorted(p.name for p in folder.iterdir())


def test_a_real_png_is_kept_byte_for_byte(client, root):
    data = png_bytes()
    assert len(data) < LIMIT
    response = upload(client, "work/data", ("photo.png", data))
    assert response.status_code == 200
    assert response.json() == {"path": "work/data", "saved": ["photo.png"]}
    assert (root / "data" / "photo.png").read_bytes() == data
    assert every_file(root / "data") == ["ink", "photo.png"]
    listed = client.get("/api/dataset", params={"path": "work/data"}).json()["images"]
    assert [(image["file_name"], image["width"], image["height"]) for image in listed] == [
        ("photo.png", 32, 24)
    ]


def test_several_files_in_one_request(client, root):
    response = upload(client, "work/output", ("a.png", png_bytes(1, (8, 8))), ("b.png", png_bytes(2, (8, 8))))
    assert response.json()["saved"] == ["a.png", "b.png"]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (
            "notes.png",
            b"just some text, renamed",
            "'notes.png': cannot be read as an image (cannot identify image file 'notes.png'); upload PNG, "
            "JPEG, WebP or BMP images.",
        ),
        (
            "cut.png",
            png_bytes()[:300],
            "'cut.png': cannot be read as an image (",
        ),
        (
            "notes.txt",
            b"hello",
            "'notes.txt': not an image file name; upload .jpg, .jpeg, .png, .webp, .bmp files.",
        ),
        (
            ".hidden.png",
            png_bytes(),
            "'.hidden.png': not a usable file name; rename the image, e.g. to image_01.png.",
        ),
        ("../up.png", png_bytes(), None),  # the base name is kept: up.png, inside the folder
    ],
)
def test_what_is_not_an_image_is_refused_and_leaves_nothing(client, root, name, data, message):
    response = upload(client, "work/data", (name, data))
    if message is None:
        assert response.json()["saved"] == ["up.png"] and (root / "data" / "up.png").is_file()
        assert not (root / "up.png").exists()
        return
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert error.startswith(message)
    assert every_file(root / "data") == ["ink"]


def test_an_existing_name_is_never_overwritten(client, root):
    old = root / "data" / "ink" / "a.png"
    old.write_bytes(b"the user's own file")
    response = upload(client, "work/data/ink", ("a.png", png_bytes()))
    assert response.status_code == 400
    assert response.json() == {
        "errors": [
            "'a.png': 'work/data/ink' already has a file of this name; rename the image or delete the old "
            "file."
        ]
    }
    assert old.read_bytes() == b"the user's own file"
    assert every_file(root / "data" / "ink") == ["a.png", "a.txt"]


def test_a_name_taken_while_the_upload_is_written_is_not_overwritten(client, root, monkeypatch):
    from lora_scripts.data import captions

    target = root / "data" / "race.png"
    real = captions.unreadable_images

    def another_program_writes_it_meanwhile(paths):
        target.write_bytes(b"written by another program")
        return real(paths)

    monkeypatch.setattr("lora_scripts.gui.uploads.unreadable_images", another_program_writes_it_meanwhile)
    response = upload(client, "work/data", ("race.png", png_bytes()))
    assert response.status_code == 400 and "already has a file of this name" in response.json()["errors"][0]
    assert target.read_bytes() == b"written by another program"
    assert every_file(root / "data") == ["ink", "race.png"]


def test_files_over_the_limit_are_refused(client, root):
    big = png_bytes(3, (64, 64))
    assert LIMIT < len(big) < LIMIT + dataset_api.MULTIPART_OVERHEAD
    response = upload(client, "work/data", ("big.png", big))
    assert response.json() == {
        "errors": [
            "'big.png': larger than the upload limit of 3.9 KB; make the image smaller (training scales "
            "it down to about a megapixel anyway)."
        ]
    }
    huge = upload(client, "work/data", ("huge.png", b"\0" * (LIMIT + dataset_api.MULTIPART_OVERHEAD + 1)))
    assert huge.status_code == 400
    assert huge.json()["errors"][0].startswith("The upload is 1.0 MB, over the limit of 3.9 KB per file;")
    assert every_file(root / "data") == ["ink"]


def test_some_kept_some_refused_names_both(client, root):
    response = upload(client, "work/data", ("good.png", png_bytes(1, (8, 8))), ("bad.png", b"nope"))
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert errors[0].startswith("'bad.png': cannot be read as an image")
    assert errors[1] == "Kept the other files: good.png."
    assert every_file(root / "data") == ["good.png", "ink"]


def test_an_upload_without_files_is_one_sentence(client):
    response = client.post(
        "/api/dataset/upload", params={"path": "work/data"}, data={"x": "1"}, headers=csrf_headers(client)
    )
    assert response.json() == {"errors": ["The upload holds no files; send them in the form field 'files'."]}
