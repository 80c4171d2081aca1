"""A tiny WD14-shaped tagger whose tag probabilities are known for plain-coloured images.

The ONNX graph has the real models' interface (input `input_1:0`, float32 [N, 32, 32, 3] NHWC BGR 0..255
with a dynamic batch; output `predictions_sigmoid`, [N, num_tags] sigmoid probabilities) and computes

    p = sigmoid(mean_over_pixels(image / 255) @ W + b)      # image mean: (blue, green, red) in 0..1

With features x = (b, g, r), a black image gives logit `b`, a pure blue/green/red image `b + W[channel]`,
so choosing the probability for black, blue, green and red fixes `b` and `W` exactly (see `TAGS`). Anything
between (white padding, a resize) gives the probability of the pixel-weighted average of those colours.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IMAGE_SIZE = 32
UNLIKELY = 0.0025  # logit -6: the probability of a tag for the colours not listed

# (name, category, {colour: probability}); colours are "black", "blue", "green", "red" (RGB).
# The csv order is deliberately not the probability order, so sorting is tested.
TAGS: list[tuple[str, int, dict[str, float]]] = [
    # Ratings (9) are likely for every image and must never be written.
    ("general", 9, {"black": 0.99, "blue": 0.99, "green": 0.99, "red": 0.99}),
    ("sensitive", 9, {"black": 0.99, "blue": 0.99, "green": 0.99, "red": 0.99}),
    ("questionable", 9, {"black": 0.99, "blue": 0.99, "green": 0.99, "red": 0.99}),
    ("explicit", 9, {"black": 0.99, "blue": 0.99, "green": 0.99, "red": 0.99}),
    # General tags (0).
    ("simple_background", 0, {"blue": 0.5}),
    ("^_^", 0, {"blue": 0.7}),  # in SmilingWolf's kaomoji list
    ("long_hair", 0, {"blue": 0.9}),
    ("blue_theme", 0, {"blue": 0.97}),
    ("red_theme", 0, {"red": 0.97}),
    (";_;", 0, {"green": 0.9}),  # kept by sd-scripts' "3 characters or fewer" rule
    ("green_theme", 0, {"green": 0.97}),
    ("(o)_(o)", 0, {"green": 0.6}),  # kept only by the kaomoji list (7 characters)
    # Character tags (4).
    ("kaname_madoka", 4, {"blue": 0.8}),
    ("hatsune_miku", 4, {"blue": 0.95}),
    ("saber_(fate)", 4, {"red": 0.95}),
]

# What the tagger must write at the default thresholds (0.35 general, 0.85 character).
EXPECTED = {
    "blue": "hatsune miku, blue theme, long hair, ^_^, simple background",
    "red": "saber (fate), red theme",
    "green": "green theme, ;_;, (o)_(o)",
    "black": "",
}


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def weights_and_bias(tags: list[tuple[str, int, dict[str, float]]] = TAGS) -> tuple[np.ndarray, np.ndarray]:
    """W float32 [3, num_tags] (rows: blue, green, red: the model's BGR input order) and bias [num_tags]."""
    weights = np.zeros((3, len(tags)), dtype=np.float32)
    bias = np.zeros(len(tags), dtype=np.float32)
    for column, (_, _, probabilities) in enumerate(tags):
        black = _logit(probabilities.get("black", UNLIKELY))
        bias[column] = black
        for row, colour in enumerate(("blue", "green", "red")):
            weights[row, column] = _logit(probabilities.get(colour, UNLIKELY)) - black
    return weights, bias


def write_tiny_wd14(
    folder: Path,
    *,
    tags: list[tuple[str, int, dict[str, float]]] = TAGS,
    num_outputs: int | None = None,
    batch: int | str = "N",
    channels_last: bool = True,
    model: bool = True,
    tags_csv: bool = True,
) -> Path:
    """Write `model.onnx` and `selected_tags.csv` into `folder` (created) and return it.

    `num_outputs` pads the model's output with extra columns (to test a csv/model mismatch); `batch` is the
    input's batch dimension (a name = dynamic, as in the real models, or a fixed int); `channels_last=False`
    writes an NCHW model (not a WD14 layout); `model` / `tags_csv` False leave that file out.
    """
    folder.mkdir(parents=True, exist_ok=True)
    weights, bias = weights_and_bias(tags)
    if num_outputs is not None:
        extra = num_outputs - len(tags)
        weights = np.pad(weights, ((0, 0), (0, extra)))
        bias = np.pad(bias, (0, extra))
    if model:
        onnx.save(_graph_model(weights, bias, batch, channels_last), folder / "model.onnx")
    if tags_csv:
        with (folder / "selected_tags.csv").open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["tag_id", "name", "category", "count"])
            for index, (name, category, _) in enumerate(tags):
                writer.writerow([1000 + index, name, category, 5000 - index])
    return folder


def _graph_model(
    weights: np.ndarray, bias: np.ndarray, batch: int | str, channels_last: bool
) -> onnx.ModelProto:
    """mean over pixels -> /255 -> MatMul W -> + b -> Sigmoid, with the real models' input/output names."""
    size = IMAGE_SIZE
    shape = [batch, size, size, 3] if channels_last else [batch, 3, size, size]
    nodes = [
        helper.make_node(
            "ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2] if channels_last else [2, 3], keepdims=0
        ),
        helper.make_node("Mul", ["mean", "inv255"], ["features"]),
        helper.make_node("MatMul", ["features", "W"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, weights.shape[1]])],
        initializer=[
            numpy_helper.from_array(np.array(1.0 / 255.0, dtype=np.float32), "inv255"),
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    # Opset 13 and IR 8: old enough for any onnxruntime the `wd14` extra allows (>= 1.16).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model
