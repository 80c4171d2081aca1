"""The `generate` subcommand's arguments (kept here so cli.py stays a thin dispatcher).

Importing this module is cheap: diffusers loads only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_scripts.generation.options import GenerateOptions, parse_weight_list

HELP = "render images with a base model and the LoRAs named in the prompt (<lora:NAME:WEIGHT>)"


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `generate` options to `parser` (the subcommand's parser)."""
    defaults = GenerateOptions(base_model="", prompt="")
    add = parser.add_argument
    add(
        "--base-model",
        required=True,
        help="SD 1.x/2.x, SDXL or FLUX.1 checkpoint (.safetensors), diffusers folder or hub id",
    )
    add("--prompt", required=True, help="the prompt; <lora:NAME:WEIGHT> tags apply LoRAs (A1111 syntax)")
    add("--negative-prompt", default="", help="what to steer away from")
    add(
        "--lora-dir",
        action="append",
        default=[],
        type=Path,
        help="folder searched (recursively) for the LoRAs named in the prompt; repeatable",
    )
    add("--steps", type=int, default=defaults.steps, help=f"sampling steps (default {defaults.steps})")
    add(
        "--cfg-scale",
        type=float,
        default=None,
        help="classifier-free guidance (default 7; FLUX.1-dev: its distilled guidance, default 3.5)",
    )
    add("--seed", type=int, default=-1, help="seed of the first image, image i uses seed+i; -1: random")
    native = "pixels, multiple of 8 (default: 512 for SD 1.x/2.x, 1024 for SDXL)"
    add("--width", type=int, default=defaults.width, help=native)
    add("--height", type=int, default=defaults.height, help=native)
    add(
        "--sampler",
        default=None,
        help="euler, euler_a, dpm++ 2m, dpm++ 2m karras, ddim, ... "
        "(A1111's names such as 'DPM++ 2M Karras' work too; default euler_a; FLUX.1: euler only)",
    )
    add("--num-images", type=int, default=1, help="how many images (seeds seed, seed+1, ...)")
    add(
        "--lora-weights",
        type=str,
        default=None,
        help="e.g. 0,0.5,0.7,1.0: one grid of the prompt's single LoRA at each weight, same seed",
    )
    add("--output", type=Path, default=defaults.output, help="a .png file or a folder (default ./renders)")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="default: GPU if any")
    add(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="auto: fp16 on GPU, fp32 on CPU",
    )
    add("--attention-slicing", action="store_true", help="less memory, a little slower")
    add("--vae-slicing", action="store_true", help="decode images one at a time")
    add("--vae-tiling", action="store_true", help="decode in tiles (large sizes on small GPUs)")
    add("--base-model-config", default=None, help="diffusers config folder for a non-standard single file")
    add("--vae", default=None, help="FLUX.1 single files: the VAE file (ae.safetensors)")
    add("--clip-l", default=None, help="FLUX.1 single files: the CLIP-L file (clip_l.safetensors)")
    add("--t5xxl", default=None, help="FLUX.1 single files: the T5-XXL file (t5xxl_fp16.safetensors)")


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    """GenerateOptions from the parsed arguments (UserError for a malformed --lora-weights)."""
    return GenerateOptions(
        base_model=args.base_model,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        lora_dirs=list(args.lora_dir),
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        width=args.width,
        height=args.height,
        sampler=args.sampler,
        num_images=args.num_images,
        lora_weights=parse_weight_list(args.lora_weights) if args.lora_weights is not None else None,
        output=args.output,
        device=args.device,
        precision=args.precision,
        attention_slicing=args.attention_slicing,
        vae_slicing=args.vae_slicing,
        vae_tiling=args.vae_tiling,
        base_model_config=args.base_model_config,
        vae=args.vae,
        clip_l=args.clip_l,
        t5xxl=args.t5xxl,
    )
