"""The mapping tables of docs/import.md, made from the importer's own table (sd_scripts_table.py), so that
the page cannot drift from what the import does (tests/config/test_import_sd_scripts.py checks it):

    python -m lora_scripts.config.importers.reference     # prints the tables to paste into the page
"""

from __future__ import annotations

from lora_scripts.config.importers.kohya_gui import DROPPED_GROUPS as KOHYA_DROPPED
from lora_scripts.config.importers.kohya_gui import RENAMED as KOHYA_RENAMED
from lora_scripts.config.importers.nested import rules_table
from lora_scripts.config.importers.sd_scripts_table import _DROPPED_GROUPS, MAPPED


def mapped_table() -> str:
    rows = [f"| `{option}` | `{rule.key}` | {rule.note} |" for option, rule in MAPPED.items()]
    return "\n".join(["| sd-scripts option | key here | note |", "|---|---|---|", *rows])


def dropped_table() -> str:
    rows = [
        f"| {', '.join(f'`{name}`' for name in names)} | {reason} |"
        for reason, names in _DROPPED_GROUPS.items()
    ]
    return "\n".join(["| sd-scripts options | why |", "|---|---|", *rows])


def kohya_gui_table() -> str:
    """kohya_ss GUI keys: the sd-scripts option each is read as, or why it is dropped."""
    rows = [f"| `{key}` | read as `{option}` |" for key, option in KOHYA_RENAMED.items()]
    rows += [
        f"| {', '.join(f'`{name}`' for name in names)} | dropped: {reason} |"
        for reason, names in KOHYA_DROPPED.items()
    ]
    return "\n".join(["| kohya_ss keys | becomes |", "|---|---|", *rows])


def ai_toolkit_table() -> str:
    from lora_scripts.config.importers import ai_toolkit

    return rules_table("ai-toolkit keys", ai_toolkit.SECTIONS)


def onetrainer_table() -> str:
    from lora_scripts.config.importers import onetrainer

    return rules_table("OneTrainer keys", onetrainer.SECTIONS)


def main() -> None:
    tables = (mapped_table(), dropped_table(), kohya_gui_table(), ai_toolkit_table(), onetrainer_table())
    print(*tables, sep="\n\n")


if __name__ == "__main__":
    main()
