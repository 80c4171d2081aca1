"""The rows of a `file_name,text` metadata CSV as the user wrote them: each record's exact text, and the
captions whose commas lost their quotes (`ink_05.png,inkstyle, misty, river`), taken whole where that is
unambiguous and reported either way. data/captions.py (training, `check`) and captioning/metadata_csv.py
(the labeler) read through it.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path

MAX_LISTED_LINES = 5  # line numbers named in one message about rows; the rest are counted
FILE_NAME_COLUMN = "file_name"
TEXT_COLUMN = "text"


class RecordingLines:
    """Feeds csv.reader line by line and keeps the lines of the current record, i.e. its exact text.

    `first_line` is the 1-based line where the current record starts: a quoted caption may span several
    lines, and the user looks for the line where the row starts.
    """

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self._line_no = 0
        self._taken: list[str] = []
        self.first_line = 1

    def __iter__(self) -> RecordingLines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self._line_no += 1
        self._taken.append(line)
        return line

    def take(self) -> str:
        """The exact text of the record csv.reader just returned (line endings included); starts the next."""
        text = "".join(self._taken)
        self._taken = []
        self.first_line = self._line_no + 1
        return text


# The first field of a CSV record (quoted or not) and the comma that ends it; group 1 is the rest.
_FIRST_FIELD = re.compile(r' *(?:"(?:[^"]|"")*"|(?!")[^,]*),(.*)', re.DOTALL)


def caption_after_file_name(raw: str) -> str | None:
    """The caption of a `file_name,text` record whose caption has commas outside quotes: everything after
    the comma that ends the file_name, exactly as written (its spacing kept), stripped like any caption.

    `a.png,inkstyle, misty,  river` -> `inkstyle, misty,  river`. None when a field after the file_name is
    quoted (`a.png,ink, "misty, river"`): the quotes may be part of the caption or mark a field.
    """
    match = _FIRST_FIELD.match(raw)
    if match is None:
        return None
    rest = match[1]
    # A field is quoted when its first character (after skipinitialspace's spaces) is a quote.
    if any(piece.lstrip(" ").startswith('"') for piece in rest.split(",")):
        return None
    return rest.strip()


class ExtraFields:
    """Rows with text in more fields than the header has columns, reported once per file.

    With the header exactly `file_name,text` such a row is a caption with unquoted commas, and the rest of
    the row is the caption (a warning); with other columns, or quotes in the rest, where the caption ends
    cannot be told (an error). Training and the labeler (captioning/metadata_csv.py) both use it.
    """

    def __init__(self, metadata_path: Path, columns: list[str]) -> None:
        self.path = metadata_path
        # Up to the last named column: a trailing unnamed one (`file_name,text,` from a spreadsheet) holds no
        # caption, so text there is caption text that lost its quotes too.
        named = max((i + 1 for i, column in enumerate(columns) if column), default=0)
        self.columns = columns[:named]
        self.rejoined: list[tuple[int, str, str]] = []  # (line, file_name, caption taken)
        self.ambiguous: list[tuple[int, str]] = []  # (line, file_name)

    def overflows(self, cells: list[str]) -> bool:
        """Whether a row has text in more fields than the header names (then ask `caption`)."""
        return any(cell.strip() for cell in cells[len(self.columns) :])

    def caption(self, line: int, name: str, raw: str) -> str | None:
        """The caption of the row starting at `line` (exact text `raw`); None when it cannot be told."""
        caption = None
        if self.columns == [FILE_NAME_COLUMN, TEXT_COLUMN]:
            caption = caption_after_file_name(raw)
        if caption is None:
            self.ambiguous.append((line, name))
            return None
        self.rejoined.append((line, name, caption))
        return caption

    def error(self) -> str | None:
        """One message naming the rows whose caption cannot be told, and the fix; None if there are none."""
        if not self.ambiguous:
            return None
        name = self.ambiguous[0][1] or "a.png"
        example = [name if c == FILE_NAME_COLUMN else "…" for c in self.columns]
        example[self.columns.index(TEXT_COLUMN)] = "a caption, with commas"
        return (
            f"{self.path} {line_list([line for line, _ in self.ambiguous])}: more fields than the "
            f"{len(self.columns)} columns of the header ({','.join(self.columns)}), so where the caption "
            "ends cannot be told; put a caption that contains commas in double quotes, e.g. "
            f"{_csv_record(example)}."
        )

    def warning(self) -> str | None:
        """One message naming the rows taken whole, what was taken, and the fix; None if there are none."""
        if not self.rejoined:
            return None
        line, name, caption = self.rejoined[0]
        if len(self.rejoined) == 1:
            what = "a caption with commas outside double quotes; the rest of the row is taken as the caption"
            what += f" ('{caption}')"
        else:
            what = "captions with commas outside double quotes; the rest of each row is taken as its"
            what += f" caption (line {line}: '{caption}')"
        return (
            f"{self.path} {line_list([line for line, _, _ in self.rejoined])}: {what}. Put a caption that "
            f"contains commas in double quotes: {_csv_record([name, caption])}."
        )


def line_list(lines: list[int], limit: int = MAX_LISTED_LINES) -> str:
    """'line 3', 'lines 3, 5' or 'lines 3, 5, 8, 11, 12 and 4 more (9 rows)'."""
    if len(lines) == 1:
        return f"line {lines[0]}"
    shown = ", ".join(map(str, lines[:limit]))
    if len(lines) <= limit:
        return f"lines {shown}"
    return f"lines {shown} and {len(lines) - limit} more ({len(lines)} rows)"


def _csv_record(cells: list[str]) -> str:
    """`cells` as one CSV record, quoted where needed (no line ending)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(cells)
    return buffer.getvalue()
