"""POST /api/check: the facts `lora-scripts check --json` prints, for a config file under a root or a dict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_scripts.cli import main
from tests.checks.conftest import RESOLUTION, TRIGGER, distinct_image, tiny_model, write_config, write_pair
from tests.gui.conftest import csrf_headers

__all__ = ["tiny_model"]  # the session fixture the check tests build the tiny model with


@pytest.fixture
def config_values(root: Path, tiny_model: Path) -> dict[str, object]:
    data = root / "data" / "tiny"
    for i in range(5):
        write_pair(
            data, f"{i}.png", distinct_image(i, (96, 64) if i % 2 else (64, 64)), f"{TRIGGER}, thing {i}"
        )
    return {
        "train_data_dir": str(data),
        "base_model": str(tiny_model),
        "resolution": RESOLUTION,
        "trigger_word": TRIGGER,
        "batch_size": 2,
        "epochs": 2,
        "save_steps": 2,
        "output_dir": str(root / "output" / "run1"),
    }


def test_check_gives_the_facts_of_check_json(client, root: Path, config_values, capsys):
    config = write_config(root / "run1.yaml", **config_values)
    assert main(["check", "--config", str(config), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)

    from_file = client.post("/api/check", json={"path": "work/run1.yaml"}, headers=csrf_headers(client))
    assert from_file.status_code == 200, from_file.text
    assert from_file.json() == expected
    from_form = client.post("/api/check", json={"config": config_values}, headers=csrf_headers(client)).json()
    assert from_form == {**expected, "config": "config"}
    assert expected["plan"]["num_images"] == 5 and sum(b["samples"] for b in expected["plan"]["buckets"]) == 5


def test_check_of_an_invalid_config_lists_the_loaders_sentences(client, config_values):
    answer = client.post(
        "/api/check", json={"config": {**config_values, "lora_rank": 0}}, headers=csrf_headers(client)
    ).json()
    assert answer["ok"] is False and answer["errors"][0].startswith("config: lora_rank: ")


def test_check_needs_one_source(client):
    answer = client.post("/api/check", json={}, headers=csrf_headers(client))
    assert answer.status_code == 400
    outside = client.post("/api/check", json={"path": "/etc/passwd"}, headers=csrf_headers(client))
    assert outside.status_code == 400
