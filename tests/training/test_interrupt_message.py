"""What a run stopped by Ctrl-C says, read as a terminal shows it: stdout and stderr in one stream."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.training.conftest import tiny_run_settings, write_config


def test_ctrl_c_says_stopped_at_step_once(tmp_path: Path, tiny_model_dir: Path, dataset_dir: Path) -> None:
    settings = tiny_run_settings(
        dataset_dir, tiny_model_dir, max_train_steps=6, save_steps=2, output_dir=str(tmp_path / "out")
    )
    config = write_config(tmp_path / "run.yaml", **settings)
    env = {**os.environ, "LORA_SCRIPTS_TEST_FAULT": "sigint@3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_scripts", "train", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 130, out[-3000:]
    assert out.count("Stopped at step 3 (SIGINT)") == 1, out[-3000:]
    assert out.count("Stopped at step") == 1
    stopped = out[out.index("Stopped at step 3 (SIGINT)") :]
    assert "Training state: " in stopped and "--resume auto" in stopped  # the message says how to go on
