"""The app's strings in English and Simplified Chinese (locales/*.json, one key set). Pages get the chosen
language's table; a key missing from a language is a test failure, never an empty label."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

LOCALES_DIR = Path(__file__).parent / "locales"
LANGUAGES = {"en": "English", "zh": "简体中文"}
DEFAULT_LANGUAGE = "en"


@cache
def strings(language: str) -> dict[str, str]:
    """The string table of `language` (the default language's for an unknown one)."""
    if language not in LANGUAGES:
        language = DEFAULT_LANGUAGE
    return json.loads((LOCALES_DIR / f"{language}.json").read_text(encoding="utf-8"))


def pick_language(cookie: str | None, accept_language: str | None) -> str:
    """The language chosen in the page (cookie), else the browser's first supported one, else English."""
    if cookie in LANGUAGES:
        return cookie
    for part in (accept_language or "").split(","):
        code = part.split(";")[0].strip().lower()
        if code.startswith("zh"):
            return "zh"
        if code.startswith("en"):
            return "en"
    return DEFAULT_LANGUAGE
