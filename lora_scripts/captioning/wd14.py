"""WD14 tagger: Danbooru-style tags for anime and illustration images from SmilingWolf's ONNX models.

A tagger folder is laid out like SmilingWolf's hub repos (wd-v1-4-moat-tagger-v2, wd-vit-tagger-v3, ...):
`model.onnx` (NHWC float32 BGR 0..255 in, one sigmoid probability per tag out) and `selected_tags.csv`
(`tag_id,name,category,count`; category 0 = general, 4 = character, 9 = rating).

Preprocessing, thresholds and tag order follow kohya sd-scripts' `finetune/tag_images_by_wd14_tagger.py`
(`preprocess_image`; `run_batch` with `--character_tags_first --remove_underscore`, thresholds inclusive),
which is what most LoRA datasets were captioned with; the kaomoji list comes from SmilingWolf's reference
space (`wd-v1-4-tags`, `app.py`).
onnxruntime is an optional dependency (`pip install 'lora-scripts[wd14]'`), imported only when a tagger loads.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lora_scripts.data import to_rgb
from lora_scripts.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_WD14_MODEL = "SmilingWolf/wd-v1-4-moat-tagger-v2"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9  # `category` values in selected_tags.csv

_DOWNLOAD_HINT = f"`hf download {DEFAULT_WD14_MODEL} --local-dir models/wd14`"

# Tags whose underscore is part of the face, not a word separator. SmilingWolf's space keeps exactly these;
# sd-scripts' --remove_underscore instead keeps every tag of 3 characters or fewer (`;_;`, `t_t`, `0_o`, ...).
# We keep both sets, so neither tool's kaomoji turns into "^ ^" here.
KAOMOJIS = frozenset(
    {
        "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
        "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
    }
)  # fmt: skip


def tag_display_name(tag: str, replace_underscores: bool = True) -> str:
    """The tag as written into captions: `long_hair` -> `long hair`, kaomoji such as `^_^` unchanged.

    Parentheses stay literal (`saber_(fate)` -> `saber (fate)`), as sd-scripts writes them: captions are
    training text, and A1111's `\\(` escaping belongs to prompts, where its parser removes the backslash.
    """
    tag = tag.strip()
    if not replace_underscores or tag in KAOMOJIS or len(tag) <= 3:
        return tag
    return tag.replace("_", " ")


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """One image as the WD14 models expect it: float32 [size, size, 3], BGR channel order, values 0..255.

    The image is centred on a white square (the models were trained on Danbooru images padded with white;
    black bars change the predicted background tags), then resized as sd-scripts does: cv2.INTER_AREA when
    shrinking (reproduced by `_area_resize`, so opencv is not needed), PIL LANCZOS when enlarging. No
    normalisation: the models take raw 0..255 values.
    """
    rgb = to_rgb(image)  # transparency composited on white, like SmilingWolf's space
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side < size:
        square = square.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(square)
    if side > size:
        pixels = _area_resize(pixels, size)
    # The models come from Keras/OpenCV pipelines, hence BGR.
    return np.ascontiguousarray(pixels[:, :, ::-1], dtype=np.float32)


def _area_resize(square: np.ndarray, size: int) -> np.ndarray:
    """cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA) for shrinking a uint8 [S, S, 3] image.

    Every output pixel is the mean of the input area it covers, border pixels weighted by the fraction
    covered. PIL's BOX filter is not this: it weighs border pixels 0 or 1, which moves pixel values by
    ~2 levels on average (up to 50) on real pictures. Returns uint8 [size, size, 3], equal to cv2's up to
    an occasional difference of 1 where cv2 rounds in float32.
    """
    averaged = _area_average(_area_average(square, size, axis=1), size, axis=0)
    if square.shape[0] == 2 * size:
        # cv2's SIMD path for exactly half size rounds halves up, (a + b + c + d + 2) >> 2; the epsilon keeps
        # an exact k + 0.5 that float arithmetic left at k + 0.4999... going up.
        rounded = np.floor(averaged + (0.5 + 1e-9))
    else:
        rounded = np.rint(averaged)
    return rounded.clip(0, 255).astype(np.uint8)


def _area_average(values: np.ndarray, out: int, axis: int) -> np.ndarray:
    """Area-average `values` along `axis` from n to `out` (< n) samples, as float64.

    Each input sample is a constant block of width 1, so the running integral is piecewise linear and the
    mean over [k * n / out, (k + 1) * n / out] is a difference of two interpolated prefix sums. Only the
    out + 1 prefix sums at the edges are formed (reduceat), not one per input sample.
    """
    n = values.shape[axis]
    edges = np.arange(out + 1) * n / out  # multiply first: the last edge is exactly n
    first = np.minimum(edges.astype(np.int64), n - 1)  # the sample each edge falls in (strictly increasing)
    shape = [1] * values.ndim
    shape[axis] = out + 1
    fraction = (edges - first).reshape(shape)
    # Sums of first[k]:first[k+1]; integer sums of uint8 samples are exact and several times faster.
    segments = np.add.reduceat(
        values, first, axis=axis, dtype=np.uint32 if values.dtype == np.uint8 else None
    )
    segments = segments.astype(np.float64)
    before = np.cumsum(segments, axis=axis) - segments  # sums of 0:first[k], exact in float64
    integral = before + fraction * np.take(values, first, axis=axis)
    return np.diff(integral, axis=axis) * (out / n)


class WD14Tagger:
    """A loaded WD14 tagger (a `Captioner`); build it with `load_wd14`.

    `caption` returns, per image, the character tags with p >= `character_threshold`, then the general tags
    with p >= `threshold`, each group by descending probability, joined with ", ". Rating tags are never
    written (sd-scripts only adds them with --use_rating_tags).
    """

    name = "wd14"

    def __init__(
        self,
        session: Any,
        tags: list[str],
        categories: np.ndarray,
        *,
        threshold: float,
        character_threshold: float,
        excluded: np.ndarray,
    ) -> None:
        model_input = session.get_inputs()[0]
        self._session = session
        self._input_name: str = model_input.name
        self.image_size: int = int(model_input.shape[1])
        # Some re-exported models have a fixed batch size; sd-scripts then runs batches of that size.
        batch = model_input.shape[0]
        self._max_batch: int | None = batch if isinstance(batch, int) and batch > 0 else None
        self.tags = tags
        self.categories = categories
        self.threshold = threshold
        self.character_threshold = character_threshold
        self.excluded = excluded  # bool [num_tags]: never written

    def predict(self, images: list[Image.Image]) -> np.ndarray:
        """Tag probabilities, float32 [len(images), len(self.tags)], in selected_tags.csv order."""
        if not images:
            return np.zeros((0, len(self.tags)), dtype=np.float32)
        batch = np.stack([prepare_image(image, self.image_size) for image in images])
        step = self._max_batch or len(batch)
        chunks = [
            self._session.run(None, {self._input_name: batch[start : start + step]})[0]
            for start in range(0, len(batch), step)
        ]
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def tags_for(self, probabilities: np.ndarray) -> list[str]:
        """The caption's tags for one image's probabilities ([num_tags]): characters first, then general."""
        picked: list[str] = []
        for category, threshold in ((CHARACTER, self.character_threshold), (GENERAL, self.threshold)):
            passing = (self.categories == category) & (probabilities >= threshold) & ~self.excluded
            (indexes,) = np.nonzero(passing)
            # Stable sort: equal probabilities keep the csv order, so captions are reproducible.
            picked += [self.tags[i] for i in indexes[np.argsort(-probabilities[indexes], kind="stable")]]
        return list(dict.fromkeys(picked))  # two csv names can give the same caption text

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One comma-separated tag list per image, in order ("" when no tag passes its threshold)."""
        return [", ".join(self.tags_for(row)) for row in self.predict(images)]


def load_wd14(
    model_dir: str | Path = DEFAULT_WD14_MODEL,
    *,
    threshold: float = 0.35,
    character_threshold: float = 0.85,
    exclude_tags: list[str] | None = None,
    device: str = "cpu",
    replace_underscores: bool = True,
) -> WD14Tagger:
    """Load a WD14 tagger from a local folder, or from a hub id already in the Hugging Face cache.

    `model_dir` holds `model.onnx` and `selected_tags.csv`. `exclude_tags` may be written with underscores
    or spaces (both are matched after the underscore rule). `device` "cuda" or "cuda:N" uses onnxruntime's
    CUDAExecutionProvider when the installed onnxruntime has it (onnxruntime-gpu), else the CPU.
    Nothing is downloaded; every problem found is raised together as a UserError.
    """
    problems = [
        f"WD14 {name} {value} is out of range; give a probability between 0 and 1."
        for name, value in (("threshold", threshold), ("character_threshold", character_threshold))
        if not 0.0 <= value <= 1.0
    ]
    try:
        import onnxruntime as ort
    except ImportError:
        problems.append("WD14 tagging needs onnxruntime: pip install 'lora-scripts[wd14]'")
        ort = None
    folder, folder_problems = _locate_model_folder(str(model_dir))
    problems += folder_problems
    if problems:
        raise UserError(problems)
    assert ort is not None and folder is not None  # for the type checker: problems were raised above

    tag_names, categories = _read_tags(folder / TAGS_FILE)
    session = _open_session(ort, folder / MODEL_FILE, device)
    num_outputs = session.get_outputs()[0].shape[-1]
    if isinstance(num_outputs, int) and num_outputs != len(tag_names):
        raise UserError(
            f"WD14 model folder '{folder}': {TAGS_FILE} lists {len(tag_names)} tags but {MODEL_FILE} outputs "
            f"{num_outputs}; the two files come from different taggers, download both from the same repo."
        )
    tagger = WD14Tagger(
        session,
        [tag_display_name(name, replace_underscores) for name in tag_names],
        np.asarray(categories),
        threshold=threshold,
        character_threshold=character_threshold,
        excluded=_excluded_mask(tag_names, exclude_tags or []),
    )
    logger.info(
        "WD14 tagger %s: %d tags, %dpx input, %s",
        folder,
        len(tag_names),
        tagger.image_size,
        session.get_providers()[0],
    )
    return tagger


def _excluded_mask(tag_names: list[str], exclude_tags: list[str]) -> np.ndarray:
    """bool [num_tags]: which tags `exclude_tags` names, matched whatever `replace_underscores` says."""
    # Compare in the spaced form so that "long_hair" and "long hair" both exclude the tag.
    wanted = {tag_display_name(tag) for tag in exclude_tags if tag.strip()}
    spaced = [tag_display_name(name) for name in tag_names]
    unknown = sorted(wanted - set(spaced))
    if unknown:
        logger.warning("WD14: exclude_tags %s are not in this tagger's vocabulary.", ", ".join(unknown))
    return np.array([name in wanted for name in spaced], dtype=bool)


def onnx_providers(device: str, available: list[str]) -> list[Any]:
    """onnxruntime providers for `device` ("cpu", "cuda", "cuda:1"), given `ort.get_available_providers()`.

    Any other device (mps, ...) runs on the CPU: those are torch devices, not onnxruntime providers.
    """
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        if device not in ("cuda", f"cuda:{index}") or not (index or "0").isdigit():
            raise UserError(f"WD14 device '{device}' is not understood; give cpu, cuda or cuda:N.")
        if "CUDAExecutionProvider" in available:
            device_id = int(index or 0)
            return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        logger.warning(
            "WD14: device %s requested but this onnxruntime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu for that); tagging on the CPU.",
            device,
        )
    return ["CPUExecutionProvider"]


def _locate_model_folder(spec: str) -> tuple[Path | None, list[str]]:
    """The tagger folder for `spec` (a folder, or a cached hub id), and the problems found with it."""
    path = Path(spec).expanduser()
    if path.is_file():
        return None, [f"WD14 model '{spec}' is a file; give the folder holding {MODEL_FILE} and {TAGS_FILE}."]
    if not path.is_dir():
        snapshot = _cached_snapshot(spec) if _looks_like_hub_id(spec) else None
        if snapshot is None:
            return None, [
                f"WD14 model '{spec}' is neither an existing folder nor a hub id in the local cache; "
                f"download a tagger first, e.g. {_DOWNLOAD_HINT}, and pass that folder."
            ]
        path = snapshot
    problems = [
        f"WD14 model folder '{path}' has no {missing}; download the tagger there, "
        f"e.g. `hf download {DEFAULT_WD14_MODEL} --local-dir {path}`."
        for missing in (MODEL_FILE, TAGS_FILE)
        if not (path / missing).is_file()
    ]
    return path, problems


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id`, or None; never touches the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure (not cached, bad id) means "not usable offline"
        return None


def _read_tags(path: Path) -> tuple[list[str], list[int]]:
    """Tag names and categories from selected_tags.csv, in model output order."""
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = [column for column in ("name", "category") if column not in (reader.fieldnames or [])]
        if missing:
            raise UserError(
                f"{path}: no {' or '.join(repr(m) for m in missing)} column; expected the header "
                f"tag_id,name,category,count of SmilingWolf's {TAGS_FILE}, download it again."
            )
        names, categories = [], []
        for row in reader:
            try:
                categories.append(int(row["category"]))
            except (TypeError, ValueError):
                raise UserError(
                    f"{path}: line {reader.line_num}: category {row['category']!r} is not a number; "
                    f"download {TAGS_FILE} again."
                ) from None
            names.append(row["name"] or "")
    return names, categories


def _open_session(ort: Any, model_path: Path, device: str) -> Any:
    """An onnxruntime session for `model_path`, checked to take [batch, size, size, 3] images."""
    providers = onnx_providers(device, ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(model_path), providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own, version-dependent error types
        raise UserError(
            f"{model_path}: onnxruntime cannot load it ({err}); download it again, e.g. {_DOWNLOAD_HINT}."
        ) from None
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise UserError(
            f"{model_path}: input shape {shape} is not a WD14 tagger's [batch, size, size, 3]; use the "
            "model.onnx of a SmilingWolf wd-v1-4 / wd-*-tagger-v3 repo."
        )
    return session
