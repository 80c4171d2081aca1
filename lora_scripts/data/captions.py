"""Find the training images and their captions, and check all of them before any model is loaded.

Two layouts are accepted:
- a metadata CSV with columns `file_name,text` (the Hugging Face imagefolder convention), or
- a `.txt` file beside each image with the same stem (`cat.png` + `cat.txt`, the kohya convention).

`collect_dataset` reports every problem at once in one UserError, so a user fixes a dataset in one pass
instead of one error per training launch. Nothing here writes to disk.
"""

from __future__ import annotations

import csv
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lora_scripts.data.images import load_rgb
from lora_scripts.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_LISTED_PER_KIND = 20
_FILE_NAME_COLUMN = "file_name"
_TEXT_COLUMN = "text"
# Decoding releases the GIL, so a few threads make checking hundreds of large photos several times faster.
_MAX_CHECK_THREADS = 8
# What "and N more ..." calls each kind of problem.
_KIND_PLURALS = {
    "folder": "folder problems",
    "no_images": "folder problems",
    "metadata": "problems with the metadata file",
    "csv_syntax": "CSV syntax errors",
    "empty_file_name": "rows with an empty file_name",
    "escape": "rows pointing outside train_data_dir",
    "missing_file": "rows naming a file that does not exist",
    "not_image": "rows naming a file that is not an image",
    "duplicate": "images with several rows",
    "empty_caption": "empty captions",
    "no_caption": "images without a caption",
    "caption_file": "unreadable caption files",
    "unreadable": "unreadable images",
}


@dataclass(frozen=True)
class CaptionedImage:
    """One training example. `file_name` is `path` relative to train_data_dir, with forward slashes."""

    path: Path
    caption: str
    file_name: str


class _Problems:
    """Problems grouped by kind, so that each kind can be capped at MAX_LISTED_PER_KIND messages."""

    def __init__(self) -> None:
        self._by_kind: dict[str, list[str]] = {}

    def add(self, kind: str, message: str) -> None:
        self._by_kind.setdefault(kind, []).append(message)

    def __bool__(self) -> bool:
        return bool(self._by_kind)

    def messages(self) -> list[str]:
        out: list[str] = []
        for kind, messages in self._by_kind.items():
            out.extend(messages[:MAX_LISTED_PER_KIND])
            if len(messages) > MAX_LISTED_PER_KIND:
                out.append(f"... and {len(messages) - MAX_LISTED_PER_KIND} more {_KIND_PLURALS[kind]}.")
        return out


def collect_dataset(train_data_dir: Path, metadata_path: Path | None) -> list[CaptionedImage]:
    """List the captioned images of a dataset, sorted by `file_name`, after checking every image opens.

    With `metadata_path`, captions come from its `text` column; without, from `<stem>.txt` beside each image.
    Raises one UserError listing every problem found (at most MAX_LISTED_PER_KIND per kind).
    """
    train_data_dir = Path(train_data_dir)
    if not train_data_dir.is_dir():
        raise UserError(
            f"train_data_dir: '{train_data_dir}' is not a folder; set train_data_dir to the folder "
            "holding your training images."
        )
    problems = _Problems()
    images = find_images(train_data_dir)
    if not images:
        problems.add(
            "no_images",
            f"{train_data_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files, in "
            "subfolders too); put your training images there or fix train_data_dir.",
        )
    if metadata_path is None:
        captions = _captions_from_txt(train_data_dir, images, problems)
    else:
        captions = _captions_from_csv(train_data_dir, Path(metadata_path), images, problems)
    for file_name, reason in _unreadable_images(train_data_dir, sorted(set(images) | set(captions))):
        problems.add(
            "unreadable",
            f"{train_data_dir / file_name}: cannot be read as an image ({reason}); re-save it as "
            "PNG or JPEG, or remove it.",
        )
    if problems:
        raise UserError(problems.messages())
    return [
        CaptionedImage(path=train_data_dir / name, caption=captions[name], file_name=name)
        for name in sorted(captions)
    ]


def find_images(train_data_dir: Path) -> list[str]:
    """Image files under `train_data_dir` (recursive), as sorted posix paths relative to it.

    Hidden files and folders (".ipynb_checkpoints", ".git", macOS "._x.jpg") are skipped. Symlinked
    folders are followed, once each, so a link loop cannot hang the scan.
    """
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(train_data_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        relative_dir = Path(dirpath).relative_to(train_data_dir)
        for name in filenames:
            if not name.startswith(".") and _is_image_name(name):
                found.append((relative_dir / name).as_posix())
    return sorted(found)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _captions_from_txt(train_data_dir: Path, images: list[str], problems: _Problems) -> dict[str, str]:
    """file_name -> caption read from `<stem>.txt` beside each image (utf-8, BOM allowed, stripped)."""
    captions: dict[str, str] = {}
    for name in images:
        image_path = train_data_dir / name
        txt_path = image_path.with_suffix(".txt")
        if not txt_path.is_file():
            problems.add(
                "no_caption",
                f"{image_path}: image without a caption (no {txt_path.name} beside it); write its caption "
                f"in {txt_path} or remove the image.",
            )
            continue
        try:
            caption = txt_path.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError:
            problems.add("caption_file", f"{txt_path}: caption is not UTF-8 text; save it as UTF-8.")
            continue
        except OSError as exc:
            problems.add(
                "caption_file", f"{txt_path}: cannot be read ({exc.strerror}); check its permissions."
            )
            continue
        if not caption:
            problems.add(
                "empty_caption", f"{txt_path}: caption file is empty; write the caption of {name} in it."
            )
            continue
        captions[name] = caption
    return captions


def _captions_from_csv(
    train_data_dir: Path, metadata_path: Path, images: list[str], problems: _Problems
) -> dict[str, str]:
    """file_name -> caption from a `file_name,text` CSV; every bad row and uncaptioned image is a problem.

    Images named by rows are returned even when their row has another problem, so that they still get
    their readability check.
    """
    rows = _read_metadata_rows(metadata_path, problems)
    if rows is None:
        return {}
    lines_by_name: dict[str, list[int]] = {}
    captions: dict[str, str] = {}
    where = metadata_path
    for line, raw_name, caption in rows:
        if not raw_name:
            problems.add(
                "empty_file_name", f"{where} line {line}: file_name is empty; fill it in or remove the row."
            )
            continue
        name = _inside_path(raw_name)
        if name is None:
            problems.add(
                "escape",
                f"{where} line {line}: file_name '{raw_name}' points outside train_data_dir; use a path "
                f"relative to {train_data_dir}.",
            )
            continue
        lines_by_name.setdefault(name, []).append(line)
        if not (train_data_dir / name).is_file():
            problems.add(
                "missing_file",
                f"{where} line {line}: '{raw_name}' does not exist in {train_data_dir}; fix the file_name "
                "or remove the row.",
            )
            continue
        if not _is_image_name(name):
            problems.add(
                "not_image",
                f"{where} line {line}: '{raw_name}' is not an image (expected "
                f"{', '.join(IMAGE_EXTENSIONS)}); remove the row.",
            )
            continue
        if not caption:
            problems.add(
                "empty_caption",
                f"{where} line {line}: '{raw_name}' has an empty caption; write one in the text column.",
            )
        captions.setdefault(name, caption)
    for name, lines in lines_by_name.items():
        if len(lines) > 1:
            problems.add(
                "duplicate",
                f"{where} lines {', '.join(map(str, lines))}: several rows for '{name}'; keep one row "
                "per image.",
            )
    for name in images:
        if name not in lines_by_name:
            problems.add(
                "no_caption",
                f"{train_data_dir / name}: image without a caption (no row in {metadata_path.name}); add a "
                f"row for '{name}' or remove the image.",
            )
    return captions


def _read_metadata_rows(metadata_path: Path, problems: _Problems) -> list[tuple[int, str, str]] | None:
    """(line where the row starts, file_name, stripped caption) per non-blank row; None if unusable."""
    if not metadata_path.is_file():
        problems.add(
            "metadata",
            f"{metadata_path}: metadata file not found; create it with columns file_name,text or fix "
            "metadata_path in the config.",
        )
        return None
    try:
        # utf-8-sig drops the BOM Excel writes; newline="" lets csv handle newlines inside quoted captions.
        with metadata_path.open(encoding="utf-8-sig", newline="") as f:
            return _parse_metadata(metadata_path, f, problems)
    except UnicodeDecodeError:
        problems.add("metadata", f"{metadata_path}: not UTF-8 text; save it as a UTF-8 CSV.")
    except OSError as exc:
        problems.add("metadata", f"{metadata_path}: cannot be read ({exc.strerror}); check its permissions.")
    return None


def _parse_metadata(
    metadata_path: Path, lines: Iterable[str], problems: _Problems
) -> list[tuple[int, str, str]] | None:
    # strict: an unclosed quote is an error instead of silently swallowing the rest of the file.
    # skipinitialspace: `a.png, "a, b"` (a space before the quote) still reads as a quoted caption.
    reader = csv.reader(lines, strict=True, skipinitialspace=True)
    row_start = 1
    try:
        header = next(reader, None)
        if header is None:
            problems.add(
                "metadata",
                f"{metadata_path}: the file is empty; write a header row 'file_name,text' and one row "
                "per image.",
            )
            return None
        columns = [c.strip() for c in header]
        missing = [c for c in (_FILE_NAME_COLUMN, _TEXT_COLUMN) if c not in columns]
        if missing:
            problems.add(
                "metadata",
                f"{metadata_path}: the header has no {' and no '.join(repr(c) for c in missing)} column "
                f"(found {', '.join(repr(c) for c in columns)}); make the first row name the columns "
                "file_name,text.",
            )
            return None
        name_at, text_at = columns.index(_FILE_NAME_COLUMN), columns.index(_TEXT_COLUMN)
        rows: list[tuple[int, str, str]] = []
        # reader.line_num is the line a row ends on; a quoted caption may span several lines, and the user
        # looks for the line where the row starts.
        row_start = reader.line_num + 1
        for row in reader:
            line, row_start = row_start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue  # blank line
            name = row[name_at].strip() if name_at < len(row) else ""
            text = row[text_at].strip() if text_at < len(row) else ""
            rows.append((line, name, text))
        return rows
    except csv.Error as exc:
        problems.add(
            "csv_syntax",
            f"{metadata_path} line {row_start}: not valid CSV ({exc}); put a caption containing commas in "
            'double quotes, write a quote inside it as "", and close every quote.',
        )
        return None


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def _inside_path(raw_name: str) -> str | None:
    """Normalize a CSV file_name to a posix path relative to train_data_dir; None if it would escape it.

    Backslashes count as separators, because CSVs written on Windows use them and a real file name with a
    backslash is very rare.
    """
    name = raw_name.replace("\\", "/")
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        return None
    name = posixpath.normpath(name)
    if name == ".." or name.startswith("../"):
        return None
    return name


def _unreadable_images(train_data_dir: Path, names: list[str]) -> list[tuple[str, str]]:
    """(file_name, short reason) for every image that cannot be decoded to RGB, in input order."""
    with ThreadPoolExecutor(max_workers=min(_MAX_CHECK_THREADS, os.cpu_count() or 1)) as pool:
        reasons = pool.map(lambda name: _why_unreadable(train_data_dir / name), names)
        return [(name, reason) for name, reason in zip(names, reasons, strict=True) if reason is not None]


def _why_unreadable(path: Path) -> str | None:
    """None if the image decodes fully; otherwise a short reason.

    `verify()` catches corrupt PNG chunks but not a JPEG cut short, so the image is then decoded for real,
    with the same code training uses.
    """
    try:
        with Image.open(path) as img:
            img.verify()
        load_rgb(path)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        reason = str(exc).replace(str(path), path.name) or type(exc).__name__
        return reason.splitlines()[0][:200]
    return None


# Words too common in captions (BLIP sentences or tag lists) to say anything about a dataset.
_STOPWORDS = frozenset(
    "a an the and or of in on at to with for from by is are as its it this that there some near next "
    "his her their".split()
)
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def caption_words(caption: str) -> list[str]:
    """The lower-cased words of a caption, stopwords left out (for the word counts of label and check)."""
    return [word for word in _WORD.findall(caption.lower()) if word not in _STOPWORDS]


def tag_frequency(items: Iterable[CaptionedImage]) -> dict[str, int]:
    """How often each comma-separated tag occurs over all captions (kohya's `ss_tag_frequency` counts).

    Tags are stripped but keep their case; empty tags are skipped. Ordered by count, then first appearance.
    """
    counts: Counter[str] = Counter()
    for item in items:
        counts.update(tag for tag in (t.strip() for t in item.caption.split(",")) if tag)
    return dict(counts.most_common())
