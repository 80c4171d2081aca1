"""`train.py` runs unchanged under a 2-process launch (DDP over gloo on CPU, as torchrun/accelerate do)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.demo import draw_ink_image
from lora_scripts.export.lora_file import read_lora_metadata
from tests.helpers.ports import free_port
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
        str(free_port()),
    ]
    # train.py under a probe of the process group's teardown (see the assertion below).
    probe = REPO / "tests" / "helpers" / "ddp_teardown_probe.py"
    proc = subprocess.run(
        [*torchrun, str(probe), "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 8 images / batch 2 = 4 batches, sharded over 2 processes → 2 steps per epoch, 2 epochs → 4 steps
    assert proc.stderr.count("8 images (0 regularization), 8 samples/epoch, 2 batches/epoch per process") == 1
    assert proc.stderr.count("effective batch size 4 (batch_size 2 x gradient_accumulation_steps 1 x 2") == 1
    assert proc.stdout.count("Done: 4 steps") == 1
    # DDP's wrappers are freed before the process group, or a run can hang at its end (loop.py).
    for rank in (0, 1):
        assert f"rank {rank}: 0 DDP wrappers alive at destroy_process_group" in proc.stdout
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


def test_accelerate_launch_with_buckets_and_repeats(tmp_path, tiny_model_dir):
    """`accelerate launch --num_processes 2 -m lora_scripts train`: kohya repeat folders and aspect-ratio
    buckets are dealt out over the processes, every batch within one bucket, and the files written once."""
    data = tmp_path / "data"
    for folder, size, count in (("2_wide", (96, 64), 3), ("1_tall", (64, 96), 2)):
        (data / folder).mkdir(parents=True)
        for i in range(count):
            draw_ink_image(i, seed=i, size=96).resize(size).save(data / folder / f"{i}.png")
            (data / folder / f"{i}.txt").write_text(f"ink painting {folder} {i}", encoding="utf-8")
    out = tmp_path / "out" / "buckets_v1"
    cfg = write_config(
        tmp_path / "buckets.yaml",
        train_data_dir=str(data),
        base_model=str(tiny_model_dir),
        resolution=96,
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=128,
        bucket_reso_steps=16,
        batch_size=2,
        epochs=1,
        output_dir=str(out),
    )
    # accelerate's multi-process launcher (torchrun underneath); ACCELERATE_USE_CPU puts each process on the
    # CPU with the gloo backend, as a multi-GPU machine would use NCCL.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "-m", "lora_scripts", "train", "--config", str(cfg)]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # resolution 96, steps 16: buckets (64,128) (80,112) (96,96) (112,80) (128,64); 96x64 (ratio 1.5) goes to
    # 112x80 (1.4), 64x96 to 80x112. wide: 3 images x 2 repeats = 6 samples (3 batches); tall: 2 samples
    # (1 batch) → 4 batches, 2 per process → 2 steps. Only the main process logs.
    assert proc.stderr.count("5 images (0 regularization), 8 samples/epoch, 2 batches/epoch per process") == 1
    assert proc.stdout.count("Done: 2 steps") == 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "buckets_v1.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    meta = read_lora_metadata(out / "buckets_v1.safetensors")
    assert meta["ss_num_train_images"] == "8" and meta["ss_steps"] == "2"
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sorted((tuple(b["resolution"]), b["count"]) for b in buckets.values()) == [
        ((80, 112), 2),
        ((112, 80), 6),
    ]
