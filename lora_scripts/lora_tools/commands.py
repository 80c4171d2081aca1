"""The `lora-scripts` subcommands of the post-training tools: arguments, then one library call each."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Not imported from the library, so that `lora-scripts --help` starts without torch.
LAYOUTS = ("kohya", "diffusers", "peft")  # export/lora_layouts.LAYOUTS
VERSION_LABELS = {
    "sd_v1": "SD 1.x",
    "sd_v2": "SD 2.x",
    "sdxl": "SDXL",
    "flux1": "FLUX.1",
}  # models/detect.VERSION_NAMES
PRECISIONS = ("fp16", "bf16", "fp32")
BASE_CONFIG_HELP = (
    "a diffusers folder whose configs name and size the layers (default: the full-size model of the file's "
    "family)"
)
PICKLE_HELP = "read .ckpt/.pt files too (torch.load with weights_only=True; only for files you trust)"
DEVICE_HELP = "where the sums and SVDs run: cpu (default) or cuda"


def add_lora_tool_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a LoRA between the kohya (A1111/ComfyUI) and diffusers/peft layouts"
    )
    p.add_argument("input", type=Path, help="a LoRA .safetensors file (kohya or diffusers) or a peft folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="the file (a folder for --to peft)")
    p.add_argument("--to", choices=LAYOUTS, required=True, help="the layout to write")
    _add_output_options(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("inspect", help="show what a LoRA file is, how it was trained and where it loads")
    p.add_argument("input", type=Path, help="a LoRA .safetensors file or a peft folder")
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    p.add_argument("--base-config", type=Path, help=BASE_CONFIG_HELP)
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.set_defaults(func=_cmd_inspect)

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
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    _add_output_options(p)
    p.set_defaults(func=_cmd_resize)

    p = sub.add_parser(
        "merge",
        help="merge LoRAs into a checkpoint (--base) or into one LoRA file (exact, or by SVD with --rank)",
    )
    p.add_argument(
        "--base",
        type=Path,
        help="a single-file checkpoint to fuse the LoRAs into (its layout is kept); leave it out to merge "
        "the LoRAs into one LoRA",
    )
    p.add_argument(
        "--lora",
        action="append",
        required=True,
        metavar="PATH[:WEIGHT]",
        help="a LoRA and its weight (default 1; negative subtracts); with --base also PATH:TE:UNET, as "
        "<lora:name:te:unet>; repeat for each",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the merged file")
    p.add_argument("--rank", type=int, help="LoRA merge: SVD-merge each module to this rank (default: exact)")
    p.add_argument("--conv-rank", type=int, help="LoRA merge: SVD rank of 3x3 LoCon convs (default: --rank)")
    p.add_argument("--to", choices=LAYOUTS, default="kohya", help="LoRA merge: the layout to write (kohya)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    _add_output_options(p)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("extract", help="extract a LoRA (LoCon with --conv-rank) from a fine-tuned checkpoint")
    p.add_argument("--base", type=Path, required=True, help="the checkpoint the fine-tune started from")
    p.add_argument("--tuned", type=Path, required=True, help="the fine-tuned checkpoint")
    p.add_argument("-o", "--output", type=Path, required=True, help="the LoRA file (a folder for --to peft)")
    p.add_argument("--rank", type=int, required=True, help="rank of the Linear and 1x1 layers")
    p.add_argument("--conv-rank", type=int, help="also extract the 3x3 convs (LoCon) at this rank")
    p.add_argument(
        "--min-diff",
        type=float,
        default=0.01,
        help="leave out a text encoder whose largest weight change is at most this (default 0.01, as "
        "sd-scripts)",
    )
    p.add_argument("--to", choices=LAYOUTS, default="kohya", help="the layout to write (default kohya)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    _add_output_options(p, precision_default="fp16")
    p.set_defaults(func=_cmd_extract)


def _add_output_options(p: argparse.ArgumentParser, precision_default: str | None = None) -> None:
    keep = f"default {precision_default}" if precision_default else "default: keep them"
    p.add_argument("--precision", choices=PRECISIONS, help=f"the weights' dtype ({keep})")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--base-config", type=Path, help=BASE_CONFIG_HELP)
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    import torch

    if not args.precision:
        return None
    return getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[args.precision])


def _cmd_convert(args: argparse.Namespace) -> int:
    from lora_scripts.lora_tools.convert import convert

    result = convert(
        args.input,
        args.output,
        to=args.to,
        overwrite=args.overwrite,
        dtype=_dtype(args),
        config_dir=args.base_config,
        allow_pickle=args.allow_pickle,
    )
    print(f"Wrote {args.output}: {result.modules} modules, {result.source_layout} → {result.layout}.")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lora_scripts.lora_tools.inspection import format_inspection, inspect_lora, to_json

    inspection = inspect_lora(args.input, config_dir=args.base_config, allow_pickle=args.allow_pickle)
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
        allow_pickle=args.allow_pickle,
    )
    print(format_report(report))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    if args.base is not None:
        return _merge_into_checkpoint(args)
    from lora_scripts.lora_tools.files import parse_weighted
    from lora_scripts.lora_tools.merge_loras import merge_loras

    report = merge_loras(
        [parse_weighted(spec, option="--lora") for spec in args.lora],
        args.output,
        rank=args.rank,
        conv_rank=args.conv_rank,
        layout=args.to,
        overwrite=args.overwrite,
        dtype=_dtype(args),
        device=args.device,
        config_dir=args.base_config,
        allow_pickle=args.allow_pickle,
    )
    low, high = report.ranks
    line = (
        f"Wrote {args.output}: {len(report.modules)} modules, ranks {low if low == high else f'{low}–{high}'}"
    )
    least = report.least_retained
    if least is None:
        print(f"{line} (concatenated: exact).")
    else:
        print(
            f"{line}; the SVD keeps ≥ {100 * least.retained:.1f}% of each module's update "
            f"(least: {least.name})."
        )
    return 0


def _merge_into_checkpoint(args: argparse.Namespace) -> int:
    from lora_scripts.errors import UserError
    from lora_scripts.lora_tools.merge_checkpoint import merge_into_checkpoint, parse_merge_input

    lora_only = [f"--{name.replace('_', '-')}" for name in ("rank", "conv_rank") if getattr(args, name)]
    lora_only += ["--to"] if args.to != "kohya" else []
    if lora_only:
        raise UserError(
            f"{', '.join(lora_only)}: only for merging LoRAs into one LoRA; leave out --base, or the option."
        )
    report = merge_into_checkpoint(
        args.base,
        [parse_merge_input(spec, option="--lora") for spec in args.lora],
        args.output,
        dtype=_dtype(args),
        device=args.device,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        config_dir=args.base_config,
    )
    version = VERSION_LABELS.get(report.version, report.version)
    print(
        f"Wrote {report.output}: {report.modules} LoRA modules fused into {report.changed} of "
        f"{report.tensors} tensors ({version})."
    )
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from lora_scripts.lora_tools.extract import extract_lora

    report = extract_lora(
        args.base,
        args.tuned,
        args.output,
        rank=args.rank,
        conv_rank=args.conv_rank,
        min_diff=args.min_diff,
        layout=args.to,
        device=args.device,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        config_dir=args.base_config,
        **({"dtype": _dtype(args)} if args.precision else {}),
    )
    for name, largest in report.text_encoders_left_out.items():
        print(f"{name}: left out; its largest weight change is {largest:.2g} (at most --min-diff).")
    least = report.least_retained
    print(
        f"Wrote {report.output}: {len(report.modules)} modules ({len(report.unchanged)} layers unchanged); "
        f"Frobenius norm kept {100 * report.mean_retained:.1f}% on average, least "
        f"{100 * least.retained:.1f}% ({least.name})."
    )
    return 0
