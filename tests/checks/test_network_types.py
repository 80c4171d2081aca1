"""`check` for every network_type: its trainable parameters and file size equal those of the network training
builds and the file training's saver writes, on the tiny SD 1.x and SDXL models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from lora_scripts.checks.lora_file import file_bytes
from lora_scripts.checks.plan import SpeedFacts, network_facts
from lora_scripts.checks.report import CheckReport, _speed_lines, render_text, report_to_json
from lora_scripts.config import TrainConfig, validate_config_dict
from lora_scripts.export.kohya import kohya_state_dict
from lora_scripts.export.lora_file import read_lora_metadata, save_lora_file
from lora_scripts.export.metadata import RunMetadata
from lora_scripts.export.safetensors_stream import TensorSpec
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.registry import load_family
from lora_scripts.models.tiny import build_tiny_sdxl
from lora_scripts.training.saving import SAVE_DTYPES
from lora_scripts.training.setup import lora_spec

# (network_type and its keys, as a config gives them); locon turns the 3x3 convs on by itself.
NETWORKS = [
    {"network_type": "lora"},
    {"network_type": "lora", "conv_rank": 2, "conv_alpha": 1},
    {"network_type": "locon"},
    {"network_type": "loha", "conv_rank": 2},
    {"network_type": "lokr"},
    {"network_type": "lokr", "lokr_full_matrix": True},
    {"network_type": "lokr", "lokr_factor": 4, "conv_rank": 4},
    {"network_type": "dora", "conv_rank": 2, "network_dropout": 0.1},
]
TYPE_ROWS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("check_sdxl") / "tiny-sdxl")


@pytest.fixture(params=["sd", "sdxl"])
def model(request: pytest.FixtureRequest, tiny_model: Path) -> Path:
    return tiny_model if request.param == "sd" else request.getfixturevalue("tiny_sdxl")


def _config(model: Path, **values: object) -> TrainConfig:
    base = {"train_data_dir": "data", "base_model": str(model), "output_dir": "out/run", "lora_rank": 4}
    config = validate_config_dict({**base, **values}, "test.yaml", check_paths=False)
    return config.resolved()


def _listed(value: str | tuple[str, ...]) -> str | list[str]:
    return value if isinstance(value, str) else list(value)


def _training_networks(model: Path, config: TrainConfig):
    """The networks training builds for `config` (training/setup.py's LoraSpec), on the CPU, with weights."""
    family = load_family(str(model))
    targets = LoraTargets(_listed(config.target_modules), _listed(config.text_encoder_target_modules))
    return family, family.add_lora(targets, lora_spec(config))


def _run_metadata(family, config: TrainConfig) -> RunMetadata:  # noqa: ANN001 - a ModelFamily
    return RunMetadata(
        family=family.info,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        target_modules=_listed(config.target_modules),
        text_encoder_target_modules=_listed(config.text_encoder_target_modules),
        resolution=config.resolution,
        num_train_images=10,
        num_batches_per_epoch=3,
        num_epochs=2,
        max_train_steps=6,
        batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        text_encoder_lr=5e-5,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        max_grad_norm=1.0,
        mixed_precision="fp16",
        seed=42,
        sd_model_name="tiny",
        tag_frequency={"data": {"sks": 10, "a cat": 4}},
    )


@pytest.mark.parametrize("values", NETWORKS, ids=lambda v: "-".join(str(x) for x in v.values()))
@pytest.mark.parametrize("save_precision", ["fp16", "fp32"])
def test_parameters_and_file_size_equal_trainings(
    model: Path, values: dict[str, object], save_precision: str, tmp_path: Path
) -> None:
    config = _config(model, train_text_encoder=True, save_precision=save_precision, **values)
    facts = network_facts(config)
    family, networks = _training_networks(model, config)

    trainable = [sum(p.numel() for p in n.module.parameters() if p.requires_grad) for n in networks]
    assert facts.unet_parameters == trainable[0] > 0
    assert facts.text_encoder_parameters == sum(trainable[1:]) > 0

    path = tmp_path / "run.safetensors"
    tensors = kohya_state_dict(networks, SAVE_DTYPES[save_precision])
    save_lora_file(path, tensors, _run_metadata(family, config), output_name="run", steps=6, epoch=2)
    real = path.stat().st_size
    assert facts.file is not None
    assert facts.file.modules == sum(1 for key in tensors if key.endswith(".alpha"))
    assert facts.file.tensors == len(tensors)
    assert facts.file.tensor_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    # Exact for the same metadata: check's shapes, with the metadata the file holds, give its size.
    metadata = read_lora_metadata(path)
    specs = [TensorSpec(key, t.dtype, tuple(t.shape)) for key, t in tensors.items()]
    assert file_bytes(specs, metadata) == real
    # check reports the file without training's metadata: smaller by the metadata's JSON entry, +-7 bytes of
    # the header's padding to a multiple of 8.
    entry = len(b'"__metadata__":,') + len(json.dumps(metadata, separators=(",", ":")).encode("utf-8"))
    assert abs(real - facts.file.bytes - entry) < 8
    # And exactly the file of no metadata.
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    assert facts.file.bytes == bare.stat().st_size


def test_type_rows_and_json(tiny_model: Path) -> None:
    for values in NETWORKS:
        facts = network_facts(_config(tiny_model, **values))
        report = CheckReport(config_path="c.yaml", network=facts)
        text = render_text(report)
        type_row = next(line for line in text.splitlines() if line.startswith("  network_type "))
        assert type_row.split()[1].rstrip(",") == TYPE_ROWS[str(values["network_type"])]
        assert f"  file size           {facts.file.bytes:,} bytes" in text  # type: ignore[union-attr]
        network = report_to_json(report)["network"]
        assert network["network_type"] == values["network_type"]
        assert network["file"]["bytes"] == facts.file.bytes  # type: ignore[union-attr]
        assert network["file"]["save_precision"] == "fp16"
        assert network["file"]["metadata_included"] is False
        lokr = values["network_type"] == "lokr"
        assert network["lokr_factor"] == (values.get("lokr_factor", -1) if lokr else None)
        assert network["lokr_full_matrix"] == (values.get("lokr_full_matrix", False) if lokr else None)
        convs = "conv_rank" in values or values["network_type"] == "locon"
        assert (network["conv_rank"] is not None) == convs


def test_lokr_and_conv_details_in_the_type_row(tiny_model: Path) -> None:
    facts = network_facts(_config(tiny_model, network_type="lokr", lokr_factor=4, conv_rank=4, conv_alpha=2))
    (row,) = [
        line for line in render_text(CheckReport("c.yaml", network=facts)).splitlines() if "LoKr" in line
    ]
    assert row == (
        "  network_type        LoKr (lokr_factor 4, lokr_full_matrix false), 3x3 convs at conv_rank 4 "
        "(conv_alpha 2)"
    )


def test_every_label_fits_its_column() -> None:
    """FLUX.1's "transformer weights", the longest label, is in line with the others."""
    speed = SpeedFacts(
        "normal", True, "", True, "", True, "bf16", "AdamW8bit", 1, 1, False, "no", denoiser="transformer"
    )
    rows = [line for line in _speed_lines(speed) if line.startswith("  ")]
    # every value starts in the same column, one space after the widest label
    assert all(line[21] == " " and line[22] != " " for line in rows), rows
    assert any(line.startswith("  transformer weights bf16") for line in rows)
