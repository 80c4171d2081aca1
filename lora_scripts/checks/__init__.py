"""`lora-scripts check`: is the data and config right, and what will training do? Nothing is written.

`check_config_file` / `run_check` gather every fact into a CheckReport (`render_text`, `report_to_json`);
`check_before_training` is the cheap part that `train` runs first.
"""

from lora_scripts.checks.report import CheckReport, render_text, report_to_json
from lora_scripts.checks.run import check_before_training, check_config_dict, check_config_file, run_check

__all__ = [
    "CheckReport",
    "check_before_training",
    "check_config_dict",
    "check_config_file",
    "render_text",
    "report_to_json",
    "run_check",
]
