"""The loader: seed configs load, derived defaults are filled, and each mistake gives its exact message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from lora_scripts.config import TrainConfig, dump_config, load_config, validate_config_dict
from lora_scripts.errors import UserError

from .conftest import BASE_MODEL

SEED_STYLE = """\
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors"
lora_rank: 8
target_modules: ["to_q", "to_v"]
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/my_style_lora"
save_steps: 100
"""

SEED_INK = (
    SEED_STYLE.replace("style_train", "ink_painting")
    .replace("my_style_lora", "ink_painting_v1")
    .replace("epochs: 10", "epochs: 15")
    .replace("save_steps: 100", "save_steps: 50")
)

MINIMAL = f"""\
train_data_dir: ./data/style_train
base_model: {BASE_MODEL}
output_dir: ./output/my_style_lora
"""

Write = Callable[[str], str]


def messages(write: Write, text: str) -> list[str]:
    """The messages of the UserError raised when loading `text`."""
    path = write(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    return info.value.messages


@pytest.mark.parametrize("text", [SEED_STYLE, SEED_INK], ids=["my_lora_config", "ink_painting"])
def test_seed_configs_load(write: Write, text: str) -> None:
    config = load_config(write(text))
    assert isinstance(config.learning_rate, float) and config.learning_rate == 0.0002
    assert config.target_modules == ("to_q", "to_v")
    assert config.lora_rank == 8 and config.batch_size == 4
    assert config.train_data_dir == Path(yaml_value(text, "train_data_dir"))
    assert config.save_steps in (100, 50) and config.epochs in (10, 15)


def yaml_value(text: str, key: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith(f"{key}:"))
    return line.split(":", 1)[1].strip().strip('"')


def test_derived_defaults(write: Write) -> None:
    config = load_config(write(SEED_STYLE))
    assert config.output_name == "my_style_lora"
    assert config.lora_alpha == 8.0
    assert config.logging_dir == Path("output/my_style_lora/logs")
    assert config.text_encoder_lr == 0.0002
    # Plain defaults, for the keys the seed leaves out.
    assert (config.resolution, config.lr_scheduler, config.mixed_precision) == (512, "constant", "no")
    assert config.metadata_path == Path("data/style_train/metadata.csv")


def test_explicit_values_win_over_derived_defaults(write: Write) -> None:
    text = (
        MINIMAL
        + "lora_rank: 16\nlora_alpha: 4\noutput_name: mika\nlogging_dir: ./tb\ntext_encoder_lr: 5e-5\n"
    )
    config = load_config(write(text))
    assert (config.lora_rank, config.lora_alpha, config.output_name) == (16, 4.0, "mika")
    assert config.logging_dir == Path("tb") and config.text_encoder_lr == 5e-5


def test_text_encoder_rates_in_yaml_exponent_form(write: Write) -> None:
    """PyYAML reads `1e-5` (no '.') as text: listed or negative, it is still read as the number it is."""
    config = load_config(write(MINIMAL + "train_text_encoder: true\ntext_encoder_lr: [1e-5, 0]\n"))
    assert config.text_encoder_lr == (1e-5, 0.0)
    with pytest.raises(UserError, match=r"text_encoder_lr: must be greater than 0 \(got -1e-05\)"):
        load_config(write(MINIMAL + "text_encoder_lr: -1e-5\n"))


def test_config_is_frozen(write: Write) -> None:
    config = load_config(write(SEED_STYLE))
    with pytest.raises(ValidationError):
        config.learning_rate = 1.0  # type: ignore[misc]
    assert isinstance(config.target_modules, tuple)  # no in-place edits either


def test_unquoted_no_is_mixed_precision_no(write: Write) -> None:
    # YAML 1.1 reads `no` as false.
    assert load_config(write(MINIMAL + "mixed_precision: no\n")).mixed_precision == "no"


def test_overrides_are_validated_like_the_file(write: Write) -> None:
    path = write(SEED_STYLE)
    assert load_config(path, {"learning_rate": "1e-3", "epochs": 3}).learning_rate == 0.001
    with pytest.raises(UserError) as info:
        load_config(path, {"batch_size": 0})
    assert info.value.messages == ["configs/x.yaml: batch_size: 0 is out of range (must be ≥ 1)"]


def test_dumped_config_loads_back_the_same(write: Write, project: Path) -> None:
    config = load_config(write(SEED_STYLE))
    dump_config(config, project / "resolved.yaml")
    assert load_config("resolved.yaml") == config
    plain = config.to_yaml_dict()
    assert plain["train_data_dir"] == "data/style_train" and plain["target_modules"] == ["to_q", "to_v"]
    assert plain["logging_dir"] == "output/my_style_lora/logs"


def test_validate_config_dict_and_skipping_path_checks() -> None:
    data = {"train_data_dir": "./nowhere", "base_model": "./nowhere.safetensors", "output_dir": "out"}
    config = validate_config_dict(data, "<test>", check_paths=False)
    assert config.output_name == "out"
    with pytest.raises(UserError) as info:
        validate_config_dict(data, "<test>")
    assert info.value.messages[0] == "<test>: train_data_dir: folder './nowhere' does not exist"
    assert len(info.value.messages) == 2


ERROR_CASES = [
    ("learnig_rate: 2e-4", "learnig_rate: unknown key (did you mean 'learning_rate'?)"),
    ("network_dim: 16", "network_dim: unknown key (did you mean 'lora_rank'?)"),
    ("flux_capacitor: 1", "flux_capacitor: unknown key"),
    ("batch_size: four", "batch_size: 'four' is not an integer"),
    ("max_train_steps: 2.5", "max_train_steps: 2.5 is not an integer"),
    ("learning_rate: abc", "learning_rate: 'abc' is not a number"),
    ("learning_rate: .inf", "learning_rate: inf is not a finite number"),
    ("epochs: true", "epochs: true is not a number"),
    ("lora_rank: 0", "lora_rank: 0 is out of range (must be ≥ 1)"),
    ("learning_rate: 0", "learning_rate: 0 is out of range (must be > 0)"),
    ("resolution: 500", "resolution: 500 is not a multiple of 8"),
    ("resolution: 32", "resolution: 32 is out of range (must be ≥ 64)"),
    (
        "lr_scheduler: cosin",
        "lr_scheduler: 'cosin' is not one of 'constant', 'constant_with_warmup', 'linear', 'cosine', "
        "'cosine_with_restarts', 'polynomial' (did you mean 'cosine'?)",
    ),
    ("mixed_precision: fp32", "mixed_precision: 'fp32' is not one of 'no', 'fp16', 'bf16'"),
    ("train_text_encoder: maybe", "train_text_encoder: 'maybe' is not true or false"),
    (
        "target_modules: to_q",
        "target_modules: 'to_q' is not a preset (attn, attn-ff, kohya); to name layers, write a list such "
        "as ['to_q']",
    ),
    ("target_modules: []", "target_modules: [] is empty (give at least one value)"),
    ("target_modules: [to_q, 3]", "target_modules[1]: 3 is not a string"),
    ("batch_size: null", "batch_size: null is not allowed (leave the key out to use the default, 1)"),
    (
        "metadata_path: ./data/style_train/captions.csv",
        "metadata_path: file './data/style_train/captions.csv' does not exist",
    ),
    ("metadata_path: ./data", "metadata_path: './data' is a folder, not a file"),
    ("base_model_config: ./configs/sd15", "base_model_config: folder './configs/sd15' does not exist"),
    (
        "output_name: my/lora",
        "output_name: 'my/lora' is not a valid file name (no slashes, leading or trailing spaces, "
        'or any of : * ? " < > |)',
    ),
    (
        "output_name: mika.safetensors",
        "output_name: 'mika.safetensors' includes the extension; write the name without '.safetensors'",
    ),
    (
        "lr_warmup_steps: 100",
        "lr_warmup_steps: 100 has no effect with lr_scheduler 'constant' "
        "(use 'constant_with_warmup', or leave lr_warmup_steps out)",
    ),
]


@pytest.mark.parametrize(("line", "expected"), ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_each_mistake_gives_its_message(write: Write, line: str, expected: str) -> None:
    assert messages(write, MINIMAL + line + "\n") == [f"configs/x.yaml: {expected}"]


def test_missing_folder_is_named(write: Write) -> None:
    text = MINIMAL.replace("./data/style_train", "./data/nope")
    assert messages(write, text) == ["configs/x.yaml: train_data_dir: folder './data/nope' does not exist"]


def test_missing_base_model_uses_the_locator_message(write: Write) -> None:
    text = MINIMAL.replace(BASE_MODEL, "./models/nope.safetensors")
    assert messages(write, text) == [
        "configs/x.yaml: base_model: './models/nope.safetensors' does not exist; check the path (relative "
        "paths start from the current directory) or download the checkpoint there."
    ]


def test_missing_required_keys(write: Write) -> None:
    assert messages(write, "lora_rank: 8\n") == [
        "configs/x.yaml: train_data_dir: missing required key (the folder of training images)",
        "configs/x.yaml: base_model: missing required key (the Stable Diffusion checkpoint to train on: "
        "a .safetensors file or a diffusers folder)",
        "configs/x.yaml: output_dir: missing required key (the folder where the LoRA files are written)",
    ]


def test_every_error_in_a_file_is_reported_in_file_order(write: Write) -> None:
    text = """\
train_data_dir: 5
base_model: ./models/nope.safetensors
lora_rank: 0
learnig_rate: 2e-4
batch_size: four
lr_scheduler: cosin
learning_rate: 1e-4
learning_rate: 2e-4
"""
    assert messages(write, text) == [
        "configs/x.yaml: train_data_dir: 5 is not a path (write it as a string, e.g. './data/my_images')",
        "configs/x.yaml: base_model: './models/nope.safetensors' does not exist; check the path (relative "
        "paths start from the current directory) or download the checkpoint there.",
        "configs/x.yaml: lora_rank: 0 is out of range (must be ≥ 1)",
        "configs/x.yaml: learnig_rate: unknown key (did you mean 'learning_rate'?)",
        "configs/x.yaml: batch_size: 'four' is not an integer",
        "configs/x.yaml: lr_scheduler: 'cosin' is not one of 'constant', 'constant_with_warmup', 'linear', "
        "'cosine', 'cosine_with_restarts', 'polynomial' (did you mean 'cosine'?)",
        "configs/x.yaml: learning_rate: duplicate key (lines 7 and 8); keep only one",
        "configs/x.yaml: output_dir: missing required key (the folder where the LoRA files are written)",
    ]


def test_empty_required_value(write: Write) -> None:
    text = MINIMAL.replace("train_data_dir: ./data/style_train", "train_data_dir:")
    assert messages(write, text) == [
        "configs/x.yaml: train_data_dir: has no value (the folder of training images)"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "batch_size: 4\nlearning_rate: 2e-4: x\n",
            "configs/x.yaml: line 2, column 20: YAML syntax error (mapping values are not allowed here); "
            "check the indentation, colons and quotes there",
        ),
        (
            "- train_data_dir: ./data\n",
            "configs/x.yaml: the top level must be a mapping of 'key: value' lines, not a list",
        ),
        ("# nothing yet\n", "configs/x.yaml: the file is empty; write one 'key: value' line per setting"),
    ],
    ids=["syntax", "list", "empty"],
)
def test_unreadable_files(write: Write, text: str, expected: str) -> None:
    assert messages(write, text) == [expected]


def test_config_file_not_found(project: Path) -> None:
    with pytest.raises(UserError) as info:
        load_config("configs/nope.yaml")
    assert info.value.messages == ["configs/nope.yaml: config file not found"]


def test_wrong_type_skips_the_existence_check(write: Write) -> None:
    assert messages(write, MINIMAL + "metadata_path: [a.csv]\n") == [
        "configs/x.yaml: metadata_path: ['a.csv'] is not a path "
        "(write it as a string, e.g. './data/my_images')"
    ]


def test_schema_rejects_unknown_keys_directly() -> None:
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"train_data_dir": "d", "base_model": "m", "output_dir": "o", "x": 1})
