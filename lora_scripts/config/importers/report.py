"""What an import did, key by key: mapped, dropped (with the reason), or unknown to the importer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["mapped", "default", "dropped", "unknown"]


@dataclass(frozen=True)
class ReportLine:
    """One source option. `option` is its path in the source ("network_dim", "datasets[0].subsets[1].x");
    `key` our key path it became (None when dropped); `note` the reason or a caveat."""

    option: str
    value: Any
    status: Status
    key: str | None = None
    new_value: Any = None
    note: str = ""


@dataclass
class ImportReport:
    source: str
    lines: list[ReportLine] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the loader's messages about the written config

    def add(self, line: ReportLine) -> None:
        self.lines.append(line)

    def of(self, status: Status) -> list[ReportLine]:
        return [line for line in self.lines if line.status == status]


_HEADINGS: dict[Status, str] = {
    "mapped": "Mapped",
    "default": "Set to keep sd-scripts' default (it differs from ours)",
    "dropped": "Dropped (no equivalent here, or not needed)",
    "unknown": "Unknown to the importer (not carried over; check them by hand)",
}


def render_report(report: ImportReport, output: str | None = None) -> str:
    """The report as text, one section per status, one line per option."""
    out = [f"Imported {report.source}" + (f" -> {output}" if output else "")]
    for status, heading in _HEADINGS.items():
        lines = report.of(status)
        if not lines:
            continue
        out.append(f"\n{heading}:")
        for line in lines:
            source = f"{line.option} = {_show(line.value)}" if status != "default" else "(not set)"
            if line.key is not None:
                text = f"  {source} -> {line.key}: {_show(line.new_value)}"
            else:
                text = f"  {source}"
            if line.note:
                text += f"  ({line.note})" if line.key is not None else f": {line.note}"
            out.append(text)
    if report.problems:
        out.append("\nThe written config still needs attention before training:")
        out.extend(f"  {problem}" for problem in report.problems)
    return "\n".join(out) + "\n"


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).replace("'", "")
