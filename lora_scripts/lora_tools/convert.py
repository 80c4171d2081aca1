"""`lora-scripts convert`: a LoRA between the kohya layout (A1111, Forge, ComfyUI) and the diffusers / peft
layouts (`load_lora_weights`, `PeftModel.from_pretrained`). The tensors are copied as they are (no dtype
change unless asked) and every module keeps its own alpha, so kohya → diffusers → kohya gives the same
tensors bit for bit. LoHa, LoKr and DoRA files (LyCORIS' keys) exist in the kohya layout only: they convert
kohya → kohya (renaming their modules to sd-scripts' spelling), and are refused for diffusers and peft.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_scripts.export.lora_layouts import LAYOUTS
from lora_scripts.lora_tools.files import (
    check_output,
    history_entry,
    lora_facts,
    open_lora,
    output_metadata,
    refuse_unless_plain,
    save_lora,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    source_layout: str
    layout: str
    version: str
    modules: int


def convert(
    source: Path,
    output: Path,
    *,
    to: str,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    config_dir: Path | None = None,
    allow_pickle: bool = False,
) -> ConvertResult:
    """Write the LoRA at `source` to `output` in layout `to` ("kohya", "diffusers", "peft").

    config_dir: a diffusers folder whose configs name and size the layers (default: the family's full-size
    model, found from the file)."""
    if to not in LAYOUTS:
        raise ValueError(f"to must be one of {LAYOUTS}")
    check_output(output, overwrite=overwrite, inputs=[source])
    opened = open_lora(source, key="convert", config_dir=config_dir, allow_pickle=allow_pickle)
    model = opened.model
    if to != "kohya":
        refuse_unless_plain(
            opened,
            "convert",
            "the diffusers and peft layouts hold plain LoRA only; keep the kohya layout, which A1111, Forge "
            "and ComfyUI load.",
        )
    facts = lora_facts(model, opened.version)
    # A file from diffusers or peft lacks sd-scripts' keys; A1111/Forge sort LoRAs by ss_base_model_version.
    missing = {k: v for k, v in facts.items() if k not in model.metadata}
    entry = history_entry("convert", [(Path(source), model.metadata, None)], to=to)
    metadata = output_metadata(model.metadata, entry, **missing)
    save_lora(output, model, opened.base, metadata, layout=to, dtype=dtype)
    log.info("Wrote %d modules (%s → %s) to %s", len(model.modules), model.layout, to, output)
    return ConvertResult(model.layout, to, opened.version, len(model.modules))
