"""Files are read only inside the roots: `..`, absolute paths, unknown roots and symlinks out are refused."""

from __future__ import annotations

import os

import pytest

from lora_scripts.errors import UserError
from lora_scripts.gui.roots import Roots


def test_listing_a_folder_inside_the_root(client, root):
    assert client.get("/api/roots").json() == [{"name": "work", "path": str(root.resolve())}]
    listing = client.get("/api/files", params={"path": "work/data/ink"}).json()
    assert listing == {"path": "work/data/ink", "folders": [], "images": ["a.png"]}
    assert client.get("/api/files", params={"path": "work"}).json()["folders"] == ["data", "output"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("work/../secret", "'..' is not allowed"),
        ("/etc", "give a path inside a root"),
        ("C:/Windows", "give a path inside a root"),
        ("other/data", "'other' is not a root; the roots are work"),
        ("work/missing", "no such file or folder"),
    ],
)
def test_paths_outside_the_roots_are_refused_with_one_sentence(client, path, message):
    response = client.get("/api/files", params={"path": path})
    assert response.status_code == 400
    (error,) = response.json()["errors"]
    assert message in error and error.startswith(f"'{path}'")


def test_a_symlink_out_of_the_root_is_refused(client, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "data" / "escape")
    response = client.get("/api/files", params={"path": "work/data/escape"})
    assert response.status_code == 400
    assert "leads out of the root 'work'" in response.json()["errors"][0]


def test_roots_get_unique_names_and_name_paths_back(tmp_path):
    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "b" / "data").mkdir(parents=True)
    roots = Roots([tmp_path / "a" / "data", tmp_path / "b" / "data"])
    assert [r.name for r in roots] == ["data", "data-2"]
    assert roots.resolve("data-2") == (tmp_path / "b" / "data").resolve()
    assert roots.name_of(tmp_path / "b" / "data" / "x.png") == "data-2/x.png"
    with pytest.raises(UserError, match="not a folder"):
        Roots([tmp_path / "nope"])
