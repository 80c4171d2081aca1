"""Find the training images and their captions, and check all of them before any model is loaded.

Two layouts are accepted:
- a metadata CSV with columns `file_name,text` (the Hugging Face imagefolder convention), or
- a caption file beside each image with the same stem (`cat.png` + `cat.txt`, the kohya convention).

`collect_dataset` reads one folder; `lora_scripts.data.subsets.collect_subsets` reads several (kohya's
`N_name` repeat folders, regularization images) with the readers below. Both report every problem at once in
one UserError, so a user fixes a dataset in one pass instead of one error per training launch. Nothing here
writes to disk.

A hand-edited CSV row such as `a.png,inkstyle, misty, river` (a caption with commas outside double quotes)
has more fields than the header. With the header `file_name,text` the rest of the row is the caption, taken
as written, and `metadata_warnings` says so; with more columns the row is an error. Caption text is never
dropped.
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

from lora_scripts.data.csv_rows import FILE_NAME_COLUMN, TEXT_COLUMN, ExtraFields, RecordingLines
from lora_scripts.data.images import load_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_LISTED_PER_KIND = 20
# Decoding releases the GIL, so a few threads make checking hundreds of large photos several times faster.
_MAX_CHECK_THREADS = 8
# What "and N more ..." calls each kind of problem.
_KIND_PLURALS = {
    "folder": "folder problems",
    "option": "dataset option problems",
    "repeat_folder": "repeat folders with 0 repeats",
    "caption_extension": "caption extension hints",
    "no_images": "folder problems",
    "metadata": "problems with the metadata file",
    "csv_syntax": "CSV syntax errors",
    "csv_fields": "files with rows of too many fields",
    "empty_file_name": "rows with an empty file_name",
    "escape": "rows pointing outside the image folder",
    "missing_file": "rows naming a file that does not exist",
    "not_image": "rows naming a file that is not an image",
    "duplicate": "images with several rows",
    "empty_caption": "empty captions",
    "no_caption": "images without a caption",
    "reg_no_caption": "regularization images without a caption",
    "caption_file": "unreadable caption files",
    "unreadable": "unreadable images",
}


@dataclass(frozen=True)
class CaptionedImage:
    """One training example. `file_name` is `path` relative to its subset's image folder, forward slashes.

    `repeats` is how many times the image is seen per epoch (kohya's `N_name` folders or `num_repeats`),
    `is_reg` marks a regularization (prior-preservation) image, and `subset` is the index of the dataset
    entry it came from.
    """

    path: Path
    caption: str
    file_name: str
    repeats: int = 1
    is_reg: bool = False
    subset: int = 0


class _Problems:
    """Problems grouped by kind, so that each kind can be capped at MAX_LISTED_PER_KIND messages."""

    def __init__(self) -> None:
        self._by_kind: dict[str, list[str]] = {}
        self.warnings: list[str] = []  # not problems: reported by `metadata_warnings`, training goes on

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
    """List the captioned images of one dataset folder, sorted by `file_name`, after checking every image.

    With `metadata_path`, captions come from its `text` column; without, from `<stem>.txt` beside each image.
    Images inside kohya `N_name` folders get `repeats = N`. Raises one UserError listing every problem found
    (at most MAX_LISTED_PER_KIND per kind).
    """
    # Imported here because subsets.py builds on the readers of this module.
    from lora_scripts.data.subsets import SubsetSpec, collect_subsets

    spec = SubsetSpec(
        image_dir=Path(train_data_dir), metadata_path=None if metadata_path is None else Path(metadata_path)
    )
    return collect_subsets([spec])


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


def captions_from_files(
    image_dir: Path, images: list[str], caption_extension: str, problems: _Problems
) -> tuple[dict[str, str], list[str]]:
    """Captions from `<stem><caption_extension>` beside each image (utf-8, BOM allowed, stripped).

    Returns (file_name -> caption, file_names with no caption file). Unreadable and empty caption files are
    added to `problems`; whether a missing caption file is a problem is the caller's call (a regularization
    image may take its folder's class token instead).
    """
    captions: dict[str, str] = {}
    uncaptioned: list[str] = []
    for name in images:
        caption_path = caption_path_of(image_dir / name, caption_extension)
        if not caption_path.is_file():
            uncaptioned.append(name)
            continue
        try:
            caption = caption_path.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError:
            problems.add("caption_file", f"{caption_path}: caption is not UTF-8 text; save it as UTF-8.")
            continue
        except OSError as exc:
            problems.add(
                "caption_file", f"{caption_path}: cannot be read ({exc.strerror}); check its permissions."
            )
            continue
        if not caption:
            problems.add(
                "empty_caption", f"{caption_path}: caption file is empty; write the caption of {name} in it."
            )
            continue
        captions[name] = caption
    return captions, uncaptioned


def caption_path_of(image_path: Path, caption_extension: str) -> Path:
    """`photo.v2.png` + ".txt" -> `photo.v2.txt`: only the image suffix is replaced, as kohya does."""
    return image_path.with_name(image_path.stem + caption_extension)


def captions_from_csv(
    train_data_dir: Path,
    metadata_path: Path,
    images: list[str],
    problems: _Problems,
    dir_key: str = "train_data_dir",
) -> tuple[dict[str, str], list[str]]:
    """Captions from a `file_name,text` CSV whose file names are relative to `train_data_dir`.

    Returns (file_name -> caption, images of `images` without a row). Every bad row is added to `problems`
    (`dir_key` is the config key named in them). Images named by rows are returned even when their row has
    another problem, so that they still get their readability check. When the file itself is unusable,
    both are empty: listing every image as uncaptioned would bury the one message that matters.
    """
    rows = _read_metadata_rows(metadata_path, problems)
    if rows is None:
        return {}, []
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
                f"{where} line {line}: file_name '{raw_name}' points outside {dir_key}; use a path "
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
        if caption is None:
            continue  # a row of too many fields: reported for the whole file (ExtraFields)
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
    return captions, [name for name in images if name not in lines_by_name]


def _read_metadata_rows(metadata_path: Path, problems: _Problems) -> list[tuple[int, str, str | None]] | None:
    """(line where the row starts, file_name, stripped caption) per non-blank row; None if unusable.

    The caption is None for a row whose caption cannot be told apart from its other fields (a problem).
    """
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
) -> list[tuple[int, str, str | None]] | None:
    # strict: an unclosed quote is an error instead of silently swallowing the rest of the file.
    # skipinitialspace: `a.png, "a, b"` (a space before the quote) still reads as a quoted caption.
    record = RecordingLines(iter(lines))
    reader = csv.reader(record, strict=True, skipinitialspace=True)
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
        missing = [c for c in (FILE_NAME_COLUMN, TEXT_COLUMN) if c not in columns]
        if missing and [c.strip() for c in header[0].split(";")][:2] == [FILE_NAME_COLUMN, TEXT_COLUMN]:
            # Excel writes ";" as the separator where "," is the decimal comma (German, French, ...).
            problems.add(
                "metadata",
                f"{metadata_path}: the columns are separated by semicolons; save it as a comma-separated "
                "CSV (file_name,text).",
            )
            return None
        if missing:
            problems.add(
                "metadata",
                f"{metadata_path}: the header has no {' and no '.join(repr(c) for c in missing)} column "
                f"(found {', '.join(repr(c) for c in columns)}); make the first row name the columns "
                "file_name,text.",
            )
            return None
        name_at, text_at = columns.index(FILE_NAME_COLUMN), columns.index(TEXT_COLUMN)
        rows: list[tuple[int, str, str | None]] = []
        extra = ExtraFields(metadata_path, columns)
        record.take()  # the header
        for row in reader:
            line, raw = record.first_line, record.take()
            if not any(cell.strip() for cell in row):
                continue  # blank line
            name = row[name_at].strip() if name_at < len(row) else ""
            text: str | None = row[text_at].strip() if text_at < len(row) else ""
            if extra.overflows(row):
                text = extra.caption(line, name, raw)
            rows.append((line, name, text))
        error, warning = extra.error(), extra.warning()
        if error is not None:
            problems.add("csv_fields", error)
        if warning is not None:
            problems.warnings.append(warning)
        return rows
    except csv.Error as exc:
        problems.add(
            "csv_syntax",
            f"{metadata_path} line {record.first_line}: not valid CSV ({exc}); put a caption containing "
            'commas in double quotes, write a quote inside it as "", and close every quote.',
        )
        return None


def metadata_warnings(metadata_path: Path) -> list[str]:
    """Warnings about a metadata CSV that training still reads: rows whose caption has commas outside
    double quotes, taken whole. [] for a file that is fine, or that cannot be read (collecting the dataset
    reports that)."""
    problems = _Problems()
    _read_metadata_rows(Path(metadata_path), problems)
    return problems.warnings


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


def unreadable_images(paths: list[Path]) -> list[tuple[Path, str]]:
    """(path, short reason) for every image that cannot be decoded to RGB, in input order."""
    with ThreadPoolExecutor(max_workers=min(_MAX_CHECK_THREADS, os.cpu_count() or 1)) as pool:
        reasons = pool.map(_why_unreadable, paths)
        return [(path, reason) for path, reason in zip(paths, reasons, strict=True) if reason is not None]


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


def trigger_pattern(trigger_word: str) -> re.Pattern[str]:
    """Matches `trigger_word` as a whole word (or phrase), ignoring case as CLIP's tokenizer does.

    "sks" matches "a photo of sks, smiling" but not "sksdog"; whitespace inside a phrase may vary.
    """
    words = [re.escape(word) for word in trigger_word.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def tag_frequency(items: Iterable[CaptionedImage]) -> dict[str, int]:
    """How often each comma-separated tag occurs over all captions (kohya's `ss_tag_frequency` counts).

    Tags are stripped but keep their case; empty tags are skipped. Ordered by count, then first appearance.
    """
    counts: Counter[str] = Counter()
    for item in items:
        counts.update(tag for tag in (t.strip() for t in item.caption.split(",")) if tag)
    return dict(counts.most_common())
