"""Several image folders in one dataset: kohya's `N_name` repeat folders, caption extensions, reg images.

sd-scripts (library/train_util.py, DreamBoothDataset) reads a `train_data_dir` holding folders such as
`10_inkstyle` (every image inside is seen 10 times per epoch) and a `reg_data_dir` of regularization images
whose folder name (`1_person`) doubles as their caption. `collect_subsets` reads any number of such folders,
each described by a `SubsetSpec`, and reports every problem of every folder in one UserError.

Unlike sd-scripts, a training image without a caption file stops with an error: sd-scripts trains it with an
empty caption (or the folder's class token) and only logs a warning, a trap when `caption_extension` does not
match the files (`.caption` by default there, `.txt` here).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lora_scripts.data.captions import (
    IMAGE_EXTENSIONS,
    CaptionedImage,
    _Problems,
    caption_path_of,
    captions_from_csv,
    captions_from_files,
    find_images,
    unreadable_images,
)
from lora_scripts.errors import UserError

logger = logging.getLogger(__name__)

# sd-scripts: `tokens = os.path.basename(dir).split("_"); n_repeats = int(tokens[0])`, the rest is the class.
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
# Caption extensions people use, looked for beside the images when none has the configured one.
_OTHER_CAPTION_EXTENSIONS = (".txt", ".caption", ".tags", ".cap")
# A folder such as "2024_summer" parses as 2024 repeats; above this a warning asks whether that was meant.
_SUSPICIOUS_REPEATS = 100


@dataclass(frozen=True)
class SubsetSpec:
    """One folder of images and how to read it.

    `key` is the config key path of `image_dir` (e.g. "datasets[1].train_data_dir"); messages name it and
    its sibling keys ("datasets[1].caption_extension").
    """

    image_dir: Path
    metadata_path: Path | None = None  # a `file_name,text` CSV instead of caption files
    caption_extension: str = ".txt"  # sd-scripts' key; ".caption", ".tags", ... allowed
    num_repeats: int | None = None  # None: from N_name folders; else this for every image
    is_reg: bool = False  # regularization (prior-preservation) images
    key: str = "train_data_dir"


@dataclass(frozen=True)
class _RepeatFolder:
    path: str  # posix path relative to the subset's image_dir
    repeats: int
    class_token: str


def folder_repeats(file_name: str) -> tuple[int, str | None]:
    """(repeats, class token) from the innermost `N_name` folder on a posix path relative to image_dir.

    `folder_repeats("10_ink/sub/a.png") == (10, "ink")`; `folder_repeats("a.png") == (1, None)`.
    Raises UserError for a `0_name` folder, whose images would never be seen.
    """
    folder = _repeat_folder(file_name)
    if folder is None:
        return 1, None
    if folder.repeats < 1:
        raise UserError(_zero_repeats_message(folder.path))
    return folder.repeats, folder.class_token


def _repeat_folder(file_name: str) -> _RepeatFolder | None:
    parts = PurePosixPath(file_name).parts[:-1]
    for depth in range(len(parts), 0, -1):
        match = _REPEAT_FOLDER.match(parts[depth - 1])
        if match:
            return _RepeatFolder("/".join(parts[:depth]), int(match[1]), match[2])
    return None


def _zero_repeats_message(folder: Path | str) -> str:
    return (
        f"{folder}: a folder named 0_<name> repeats its images 0 times, so they would never be seen; "
        "rename it to 1_<name> or more (N_name folders repeat each image N times per epoch)."
    )


def collect_subsets(specs: Sequence[SubsetSpec]) -> list[CaptionedImage]:
    """Every captioned image of every subset, sorted by (subset, file_name), after checking each image opens.

    `subset` is the index in `specs`; `file_name` is relative to that subset's image_dir. Raises one
    UserError listing every problem of every subset (at most MAX_LISTED_PER_KIND per kind).
    """
    problems = _Problems()
    items: list[CaptionedImage] = []
    to_check: dict[Path, None] = {}  # ordered set: an image in two subsets is decoded once
    for index, spec in enumerate(specs):
        subset_items, subset_checks = _collect_one(index, spec, problems)
        items.extend(subset_items)
        to_check.update(dict.fromkeys(subset_checks))
    for path, reason in unreadable_images(list(to_check)):
        problems.add(
            "unreadable",
            f"{path}: cannot be read as an image ({reason}); re-save it as PNG or JPEG, or remove it.",
        )
    if problems:
        raise UserError(problems.messages())
    return items


def _collect_one(
    index: int, spec: SubsetSpec, problems: _Problems
) -> tuple[list[CaptionedImage], list[Path]]:
    """(captioned images sorted by file_name, image paths to decode) of one subset; problems are added."""
    image_dir = Path(spec.image_dir)
    kind_of_images = "regularization" if spec.is_reg else "training"
    options_ok = _check_options(spec, problems)
    if not image_dir.is_dir():
        problems.add(
            "folder",
            f"{spec.key}: '{image_dir}' is not a folder; set {spec.key} to the folder holding your "
            f"{kind_of_images} images.",
        )
        return [], []
    images = find_images(image_dir)
    if not images:
        problems.add(
            "no_images",
            f"{image_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files, in subfolders "
            f"too); put your {kind_of_images} images there or fix {spec.key}.",
        )
        return [], []
    if not options_ok:
        return [], []
    if spec.num_repeats is None:
        _check_repeat_folders(spec, images, problems)
    if spec.metadata_path is None:
        captions, uncaptioned = captions_from_files(image_dir, images, spec.caption_extension, problems)
        if len(uncaptioned) == len(images):
            _hint_other_caption_extension(spec, images, problems)
    else:
        captions, uncaptioned = captions_from_csv(
            image_dir, Path(spec.metadata_path), images, problems, spec.key
        )
    for name in uncaptioned:
        folder = _repeat_folder(name)
        if spec.is_reg and folder is not None:
            # sd-scripts' prior preservation: reg/1_person/x.png is captioned "person".
            captions[name] = folder.class_token
        else:
            _add_missing_caption(spec, name, problems)
    items = [
        CaptionedImage(
            path=image_dir / name,
            caption=captions[name],
            file_name=name,
            repeats=_repeats(spec, name),
            is_reg=spec.is_reg,
            subset=index,
        )
        for name in sorted(captions)
    ]
    if spec.is_reg:  # how often they are drawn depends on the training images (training_set.py)
        logger.info("%s: %d %s images", image_dir, len(items), kind_of_images)
    else:
        views = sum(item.repeats for item in items)
        logger.info("%s: %d %s images, %d samples per epoch", image_dir, len(items), kind_of_images, views)
    return items, [image_dir / name for name in sorted(set(images) | set(captions))]


def _repeats(spec: SubsetSpec, file_name: str) -> int:
    if spec.num_repeats is not None:
        return spec.num_repeats
    folder = _repeat_folder(file_name)
    return 1 if folder is None else folder.repeats


def _sibling_key(key: str, name: str) -> str:
    """`_sibling_key("datasets[1].train_data_dir", "num_repeats") == "datasets[1].num_repeats"`."""
    parent, dot, _ = key.rpartition(".")
    return f"{parent}{dot}{name}"


def _check_options(spec: SubsetSpec, problems: _Problems) -> bool:
    """Add a problem for each bad option of `spec`; True when all are usable."""
    ok = True
    extension = spec.caption_extension
    if not extension.startswith(".") or len(extension) < 2 or "/" in extension or "\\" in extension:
        problems.add(
            "option",
            f"{_sibling_key(spec.key, 'caption_extension')}: '{extension}' is not a file extension; write "
            "it with its leading dot, e.g. .txt or .caption.",
        )
        ok = False
    if spec.num_repeats is not None and (isinstance(spec.num_repeats, bool) or spec.num_repeats < 1):
        problems.add(
            "option",
            f"{_sibling_key(spec.key, 'num_repeats')}: {spec.num_repeats!r} is not a positive whole number; "
            "set how many times each image is seen per epoch (1 or more), or leave it out to take it from "
            "N_name folders.",
        )
        ok = False
    return ok


def _check_repeat_folders(spec: SubsetSpec, images: list[str], problems: _Problems) -> None:
    """Report each `0_name` folder once, and warn about folders whose number looks like a year or an id."""
    folders = {folder.path: folder for folder in map(_repeat_folder, images) if folder is not None}
    image_dir = Path(spec.image_dir)
    for folder in folders.values():
        if folder.repeats < 1:
            problems.add("repeat_folder", _zero_repeats_message(image_dir / folder.path))
        elif folder.repeats > _SUSPICIOUS_REPEATS:
            logger.warning(
                "%s: the folder name makes each image inside repeat %d times per epoch (kohya N_name "
                "folders); rename it if that number is not meant as a repeat count.",
                image_dir / folder.path,
                folder.repeats,
            )
    if not folders and _REPEAT_FOLDER.match(image_dir.name):
        # kohya's train_data_dir is the PARENT of the N_name folders; pointing at one loses its number.
        logger.warning(
            "%s: %s itself is named like a kohya N_name folder, but only folders inside it set repeats, so "
            "its images repeat once; point %s at its parent folder or set num_repeats.",
            image_dir,
            spec.key,
            spec.key,
        )


def _hint_other_caption_extension(spec: SubsetSpec, images: list[str], problems: _Problems) -> None:
    """When no image has a caption with the configured extension, look for captions with another one."""
    image_dir = Path(spec.image_dir)
    counts = {
        extension: sum(caption_path_of(image_dir / name, extension).is_file() for name in images)
        for extension in _OTHER_CAPTION_EXTENSIONS
        if extension != spec.caption_extension
    }
    found = sorted(((n, ext) for ext, n in counts.items() if n), reverse=True)
    if not found:
        return
    listed = " and ".join(f"{n} {ext}" for n, ext in found)
    problems.add(
        "caption_extension",
        f"found {listed} files beside the images in {image_dir} but no {spec.caption_extension} ones; set "
        f"{_sibling_key(spec.key, 'caption_extension')}: {found[0][1]}.",
    )


def _add_missing_caption(spec: SubsetSpec, name: str, problems: _Problems) -> None:
    image_path = Path(spec.image_dir) / name
    if spec.metadata_path is None:
        caption_path = caption_path_of(image_path, spec.caption_extension)
        missing, fix = f"no {caption_path.name} beside it", f"write its caption in {caption_path}"
        metadata = Path(spec.image_dir) / "metadata.csv"  # the labeler's and the web app's caption file
        if metadata.is_file():  # captions kept the diffusers way, which is read only when the config says so
            fix = f"set metadata_path: {metadata} in the config to read the folder's captions, or {fix}"
    else:
        missing = f"no row in {Path(spec.metadata_path).name}"
        fix = f"add a row for '{name}'"
    if spec.is_reg:
        problems.add(
            "reg_no_caption",
            f"{image_path}: regularization image without a caption ({missing}, and no N_name folder such "
            f"as 1_person above it to take a class token from); {fix} or move it into a folder named "
            "1_<class>.",
        )
    else:
        problems.add(
            "no_caption", f"{image_path}: image without a caption ({missing}); {fix} or remove the image."
        )
