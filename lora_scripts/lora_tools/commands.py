"""The `lora-scripts` subcommands of the post-training tools: arguments, then one library call each."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LAYOUTS = ("kohya", "diffusers", "peft")  # export/lora_layouts.LAYOUTS (not imported: the CLI starts fast)
PRECISIONS = ("fp16", "bf16", "fp32")
BASE_CONFIG_HELP = (
    "a diffusers folder whose configs name and size the layers (default: the full-size model of the file's "
    "family)"
)


def add_lora_tool_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a LoRA between the kohya (A1111/ComfyUI) and diffusers/peft layouts"
    )
    p.add_argument("input", type=Path, help="a LoRA .safetensors file (kohya or diffusers) or a peft folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="the file (a folder for --to peft)")
    p.add_argument("--to", choices=LAYOUTS, required=True, help="the layout to write")
    _add_output_options(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("merge", help="merge LoRAs into one LoRA file (exact, or by SVD with --rank)")
    p.add_argument(
        "--lora",
        action="append",
        required=True,
        metavar="PATH[:WEIGHT]",
        help="a LoRA and its weight (default 1; negative subtracts); repeat for each",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the merged file")
    p.add_argument(
        "--rank", type=int, help="SVD-merge every module to this rank (default: exact concatenation)"
    )
    p.add_argument("--conv-rank", type=int, help="SVD rank of 3x3 LoCon convs (default: --rank)")
    p.add_argument("--to", choices=LAYOUTS, default="kohya", help="the layout to write (default kohya)")
    p.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda")
    _add_output_options(p)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("resize", help="shrink a LoRA's ranks by SVD, to one rank or per module (dynamic)")
    p.add_argument("input", type=Path, help="a LoRA .safetensors file (kohya or diffusers) or a peft folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="the file (a folder for a peft input)")
    p.add_argument("--rank", type=int, required=True, help="the new rank (with --dynamic: the largest)")
    p.add_argument("--conv-rank", type=int, help="the new rank of 3x3 LoCon convs (default: --rank)")
    p.add_argument(
        "--dynamic",
        choices=("sv_ratio", "sv_fro", "sv_cumulative"),
        help="choose each module's rank from its singular values, as sd-scripts' resize_lora.py does",
    )
    p.add_argument(
        "--dynamic-param",
        type=float,
        help="sv_ratio: the largest singular value over the smallest kept (≥ 1); sv_fro / sv_cumulative: the "
        "fraction of the Frobenius norm / of the sum of singular values to keep (0–1]",
    )
    p.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda")
    _add_output_options(p)
    p.set_defaults(func=_cmd_resize)

    p = sub.add_parser("inspect", help="show what a LoRA file is, how it was trained and where it loads")
    p.add_argument("input", type=Path, help="a LoRA .safetensors file or a peft folder")
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    p.add_argument("--base-config", type=Path, help=BASE_CONFIG_HELP)
    p.set_defaults(func=_cmd_inspect)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, help="cast the weights (default: keep them)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--base-config", type=Path, help=BASE_CONFIG_HELP)


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    import torch

    return (
        getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[args.precision])
        if args.precision
        else None
    )


def _cmd_convert(args: argparse.Namespace) -> int:
    from lora_scripts.lora_tools.convert import convert

    result = convert(
        args.input,
        args.output,
        to=args.to,
        overwrite=args.overwrite,
        dtype=_dtype(args),
        config_dir=args.base_config,
    )
    print(f"Wrote {args.output}: {result.modules} modules, {result.source_layout} → {result.layout}.")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lora_scripts.lora_tools.inspection import format_inspection, inspect_lora, to_json

    inspection = inspect_lora(args.input, config_dir=args.base_config)
    print(to_json(inspection) if args.json else format_inspection(inspection))
    return 0


def _cmd_resize(args: argparse.Namespace) -> int:
    from lora_scripts.lora_tools.resize import format_report, resize

    report = resize(
        args.input,
        args.output,
        rank=args.rank,
        dynamic=args.dynamic,
        dynamic_param=args.dynamic_param,
        conv_rank=args.conv_rank,
        overwrite=args.overwrite,
        dtype=_dtype(args),
        device=args.device,
        config_dir=args.base_config,
    )
    print(format_report(report))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from lora_scripts.lora_tools.files import parse_weighted
    from lora_scripts.lora_tools.merge_loras import merge_loras

    inputs = [parse_weighted(spec, option="--lora") for spec in args.lora]
    report = merge_loras(
        inputs,
        args.output,
        rank=args.rank,
        conv_rank=args.conv_rank,
        layout=args.to,
        overwrite=args.overwrite,
        dtype=_dtype(args),
        device=args.device,
        config_dir=args.base_config,
    )
    low, high = report.ranks
    ranks = str(low) if low == high else f"{low}–{high}"
    line = f"Wrote {args.output}: {len(report.modules)} modules, ranks {ranks}"
    least = report.least_retained
    if least is None:
        print(f"{line} (concatenated: exact).")
    else:
        print(
            f"{line}; the SVD keeps ≥ {100 * least.retained:.1f}% of each module's update "
            f"(least: {least.name})."
        )
    return 0
