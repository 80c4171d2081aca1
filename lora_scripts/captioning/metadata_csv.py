"""Caption files that never lose a hand edit: metadata.csv rows and kohya-style `.txt` files.

A metadata CSV is read keeping the exact text of every row, so that adding captions rewrites the file with
each existing row byte for byte (quoting, spacing, line endings, extra columns, a BOM) and only appends.
Captions are read as training reads them (data/captions.py): a hand-edited `a.png,ink, misty` row has the
caption `ink, misty` (with a warning), and a row whose caption cannot be told from its other fields stops
the run before anything is written.
Replacing captions (`overwrite`) or dropping rows (`prune`) first copies the old file to `<name>.bak`.
Every write is atomic. `convert_captions` turns one form into the other under the same rules.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lora_scripts.data import find_images
from lora_scripts.data.csv_rows import FILE_NAME_COLUMN, TEXT_COLUMN, ExtraFields, RecordingLines
from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic

logger = logging.getLogger(__name__)
METADATA_FILE = "metadata.csv"  # the labeler's default CSV, and the one a folder's captions are read from


@dataclass(frozen=True)
class CsvRow:
    """One record of a metadata CSV: its exact text (line endings included) and its parsed cells.

    A `file_name,text` row with commas outside quotes has the cells [file_name, the rest of the row].
    """

    raw: str
    cells: list[str]
    line: int  # where the record starts, 1-based (a quoted caption may span several lines)


@dataclass(frozen=True)
class MetadataCsv:
    """A parsed metadata CSV that remembers its exact text, so that rewriting it changes nothing kept."""

    path: Path
    header_raw: str
    columns: list[str]
    rows: list[CsvRow]

    @property
    def newline(self) -> str:
        """The line ending new rows get: the header's, so a CRLF file stays CRLF."""
        return "\r\n" if self.header_raw.endswith("\r\n") else "\n"

    def file_name(self, row: CsvRow) -> str:
        """The row's file_name as a normalized posix path ("" for a blank row)."""
        return normalize_file_name(_cell(row.cells, self.columns.index(FILE_NAME_COLUMN)))

    def text(self, row: CsvRow) -> str:
        return _cell(row.cells, self.columns.index(TEXT_COLUMN)).strip()


def normalize_file_name(raw: str) -> str:
    """`./a.jpg`, `sub\\b.jpg` -> `a.jpg`, `sub/b.jpg`: the form find_images returns, so rows match files."""
    name = raw.strip().replace("\\", "/")
    return posixpath.normpath(name) if name else ""


def read_metadata_csv(path: Path) -> MetadataCsv | None:
    """Parse a `file_name,text` CSV (extra columns allowed); None if the file is absent or empty."""
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text; save it as a UTF-8 CSV.") from exc
    if not text.strip():
        return None
    # newline="" keeps "\r\n" and lets csv see newlines inside quoted captions, as the data module reads.
    lines = RecordingLines(io.StringIO(text, newline=""))
    reader = csv.reader(lines, strict=True, skipinitialspace=True)
    records: list[CsvRow] = []
    try:
        for cells in reader:
            line = lines.first_line
            records.append(CsvRow(raw=lines.take(), cells=cells, line=line))
    except csv.Error as exc:
        raise UserError(
            f"{path} line {lines.first_line}: not valid CSV ({exc}); put a caption containing commas in "
            'double quotes, write a quote inside it as "", and close every quote.'
        ) from exc
    header, rows = records[0], records[1:]
    columns = [c.strip().lstrip("\ufeff") for c in header.cells]
    missing = [c for c in (FILE_NAME_COLUMN, TEXT_COLUMN) if c not in columns]
    if missing:
        raise UserError(
            f"{path}: the header has no {' and no '.join(repr(c) for c in missing)} column; make the first "
            "row name the columns file_name,text (or move the file away to start a new one)."
        )
    return MetadataCsv(
        path=path, header_raw=header.raw, columns=columns, rows=_whole_captions(path, columns, rows)
    )


def _whole_captions(path: Path, columns: list[str], rows: list[CsvRow]) -> list[CsvRow]:
    """`rows` with a caption that has commas outside quotes put back together (and a warning); UserError
    for rows whose caption cannot be told from the other fields. `raw` is never changed."""
    extra = ExtraFields(path, columns)
    out = []
    for row in rows:
        if extra.overflows(row.cells):
            name = _cell(row.cells, columns.index(FILE_NAME_COLUMN)).strip()
            caption = extra.caption(row.line, name, row.raw)
            if caption is not None:  # the header is exactly file_name,text
                row = CsvRow(raw=row.raw, cells=[row.cells[0], caption], line=row.line)
        out.append(row)
    error, warning = extra.error(), extra.warning()
    if error is not None:
        raise UserError(error)
    if warning is not None:
        logger.warning("%s", warning)
    return out


def render_metadata_csv(
    existing: MetadataCsv | None, captions: dict[str, str], *, replace: bool, drop: frozenset[str]
) -> str:
    """The CSV text: every existing row as it was, then new rows (sorted) for images without one.

    `replace`: rows of images in `captions` get the new text (other columns kept). `drop`: normalized
    file_names whose rows are left out. Without `replace`, a caption for an image that has a row is ignored.
    """
    if existing is None:
        pieces = ["file_name,text\n"]
        pieces += [
            format_row(["", ""], [FILE_NAME_COLUMN, TEXT_COLUMN], n, captions[n], "\n")
            for n in sorted(captions)
        ]
        return "".join(pieces)
    newline = existing.newline
    pieces = [existing.header_raw]
    has_row: set[str] = set()
    for row in existing.rows:
        name = existing.file_name(row)
        has_row.add(name)
        if name in drop:
            continue
        if replace and name in captions:
            pieces.append(format_row(row.cells, existing.columns, None, captions[name], newline))
        else:
            pieces.append(row.raw)
    new_names = sorted(n for n in captions if n not in has_row)
    pieces += [format_row([], existing.columns, n, captions[n], newline) for n in new_names]
    # A last row without a line ending must get one before anything is appended after it.
    return "".join(
        p if i == len(pieces) - 1 or p.endswith(("\n", "\r")) else p + newline for i, p in enumerate(pieces)
    )


def format_row(cells: list[str], columns: list[str], file_name: str | None, text: str, newline: str) -> str:
    """One CSV record: `cells` (padded to the columns) with the text (and file_name, if given) set.

    csv quotes a caption holding commas, quotes or newlines, so any caption survives a round trip.
    """
    out = list(cells) + [""] * (len(columns) - len(cells))
    if file_name is not None:
        out[columns.index(FILE_NAME_COLUMN)] = file_name
    out[columns.index(TEXT_COLUMN)] = text
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator=newline).writerow(out)
    return buffer.getvalue()


def _cell(cells: list[str], index: int) -> str:
    return cells[index] if index < len(cells) else ""


def write_bytes_atomic(path: Path, text: str) -> None:
    """Write UTF-8 exactly as given: no newline translation, so kept rows stay byte for byte everywhere."""
    write_atomic(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def backup_file(path: Path) -> Path:
    """Copy `path` to `<path>.bak` before it is replaced; returns the backup.

    An older, different `.bak` is not overwritten but moved to `.bak.1` (then `.bak.2`, ...): a second
    `--overwrite` run must not destroy the only copy of the hand edits the first one replaced.
    """
    backup = path.with_name(path.name + ".bak")
    if backup.is_file():
        if backup.read_bytes() == path.read_bytes():
            return backup
        n = 1
        while backup.with_name(f"{backup.name}.{n}").exists():
            n += 1
        os.replace(backup, backup.with_name(f"{backup.name}.{n}"))
    write_atomic(backup, lambda tmp: shutil.copyfile(path, tmp))
    return backup


def list_images(image_dir: Path, *, recursive: bool) -> list[str]:
    """Images as sorted posix paths relative to `image_dir`; subfolders only when `recursive`."""
    images = find_images(image_dir)
    return images if recursive else [name for name in images if "/" not in name]


def check_image_dir(image_dir: Path) -> None:
    if not image_dir.is_dir():
        raise UserError(f"--input: '{image_dir}' is not a folder; pass the folder holding your images.")


def read_txt_caption(path: Path) -> str:
    """A kohya caption file's text, stripped ("" if it cannot be decoded: it then counts as present)."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except (UnicodeDecodeError, OSError):
        return ""


class CaptionStore(Protocol):
    """Where captions live (a CSV or `.txt` files): what is there already, and how to add to it."""

    location: Path
    existing: dict[str, str]  # file_name -> caption, for images that exist
    missing: list[str]  # captions whose image is gone: CSV file_names or .txt paths
    backups: list[Path]

    def save(self, captions: dict[str, str]) -> None:
        """Write `captions` (file_name -> text, all of this run so far); may be called repeatedly."""


@dataclass
class CsvCaptions:
    """The rows of a metadata CSV, written back without losing one unless `overwrite` / `prune` say so."""

    location: Path
    image_dir: Path
    overwrite: bool = False
    prune: bool = False
    backup: bool = True  # False: the caller has just backed the file up itself (the web app's edits)
    existing: dict[str, str] = field(init=False)
    missing: list[str] = field(init=False)
    backups: list[Path] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.location.is_dir():
            raise UserError(f"--output: '{self.location}' is a folder; pass the path of the CSV to write.")
        self._csv = read_metadata_csv(self.location)
        self.existing, self.missing, self._missing_names = {}, [], set()
        for row in self._csv.rows if self._csv else []:
            name = self._csv.file_name(row)
            if not name:
                continue  # blank line: kept as it is
            if (self.image_dir / name).is_file():
                self.existing.setdefault(name, self._csv.text(row))
            elif name not in self._missing_names:
                self._missing_names.add(name)
                self.missing.append(name)

    def save(self, captions: dict[str, str]) -> None:
        drop = frozenset(self._missing_names if self.prune else ())
        if not captions and not drop:
            return
        replacing = self.overwrite and any(name in self.existing for name in captions)
        if self.backup and (replacing or drop) and self._csv is not None and not self.backups:
            self.backups.append(backup_file(self.location))
        write_bytes_atomic(
            self.location, render_metadata_csv(self._csv, captions, replace=self.overwrite, drop=drop)
        )


@dataclass
class TxtCaptions:
    """`<stem>.txt` beside each image; an existing one is only replaced with `overwrite` (after a .bak)."""

    location: Path  # the image folder
    images: list[str]
    overwrite: bool = False
    recursive: bool = False
    backup: bool = True  # False: the caller has just backed the files up itself (the web app's edits)
    existing: dict[str, str] = field(init=False)
    missing: list[str] = field(init=False)
    backups: list[Path] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        by_txt: dict[str, list[str]] = {}
        for name in self.images:
            by_txt.setdefault(_txt_name(name), []).append(name)
        clashes = [names for names in by_txt.values() if len(names) > 1]
        if clashes:
            raise UserError(
                [
                    f"{self.location}: {' and '.join(names)} would share one caption file; rename one, or "
                    "use --format csv."
                    for names in clashes
                ]
            )
        self.existing = {
            name: read_txt_caption(self.location / _txt_name(name))
            for name in self.images
            if (self.location / _txt_name(name)).is_file()
        }
        self.missing = _orphan_txt_files(self.location, recursive=self.recursive)
        self._written: set[str] = set()

    def save(self, captions: dict[str, str]) -> None:
        for name, text in captions.items():
            if name in self._written:
                continue
            path = self.location / _txt_name(name)
            if path.exists():
                if not self.overwrite:
                    continue
                if self.backup:
                    self.backups.append(backup_file(path))
            write_bytes_atomic(path, text)
            self._written.add(name)


def folder_caption_format(image_dir: Path, images: list[str]) -> str | None:
    """How the captions of `image_dir` are kept: "csv" when it has a metadata.csv, else "txt" when one of
    `images` has a `.txt` beside it, else None (no captions yet)."""
    if (image_dir / METADATA_FILE).is_file():
        return "csv"
    if any((image_dir / _txt_name(name)).is_file() for name in images):
        return "txt"
    return None


def open_folder_captions(
    image_dir: Path, images: list[str], caption_format: str, *, overwrite: bool = False, backup: bool = True
) -> CaptionStore:
    """The captions of `images` in `image_dir`, as `<image_dir>/metadata.csv` ("csv") or `.txt` files."""
    if caption_format == "csv":
        return CsvCaptions(image_dir / METADATA_FILE, image_dir, overwrite=overwrite, backup=backup)
    if caption_format == "txt":
        return TxtCaptions(image_dir, images, overwrite=overwrite, backup=backup)
    raise UserError(f"format: '{caption_format}' is not a caption format; use csv or txt.")


def caption_file_of(image_dir: Path, image_name: str, caption_format: str) -> Path:
    """The file that holds the caption of `image_name`: the folder's metadata.csv, or its `.txt`."""
    return image_dir / (METADATA_FILE if caption_format == "csv" else _txt_name(image_name))


def _txt_name(image_name: str) -> str:
    return posixpath.splitext(image_name)[0] + ".txt"


def _orphan_txt_files(image_dir: Path, *, recursive: bool) -> list[str]:
    """`.txt` files with no image of the same stem beside them (captions of deleted images)."""
    stems = {posixpath.splitext(name)[0] for name in find_images(image_dir)}
    pattern = "**/*.txt" if recursive else "*.txt"
    orphans = []
    for path in image_dir.glob(pattern):
        name = path.relative_to(image_dir).as_posix()
        if any(part.startswith(".") for part in name.split("/")) or not path.is_file():
            continue
        if posixpath.splitext(name)[0] not in stems:
            orphans.append(name)
    return sorted(orphans)


@dataclass
class ConvertSummary:
    """What `convert_captions` did; `written` are file_names of images whose caption was written."""

    target: Path
    written: list[str]
    kept: int
    no_caption: list[str]  # images without a caption to convert
    missing: list[str]  # source captions whose image is gone
    backups: list[Path]


def convert_captions(
    image_dir: Path, to: str, csv_path: Path, *, recursive: bool = False, overwrite: bool = False
) -> ConvertSummary:
    """Copy captions from `.txt` files into the CSV (`to="csv"`) or from the CSV into `.txt` files.

    A caption already in the target is kept unless `overwrite` (which backs it up first).
    """
    check_image_dir(image_dir)
    images = list_images(image_dir, recursive=recursive)
    store: CaptionStore
    if to == "csv":
        txt = TxtCaptions(image_dir, images, recursive=recursive)
        source, missing = {n: t for n, t in txt.existing.items() if t}, txt.missing
        store = CsvCaptions(csv_path, image_dir, overwrite=overwrite)
    elif to == "txt":
        if not csv_path.is_file():
            raise UserError(
                f"--output: '{csv_path}' not found; pass the metadata CSV to convert with --output."
            )
        rows = CsvCaptions(csv_path, image_dir)
        source, missing = {n: t for n, t in rows.existing.items() if t}, rows.missing
        store = TxtCaptions(image_dir, sorted(source), overwrite=overwrite, recursive=recursive)
    else:
        raise UserError(f"--to: '{to}' is not a caption format; use csv or txt.")
    todo = {n: t for n, t in source.items() if overwrite or n not in store.existing}
    store.save(todo)
    return ConvertSummary(
        target=store.location,
        written=sorted(todo),
        kept=len(source) - len(todo),
        no_caption=[n for n in images if n not in source and n not in store.existing],
        missing=missing,
        backups=store.backups,
    )
