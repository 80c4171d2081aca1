"""The dataset page's endpoints: listing, thumbnails, caption edits, bulk edits, tag counts, new folders,
and their refusals (paths outside the roots, a missing CSRF token, stale edits)."""

from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image

from lora_scripts.captioning import metadata_csv
from lora_scripts.captioning.metadata_csv import CsvCaptions
from tests.gui.conftest import csrf_headers
from tests.gui.dataset_helpers import (
    CSV_TEXT,
    csv_folder,
    trained_captions,
    txt_captions,
    txt_folder,
    write_picture,
)

SMALL_RESOLUTION = "64"  # the 96 px test pictures are big enough; only small.png (40 px) is not


def listing(client, path: str) -> dict:
    response = client.get("/api/dataset", params={"path": path, "resolution": SMALL_RESOLUTION})
    assert response.status_code == 200, response.text
    return response.json()


def put_caption(client, path: str, file_name: str, caption: str, previous: str | None, **extra):
    body = {"path": path, "file_name": file_name, "caption": caption, "previous": previous, **extra}
    return client.put("/api/dataset/caption", json=body, headers=csrf_headers(client))


# --- listing --------------------------------------------------------------------------------------------


def test_a_txt_folder_lists_captions_sizes_and_findings(client, root):
    folder = txt_folder(root)
    shutil.copyfile(folder / "a.png", folder / "dup.png")
    (folder / "sub").mkdir()
    got = listing(client, "work/txtset")
    assert got["path"] == "work/txtset" and got["folders"] == ["sub"]
    assert got["caption_format"] == "txt" and got["caption_file"] is None and got["resolution"] == 64
    by_name = {image["file_name"]: image for image in got["images"]}
    assert list(by_name) == ["a.png", "b.png", "bare.png", "dup.png", "small.png"]
    assert {name: image["caption"] for name, image in by_name.items()} == {
        "a.png": "sks, ink, mountain",
        "b.png": "ink, river, boat",
        "bare.png": None,
        "dup.png": None,
        "small.png": "sks, moon",
    }
    assert (by_name["a.png"]["width"], by_name["a.png"]["height"]) == (96, 96)
    assert by_name["a.png"]["bytes"] == (folder / "a.png").stat().st_size
    assert {name: image["findings"] for name, image in by_name.items()} == {
        "a.png": [{"kind": "duplicate", "of": ["dup.png"]}],
        "b.png": [],
        "bare.png": [{"kind": "uncaptioned"}],
        "dup.png": [{"kind": "duplicate", "of": ["a.png"]}, {"kind": "uncaptioned"}],
        "small.png": [{"kind": "too_small", "width": 40, "height": 40, "resolution": 64}],
    }
    assert got["missing"] == [] and got["job"] is None and got["caption_errors"] == []


def test_a_csv_folder_lists_the_csv_captions_and_rows_of_deleted_images(client, root):
    folder = csv_folder(root)
    write_picture(folder, "d.png", 20)
    (folder / "metadata.csv").write_bytes((CSV_TEXT + "gone.png,a deleted image\r\n").encode("utf-8"))
    (folder / "a.txt").write_text("ignored: the folder has a metadata.csv", encoding="utf-8")
    got = listing(client, "work/csvset")
    assert got["caption_format"] == "csv" and got["caption_file"] == "work/csvset/metadata.csv"
    assert {image["file_name"]: image["caption"] for image in got["images"]} == {
        "a.png": "ink, mountain, mist",
        "b.png": "ink wash of a river",
        "c.png": 'ink, "old" pine',
        "d.png": None,
    }
    assert got["images"][3]["findings"] == [{"kind": "uncaptioned"}]
    assert got["missing"] == ["gone.png"]


def test_a_csv_that_cannot_be_parsed_still_lists_the_images_and_blocks_edits(client, root):
    folder = csv_folder(root)
    broken = CSV_TEXT + 'd.png,"an unclosed quote\r\n'
    (folder / "metadata.csv").write_bytes(broken.encode("utf-8"))
    got = listing(client, "work/csvset")
    [error] = got["caption_errors"]
    assert error.startswith(f"{folder / 'metadata.csv'} line 5: not valid CSV (")
    assert [image["caption"] for image in got["images"]] == [None, None, None]
    refused = put_caption(client, "work/csvset", "a.png", "x", None)
    assert refused.json() == {"errors": [error]}
    assert (folder / "metadata.csv").read_bytes() == broken.encode("utf-8")


def test_too_long_captions_and_unreadable_images_get_their_facts(client, root):
    folder = root / "long"
    write_picture(folder, "long.png", 1)
    (folder / "long.txt").write_text("sks " + " ".join(["red"] * 99), encoding="utf-8")  # 100 CLIP tokens
    (folder / "broken.png").write_bytes(b"not a picture")
    (folder / "broken.txt").write_text("sks", encoding="utf-8")
    by_name = {image["file_name"]: image for image in listing(client, "work/long")["images"]}
    assert by_name["long.png"]["findings"] == [
        {"kind": "too_long", "tokens": 100, "limit": 75, "cut_off": " ".join(["red"] * 25)}
    ]
    [broken] = by_name["broken.png"]["findings"]
    assert broken["kind"] == "unreadable" and "cannot identify image file" in broken["reason"]
    assert (by_name["broken.png"]["width"], by_name["broken.png"]["height"]) == (0, 0)


def test_the_resolution_decides_what_is_too_small(client, root):
    txt_folder(root)
    got = client.get("/api/dataset", params={"path": "work/txtset", "resolution": "512"}).json()
    small = [
        image["file_name"]
        for image in got["images"]
        if image["findings"][:1] and image["findings"][0]["kind"] == "too_small"
    ]
    assert small == ["a.png", "b.png", "bare.png", "small.png"]  # every test picture is under 512 px
    bad = client.get("/api/dataset", params={"path": "work/txtset", "resolution": "big"})
    assert bad.status_code == 400
    assert bad.json() == {"errors": ["resolution: 'big' is not a whole number; give one from 64 to 8192."]}


# --- thumbnails -----------------------------------------------------------------------------------------


def test_thumbnails_are_jpegs_within_the_size_and_revalidate(client, root):
    write_picture(root / "thumbs", "wide.png", 1, (200, 100))
    response = client.get("/api/dataset/thumbnail", params={"path": "work/thumbs/wide.png", "size": "64"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as thumb:
        assert (thumb.format, thumb.size) == ("JPEG", (64, 32))
    again = client.get(
        "/api/dataset/thumbnail",
        params={"path": "work/thumbs/wide.png", "size": "64"},
        headers={"If-None-Match": response.headers["etag"]},
    )
    assert again.status_code == 304 and again.content == b""
    write_picture(root / "thumbs", "wide.png", 2, (300, 100))  # replaced: a new ETag and thumbnail
    changed = client.get(
        "/api/dataset/thumbnail",
        params={"path": "work/thumbs/wide.png", "size": "64"},
        headers={"If-None-Match": response.headers["etag"]},
    )
    assert changed.status_code == 200
    assert Image.open(io.BytesIO(changed.content)).size == (64, 21)


def test_thumbnails_of_what_is_not_an_image_are_refused(client, root):
    (root / "data" / "notes.txt").write_text("hello", encoding="utf-8")
    refused = client.get("/api/dataset/thumbnail", params={"path": "work/data/notes.txt"})
    assert refused.json() == {"errors": ["'work/data/notes.txt': not an image file."]}
    broken = client.get("/api/dataset/thumbnail", params={"path": "work/data/ink/a.png"})  # 0 bytes
    assert broken.status_code == 400
    assert broken.json()["errors"][0].startswith("'a.png': cannot be read as an image (")


# --- one caption ----------------------------------------------------------------------------------------


def test_editing_a_csv_caption_keeps_the_other_rows_and_backs_up_once(client, root, monkeypatch):
    folder = csv_folder(root)
    metadata = folder / "metadata.csv"
    written = []
    real_write_atomic = metadata_csv.write_atomic
    monkeypatch.setattr(
        metadata_csv,
        "write_atomic",
        lambda path, write: (written.append(path), real_write_atomic(path, write)),
    )
    response = put_caption(client, "work/csvset", "b.png", "ink wash, river at dusk", "ink wash of a river")
    assert response.status_code == 200, response.text
    assert response.json()["backups"] == ["work/csvset/metadata.csv.bak"]
    assert response.json()["caption_format"] == "csv"
    expected = CSV_TEXT.replace("b.png,ink wash of a river", 'b.png,"ink wash, river at dusk"')
    assert metadata.read_bytes() == expected.encode("utf-8")  # the other rows byte for byte, CRLF kept
    assert (folder / "metadata.csv.bak").read_bytes() == CSV_TEXT.encode("utf-8")
    assert written == [folder / "metadata.csv.bak", metadata]  # both through the atomic writer
    assert trained_captions(folder, csv=True)["b.png"] == "ink wash, river at dusk"
    assert CsvCaptions(metadata, folder).existing["b.png"] == "ink wash, river at dusk"

    # The file is what the app wrote: the next edit needs no new backup.
    second = put_caption(client, "work/csvset", "a.png", "ink, mountain", "ink, mountain, mist")
    assert second.json()["backups"] == []
    assert not (folder / "metadata.csv.bak.1").exists()
    assert trained_captions(folder, csv=True)["a.png"] == "ink, mountain"

    # Edited elsewhere meanwhile: backed up again before the app changes it, the older backup kept.
    outside = metadata.read_bytes().replace(b'"ink, ""old"" pine"', b"edited in a text editor")
    metadata.write_bytes(outside)
    third = put_caption(client, "work/csvset", "a.png", "ink, peak", "ink, mountain")
    assert third.json()["backups"] == ["work/csvset/metadata.csv.bak"]
    assert (folder / "metadata.csv.bak").read_bytes() == outside
    assert (folder / "metadata.csv.bak.1").read_bytes() == CSV_TEXT.encode("utf-8")
    assert trained_captions(folder, csv=True) == {
        "a.png": "ink, peak",
        "b.png": "ink wash, river at dusk",
        "c.png": "edited in a text editor",
    }
    assert not list(folder.glob(".*.tmp"))


def test_a_row_appended_first_does_not_skip_the_backup_of_a_later_change(client, root):
    folder = csv_folder(root)
    write_picture(folder, "d.png", 20)
    appended = put_caption(client, "work/csvset", "d.png", "a new one", None)
    assert appended.json()["backups"] == []  # nothing replaced
    replaced = put_caption(client, "work/csvset", "a.png", "changed", "ink, mountain, mist")
    assert replaced.json()["backups"] == ["work/csvset/metadata.csv.bak"]
    backup = CsvCaptions(folder / "metadata.csv.bak", folder).existing
    assert backup["a.png"] == "ink, mountain, mist" and backup["d.png"] == "a new one"


def test_editing_txt_captions_backs_up_the_old_file_and_creates_missing_ones(client, root):
    folder = txt_folder(root)
    response = put_caption(client, "work/txtset", "a.png", "sks, ink, mountains", "sks, ink, mountain")
    assert response.json()["backups"] == ["work/txtset/a.txt.bak"]
    assert (folder / "a.txt.bak").read_text(encoding="utf-8") == "sks, ink, mountain"
    created = put_caption(client, "work/txtset", "bare.png", "  sks, bare hills \n", None, resolution=64)
    assert created.json() == {
        "file_name": "bare.png",
        "caption": "sks, bare hills",
        "caption_format": "txt",
        "backups": [],
        "findings": [],  # no longer uncaptioned
    }
    assert (folder / "bare.txt").read_bytes() == b"sks, bare hills"
    assert trained_captions(folder, csv=False) == {
        "a.png": "sks, ink, mountains",
        "b.png": "ink, river, boat",
        "bare.png": "sks, bare hills",
        "small.png": "sks, moon",
    }


def test_a_folder_without_captions_gets_the_format_the_page_chose(client, root):
    write_picture(root / "fresh_txt", "x.png", 1)
    write_picture(root / "fresh_csv", "x.png", 1)
    assert listing(client, "work/fresh_txt")["caption_format"] is None
    assert (
        put_caption(client, "work/fresh_txt", "x.png", "a hill", None, caption_format="txt").status_code
        == 200
    )
    assert (root / "fresh_txt" / "x.txt").read_text(encoding="utf-8") == "a hill"
    assert put_caption(client, "work/fresh_csv", "x.png", "a hill, far", None).status_code == 200
    assert (root / "fresh_csv" / "metadata.csv").read_text(
        encoding="utf-8"
    ) == 'file_name,text\nx.png,"a hill, far"\n'
    assert listing(client, "work/fresh_csv")["caption_format"] == "csv"


@pytest.mark.parametrize(
    ("file_name", "caption", "previous", "message"),
    [
        (
            "a.png",
            "changed",
            "stale text",
            "'a.png': its caption changed on disk since the page showed it "
            "(now: 'sks, ink, mountain'); reload the folder and edit again.",
        ),
        (
            "bare.png",
            "new",
            "the page thought it had one",
            "'bare.png': its caption changed on disk since the "
            "page showed it (now: ''); reload the folder and edit again.",
        ),
        (
            "a.png",
            "   ",
            "sks, ink, mountain",
            "'a.png': the caption is empty; write one (training refuses empty captions).",
        ),
        ("zzz.png", "x", None, "'zzz.png': no such image in 'work/txtset'; reload the folder."),
    ],
)
def test_caption_edits_that_would_lose_text_are_refused(client, root, file_name, caption, previous, message):
    folder = txt_folder(root)
    before = txt_captions(folder)
    response = put_caption(client, "work/txtset", file_name, caption, previous)
    assert response.status_code == 400 and response.json() == {"errors": [message]}
    assert txt_captions(folder) == before and not list(folder.glob("*.bak"))


# --- bulk edits -----------------------------------------------------------------------------------------

BULK_CASES = [
    (
        "txt",
        {"operation": "add_trigger", "text": "sks"},
        {"b.png": "sks, ink, river, boat"},
        2,
    ),
    (
        "txt",
        {"operation": "add_suffix", "text": ", ink wash painting"},
        {
            "a.png": "sks, ink, mountain, ink wash painting",
            "b.png": "ink, river, boat, ink wash painting",
            "small.png": "sks, moon, ink wash painting",
        },
        0,
    ),
    (
        "txt",
        {"operation": "replace", "find": "ink", "replace": "sumi-e"},
        {"a.png": "sks, sumi-e, mountain", "b.png": "sumi-e, river, boat"},
        1,
    ),
    (
        "txt",
        {"operation": "remove_tag", "text": "ink"},
        {"a.png": "sks, mountain", "b.png": "river, boat"},
        1,
    ),
    (
        "csv",
        {"operation": "add_trigger", "text": "sks"},
        {
            "a.png": "sks, ink, mountain, mist",
            "b.png": "sks, ink wash of a river",
            "c.png": 'sks, ink, "old" pine',
        },
        0,
    ),
    (
        "csv",
        {"operation": "remove_tag", "text": "ink"},
        {"a.png": "mountain, mist", "c.png": '"old" pine'},
        1,
    ),
    ("csv", {"operation": "replace", "find": '"old" ', "replace": ""}, {"c.png": "ink, pine"}, 2),
]


@pytest.mark.parametrize(("kind", "edit", "changed", "unchanged"), BULK_CASES)
def test_bulk_edits_write_exactly_their_preview_after_one_backup(
    client, root, kind, edit, changed, unchanged
):
    folder = txt_folder(root) if kind == "txt" else csv_folder(root)
    path = f"work/{folder.name}"
    before = trained_captions(folder, csv=True) if kind == "csv" else txt_captions(folder)
    preview = client.post(
        "/api/dataset/bulk/preview", json={"path": path, **edit}, headers=csrf_headers(client)
    )
    assert preview.status_code == 200, preview.text
    plan = preview.json()
    assert {c["file_name"]: c["after"] for c in plan["changes"]} == changed
    assert {c["file_name"]: c["before"] for c in plan["changes"]} == {name: before[name] for name in changed}
    assert plan["unchanged"] == unchanged and plan["skipped"] == []
    assert (
        trained_captions(folder, csv=True) if kind == "csv" else txt_captions(folder)
    ) == before  # unwritten

    expect = {c["file_name"]: c["before"] for c in plan["changes"]}
    applied = client.post(
        "/api/dataset/bulk/apply", json={"path": path, **edit, "expect": expect}, headers=csrf_headers(client)
    )
    assert applied.status_code == 200, applied.text
    result = applied.json()
    assert result["changes"] == plan["changes"] and result["written"] == len(changed)
    after = trained_captions(folder, csv=kind == "csv") if kind == "csv" else txt_captions(folder)
    assert after == {**before, **changed}
    if kind == "csv":
        assert result["backups"] == ["work/csvset/metadata.csv.bak"]
        assert (folder / "metadata.csv.bak").read_bytes() == CSV_TEXT.encode("utf-8")
    else:
        assert result["backups"] == [f"work/txtset/{name[:-4]}.txt.bak" for name in sorted(changed)]
        for name in changed:
            assert (folder / f"{name[:-4]}.txt.bak").read_text(encoding="utf-8") == before[name]


def test_bulk_apply_refuses_when_the_captions_changed_since_the_preview(client, root):
    folder = txt_folder(root)
    edit = {"path": "work/txtset", "operation": "add_trigger", "text": "sks"}
    plan = client.post("/api/dataset/bulk/preview", json=edit, headers=csrf_headers(client)).json()
    (folder / "a.txt").write_text("someone else's edit", encoding="utf-8")
    expect = {c["file_name"]: c["before"] for c in plan["changes"]}
    refused = client.post(
        "/api/dataset/bulk/apply", json={**edit, "expect": expect}, headers=csrf_headers(client)
    )
    assert refused.json() == {
        "errors": ["The captions changed since the preview; preview the edit again, then apply it."]
    }
    assert (folder / "b.txt").read_text(encoding="utf-8") == "ink, river, boat"
    assert not list(folder.glob("*.bak"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"operation": "shout"},
            "operation: 'shout' is not a bulk edit; use one of add_trigger, add_suffix, replace, remove_tag.",
        ),
        ({"operation": "add_trigger", "text": " "}, "text: is empty; give the trigger word."),
        ({"operation": "replace", "replace": "x"}, "find: is empty; give the text to replace."),
        ({"operation": "remove_tag", "tag": "x"}, "tag: extra inputs are not permitted."),
    ],
)
def test_bulk_edit_mistakes_are_one_sentence_each(client, root, edit, message):
    txt_folder(root)
    response = client.post(
        "/api/dataset/bulk/preview", json={"path": "work/txtset", **edit}, headers=csrf_headers(client)
    )
    assert response.status_code == 400 and response.json() == {"errors": [message]}


# --- tag counts, folders --------------------------------------------------------------------------------


def test_tag_and_word_counts(client, root):
    txt_folder(root)
    csv_folder(root)
    tags = client.get("/api/dataset/tags", params={"path": "work/txtset"}).json()
    assert tags == {
        "kind": "tags",
        "terms": [
            {"term": "sks", "count": 2},
            {"term": "ink", "count": 2},
            {"term": "mountain", "count": 1},
            {"term": "river", "count": 1},
            {"term": "boat", "count": 1},
            {"term": "moon", "count": 1},
        ],
    }
    words = client.get(
        "/api/dataset/tags", params={"path": "work/csvset", "kind": "words", "limit": "3"}
    ).json()
    assert words["terms"] == [
        {"term": "ink", "count": 3},
        {"term": "mountain", "count": 1},
        {"term": "mist", "count": 1},
    ]
    csv_tags = client.get("/api/dataset/tags", params={"path": "work/csvset"}).json()["terms"]
    assert csv_tags[0] == {"term": "ink", "count": 2} and len(csv_tags) == 5


def test_creating_a_folder(client, root):
    headers = csrf_headers(client)
    made = client.post("/api/dataset/folder", json={"path": "work/new set"}, headers=headers)
    assert made.json() == {"path": "work/new set"} and (root / "new set").is_dir()
    again = client.post("/api/dataset/folder", json={"path": "work/new set"}, headers=headers)
    assert again.json() == {"errors": ["'work/new set': already exists; pick it, or choose another name."]}
    orphan = client.post("/api/dataset/folder", json={"path": "work/none/deeper"}, headers=headers)
    assert orphan.json() == {
        "errors": ["'work/none/deeper': its parent folder does not exist; create that first."]
    }
    assert not (root / "none").exists()
    empty = listing(client, "work/new set")
    assert empty["images"] == [] and empty["caption_format"] is None


# --- refusals -------------------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "/api/dataset", lambda p: {"params": {"path": p}}),
    ("GET", "/api/dataset/thumbnail", lambda p: {"params": {"path": f"{p}/a.png"}}),
    ("GET", "/api/dataset/tags", lambda p: {"params": {"path": p}}),
    ("PUT", "/api/dataset/caption", lambda p: {"json": {"path": p, "file_name": "a.png", "caption": "x"}}),
    (
        "POST",
        "/api/dataset/bulk/preview",
        lambda p: {"json": {"path": p, "operation": "add_trigger", "text": "x"}},
    ),
    (
        "POST",
        "/api/dataset/bulk/apply",
        lambda p: {"json": {"path": p, "operation": "add_trigger", "text": "x"}},
    ),
    ("POST", "/api/dataset/folder", lambda p: {"json": {"path": f"{p}/new"}}),
    ("POST", "/api/dataset/upload", lambda p: {"params": {"path": p}, "files": {"files": ("a.png", b"x")}}),
    ("POST", "/api/dataset/label", lambda p: {"json": {"path": p}}),
]


@pytest.mark.parametrize(("method", "url", "request_args"), ENDPOINTS)
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("work/../outside", "'..' is not allowed; give a path inside a root."),
        ("other/data", "'other' is not a root; the roots are work."),
        ("/etc", "give a path inside a root, as ROOT/relative/path."),
    ],
)
def test_every_endpoint_refuses_paths_outside_the_roots(
    client, root, method, url, request_args, path, message
):
    (root.parent / "outside").mkdir(exist_ok=True)
    write_picture(root.parent / "outside", "a.png", 1)
    response = client.request(method, url, headers=csrf_headers(client), **request_args(path))
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert message in error
    assert sorted(p.name for p in (root.parent / "outside").iterdir()) == ["a.png"]


def test_a_symlink_out_of_the_root_is_refused(client, root):
    write_picture(root.parent / "outside", "a.png", 1)
    (root / "link").symlink_to(root.parent / "outside")
    response = client.get("/api/dataset", params={"path": "work/link"})
    assert "leads out of the root" in response.json()["errors"][0]


@pytest.mark.parametrize(("method", "url", "request_args"), [e for e in ENDPOINTS if e[0] != "GET"])
def test_state_changing_endpoints_need_the_csrf_token(client, root, method, url, request_args):
    folder = txt_folder(root)
    before = sorted(p.name for p in folder.iterdir())
    response = client.request(method, url, **request_args("work/txtset"))
    assert response.status_code == 403
    assert "CSRF token" in response.json()["errors"][0]
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (folder / "a.txt").read_text(encoding="utf-8") == "sks, ink, mountain"


def test_an_unknown_job_is_one_sentence(client):
    response = client.get("/api/jobs/123abc")
    assert response.json() == {
        "errors": ["job '123abc': no such job (the server may have restarted); start it again."]
    }
