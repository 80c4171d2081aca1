"""The datasets of a run, each with its settings filled in from the top level (sd-scripts' inheritance).

One place turns the config's three ways of naming data (train_data_dir, a `datasets` list, reg_data_dir)
into a flat list, so data loading and `check` never look at those keys themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_scripts.config.keys_data import PER_DATASET_KEYS
from lora_scripts.config.schema import TrainConfig


@dataclass(frozen=True)
class DatasetSettings:
    """One dataset as training uses it. `key` names it in messages ("train_data_dir", "datasets[1]")."""

    key: str
    train_data_dir: Path
    metadata_path: Path | None
    caption_extension: str
    num_repeats: int | None
    is_reg: bool
    resolution: int
    shuffle_caption: bool
    keep_tokens: int
    caption_separator: str
    caption_prefix: str | None
    caption_suffix: str | None
    caption_dropout_rate: float
    caption_tag_dropout_rate: float
    flip_aug: bool
    random_crop: bool

    @property
    def dir_key(self) -> str:
        """The key path of this dataset's folder, e.g. "datasets[1].train_data_dir"."""
        return self.key if self.key in ("train_data_dir", "reg_data_dir") else f"{self.key}.train_data_dir"


def dataset_settings(config: TrainConfig) -> list[DatasetSettings]:
    """Training datasets first (in config order), then reg_data_dir if set."""
    top = {key: getattr(config, key) for key in PER_DATASET_KEYS if key != "is_reg"}
    out: list[DatasetSettings] = []
    if config.datasets is None:
        out.append(DatasetSettings(key="train_data_dir", is_reg=False, **top))
    else:
        for i, entry in enumerate(config.datasets):
            values = dict(top)
            for key in PER_DATASET_KEYS:
                value = getattr(entry, key)
                if value is not None and key != "is_reg":
                    values[key] = value
            out.append(DatasetSettings(key=f"datasets[{i}]", is_reg=entry.is_reg, **values))
    if config.reg_data_dir is not None:
        # A regularization folder reads its captions (or class names) like the training data, but is never
        # described by the training data's metadata file.
        values = {**top, "train_data_dir": config.reg_data_dir, "metadata_path": None}
        out.append(DatasetSettings(key="reg_data_dir", is_reg=True, **values))
    return out
