"""`lora-scripts check` end to end (the CLI function and the installed command), and `train` running the
same checks first."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lora_scripts.checks import check_before_training
from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.training.loop import train
from tests.checks.conftest import LONG_CAPTION_TOKENS, write_config

REPO = Path(__file__).resolve().parents[2]
TOP_KEYS = ["format_version", "config", "ok", "errors", "warnings", "dataset", "images", "captions", "plan"]
TOP_KEYS += ["network", "outputs", "speed"]


def _check_json(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = main(["check", "--config", str(config), "--json"])
    return code, json.loads(capsys.readouterr().out)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_json_reports_each_problem_with_its_count(
    problem_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, facts = _check_json(problem_config, capsys)
    assert code == 0 and facts["ok"] is True and facts["errors"] == []
    assert list(facts) == TOP_KEYS
    assert facts["dataset"]["images_found"] == 10 and facts["dataset"]["images_captioned"] == 10
    images = facts["images"]
    assert images["exact_duplicates"] == [["a.png", "a_copy.png"]]
    assert [pair["files"] for pair in images["near_duplicates"]] == [["b.png", "b_resaved.jpg"]]
    assert images["smaller_than_resolution"] == [{"file_name": "small.png", "width": 40, "height": 40}]
    assert images["extreme_aspect_ratio"] == [
        {"file_name": "wide.png", "width": 300, "height": 96, "ratio": 3.12}
    ]
    captions = facts["captions"]
    assert [(c["file_name"], c["tokens"]) for c in captions["too_long"]] == [
        ("long.png", LONG_CAPTION_TOKENS)
    ]
    assert captions["without_trigger"] == ["c.png", "d.png"] and captions["trigger_word"] == "sks"
    assert captions["top_tags"][0] == {"tag": "sks", "count": 7}
    plan = facts["plan"]  # 10 images, batch 4, accumulation 2, 3 epochs
    assert (plan["batches_per_epoch"], plan["steps_per_epoch"], plan["total_steps"]) == (3, 2, 6)
    assert facts["network"]["trainable_parameters"]["total"] > 0
    outputs = facts["outputs"]
    assert outputs["step_files"] == [f"run1-step0000000{s}.safetensors" for s in (2, 4, 6)]
    assert outputs["existing_files"] == []
    # one warning per kind of problem: duplicates, near-duplicates, small, aspect, long captions, trigger
    assert len(facts["warnings"]) == 6, facts["warnings"]
    assert "trigger_word 'sks' is missing from 2 of 10 captions: c.png, d.png" in facts["warnings"][5]


def test_every_json_key_is_documented(problem_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, facts = _check_json(problem_config, capsys)
    documented = set(re.findall(r"`([a-z_0-9]+)`", (REPO / "docs" / "check.md").read_text(encoding="utf-8")))

    def keys(value: Any) -> set[str]:
        if isinstance(value, dict):
            return set(value) | {k for v in value.values() for k in keys(v)}
        if isinstance(value, list):
            return {k for v in value for k in keys(v)}
        return set()

    assert keys(facts) - documented == set()


def test_text_report(problem_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(problem_config)]) == 0
    out = capsys.readouterr().out
    assert "10 found, 10 captioned" in out
    assert "3 batches per epoch" in out and "2 steps per epoch" in out and "= 6 steps" in out
    assert "long.png: 100 tokens" in out
    assert out.count("warning: ") == 6 and out.rstrip().endswith("Ready to train (6 warnings).")


def test_output_dir_with_a_run_is_an_error(problem_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = problem_config.parent / "out" / "run1"
    out.mkdir(parents=True)
    (out / "run1.safetensors").write_bytes(b"")
    (out / "config.yaml").write_text("x")
    code, facts = _check_json(problem_config, capsys)
    assert code == 2 and facts["outputs"]["existing_files"] == ["config.yaml", "run1.safetensors"]
    assert [e for e in facts["errors"] if e.startswith(f"output_dir: '{out}' already holds a run")]


def _with_empty_caption(problem_config: Path) -> Path:
    data = problem_config.parent / "data"
    (data / "e.txt").write_text("  \n", encoding="utf-8")
    return data / "e.txt"


def test_blocking_problem_exit_2_and_train_says_the_same(
    problem_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = _with_empty_caption(problem_config)
    code, facts = _check_json(problem_config, capsys)
    assert code == 2 and facts["ok"] is False
    assert facts["errors"] == [f"{empty}: caption file is empty; write the caption of e.png in it."]
    assert (
        facts["dataset"]["images_captioned"] is None and facts["captions"] is None and facts["plan"] is None
    )
    assert facts["images"]["exact_duplicates"] == [["a.png", "a_copy.png"]]  # still checked

    assert main(["check", "--config", str(problem_config)]) == 2
    check_run = capsys.readouterr()
    assert "Cannot train: 1 problem" in check_run.out
    assert main(["train", "--config", str(problem_config)]) == 2
    train_run = capsys.readouterr()
    assert _error_lines(check_run.err) == _error_lines(train_run.err) == [f"error: {facts['errors'][0]}"]
    assert not (problem_config.parent / "out").exists()


def test_invalid_config_is_reported_as_train_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "bad.yaml", train_data_dir=tmp_path, lora_rank=0, output_dir="out")
    code, facts = _check_json(config, capsys)
    assert code == 2 and facts["dataset"] is None and len(facts["errors"]) == 2
    assert main(["check", "--config", str(config)]) == 2
    check_err = capsys.readouterr().err
    assert main(["train", "--config", str(config)]) == 2
    assert (
        _error_lines(check_err)
        == _error_lines(capsys.readouterr().err)
        == [f"error: {e}" for e in facts["errors"]]
    )


def test_installed_command_exit_codes(problem_config: Path, tmp_path: Path) -> None:
    blocked = write_config(
        tmp_path / "blocked.yaml", **{**load_config(problem_config).to_yaml_dict(), "lora_rank": 0}
    )
    command = (
        [shutil.which("lora-scripts")]
        if shutil.which("lora-scripts")
        else [sys.executable, "-m", "lora_scripts.cli"]
    )
    runs = [
        subprocess.Popen(
            [*command, "check", "--config", str(cfg), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cfg, extra in ((problem_config, ["--json"]), (blocked, []))
    ]
    (ok_out, ok_err), (bad_out, bad_err) = (run.communicate(timeout=300) for run in runs)
    assert runs[0].returncode == 0, ok_err
    assert json.loads(ok_out)["plan"]["total_steps"] == 6
    assert runs[1].returncode == 2 and "Traceback" not in bad_err
    assert _error_lines(bad_err) == [f"error: {blocked}: lora_rank: 0 is out of range (must be ≥ 1)"]


def test_train_logs_the_warnings_and_follows_the_plan(
    problem_config: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(problem_config)
    with caplog.at_level(logging.WARNING, logger="lora_scripts.checks"):
        training_set = check_before_training(config)
    assert len(training_set.images) == 10 and len(training_set.samples) == 10
    _, facts = _check_json(problem_config, capsys)  # after: main() replaces the log handlers caplog reads
    assert [r.getMessage() for r in caplog.records] == [f"warning: {w}" for w in facts["warnings"]]

    result = train(config)
    assert result.global_step == facts["plan"]["total_steps"] and result.epochs_run == facts["plan"]["epochs"]
    assert [p.name for p in result.step_files] == facts["outputs"]["step_files"]
    assert [p.name for p in result.final_files] == facts["outputs"]["final_files"]


def test_check_before_training_raises_the_dataset_error(problem_config: Path) -> None:
    empty = _with_empty_caption(problem_config)
    with pytest.raises(UserError) as err:
        check_before_training(load_config(problem_config))
    assert err.value.messages == [f"{empty}: caption file is empty; write the caption of e.png in it."]


def test_sd2_partial_text_encoder_attention_is_a_warning(tmp_path: Path) -> None:
    """A1111 drops SD 2.x text-encoder attention LoRA without all of q/k/v/out_proj: check says so."""
    from lora_scripts.checks import check_config_file
    from lora_scripts.models.tiny import build_tiny_sd
    from tests.checks.conftest import make_problem_dataset, write_config

    model = build_tiny_sd(tmp_path / "tiny-sd2", version="sd_v2")
    base = dict(train_data_dir=make_problem_dataset(tmp_path / "data"), base_model=model, resolution=64)
    partial = write_config(
        tmp_path / "partial.yaml",
        **base,
        train_text_encoder=True,
        text_encoder_target_modules=["q_proj", "v_proj"],
        output_dir=tmp_path / "out" / "a",
    )
    full = write_config(
        tmp_path / "full.yaml", **base, train_text_encoder=True, output_dir=tmp_path / "out" / "b"
    )
    expected = (
        "text_encoder_target_modules: on SD 2.x, AUTOMATIC1111 ignores text-encoder attention LoRA unless "
        "all of q_proj, k_proj, v_proj and out_proj are trained; add k_proj, out_proj."
    )
    assert expected in check_config_file(partial).warnings
    assert not any("AUTOMATIC1111" in w for w in check_config_file(full).warnings)
