"""`lora-scripts` command line: parse, then call one function per subcommand.

A user mistake (UserError) prints one line per problem to stderr and exits with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lora_scripts.errors import UserError
from lora_scripts.generation import cli_args as generate_args
from lora_scripts.gui.command import add_gui_command
from lora_scripts.lora_tools.commands import add_lora_tool_commands

if TYPE_CHECKING:
    from lora_scripts.training.loop import TrainResult


def _cmd_train(args: argparse.Namespace) -> int:
    from lora_scripts.config import load_config
    from lora_scripts.training.failures import explain_failure
    from lora_scripts.training.loop import train

    # --resume on the command line wins over the config's resume.
    config = load_config(args.config, {"resume": args.resume} if args.resume else None)
    try:
        result = train(config, config_path=args.config)
    except Exception as exc:
        # A full disk, a read-only output_dir or too little GPU memory is the user's to fix: one sentence,
        # like every other user error. Anything else keeps its traceback.
        explained = explain_failure(exc, output_dir=config.output_dir, config=config)
        if explained is None:
            raise
        raise explained from exc
    if result.stopped_by is not None:
        if result.is_main_process:
            _print_stopped(result, args.config)
        return 130  # the shell's code for a run ended by Ctrl-C
    if not result.is_main_process:
        return 0
    print(f"Done: {result.global_step} steps. LoRA files:")
    for path in result.final_files:
        print(f"  {path}")
    print(f"TensorBoard: tensorboard --logdir {config.logging_dir}")
    return 0


def _print_stopped(result: TrainResult, config_path: str) -> None:
    from lora_scripts.training.interrupt import resume_command

    print(f"Stopped at step {result.global_step} ({result.stopped_by}). LoRA file: {result.step_files[-1]}")
    if result.state_dir is None:
        print("No training state was saved (save_state: false), so this run cannot be resumed.")
        return
    print(f"Training state: {result.state_dir}")
    print(f"To continue: {resume_command(config_path, sys.argv[0])}")


def _cmd_check(args: argparse.Namespace) -> int:
    import json

    from lora_scripts.checks import check_config_file, render_text, report_to_json

    # Loading the data logs what the report says anyway (images found, samples per epoch); said again on
    # stderr, a terminal or CI log may show it apart from the report, even below it. Its warnings still show.
    data_log = logging.getLogger("lora_scripts.data")
    level = data_log.level
    data_log.setLevel(logging.WARNING)
    try:
        report = check_config_file(args.config)
    finally:
        data_log.setLevel(level)
    if args.json:
        print(json.dumps(report_to_json(report), indent=2, ensure_ascii=False))
        return 0 if report.ok else 2
    print(render_text(report), end="", flush=True)  # before the errors, which go to stderr
    if not report.ok:
        raise UserError(report.errors)  # printed as `train` prints them: one `error:` line each, exit 2
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lora_scripts.demo import next_steps_lines, run_demo

    result = run_demo(Path(args.dir), steps=args.steps, family=args.family)
    print("Demo LoRA written:")
    for path in result.final_files:
        print(f"  {path}")
    print("\n".join(next_steps_lines(Path(args.dir), result.final_files[-1], args.family)))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from lora_scripts.generation.generate import run_generate

    result = run_generate(generate_args.options_from_args(args))
    print(f"Seed: {result.seed}{' (random)' if result.random_seed else ''}")
    for path in result.files:
        print(f"  {path}")
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from functools import partial

    from lora_scripts.captioning.labeler import (
        CaptionerOptions,
        LabelOptions,
        label_images,
        load_captioner,
        summary_lines,
    )

    captioner = CaptionerOptions(
        name=args.captioner,
        model=args.model,
        device=args.device,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        threshold=args.threshold,
        character_threshold=args.character_threshold,
        exclude_tags=tuple(t.strip() for t in (args.exclude_tags or "").split(",") if t.strip()),
    )
    options = LabelOptions(
        input_dir=Path(args.input),
        output=Path(args.output) if args.output else None,
        format=args.format,
        recursive=args.recursive,
        overwrite=args.overwrite,
        prune=args.prune,
        prefix=args.prefix,
        suffix=args.suffix,
        trigger=args.trigger,
        batch_size=args.batch_size,
        captioner=args.captioner,
    )
    summary = label_images(options, partial(load_captioner, captioner))
    print("\n".join(summary_lines(summary)))
    return 0


def _cmd_captions_convert(args: argparse.Namespace) -> int:
    from lora_scripts.captioning.labeler import convert_summary_lines
    from lora_scripts.captioning.metadata_csv import convert_captions

    folder = Path(args.input)
    csv_path = Path(args.output) if args.output else folder / "metadata.csv"
    summary = convert_captions(folder, args.to, csv_path, recursive=args.recursive, overwrite=args.overwrite)
    print("\n".join(convert_summary_lines(summary)))
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from lora_scripts.config.importers import import_to_file, render_report

    dataset_config = Path(args.dataset_config) if args.dataset_config else None
    report = import_to_file(
        Path(args.source), Path(args.output), dataset_config=dataset_config, force=args.force
    )
    print(render_report(report, args.output), end="")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from lora_scripts.bench.report import render_table
    from lora_scripts.bench.runner import run_bench
    from lora_scripts.bench.workspace import BenchSettings

    report = run_bench(
        BenchSettings(
            model=args.model,
            steps=args.steps,
            warmup=args.warmup,
            batch_size=args.batch_size,
            resolution=args.resolution,
            precision=args.precision,
            cache=args.cache,
            gradient_checkpointing=args.gradient_checkpointing,
            torch_compile=args.torch_compile,
            memory_profile=args.memory_profile,
            quantize_base=args.quantize_base,
            network_type=args.network_type,
            device=args.device,
        )
    )
    print(json.dumps(report, indent=2) if args.json else render_table(report), end="\n" if args.json else "")
    return 0


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time our training step against a diffusers-style reference loop")
    p.add_argument(
        "--model",
        default="tiny",
        help="tiny (default), tiny-sdxl, sd15 or sdxl (full-size architectures, random weights) or a model "
        "PATH; SDXL models are measured without the reference loop (it is diffusers' SD 1.x/2.x script)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per loop (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default 4)")
    p.add_argument(
        "--resolution", type=int, help="image size (default 64 for the tiny models, 1024 for SDXL, else 512)"
    )
    p.add_argument("--precision", choices=["no", "fp16", "bf16"], default="no", help="mixed precision")
    p.add_argument(
        "--cache", action=argparse.BooleanOptionalAction, default=True, help="our latent/text caching"
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="in both loops")
    p.add_argument(
        "--torch-compile",
        action="store_true",
        help="torch.compile our UNet (warm-up steps then include the compile)",
    )
    p.add_argument(
        "--memory-profile",
        choices=["default", "low"],
        default="default",
        help="low: train()'s small-GPU preset in both loops (steps of 1 image, accumulated)",
    )
    p.add_argument(
        "--quantize-base",
        choices=["no", "int8", "float8"],
        default="no",
        help="the UNet's frozen weights in 8 bits (config key quantize_base), in both loops",
    )
    p.add_argument(
        "--network-type",
        choices=["lora", "locon", "loha", "lokr", "dora"],
        default="lora",
        help="our loop's network (config key network_type); the reference loop trains a LoRA",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: the best")
    p.set_defaults(func=_cmd_bench)


def _add_caption_commands(sub: argparse._SubParsersAction) -> None:
    """`label` (auto-captioning, also `python tools/auto_label.py`) and `captions convert`."""
    p = sub.add_parser("label", help="caption images with BLIP or WD14, keeping every existing caption")
    p.add_argument("--input", required=True, help="folder of images")
    p.add_argument("--output", help="metadata CSV to write (default INPUT/metadata.csv)")
    p.add_argument("--format", choices=["csv", "txt"], default="csv", help="csv (default) or .txt per image")
    p.add_argument("--captioner", choices=["blip", "wd14"], default="blip", help="sentences or booru tags")
    p.add_argument("--model", help="model folder or hub id (blip: Salesforce/blip-image-captioning-base)")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best available)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--num-beams", type=int, default=1, help="BLIP: 1 = greedy (default), more = beam search")
    p.add_argument("--max-new-tokens", type=int, default=40, help="BLIP: caption length limit (default 40)")
    p.add_argument("--threshold", type=float, default=0.35, help="WD14: general tag threshold (default 0.35)")
    p.add_argument("--character-threshold", type=float, default=0.85, help="WD14: character threshold")
    p.add_argument("--exclude-tags", help="WD14: comma-separated tags never written")
    p.add_argument("--trigger", default="", help="trigger word put first, joined with ', '")
    p.add_argument("--prefix", default="", help="text pasted before each caption")
    p.add_argument("--suffix", default="", help="text pasted after each caption, e.g. ', ink wash painting'")
    p.add_argument("--recursive", action="store_true", help="caption images in subfolders too")
    p.add_argument("--overwrite", action="store_true", help="re-caption every image (backs up the old file)")
    p.add_argument("--prune", action="store_true", help="remove CSV rows of images that no longer exist")
    p.set_defaults(func=_cmd_label)

    captions = sub.add_parser("captions", help="caption file tools").add_subparsers(
        dest="captions_command", required=True, metavar="ACTION"
    )
    p = captions.add_parser("convert", help="metadata.csv <-> .txt beside each image (never overwrites)")
    p.add_argument("--input", required=True, help="folder of images")
    p.add_argument("--to", required=True, choices=["csv", "txt"], help="the form to write")
    p.add_argument("--output", help="the metadata CSV, written or read (default INPUT/metadata.csv)")
    p.add_argument("--recursive", action="store_true", help="images in subfolders too")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions (after a backup)")
    p.set_defaults(func=_cmd_captions_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-scripts", description="Train Stable Diffusion LoRAs from one YAML file."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages of the libraries")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a LoRA from a YAML config")
    p.add_argument("--config", required=True, help="path of the YAML config (see docs/config.md)")
    p.add_argument(
        "--resume",
        metavar="auto|STATE",
        help="continue a stopped run: auto = the newest state in output_dir/state, or a state folder "
        "(overrides the config's resume)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("check", help="check the data and config and show the plan, without training")
    p.add_argument("--config", required=True, help="path of the YAML config (see docs/config.md)")
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object (docs/check.md)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "demo", help="build a tiny model and sample dataset, then train a demo LoRA (no download, CPU ok)"
    )
    p.add_argument("--dir", default="./demo", help="folder for the demo model, data and output")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument(
        "--family",
        choices=("sd", "sdxl"),
        default="sd",
        help="shape of the tiny base model: sd (SD 1.x, the default) or sdxl",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("generate", help=generate_args.HELP)
    generate_args.add_generate_arguments(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "import",
        help="turn an sd-scripts TOML or command line, a kohya_ss preset or an SD-Trainer TOML into a config",
    )
    p.add_argument(
        "source",
        help="sd-scripts / SD-Trainer .toml, kohya_ss .json, or a .sh/.bat/.txt with the command line",
    )
    p.add_argument("--dataset-config", help="sd-scripts --dataset_config .toml (datasets and subsets)")
    p.add_argument("-o", "--output", required=True, help="the YAML config to write (see docs/import.md)")
    p.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    p.set_defaults(func=_cmd_import)

    _add_caption_commands(sub)
    add_lora_tool_commands(sub)
    add_gui_command(sub)
    _add_bench_command(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    if not verbose:
        # The libraries' own info/warnings (e.g. torchvision fallbacks) are noise for our users.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        for name in ("diffusers", "transformers", "accelerate", "peft", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _close_progress_bars() -> None:
    """End a progress bar that a failure left open (e.g. a full disk mid-training), so that the error starts
    on its own line instead of after `training:  50%|█████ …`. tqdm keeps its live bars in `_instances`."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except UserError as err:
        _close_progress_bars()
        for message in err.messages:
            print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
