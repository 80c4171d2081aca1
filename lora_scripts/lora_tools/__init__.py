"""After training: merge, resize, extract, convert and inspect LoRA files (docs/tools.md).

Each command is a small module here over the one in-memory LoRA model (export/lora_model.py) and its layouts
(export/lora_layouts.py); `files.py` opens inputs and writes outputs for all of them.
"""
