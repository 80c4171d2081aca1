"""WD14 tagger on a tiny ONNX model whose probabilities are known per colour (see wd14_fixture)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_scripts.captioning.base import Captioner
from lora_scripts.captioning.wd14 import (
    WD14Tagger,
    load_wd14,
    onnx_providers,
    prepare_image,
    tag_display_name,
)
from lora_scripts.data import load_rgb
from lora_scripts.errors import UserError
from tests.captioning.wd14_fixture import EXPECTED, IMAGE_SIZE, TAGS, write_tiny_wd14
from tests.helpers.hub_cache import hub_snapshot

COLOURS = {"black": (0, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def plain(colour: str, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[colour])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_wd14(tmp_path_factory.mktemp("wd14"))


@pytest.fixture(scope="module")
def tagger(model_dir: Path) -> WD14Tagger:
    return load_wd14(model_dir)


def messages(err: pytest.ExceptionInfo[UserError]) -> list[str]:
    return err.value.messages


# ---- captions -------------------------------------------------------------------------------------------


def test_is_a_captioner(tagger: WD14Tagger) -> None:
    captioner: Captioner = tagger
    assert captioner.name == "wd14"
    assert tagger.image_size == IMAGE_SIZE  # read from the ONNX input shape


def test_probabilities_are_the_models_sigmoid_outputs(tagger: WD14Tagger) -> None:
    probabilities = tagger.predict([plain("blue")])
    assert probabilities.shape == (1, len(TAGS)) and probabilities.dtype == np.float32
    expected = [spec.get("blue", 0.0025) for _, _, spec in TAGS]
    np.testing.assert_allclose(probabilities[0], expected, atol=1e-4)


@pytest.mark.parametrize("colour", sorted(EXPECTED))
def test_known_tags_in_order_characters_first(tagger: WD14Tagger, colour: str) -> None:
    # Blue: characters (0.95 > 0.85; madoka at 0.8 is below 0.85) then general tags by probability, not in
    # csv order; the ratings (0.99 for every image) never appear; underscores become spaces except in ^_^.
    assert tagger.caption([plain(colour)]) == [EXPECTED[colour]]


def test_image_read_with_load_rgb(tagger: WD14Tagger, tmp_path: Path) -> None:
    pixels = np.zeros((16, 32, 4), dtype=np.uint8)
    pixels[...] = (0, 0, 255, 255)
    pixels[:, 24:] = (0, 0, 0, 0)  # transparent black: load_rgb makes it white, which is a white border here
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "a.png")
    white_right = plain("blue", (32, 16))
    white_right.paste((255, 255, 255), (24, 0, 32, 16))
    assert tagger.caption([load_rgb(tmp_path / "a.png")]) == tagger.caption([white_right])


def test_general_threshold(model_dir: Path) -> None:
    # simple_background has p = 0.5 on blue.
    assert "simple background" in load_wd14(model_dir, threshold=0.35).caption([plain("blue")])[0]
    assert load_wd14(model_dir, threshold=0.6).caption([plain("blue")]) == [
        "hatsune miku, blue theme, long hair, ^_^"
    ]


def test_character_threshold(model_dir: Path) -> None:
    # kaname_madoka has p = 0.8 on blue: dropped at 0.85 (the default), kept at 0.75 after hatsune miku.
    assert "madoka" not in load_wd14(model_dir, character_threshold=0.85).caption([plain("blue")])[0]
    assert load_wd14(model_dir, character_threshold=0.75).caption([plain("blue")]) == [
        "hatsune miku, kaname madoka, blue theme, long hair, ^_^, simple background"
    ]


def test_ratings_never_appear_even_at_threshold_zero(model_dir: Path) -> None:
    caption = load_wd14(model_dir, threshold=0.0, character_threshold=0.0).caption([plain("black")])[0]
    tags = caption.split(", ")
    assert len(tags) == len([t for t in TAGS if t[1] != 9])
    assert not {"general", "sensitive", "questionable", "explicit"} & set(tags)


def test_exclude_tags_with_underscores_or_spaces(model_dir: Path) -> None:
    tagger = load_wd14(
        model_dir, exclude_tags=["long_hair", " blue theme ", "^_^", "hatsune_miku", "not_a_tag"]
    )
    assert tagger.caption([plain("blue")]) == ["simple background"]


def test_keep_underscores(model_dir: Path) -> None:
    tagger = load_wd14(model_dir, replace_underscores=False, exclude_tags=["simple background"])
    assert tagger.caption([plain("blue"), plain("red")]) == [
        "hatsune_miku, blue_theme, long_hair, ^_^",
        "saber_(fate), red_theme",
    ]


@pytest.mark.parametrize(
    "kaomoji",
    ["^_^", ">_<", "0_0", "o_o", "(o)_(o)", "+_+", "u_u", "=_=", "<o>_<o>", "<|>_<|>", "|_|", "@_@", "x_x"]
    + [";_;", "t_t", "._.", "0_o", "o_0", ">_o", "||_||", "+_-", "3_3", "6_9"],
)
def test_kaomoji_keep_their_underscore(kaomoji: str) -> None:
    assert tag_display_name(kaomoji) == kaomoji


def test_underscores_become_spaces_and_parentheses_stay_literal() -> None:
    # sd-scripts writes "saber (fate)", not A1111's prompt escape "saber \(fate\)".
    assert tag_display_name("saber_(fate)") == "saber (fate)"
    assert tag_display_name("looking_at_viewer") == "looking at viewer"
    assert tag_display_name("looking_at_viewer", replace_underscores=False) == "looking_at_viewer"


def test_bgr_channel_order(tagger: WD14Tagger) -> None:
    # The model reads channel 0 as blue: an RGB-ordered input would tag the blue image "red theme".
    assert tagger.caption([plain("blue"), plain("red")]) == [EXPECTED["blue"], EXPECTED["red"]]
    assert prepare_image(plain("blue"), IMAGE_SIZE)[0, 0].tolist() == [255.0, 0.0, 0.0]


def test_padding_is_white_and_centred(tagger: WD14Tagger) -> None:
    wide = plain("blue", (IMAGE_SIZE, IMAGE_SIZE // 2))
    array = prepare_image(wide, IMAGE_SIZE)
    assert array.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and array.dtype == np.float32
    assert (array[:8] == 255).all() and (array[24:] == 255).all()  # 8 rows of white above and below
    assert (array[8:24] == (255, 0, 0)).all()
    # The mean is (1, 0.5, 0.5) in BGR, which the fixture maps to the blue tags; black padding would give
    # (0.5, 0, 0), where every blue tag falls below its threshold (blue theme: 0.22) and the caption is "".
    assert tagger.caption([wide]) == [EXPECTED["blue"]]


def test_resized_to_the_model_input(tagger: WD14Tagger) -> None:
    big = plain("blue", (64, 128))  # padded to 128x128 (32 white columns each side), shrunk 4x
    array = prepare_image(big, IMAGE_SIZE)
    assert array.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert (array[:, :8] == 255).all() and (array[:, 8:24] == (255, 0, 0)).all()
    assert prepare_image(plain("red", (8, 8)), IMAGE_SIZE).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)  # enlarged
    assert tagger.caption([big]) == [EXPECTED["blue"]]


def test_shrinking_averages_covered_areas_like_cv2_inter_area() -> None:
    # 3 columns -> 2: output column 0 covers [0, 1.5) = all of column 0 and half of column 1.
    columns = np.array([[0, 90, 180]] * 3, dtype=np.uint8)
    image = Image.fromarray(np.stack([columns, columns // 2, columns // 3], axis=-1))  # R, G, B
    array = prepare_image(image, 2)
    assert array[:, :, 2].tolist() == [[30.0, 150.0]] * 2  # (0 + 90 / 2) / 1.5, (90 / 2 + 180) / 1.5
    assert array[:, :, 0].tolist() == [[10.0, 50.0]] * 2  # blue comes first
    # Exactly half size: cv2 rounds x.5 up, (1 + 2 + 1 + 2 + 2) >> 2 = 2.
    halves = Image.fromarray(np.array([[[1] * 3, [2] * 3]] * 2, dtype=np.uint8))
    assert prepare_image(halves, 1).tolist() == [[[2.0, 2.0, 2.0]]]


def test_batch_gives_one_caption_per_image(tagger: WD14Tagger) -> None:
    images = [plain("blue"), plain("red", (40, 40)), plain("black"), plain("green", (64, 64)), plain("blue")]
    assert tagger.caption(images) == [EXPECTED[c] for c in ("blue", "red", "black", "green", "blue")]
    assert tagger.caption([]) == []


def test_model_with_a_fixed_batch_size_runs_in_chunks(tmp_path: Path) -> None:
    tagger = load_wd14(write_tiny_wd14(tmp_path, batch=1))
    assert tagger.caption([plain("red"), plain("green"), plain("blue")]) == [
        EXPECTED["red"],
        EXPECTED["green"],
        EXPECTED["blue"],
    ]


# ---- where the model comes from --------------------------------------------------------------------------


def test_hub_id_in_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiny_wd14(hub_snapshot(tmp_path, monkeypatch, "someone/tiny-tagger"))
    monkeypatch.chdir(tmp_path)  # so "someone/tiny-tagger" is not a folder
    assert load_wd14("someone/tiny-tagger").caption([plain("red")]) == [EXPECTED["red"]]

    with pytest.raises(UserError) as err:
        load_wd14("someone/not-downloaded")
    assert messages(err) == [
        "WD14 model 'someone/not-downloaded' is neither an existing folder nor a hub id in the local cache; "
        "download a tagger first, e.g. `hf download SmilingWolf/wd-v1-4-moat-tagger-v2 --local-dir "
        "models/wd14`, and pass that folder."
    ]


def test_cuda_falls_back_to_cpu_without_cuda_provider(model_dir: Path) -> None:
    assert onnx_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    assert onnx_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert onnx_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert load_wd14(model_dir, device="cuda").caption([plain("red")]) == [EXPECTED["red"]]
    with pytest.raises(UserError) as err:
        load_wd14(model_dir, device="cuda:first")
    assert messages(err) == ["WD14 device 'cuda:first' is not understood; give cpu, cuda or cuda:N."]


# ---- errors ----------------------------------------------------------------------------------------------


def test_onnxruntime_missing(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(UserError) as err:
        load_wd14(model_dir)
    assert messages(err) == ["WD14 tagging needs onnxruntime: pip install 'lora-scripts[wd14]'"]


def test_folder_missing(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "wd14"
    with pytest.raises(UserError) as err:
        load_wd14(missing)
    assert messages(err) == [
        f"WD14 model '{missing}' is neither an existing folder nor a hub id in the local cache; download a "
        "tagger first, e.g. `hf download SmilingWolf/wd-v1-4-moat-tagger-v2 --local-dir models/wd14`, and "
        "pass that folder."
    ]


def test_model_is_a_file(model_dir: Path) -> None:
    with pytest.raises(UserError) as err:
        load_wd14(model_dir / "model.onnx")
    assert messages(err) == [
        f"WD14 model '{model_dir / 'model.onnx'}' is a file; give the folder holding model.onnx and "
        "selected_tags.csv."
    ]


def test_model_and_tags_missing_reported_together(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_wd14(tmp_path, threshold=1.5)
    assert messages(err) == [
        "WD14 threshold 1.5 is out of range; give a probability between 0 and 1.",
        f"WD14 model folder '{tmp_path}' has no model.onnx; download the tagger there, e.g. "
        f"`hf download SmilingWolf/wd-v1-4-moat-tagger-v2 --local-dir {tmp_path}`.",
        f"WD14 model folder '{tmp_path}' has no selected_tags.csv; download the tagger there, e.g. "
        f"`hf download SmilingWolf/wd-v1-4-moat-tagger-v2 --local-dir {tmp_path}`.",
    ]


def test_only_tags_missing(tmp_path: Path) -> None:
    write_tiny_wd14(tmp_path, tags_csv=False)
    with pytest.raises(UserError) as err:
        load_wd14(tmp_path)
    assert messages(err) == [
        f"WD14 model folder '{tmp_path}' has no selected_tags.csv; download the tagger there, e.g. "
        f"`hf download SmilingWolf/wd-v1-4-moat-tagger-v2 --local-dir {tmp_path}`."
    ]


def test_tag_count_differs_from_model_outputs(tmp_path: Path) -> None:
    write_tiny_wd14(tmp_path, num_outputs=len(TAGS) + 2)
    with pytest.raises(UserError) as err:
        load_wd14(tmp_path)
    assert messages(err) == [
        f"WD14 model folder '{tmp_path}': selected_tags.csv lists {len(TAGS)} tags but model.onnx outputs "
        f"{len(TAGS) + 2}; the two files come from different taggers, download both from the same repo."
    ]


def test_tags_csv_without_the_expected_columns(tmp_path: Path) -> None:
    write_tiny_wd14(tmp_path)
    (tmp_path / "selected_tags.csv").write_text("id,tag\n1,long_hair\n")
    with pytest.raises(UserError) as err:
        load_wd14(tmp_path)
    assert messages(err) == [
        f"{tmp_path / 'selected_tags.csv'}: no 'name' or 'category' column; expected the header "
        "tag_id,name,category,count of SmilingWolf's selected_tags.csv, download it again."
    ]


def test_tags_csv_with_a_bad_category(tmp_path: Path) -> None:
    write_tiny_wd14(tmp_path)
    (tmp_path / "selected_tags.csv").write_text("tag_id,name,category,count\n1,long_hair,general,5\n")
    with pytest.raises(UserError) as err:
        load_wd14(tmp_path)
    assert messages(err) == [
        f"{tmp_path / 'selected_tags.csv'}: line 2: category 'general' is not a number; "
        "download selected_tags.csv again."
    ]


def test_unreadable_model(tmp_path: Path) -> None:
    write_tiny_wd14(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"<html>not a model</html>")  # e.g. a saved login page
    with pytest.raises(UserError) as err:
        load_wd14(tmp_path)
    (message,) = messages(err)
    assert message.startswith(f"{tmp_path / 'model.onnx'}: onnxruntime cannot load it (")
    assert message.endswith(
        "download it again, e.g. `hf download SmilingWolf/wd-v1-4-moat-tagger-v2 --local-dir models/wd14`."
    )


def test_model_that_is_not_nhwc(tmp_path: Path) -> None:
    write_tiny_wd14(tmp_path, channels_last=False)
    with pytest.raises(UserError) as err:
        load_wd14(tmp_path)
    assert messages(err) == [
        f"{tmp_path / 'model.onnx'}: input shape ['N', 3, 32, 32] is not a WD14 tagger's "
        "[batch, size, size, 3]; use the model.onnx of a SmilingWolf wd-v1-4 / wd-*-tagger-v3 repo."
    ]
