"""Bulk caption edits: each operation on the captions it concerns, and only those."""

from __future__ import annotations

import pytest

from lora_scripts.captioning.edits import CaptionChange, CaptionEdit, plan_edits
from lora_scripts.errors import UserError


@pytest.mark.parametrize(
    ("edit", "caption", "after"),
    [
        (CaptionEdit("add_trigger", "sks"), "ink, mountain", "sks, ink, mountain"),
        (CaptionEdit("add_trigger", " sks "), "a photo of SKS dog", "a photo of SKS dog"),  # already there
        (CaptionEdit("add_trigger", "sks"), "sksdog, river", "sks, sksdog, river"),  # not as a whole word
        (CaptionEdit("add_trigger", "sks dog"), "a sks  dog", "a sks  dog"),
        (CaptionEdit("add_suffix", ", ink wash"), "mountain", "mountain, ink wash"),
        (CaptionEdit("add_suffix", ", ink wash"), "mountain, ink wash ", "mountain, ink wash "),
        (CaptionEdit("add_suffix", " at dusk"), "a river", "a river at dusk"),
        (CaptionEdit("replace", find="ink", replace="sumi-e"), "ink, inky ink", "sumi-e, sumi-ey sumi-e"),
        (CaptionEdit("replace", find="Ink", replace="x"), "ink", "ink"),  # case-sensitive
        (CaptionEdit("replace", find=", mist", replace=""), "river, mist", "river"),
        (CaptionEdit("remove_tag", "ink"), "sks,ink , mountain,ink", "sks, mountain"),
        (CaptionEdit("remove_tag", "ink"), "ink wash,  inks", "ink wash,  inks"),  # untouched: no such tag
    ],
)
def test_each_edit(edit, caption, after):
    assert edit.apply(caption) == after


def test_the_plan_lists_changes_unchanged_and_skipped():
    captions = {"c.png": "solo", "a.png": "ink, solo", "b.png": "river", "d.png": "  "}
    plan = plan_edits(captions, CaptionEdit("remove_tag", "solo"))
    assert plan.changes == [CaptionChange("a.png", "ink, solo", "ink")]
    assert plan.unchanged == 1
    assert plan.skipped == [("c.png", "would_be_empty"), ("d.png", "no_caption")]
    assert plan.captions == {"a.png": "ink"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"operation": "upper"},
            "operation: 'upper' is not a bulk edit; use one of add_trigger, add_suffix, replace, remove_tag.",
        ),
        ({"operation": "add_suffix", "text": "  "}, "text: is empty; give the suffix."),
        ({"operation": "remove_tag"}, "text: is empty; give the tag."),
        ({"operation": "replace", "replace": "x"}, "find: is empty; give the text to replace."),
    ],
)
def test_mistakes(kwargs, message):
    with pytest.raises(UserError) as err:
        CaptionEdit(**kwargs)
    assert err.value.messages == [message]
