#!/usr/bin/env python
"""Train a LoRA: `python train.py --config configs/my_lora_config.yaml` (same as `lora-scripts train`)."""

import sys
from pathlib import Path

# Let `python train.py` work from a plain clone, before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_scripts.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
