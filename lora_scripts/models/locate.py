"""Find a base model on disk: a single file, a diffusers folder, or a hub id already in the local cache.

Nothing here downloads: training must work offline, so a hub id counts only when its snapshot is cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_scripts.errors import UserError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class BaseModelLocation:
    """Where a base model lives: `path` is the file or the diffusers folder (for hub ids, the snapshot)."""

    kind: Literal["single_file", "diffusers_folder", "hub_cache"]
    path: Path
    spec: str  # what the user wrote


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not spec.startswith((".", "~"))
        and not any(spec.endswith(s) for s in SINGLE_FILE_SUFFIXES)
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return None


def locate_base_model(spec: str) -> BaseModelLocation:
    """Resolve `base_model` from the config; raises UserError with one sentence when it cannot be used."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(
                f"base_model: '{spec}' is not a checkpoint file (expected one of "
                f"{', '.join(SINGLE_FILE_SUFFIXES)}) nor a diffusers folder."
            )
        return BaseModelLocation("single_file", path, spec)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"base_model: folder '{spec}' has no model_index.json; give a diffusers folder "
                "or a single .safetensors checkpoint file."
            )
        return BaseModelLocation("diffusers_folder", path, spec)
    if _looks_like_hub_id(spec):
        snapshot = _cached_snapshot(spec)
        if snapshot is not None and (snapshot / "model_index.json").is_file():
            return BaseModelLocation("hub_cache", snapshot, spec)
        raise UserError(
            f"base_model: '{spec}' is neither a local path nor a hub id in the local cache; download it "
            f"first (e.g. `hf download {spec}`) or give the path of a .safetensors file."
        )
    raise UserError(
        f"base_model: '{spec}' does not exist; check the path (relative paths start from the current "
        "directory) or download the checkpoint there."
    )


def base_model_problem(spec: str) -> str | None:
    """The one-sentence problem with `spec`, or None when it can be loaded (used by config validation)."""
    try:
        locate_base_model(spec)
    except UserError as err:
        return err.messages[0]
    return None
