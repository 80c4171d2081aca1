"""One labelling run: pick the images that need a caption, caption them in batches, merge, write, summarize.

Hand edits are never lost: an image that already has a caption (a CSV row or a `.txt`) is skipped unless
`overwrite`, and the caption stores (`metadata_csv`) keep every existing row byte for byte. Progress is
saved every SAVE_EVERY_S seconds and when the run stops for any reason, so an interrupted run loses at
most those seconds of work and a rerun picks up where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from lora_scripts.captioning.base import Captioner
from lora_scripts.captioning.metadata_csv import (
    CaptionStore,
    ConvertSummary,
    CsvCaptions,
    TxtCaptions,
    check_image_dir,
    list_images,
)
from lora_scripts.data import IMAGE_EXTENSIONS, CaptionedImage, caption_words, load_rgb, tag_frequency
from lora_scripts.errors import UserError

SAVE_EVERY_S = 30.0
TOP_TERMS = 15

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionerOptions:
    """Which captioner to load and how; the WD14 fields are ignored by BLIP and the BLIP ones by WD14."""

    name: str = "blip"  # "blip" or "wd14"
    model: str | None = None  # folder or hub id; None: the captioner's default
    device: str | None = None  # None: cuda, then mps, then cpu
    max_new_tokens: int = 40
    num_beams: int = 1
    threshold: float = 0.35
    character_threshold: float = 0.85
    exclude_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelOptions:
    """What to caption and where the captions go."""

    input_dir: Path
    output: Path | None = None  # the CSV; None: <input_dir>/metadata.csv. Unused for format "txt".
    format: str = "csv"  # "csv" or "txt" (kohya-style, beside each image)
    recursive: bool = False
    overwrite: bool = False
    prune: bool = False
    prefix: str = ""
    suffix: str = ""
    trigger: str = ""
    batch_size: int = 8
    captioner: str = "blip"  # decides whether the summary counts words (blip) or tags (wd14)


@dataclass
class LabelSummary:
    """What a run did, for the CLI to print (`summary_lines`)."""

    captioner: str
    location: Path  # the CSV written, or the image folder for .txt captions
    captioned: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file_name, why)
    kept: int = 0
    missing: list[str] = field(default_factory=list)
    pruned: bool = False
    backups: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    term_kind: str = "words"
    top_terms: list[tuple[str, int]] = field(default_factory=list)


def load_captioner(options: CaptionerOptions) -> Captioner:
    """Load the named captioner; transformers and the model load only here, after all checks passed."""
    if options.name == "wd14":
        try:
            from lora_scripts.captioning.wd14 import load_wd14
        except ImportError as exc:
            raise UserError(
                "--captioner wd14: the WD14 tagger is not installed here; use --captioner blip."
            ) from exc
        from lora_scripts.devices import pick_device

        # The tagger runs on onnxruntime, which wants a device name, not "auto".
        model = {} if options.model is None else {"model_dir": options.model}
        return load_wd14(
            **model,
            threshold=options.threshold,
            character_threshold=options.character_threshold,
            exclude_tags=list(options.exclude_tags),
            device=str(pick_device(options.device)),
        )
    if options.name != "blip":
        raise UserError(f"--captioner: '{options.name}' is not a captioner; use blip or wd14.")
    from lora_scripts.captioning.blip import DEFAULT_BLIP_MODEL, load_blip

    return load_blip(
        options.model or DEFAULT_BLIP_MODEL,
        device=options.device,
        max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams,
    )


def compose_caption(caption: str, *, trigger: str = "", prefix: str = "", suffix: str = "") -> str:
    """`trigger, ` + prefix + caption + suffix: prefix and suffix are pasted as given (a suffix such as
    ", ink wash painting" brings its own comma); the trigger word always comes first, joined with ", "."""
    text = f"{prefix}{caption.strip()}{suffix}".strip()
    trigger = trigger.strip()
    if trigger:
        text = f"{trigger}, {text}" if text else trigger
    return text


def label_images(
    options: LabelOptions,
    load: Callable[[], Captioner],
    progress: Callable[[int, int], None] | None = None,
) -> LabelSummary:
    """Caption every image without a caption (all of them with `overwrite`) and write the captions.

    `load` is called only if some image needs a caption, so a rerun with nothing to do loads no model.
    Unreadable images are listed in the summary and skipped. Raises UserError before loading anything if
    an option, the folder or the existing captions are unusable. `progress(done, total)` is called once the
    images to caption are known and after every batch (the web app's progress bar; the CLI has tqdm's).
    """
    store, images = _open_store(options)
    todo = [n for n in images if options.overwrite or n not in store.existing]
    summary = LabelSummary(
        captioner=options.captioner,
        location=store.location,
        kept=len(images) - len(todo),
        missing=list(store.missing),
        pruned=options.prune and bool(store.missing),
        term_kind="tags" if options.captioner == "wd14" else "words",
    )
    new: dict[str, str] = {}
    if progress is not None:
        progress(0, len(todo))
    captioner = load() if todo else None
    start = time.monotonic()  # after loading, so that images/s is the captioning speed
    try:
        if captioner is not None:
            _caption_all(options, captioner, todo, store, new, summary.skipped, progress)
    finally:
        # Also on Ctrl-C or a crash: whatever was captioned is kept, and a rerun captions only the rest.
        store.save(new)
    summary.seconds = time.monotonic() - start
    summary.captioned = sorted(new)
    summary.backups = list(store.backups)
    final = {**store.existing, **new}
    summary.top_terms = top_terms([final[n] for n in images if n in final], summary.term_kind)
    return summary


def _open_store(options: LabelOptions) -> tuple[CaptionStore, list[str]]:
    """The caption store the options name, and the images to consider; every problem is a UserError."""
    problems = []
    if options.batch_size < 1:
        problems.append(f"--batch-size: {options.batch_size} is out of range; use 1 or more (default 8).")
    if options.format == "txt" and options.output is not None:
        problems.append(
            "--output: names the metadata CSV; with --format txt captions go beside each image, so leave "
            "--output out."
        )
    if options.format == "txt" and options.prune:
        problems.append(
            "--prune: only removes CSV rows; with --format txt delete the listed .txt files yourself."
        )
    if options.format not in ("csv", "txt"):
        problems.append(f"--format: '{options.format}' is not a caption format; use csv or txt.")
    if problems:
        raise UserError(problems)
    check_image_dir(options.input_dir)
    images = list_images(options.input_dir, recursive=options.recursive)
    if not images:
        in_subfolders = not options.recursive and list_images(options.input_dir, recursive=True)
        hint = " (there are some in subfolders: add --recursive)" if in_subfolders else ""
        raise UserError(
            f"--input: no images in '{options.input_dir}'{hint}; looked for "
            f"{', '.join(IMAGE_EXTENSIONS)} files."
        )
    if options.format == "txt":
        store = TxtCaptions(
            options.input_dir, images, overwrite=options.overwrite, recursive=options.recursive
        )
        return store, images
    output = options.output if options.output is not None else options.input_dir / "metadata.csv"
    return CsvCaptions(output, options.input_dir, overwrite=options.overwrite, prune=options.prune), images


def _caption_all(
    options: LabelOptions,
    captioner: Captioner,
    todo: list[str],
    store: CaptionStore,
    new: dict[str, str],
    skipped: list[tuple[str, str]],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Caption `todo` in batches into `new`; the next batch is decoded in a thread while the model runs."""
    batches = [todo[i : i + options.batch_size] for i in range(0, len(todo), options.batch_size)]
    last_save = time.monotonic()
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        tqdm(total=len(todo), unit="img", desc=f"Captioning ({captioner.name})", dynamic_ncols=True) as bar,
    ):
        pending: Future = pool.submit(_load_batch, options.input_dir, batches[0])
        for index in range(len(batches)):
            loaded = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(_load_batch, options.input_dir, batches[index + 1])
            readable = [(name, image) for name, image in loaded if isinstance(image, Image.Image)]
            skipped.extend((name, why) for name, why in loaded if isinstance(why, str))
            texts = captioner.caption([image for _, image in readable]) if readable else []
            for (name, _), text in zip(readable, texts, strict=True):
                if text.strip():
                    new[name] = compose_caption(
                        text, trigger=options.trigger, prefix=options.prefix, suffix=options.suffix
                    )
                else:  # a trigger or suffix alone would hide that the model saw nothing to describe
                    skipped.append((name, f"{captioner.name} gave no caption; write one by hand"))
            bar.update(len(loaded))
            if progress is not None:
                progress(bar.n, len(todo))
            if time.monotonic() - last_save > SAVE_EVERY_S:
                store.save(new)
                last_save = time.monotonic()


def _load_batch(image_dir: Path, names: list[str]) -> list[tuple[str, Image.Image | str]]:
    """(file_name, RGB image) per readable file, (file_name, short reason) per unreadable one."""
    out: list[tuple[str, Image.Image | str]] = []
    for name in names:
        try:
            out.append((name, load_rgb(image_dir / name)))
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            reason = str(exc).replace(str(image_dir / name), name) or type(exc).__name__
            out.append((name, reason.splitlines()[0][:200]))
    return out


def top_terms(captions: Iterable[str], kind: str, n: int = TOP_TERMS) -> list[tuple[str, int]]:
    """The `n` most frequent comma tags (`kind="tags"`, kohya's counts) or words without stopwords."""
    if kind == "tags":
        items = [CaptionedImage(path=Path(), caption=c, file_name="") for c in captions]
        return list(tag_frequency(items).items())[:n]
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(caption_words(caption))
    return counts.most_common(n)


def summary_lines(summary: LabelSummary) -> list[str]:
    """The end-of-run report, one line each (the CLI prints them)."""
    rate = len(summary.captioned) / summary.seconds if summary.seconds > 0 else 0.0
    lines = [
        f"Captioned {_count(len(summary.captioned), 'image')} with {summary.captioner} in "
        f"{summary.seconds:.1f} s ({rate:.1f} images/s); captions in {summary.location}."
    ]
    lines.append(
        f"Kept {_count(summary.kept, 'existing caption')} (--overwrite re-captions, after a backup)."
    )
    skipped = [f"{name}: {why}" for name, why in summary.skipped]
    lines += _listed(f"Skipped {_count(len(summary.skipped), 'image')}", skipped)
    action = "removed (--prune)" if summary.pruned else "kept; --prune removes them"
    title = f"Missing: {_count(len(summary.missing), 'caption')} for images that no longer exist ({action})"
    lines += _listed(title, summary.missing)
    lines += [f"Backup of the previous captions: {path}" for path in summary.backups]
    if summary.top_terms:
        terms = ", ".join(f"{term} ({count})" for term, count in summary.top_terms)
        lines.append(f"Most frequent {summary.term_kind}: {terms}")
    return lines


def convert_summary_lines(summary: ConvertSummary) -> list[str]:
    """The report of `captions convert`, one line each."""
    written = _count(len(summary.written), "caption")
    lines = [f"Wrote {written} to {summary.target}; kept {summary.kept} already there."]
    lines += _listed(
        f"No caption to convert for {_count(len(summary.no_caption), 'image')}", summary.no_caption
    )
    title = f"Missing: {_count(len(summary.missing), 'caption')} for images that no longer exist"
    lines += _listed(title, summary.missing)
    lines += [f"Backup of the previous captions: {path}" for path in summary.backups]
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _listed(title: str, items: list[str], limit: int = 20) -> list[str]:
    """`title:` then up to `limit` indented items; nothing at all when there are no items."""
    if not items:
        return []
    more = [f"  ... and {len(items) - limit} more"] if len(items) > limit else []
    return [f"{title}:", *(f"  {item}" for item in items[:limit]), *more]
