"""Bulk caption edits: put a trigger word first, paste a suffix, find and replace, remove a tag.

Each edit is a pure function of one caption, and `plan_edits` returns only the captions it changes, with
their text before and after: what a preview shows is exactly what is then written (the web app's bulk edit
writes `plan.changes` through the caption stores of metadata_csv.py, which back the old captions up).
The trigger word and the suffix follow `lora-scripts label --trigger/--suffix` (`compose_caption`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lora_scripts.captioning.labeler import compose_caption
from lora_scripts.data.captions import trigger_pattern
from lora_scripts.errors import UserError

EDIT_OPERATIONS = ("add_trigger", "add_suffix", "replace", "remove_tag")
TAG_SEPARATOR = ","
TAG_JOINER = ", "


@dataclass(frozen=True)
class CaptionEdit:
    """One edit of every caption.

    add_trigger: `text` first, joined with ", ", in captions that do not yet hold it as a whole word.
    add_suffix: `text` pasted after the caption as given (", ink wash painting" brings its own comma), in
        captions that do not already end with it.
    replace: every occurrence of `find` (plain text, case-sensitive) becomes `replace`.
    remove_tag: comma-separated tags equal to `text` (stripped, case-sensitive, as the tag counts spell
        them) are removed; the other tags are joined again with ", ".
    """

    operation: str
    text: str = ""
    find: str = ""
    replace: str = ""

    def __post_init__(self) -> None:
        if self.operation not in EDIT_OPERATIONS:
            raise UserError(
                f"operation: '{self.operation}' is not a bulk edit; use one of {', '.join(EDIT_OPERATIONS)}."
            )
        if self.operation == "replace" and not self.find:
            raise UserError("find: is empty; give the text to replace.")
        if self.operation != "replace" and not self.text.strip():
            what = {"add_trigger": "trigger word", "add_suffix": "suffix", "remove_tag": "tag"}[
                self.operation
            ]
            raise UserError(f"text: is empty; give the {what}.")

    def apply(self, caption: str) -> str:
        """The caption after the edit (the same text when the edit does not concern it)."""
        if self.operation == "add_trigger":
            if trigger_pattern(self.text.strip()).search(caption):
                return caption
            return compose_caption(caption, trigger=self.text)
        if self.operation == "add_suffix":
            if caption.rstrip().endswith(self.text.strip()):
                return caption
            return compose_caption(caption, suffix=self.text)
        if self.operation == "replace":
            return caption.replace(self.find, self.replace).strip()
        tags = [tag.strip() for tag in caption.split(TAG_SEPARATOR)]
        kept = [tag for tag in tags if tag != self.text.strip()]
        return caption if len(kept) == len(tags) else TAG_JOINER.join(tag for tag in kept if tag)


@dataclass(frozen=True)
class CaptionChange:
    file_name: str
    before: str
    after: str


@dataclass
class EditPlan:
    """What an edit changes: `changes` sorted by file name; `skipped` are (file_name, why) left as they are,
    why being "no_caption" (nothing to edit) or "would_be_empty" (the edit removes the whole caption)."""

    changes: list[CaptionChange] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def captions(self) -> dict[str, str]:
        """file_name -> the new caption, for a caption store's `save`."""
        return {change.file_name: change.after for change in self.changes}


def plan_edits(captions: Mapping[str, str], edit: CaptionEdit) -> EditPlan:
    """The changes `edit` makes to `captions` (file_name -> caption). Empty captions are not edited (a
    trigger word alone is not a caption), and an edit that would leave a caption empty is skipped."""
    plan = EditPlan()
    for name in sorted(captions):
        before = captions[name]
        if not before.strip():
            plan.skipped.append((name, "no_caption"))
            continue
        after = edit.apply(before)
        if after == before:
            plan.unchanged += 1
        elif not after.strip():
            plan.skipped.append((name, "would_be_empty"))
        else:
            plan.changes.append(CaptionChange(name, before, after))
    return plan
