"""Find the LoRA file a `<lora:NAME>` tag means, the way AUTOMATIC1111's WebUI does.

NAME is, in this order: a path to a `.safetensors` file (anything with a `/` or `\\`, or ending in
`.safetensors`, relative to the current directory); the stem of a file under one of the LoRA folders
(searched recursively); or a file's `ss_output_name` metadata, which WebUI uses as the file's alias (our
trainer writes it, so `pytorch_lora_weights.safetensors` answers to `<lora:ink_painting_v1>`).

Unlike WebUI, which silently takes the last file of a name, two different files answering to one name are an
error that lists both; copies of one file (same sshs_model_hash, e.g. `pytorch_lora_weights.safetensors` and
`<name>.safetensors` of one run) are not.

Not every adapter file in a run's folder is a LoRA to apply: the training states under `<output_dir>/state/`
hold a `lora.safetensors` under peft's names, for resuming only. Those, and anything in hidden folders
(half-written states `.tmp-step-*`), are left out of the names.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import safetensors

from lora_scripts.errors import UserError
from lora_scripts.export.hashes import file_model_hash

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Key fragments of the adapter formats people keep in a LoRA folder (kohya LoRA/LoCon, LyCORIS, PEFT).
_ADAPTER_KEY_MARKERS = ("lora", "hada_", "lokr_")
# training/state.py's layout (not imported: generation sits below training): a state folder holds
# lora.safetensors beside progress.json, and its keys are `<kohya_prefix>/<peft name>`. No LoRA format people
# apply (kohya, LyCORIS, diffusers, peft) has a "/" in a key, so the keys tell a state's LoRA even copied out.
_STATE_LORA_FILE = "lora.safetensors"
_STATE_MARKER_FILE = "progress.json"
_STATE_KEY_SEPARATOR = "/"


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file on disk with its safetensors metadata (all strings)."""

    path: Path
    metadata: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def alias(self) -> str | None:
        """`ss_output_name`: the name WebUI shows and accepts in tags."""
        return self.metadata.get("ss_output_name") or None

    def content_hash(self) -> str:
        """sha256 of the tensors (sd-scripts' `sshs_model_hash`): the metadata value when it is a well-formed
        hash, as WebUI takes it, else computed from the file (a full read)."""
        stored = self.metadata.get("sshs_model_hash", "").strip().lower()
        # A hash from metadata ends up in infotext: accept only 64 hex characters, never arbitrary text.
        return stored if _SHA256.match(stored) else file_model_hash(self.path)

    def short_hash(self) -> str:
        """The 12 characters WebUI writes as the LoRA's hash in "Lora hashes"."""
        return self.content_hash()[:12]


def _read_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """The tensor names and metadata of a safetensors file (only the header is read)."""
    with safetensors.safe_open(str(path), framework="pt") as fh:
        return list(fh.keys()), dict(fh.metadata() or {})


def read_lora_file(path: Path) -> LoraFile:
    """A LoraFile for `path`; UserError when it is not a readable safetensors file or is a training state's
    LoRA (which only resuming reads)."""
    try:
        keys, metadata = _read_header(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged header
        raise UserError(f"LoRA file '{path}' cannot be read as safetensors ({err}).") from err
    if _is_training_state_lora(path, keys):
        raise UserError(
            f"LoRA file '{path}' is a training state's copy of the LoRA, kept to resume training; apply one "
            "of the LoRA files in the run's output_dir instead (<output_name>.safetensors or "
            "<output_name>-stepXXXXXXXX.safetensors)."
        )
    return LoraFile(path=path, metadata=metadata)


def _is_training_state_lora(path: Path, keys: Sequence[str]) -> bool:
    """Whether the file at `path` (tensor names `keys`) is a training state's LoRA, kept to resume a run."""
    in_state_folder = path.name == _STATE_LORA_FILE and (path.parent / _STATE_MARKER_FILE).is_file()
    return in_state_folder or any(_STATE_KEY_SEPARATOR in key for key in keys)


def _is_adapter_file(path: Path) -> tuple[bool, dict[str, str]]:
    """Whether `path` holds adapter weights to apply (a base checkpoint or a training state's LoRA in the
    folder does not), and its metadata.

    Only the header is read, so scanning a folder of multi-GB checkpoints stays cheap.
    """
    try:
        keys, metadata = _read_header(path)
    except Exception as err:  # noqa: BLE001
        logger.warning("Skipping %s: not a readable safetensors file (%s)", path, err)
        return False, {}
    if _is_training_state_lora(path, keys):
        return False, metadata
    return any(marker in key.lower() for key in keys for marker in _ADAPTER_KEY_MARKERS), metadata


def _in_hidden_folder(path: Path, root: Path) -> bool:
    """Whether a folder between `root` and `path` is hidden (`.tmp-step-*`: a state being written)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts[:-1])


def looks_like_path(name: str) -> bool:
    """A tag name meant as a file path rather than a name to look up."""
    return "/" in name or "\\" in name or name.lower().endswith(".safetensors")


@dataclass
class LoraLibrary:
    """The LoRA files under some folders, and name resolution over them."""

    folders: list[Path]
    files: list[LoraFile]

    @classmethod
    def scan(cls, folders: Sequence[Path]) -> LoraLibrary:
        """Every adapter `.safetensors` under `folders` (recursive, sorted); UserError for missing folders."""
        missing = [f for f in folders if not Path(f).is_dir()]
        if missing:
            raise UserError([f"--lora-dir: '{f}' is not a folder." for f in missing])
        files = []
        for folder in folders:
            for path in sorted(Path(folder).rglob("*.safetensors")):
                if _in_hidden_folder(path, Path(folder)):
                    continue
                is_adapter, metadata = _is_adapter_file(path)
                if is_adapter:
                    files.append(LoraFile(path=path, metadata=metadata))
        return cls(folders=[Path(f) for f in folders], files=files)

    def names(self) -> list[str]:
        """Every name a tag can use: file stems and ss_output_name aliases, sorted, without duplicates."""
        names = {f.stem for f in self.files} | {f.alias for f in self.files if f.alias}
        return sorted(names, key=str.lower)

    def resolve(self, name: str) -> LoraFile:
        """The file `<lora:name>` means; UserError (listing the LoRAs found) when there is none or two."""
        if looks_like_path(name):
            path = Path(name).expanduser()
            if not path.is_file():
                raise UserError(f"<lora:{name}>: the file '{path}' does not exist.")
            return read_lora_file(path)
        by_stem = [f for f in self.files if f.stem == name]
        candidates = by_stem or [f for f in self.files if f.alias == name]
        if not candidates:
            raise UserError(self._not_found_message(name))
        distinct = {f.content_hash(): f for f in candidates} if len(candidates) > 1 else {"": candidates[0]}
        if len(distinct) > 1:
            paths = ", ".join(f"'{f.path}'" for f in candidates)
            raise UserError(
                f"<lora:{name}>: several different LoRA files answer to '{name}' ({paths}); "
                "write the file's path in the tag or give only one --lora-dir."
            )
        return candidates[0]

    def _not_found_message(self, name: str) -> str:
        if not self.folders:
            return (
                f"<lora:{name}>: no LoRA named '{name}': no --lora-dir was given; pass the folder that holds "
                "it with --lora-dir, or the file's path in the tag."
            )
        where = ", ".join(f"'{f}'" for f in self.folders)
        names = self.names()
        if not names:
            return (
                f"<lora:{name}>: no LoRA named '{name}': there are no LoRA .safetensors files in {where}; "
                "give the folder with --lora-dir or the file's path in the tag."
            )
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        shown = ", ".join(names[:30]) + (f", … ({len(names) - 30} more)" if len(names) > 30 else "")
        return f"<lora:{name}>: no LoRA named '{name}' in {where}.{hint} LoRAs found: {shown}."
