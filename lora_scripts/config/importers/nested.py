"""Shared walk for trainers whose config nests its settings in sections (ai-toolkit, OneTrainer): each section
is a table of key -> Rule, and every key given ends up in the report as mapped, dropped or unknown."""

from __future__ import annotations

from typing import Any

from lora_scripts.config.importers.report import ImportReport, ReportLine
from lora_scripts.config.importers.sd_scripts_table import Rule


class NestedImport:
    """Collects our config and the report while a nested source is walked."""

    def __init__(self, source: str) -> None:
        self.config: dict[str, Any] = {}
        self.report = ImportReport(source)

    def mapped(self, option: str, value: Any, key: str, new_value: Any, note: str = "") -> None:
        self.report.add(ReportLine(option, value, "mapped", key, new_value, note))

    def dropped(self, option: str, value: Any, note: str) -> None:
        self.report.add(ReportLine(option, value, "dropped", note=note))

    def convert(self, option: str, value: Any, rule: Rule) -> Any:
        """`value` converted by `rule` and reported; None when it is dropped."""
        if rule.key is None:
            self.dropped(option, value, rule.note)
            return None
        try:
            new_value = rule.convert(value)
        except (ValueError, TypeError) as exc:
            self.dropped(option, value, str(exc))
            return None
        self.mapped(option, value, rule.key, new_value, rule.note)
        return new_value

    def section(
        self,
        where: str,
        data: dict[str, Any],
        rules: dict[str, Rule],
        into: dict[str, Any] | None = None,
        skip: tuple[str, ...] = (),
    ) -> None:
        """Apply `rules` to each key of `data` (those in `skip` are handled by the caller), setting our
        keys in `into` (the top level by default)."""
        target = self.config if into is None else into
        for name, value in data.items():
            if name in skip:
                continue
            option = f"{where}.{name}" if where else name
            rule = rules.get(name)
            if rule is None:
                self.report.add(ReportLine(option, value, "unknown", note="not a key the importer knows"))
                continue
            new_value = self.convert(option, value, rule)
            if rule.key is not None and new_value is not None:
                target[rule.key] = new_value


def rules_table(title: str, sections: dict[str, dict[str, Rule]]) -> str:
    """A docs table of the rules of each section: `| key | key here or dropped | note |`."""
    rows = []
    for where, rules in sections.items():
        for name, rule in rules.items():
            option = f"{where}.{name}" if where else name
            target = f"`{rule.key}`" if rule.key is not None else "dropped"
            rows.append(f"| `{option}` | {target} | {rule.note} |")
    return "\n".join([f"| {title} | key here | note |", "|---|---|---|", *rows])
