"""Images dropped on the dataset page: kept only when they decode as images, never over an existing file,
never over the size limit, and written atomically (a half-received file never appears under its name).

The upload is copied into a hidden temporary file beside its target (`.<name>.<random>.tmp`, which no
listing shows), decoded there with the check training runs on every image (`unreadable_images`), and only
then given its name, with a hard link that fails when the name is taken (export/atomic.py).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lora_scripts.data.captions import IMAGE_EXTENSIONS, unreadable_images
from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic

CHUNK_BYTES = 1 << 20


def upload_name(filename: str) -> str:
    """The name an upload is kept under: its base name, which must be a visible image file name."""
    name = PurePosixPath((filename or "").replace("\\", "/")).name.strip()
    if not name or name.startswith("."):
        raise UserError(f"'{filename}': not a usable file name; rename the image, e.g. to image_01.png.")
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        raise UserError(f"'{name}': not an image file name; upload {', '.join(IMAGE_EXTENSIONS)} files.")
    return name


def save_upload(folder: Path, shown: str, filename: str, source: BinaryIO, max_bytes: int) -> str:
    """Keep the upload `filename` read from `source` in `folder` (`shown`: its ROOT/relative name, for
    messages); returns the name it was kept under. Raises UserError, keeping nothing, for a name that is
    not an image's or is taken, a file over `max_bytes`, or bytes that do not decode as an image."""
    name = upload_name(filename)
    target = folder / name
    taken = f"'{name}': '{shown}' already has a file of this name; rename the image or delete the old file."
    if target.exists() or target.is_symlink():
        raise UserError(taken)

    def write(tmp: Path) -> None:
        copied = 0
        with tmp.open("wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                copied += len(chunk)
                if copied > max_bytes:
                    raise UserError(
                        f"'{name}': larger than the upload limit of {file_size(max_bytes)}; make the image "
                        "smaller (training scales it down to about a megapixel anyway)."
                    )
                out.write(chunk)
        for _, reason in unreadable_images([tmp]):
            raise UserError(
                f"'{name}': cannot be read as an image ({reason.replace(tmp.name, name)}); upload PNG, "
                "JPEG, WebP or BMP images."
            )

    try:
        write_atomic(target, write, overwrite=False)
    except FileExistsError:
        raise UserError(taken) from None
    return name


def file_size(size: int) -> str:
    """`52428800` -> "50 MB", `1100000` -> "1.0 MB", `4000` -> "3.9 KB"."""
    if size >= 2**20:
        return f"{size / 2**20:.0f} MB" if size % 2**20 == 0 else f"{size / 2**20:.1f} MB"
    return f"{size / 2**10:.1f} KB"
