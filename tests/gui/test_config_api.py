"""The Config page's endpoints: every schema key, presets, the loader's own sentences, a YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_scripts.config import TrainConfig, load_config, validate_config_dict
from lora_scripts.config.schema import field_section
from lora_scripts.errors import UserError
from lora_scripts.gui.config_api import preset_names
from tests.gui.conftest import csrf_headers

CONFIG = {
    "train_data_dir": "data/ink",
    "base_model": "models/v1-5.safetensors",
    "output_dir": "out/ink",
    "lora_rank": 8,
    "learning_rate": 2e-4,
    "mixed_precision": "no",
    "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
}


def test_schema_lists_every_key_grouped_by_section(client):
    schema = client.get("/api/config/schema").json()
    listed = {key["name"]: group["name"] for group in schema["groups"] for key in group["keys"]}
    assert sorted(listed) == sorted(TrainConfig.model_fields)
    assert all(section == field_section(name) for name, section in listed.items())
    rate = next(k for g in schema["groups"] for k in g["keys"] if k["name"] == "learning_rate")
    field = TrainConfig.model_fields["learning_rate"]
    assert (rate["default"], rate["help"], rate["kind"]) == (field.default, field.description, "float")
    scheduler = next(k for g in schema["groups"] for k in g["keys"] if k["name"] == "lr_scheduler")
    assert "cosine" in scheduler["choices"]


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_validates(client, name):
    answer = client.get("/api/config/preset", params={"name": name}).json()
    assert answer["config"] and answer["errors"] == []
    check = client.post(
        "/api/config/validate",
        json={"config": answer["config"], "check_paths": False},
        headers=csrf_headers(client),
    ).json()
    assert check == {"ok": True, "errors": []}


def test_a_bad_value_gives_the_loaders_sentence_at_its_key(client):
    bad = {**CONFIG, "lora_rank": 0, "learnig_rate": 1}
    with pytest.raises(UserError) as expected:
        validate_config_dict(bad, "config", check_paths=False)
    answer = client.post(
        "/api/config/validate", json={"config": bad, "check_paths": False}, headers=csrf_headers(client)
    ).json()
    assert answer["ok"] is False
    assert [e["message"] for e in answer["errors"]] == expected.value.messages
    by_key = {e["key"]: e["message"] for e in answer["errors"]}
    assert by_key["lora_rank"].startswith("config: lora_rank: ")
    assert "did you mean 'learning_rate'" in by_key["learnig_rate"]


def test_export_then_load_config_gives_the_same_config(client, root: Path, monkeypatch):
    monkeypatch.chdir(root)  # relative paths start from the working directory, for the CLI and the app
    answer = client.post(
        "/api/config/export", json={"config": CONFIG, "path": "work/ink.yaml"}, headers=csrf_headers(client)
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["path"] == "work/ink.yaml"
    assert yaml.safe_load((root / "ink.yaml").read_text(encoding="utf-8")) == CONFIG
    from_file = load_config(root / "ink.yaml", check_paths=False)
    assert from_file == validate_config_dict(CONFIG, "config", check_paths=False)


def test_export_never_overwrites_without_the_flag_nor_leaves_the_roots(client, root: Path):
    (root / "kept.yaml").write_text("mine: 1\n", encoding="utf-8")
    body = {"config": CONFIG, "path": "work/kept.yaml"}
    refused = client.post("/api/config/export", json=body, headers=csrf_headers(client))
    assert refused.status_code == 400 and "exists" in refused.json()["errors"][0]
    assert (root / "kept.yaml").read_text(encoding="utf-8") == "mine: 1\n"
    allowed = client.post(
        "/api/config/export", json={**body, "overwrite": True}, headers=csrf_headers(client)
    )
    assert allowed.status_code == 200 and "lora_rank: 8" in (root / "kept.yaml").read_text(encoding="utf-8")
    for outside in ("/tmp/x.yaml", "work/../x.yaml", "elsewhere/x.yaml"):
        answer = client.post(
            "/api/config/export", json={"config": CONFIG, "path": outside}, headers=csrf_headers(client)
        )
        assert answer.status_code == 400, outside
    assert not (root.parent / "x.yaml").exists()


def test_export_refuses_an_invalid_config(client):
    answer = client.post(
        "/api/config/export", json={"config": {**CONFIG, "lora_rank": 0}}, headers=csrf_headers(client)
    )
    assert answer.status_code == 400 and answer.json()["errors"][0].startswith("config: lora_rank: ")


def test_import_yaml_text_and_a_file(client, root: Path):
    text = yaml.safe_dump({**CONFIG, "lora_rank": 0})
    answer = client.post("/api/config/import", json={"yaml": text}, headers=csrf_headers(client)).json()
    assert answer["config"]["lora_rank"] == 0 and [e["key"] for e in answer["errors"]] == ["lora_rank"]
    (root / "dup.yaml").write_text("lora_rank: 4\nlora_rank: 8\n" + yaml.safe_dump(CONFIG), encoding="utf-8")
    answer = client.post(
        "/api/config/import", json={"path": "work/dup.yaml"}, headers=csrf_headers(client)
    ).json()
    with pytest.raises(UserError) as expected:
        load_config(root / "dup.yaml", check_paths=False)
    assert [e["message"] for e in answer["errors"]] == expected.value.messages
    assert answer["errors"][0]["key"] == "lora_rank"


def test_posts_without_the_csrf_token_are_refused(client):
    for path in ("/api/config/validate", "/api/config/export", "/api/config/import", "/api/check"):
        answer = client.post(path, json={"config": CONFIG})
        assert answer.status_code == 403, path


def test_the_page_has_the_config_and_check_parts(client):
    page = client.get("/").text
    for element_id in (
        "part-config",
        "config-form",
        "config-preset",
        "config-import-file",
        "config-export-path",
        "config-export-overwrite",
        "config-errors",
        "part-check",
        "check-path",
        "check-plan",
        "check-buckets",
        "check-memory",
        "check-outputs",
    ):
        assert f'id="{element_id}"' in page, element_id
    script = client.get("/static/app.js").text
    assert "./config.js" in script and "./check.js" in script
    for name in ("config.js", "check.js"):
        assert client.get(f"/static/{name}").status_code == 200
