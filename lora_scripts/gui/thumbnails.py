"""Thumbnails of the dataset grid: JPEG, longest side at most `side` px, kept in memory.

In memory rather than in a cache folder: the roots are the user's dataset folders, and a hidden folder of
thumbnails inside them would travel with every copy, sync and upload of the dataset (and could not be
written on a read-only share). Making a thumbnail takes milliseconds (JPEG draft mode decodes at 1/2 to 1/8
of the size), so after a restart a few hundred are made again in seconds. The cache is bounded in bytes and
drops the least recently used; its key holds the file's size and modification time, so a replaced image
gets a new thumbnail.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image, ImageOps

from lora_scripts.data import to_rgb
from lora_scripts.errors import UserError

DEFAULT_SIDE = 256
MIN_SIDE, MAX_SIDE = 32, 1024
DEFAULT_CACHE_BYTES = 64 * 2**20  # about 5,000 thumbnails of 256 px
JPEG_QUALITY = 85


def make_thumbnail(path: Path, side: int) -> bytes:
    """The image at `path` as a JPEG whose longer side is at most `side` px, upright (EXIF), alpha on white.

    Raises UserError naming the file when it cannot be read as an image.
    """
    try:
        with Image.open(path) as img:
            img.draft("RGB", (side, side))  # JPEG only: decode at a reduced size, far faster for photos
            # RGB before resizing: a palette image would be resized with its nearest colours only.
            small = to_rgb(ImageOps.exif_transpose(img))
            small.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        reason = (str(exc).replace(str(path), path.name) or type(exc).__name__).splitlines()[0][:200]
        raise UserError(f"'{path.name}': cannot be read as an image ({reason}).") from None
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


class ThumbnailCache:
    """Thumbnails by (path, side, size, mtime), least recently used dropped beyond `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: Path, side: int) -> tuple[bytes, str]:
        """(JPEG bytes, ETag) of the thumbnail of `path`; `side` is clamped to MIN_SIDE..MAX_SIDE."""
        side = max(MIN_SIDE, min(MAX_SIDE, side))
        stat = path.stat()
        key = (str(path), side, stat.st_size, stat.st_mtime_ns)
        etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}-{side}"'
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                return data, etag
        data = make_thumbnail(path, side)  # outside the lock: other thumbnails are made meanwhile
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)
        return data, etag

    @property
    def size_bytes(self) -> int:
        return self._bytes
