#!/usr/bin/env python
"""Caption a folder of images: `python tools/auto_label.py --input DIR` (same as `lora-scripts label`).

Existing captions are kept byte for byte; see `python tools/auto_label.py --help` and docs/captioning.md.
"""

import sys
from pathlib import Path

# Let `python tools/auto_label.py` work from a plain clone, before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_scripts.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
