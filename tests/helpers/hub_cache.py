"""A local hub cache laid out as huggingface_hub writes it, so that a hub id loads offline in tests."""

from __future__ import annotations

from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo_id: str) -> Path:
    """Point huggingface_hub's cache at `tmp_path/hub` and return the (not yet created) snapshot folder of
    `repo_id` ("owner/name") there, its `refs/main` already written; fill it with the model's files."""
    import huggingface_hub.constants

    owner, name = repo_id.split("/")
    repo = tmp_path / "hub" / f"models--{owner}--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo / "snapshots" / COMMIT
