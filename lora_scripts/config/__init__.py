"""The training config: typed schema (`TrainConfig`), strict YAML loader, and Markdown reference."""

from lora_scripts.config.loader import dump_config, load_config, validate_config_dict
from lora_scripts.config.schema import SECTIONS, TrainConfig

__all__ = ["SECTIONS", "TrainConfig", "dump_config", "load_config", "validate_config_dict"]
