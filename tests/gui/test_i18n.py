"""English and Simplified Chinese have the same keys, none empty; the page follows the chosen language."""

from __future__ import annotations

from lora_scripts.gui.i18n import LANGUAGES, pick_language, strings


def test_every_string_exists_in_every_language():
    english = strings("en")
    for language in LANGUAGES:
        table = strings(language)
        assert table.keys() == english.keys(), language
        assert all(value.strip() for value in table.values()), language
    assert strings("zh")["nav.dataset"] == "数据集"


def test_the_language_comes_from_the_cookie_then_the_browser():
    assert pick_language("zh", "en-US") == "zh"
    assert pick_language(None, "zh-CN,zh;q=0.9,en;q=0.8") == "zh"
    assert pick_language(None, "fr-FR,en;q=0.5") == "en"
    assert pick_language("xx", None) == "en"


def test_the_page_renders_in_chinese(client):
    client.cookies.set("lora_scripts_lang", "zh")
    page = client.get("/").text
    assert '<html lang="zh-CN">' in page and "数据集" in page and "LoRA 库" in page
