"""Peak memory of `merge --base` on a full-size SD 1.5 checkpoint (random fp16 weights, the 2.1 GB layout of
v1-5-pruned-emaonly-fp16) with a rank-16 LoRA on its attention layers and text encoder.

    python -m tests.helpers.full_size_merge run FOLDER     builds the files in FOLDER (once), merges them in
                                                           a child process and prints the numbers as JSON

The merge runs in a fresh child process, so `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` is its peak
resident memory alone; the child also reports its resident memory after its imports (torch, diffusers,
transformers: what any command costs before it reads a byte). The checkpoint is itself written one tensor at a
time (export/safetensors_stream.py) from one 128 MB pool of random values, so building it needs no more.
tests/lora_tools/test_merge_memory.py (slow) runs this.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

POOL_SIZE = 64 * 2**20  # fp16 values: more than the largest SD 1.5 tensor (the 49408 x 768 token embedding)
LORA_RANK = 16


def write_random_sd15(path: Path, seed: int = 0) -> Path:
    """A full-size SD 1.5 single file (CompVis layout: UNet, VAE, CLIP) of N(0, 1) fp16 values."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_scripts.export.safetensors_stream import TensorSpec, write_streaming
    from lora_scripts.models.sd_loading import shipped_config_dir
    from tests.helpers.compvis import to_compvis_state_dict

    folder = shipped_config_dir("sd_v1")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
    state = to_compvis_state_dict(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), layers_per_block=2
    )
    pool = torch.empty(POOL_SIZE, dtype=torch.float16).normal_(generator=torch.Generator().manual_seed(seed))
    offsets = {
        key: (i * 1_000_003) % (POOL_SIZE - value.numel()) for i, (key, value) in enumerate(state.items())
    }

    def spec(key: str, value: torch.Tensor) -> TensorSpec:
        dtype = torch.float16 if value.is_floating_point() else value.dtype
        return TensorSpec(key, dtype, tuple(value.shape))

    def produce(item: TensorSpec) -> torch.Tensor:
        value = state[item.name]
        if not value.is_meta:  # position_ids
            return value
        start = offsets[item.name]
        return pool[start : start + value.numel()].view(item.shape)

    write_streaming(path, [spec(k, v) for k, v in state.items()], produce, {"format": "pt"})
    return path


def write_lora(path: Path) -> Path:
    """A rank-16 kohya LoRA (fp16) on SD 1.5's attention layers and text encoder."""
    import safetensors.torch

    from lora_scripts.models.meta_modules import meta_model
    from tests.helpers.synthetic_lora import synthetic_kohya

    tensors = synthetic_kohya(meta_model("sd_v1"), rank=LORA_RANK, alpha=8.0)
    safetensors.torch.save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return path


def run(folder: Path) -> dict[str, float]:
    """Build the files in `folder` (unless there), merge in a child process, and return the numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    base, lora, out = (
        folder / "sd15-random.safetensors",
        folder / "lora-r16.safetensors",
        folder / "merged.safetensors",
    )
    if not base.exists():
        write_random_sd15(base)
    if not lora.exists():
        write_lora(lora)
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "tests.helpers.full_size_merge", "merge", str(base), str(lora), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"merge failed:\n{child.stderr[-4000:]}")
    after_imports = json.loads(child.stdout.strip().splitlines()[-1])["rss_after_imports_bytes"]
    return {
        "checkpoint_bytes": base.stat().st_size,
        "output_bytes": out.stat().st_size,
        "lora_bytes": lora.stat().st_size,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,  # Linux: KiB
        "rss_after_imports_bytes": after_imports,
        "seconds": round(seconds, 1),
    }


def _merge_child(base: str, lora: str, out: str) -> None:
    import torch  # noqa: F401 - the imports any command pays for, before the merge reads anything

    from lora_scripts.lora_tools.merge_checkpoint import MergeInput, merge_into_checkpoint

    after_imports = _rss_bytes()
    merge_into_checkpoint(Path(base), [MergeInput(Path(lora), 0.8, 0.8)], Path(out))
    print(json.dumps({"rss_after_imports_bytes": after_imports}))


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        line = next(line for line in fh if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


if __name__ == "__main__":
    if sys.argv[1] == "merge":
        _merge_child(*sys.argv[2:5])
    else:
        print(json.dumps(run(Path(sys.argv[2])), indent=2))
