"""`merge --base` on a full-size SD 1.5 checkpoint (2.1 GB of random fp16 weights) holds a few tensors, not
the model: its peak resident memory, beyond what its imports take, is a small fraction of the file
(tests/helpers/full_size_merge.py; measured: 548–609 MiB peak, 370 MiB of it imports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_scripts.lora_tools.files import open_lora
from lora_scripts.models.checkpoint_layout import CheckpointLayout
from lora_scripts.models.meta_modules import meta_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_full_size_sd15_merge_reads_and_writes_one_tensor_at_a_time(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tests.helpers.full_size_merge", "run", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    numbers = json.loads(run.stdout)
    assert numbers["checkpoint_bytes"] > 2 * 10**9
    beyond_imports = numbers["peak_rss_bytes"] - numbers["rss_after_imports_bytes"]
    assert beyond_imports < 0.25 * numbers["checkpoint_bytes"], numbers  # loading it whole: > 1.0
    assert (
        abs(numbers["output_bytes"] - numbers["checkpoint_bytes"]) < 4096
    )  # the same tensors, more metadata

    # And the full-size layout is right: a UNet attention layer and a CLIP MLP layer got W + 0.8·update.
    layout = CheckpointLayout.of(meta_model("sd_v1"))
    modules = {m.name: m for m in open_lora(tmp_path / "lora-r16.safetensors").model.modules}
    names = [
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
        "text_encoder.text_model.encoder.layers.11.self_attn.out_proj",
    ]
    with (
        safe_open(str(tmp_path / "sd15-random.safetensors"), framework="pt") as base,
        safe_open(str(tmp_path / "merged.safetensors"), framework="pt") as merged,
    ):
        for name in names:
            key = layout[name].key
            expected = base.get_tensor(key).float() + 0.8 * modules[name].update()
            torch.testing.assert_close(
                merged.get_tensor(key).float(), expected, rtol=1e-3, atol=1e-3, msg=name
            )
