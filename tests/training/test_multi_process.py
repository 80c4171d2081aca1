"""`train.py` runs unchanged under a 2-process launch (DDP over gloo on CPU, as torchrun/accelerate do)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.export.lora_file import read_lora_metadata
from tests.training.conftest import make_dataset, write_config

REPO = Path(__file__).resolve().parents[2]


def test_two_processes_share_the_steps_and_save_once(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    make_dataset(data, n=8)
    out = tmp_path / "out" / "ddp_v1"
    cfg = write_config(
        tmp_path / "ddp.yaml",
        train_data_dir=str(data),
        metadata_path=str(data / "metadata.csv"),
        base_model=str(tiny_model_dir),
        resolution=64,
        batch_size=2,
        epochs=2,
        save_steps=2,
        output_dir=str(out),
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
    ]
    proc = subprocess.run(
        [*torchrun, str(REPO / "train.py"), "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 8 images / batch 2 = 4 batches, sharded over 2 processes → 2 steps per epoch, 2 epochs → 4 steps
    assert proc.stderr.count("8 images, 2 batches/epoch, 2 epochs, 4 steps") == 1  # main process only
    assert proc.stdout.count("Done: 4 steps") == 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "ddp_v1-step00000002.safetensors",
        "ddp_v1-step00000004.safetensors",
        "ddp_v1.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    meta = read_lora_metadata(out / "ddp_v1.safetensors")
    assert meta["ss_steps"] == "4" and meta["ss_epoch"] == "2" and meta["ss_num_batches_per_epoch"] == "2"
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    shutil.rmtree(out)
