"""`lora-scripts check` read as a terminal shows it (stdout and stderr in one stream): the report comes last
and whole, and the data it describes is said once, in it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lora_scripts.checks import check_config_file, render_text


def _check_stream(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lora_scripts", "check", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def test_the_report_comes_last_and_holds_the_data_line(problem_config: Path) -> None:
    proc = _check_stream(problem_config)
    assert proc.returncode == 0, proc.stdout
    report = render_text(check_config_file(problem_config))
    start = proc.stdout.index(f"Check of {problem_config}\n")
    assert proc.stdout[start:] == report  # nothing interleaved with the report or printed after it
    data_dir = problem_config.parent / "data"
    assert f"Data: {data_dir} " in report and "10 images / batch 4" in report
    before = proc.stdout[:start]
    assert str(data_dir) not in before and "samples per epoch" not in before  # said in the report only


def test_errors_follow_the_report_that_announces_them(problem_config: Path) -> None:
    empty = problem_config.parent / "data" / "e.txt"
    empty.write_text("  \n", encoding="utf-8")  # a blocking problem
    proc = _check_stream(problem_config)
    assert proc.returncode == 2
    start = proc.stdout.index(f"Check of {problem_config}\n")
    report, errors = proc.stdout[start:].split("Cannot train: 1 problem (listed below).\n")
    assert report.startswith(f"Check of {problem_config}\n")
    expected = f"error: {empty}: caption file is empty; write the caption of e.png in it."
    assert errors.splitlines() == [expected]
    assert "samples per epoch" not in proc.stdout[:start]
