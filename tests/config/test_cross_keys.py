"""Keys that are each valid but conflict: every rule gives its exact message, at the top level and inside a
`datasets` entry, and a resolved config dumped by training loads back without any of them firing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_scripts.config import dump_config, validate_config_dict
from lora_scripts.errors import UserError

BASE: dict[str, Any] = {"train_data_dir": "data", "base_model": "m.safetensors", "output_dir": "out"}
CACHE_CROP = (
    "cache_latents: cannot be used with random crops ({}): a cached latent has one fixed crop; turn off the "
    "random crop or set cache_latents: false"
)
CACHE_CAPTIONS = (
    "cache_text_encoder_outputs: needs captions that stay the same, but {} changes them at every step; turn "
    "those off or set cache_text_encoder_outputs: false"
)


def problems(**values: Any) -> list[str]:
    """The messages for BASE updated with `values` (a value of None removes the key)."""
    data = {key: value for key, value in {**BASE, **values}.items() if value is not None}
    with pytest.raises(UserError) as info:
        validate_config_dict(data, "<t>", check_paths=False)
    return [message.removeprefix("<t>: ") for message in info.value.messages]


CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("cache+random_crop", {"cache_latents": True, "random_crop": True}, [CACHE_CROP.format("random_crop")]),
    (
        "cache_to_disk+entry random_crop",
        {
            "train_data_dir": None,
            "cache_latents_to_disk": True,
            "datasets": [{"train_data_dir": "a"}, {"train_data_dir": "b", "random_crop": True}],
        },
        [CACHE_CROP.format("datasets[1].random_crop")],
    ),
    (
        "cache+center_crop false",
        {"cache_latents": True, "center_crop": False},
        [CACHE_CROP.format("center_crop: false")],
    ),
    (
        "center_crop contradicts random_crop",
        {"center_crop": True, "random_crop": True},
        ["center_crop: true contradicts random_crop: true; keep only one of the two keys"],
    ),
    (
        "center_crop false contradicts random_crop false",
        {"center_crop": False, "random_crop": False},
        ["center_crop: false contradicts random_crop: false; keep only one of the two keys"],
    ),
    (
        "text cache+train_text_encoder",
        {"cache_text_encoder_outputs": True, "train_text_encoder": True},
        [
            "cache_text_encoder_outputs: cannot be used with train_text_encoder: true (a trained text "
            "encoder changes its outputs); turn one of them off"
        ],
    ),
    (
        "text cache+shuffle_caption",
        {"cache_text_encoder_outputs": True, "shuffle_caption": True},
        [CACHE_CAPTIONS.format("shuffle_caption")],
    ),
    (
        "text cache+caption_dropout_rate",
        {"cache_text_encoder_outputs": True, "caption_dropout_rate": 0.1},
        [CACHE_CAPTIONS.format("caption_dropout_rate")],
    ),
    (
        "text cache+entry tag dropout",
        {
            "train_data_dir": None,
            "cache_text_encoder_outputs": True,
            "datasets": [{"train_data_dir": "a", "caption_tag_dropout_rate": 0.2}],
        },
        [CACHE_CAPTIONS.format("datasets[0].caption_tag_dropout_rate")],
    ),
    (
        "bucket keys without enable_bucket",
        {"min_bucket_reso": 128, "bucket_no_upscale": True},
        [
            "min_bucket_reso: has no effect without enable_bucket: true",
            "bucket_no_upscale: has no effect without enable_bucket: true",
        ],
    ),
    (
        "min > max bucket",
        {"enable_bucket": True, "min_bucket_reso": 1024, "max_bucket_reso": 512},
        ["min_bucket_reso: 1024 is larger than max_bucket_reso (512)"],
    ),
    (
        "bucket side not a multiple of the step",
        {"enable_bucket": True, "min_bucket_reso": 320, "bucket_reso_steps": 128},
        ["min_bucket_reso: 320 is not a multiple of bucket_reso_steps (128)"],
    ),
    (
        "resolution above the bucket range",
        {"enable_bucket": True, "resolution": 1024, "max_bucket_reso": 768},
        ["resolution: 1024 is outside min_bucket_reso..max_bucket_reso (256..768); widen the range"],
    ),
    (
        "entry resolution below the bucket range",
        {
            "train_data_dir": None,
            "enable_bucket": True,
            "datasets": [{"train_data_dir": "a", "resolution": 128}],
        },
        [
            "datasets[0].resolution: 128 is outside min_bucket_reso..max_bucket_reso (256..1024); widen "
            "the range"
        ],
    ),
    (
        "prior_loss_weight without reg data",
        {"prior_loss_weight": 0.5},
        ["prior_loss_weight: has no effect without regularization images (set reg_data_dir)"],
    ),
    (
        "conv_alpha without conv_rank",
        {"conv_alpha": 4},
        ["conv_alpha: has no effect without conv_rank (set conv_rank to train conv layers)"],
    ),
    ("huber_c with l2", {"huber_c": 0.2}, ["huber_c: is only used by loss_type 'huber' or 'smooth_l1'"]),
    (
        "cache_dir without cache_latents_to_disk",
        {"cache_latents": True, "cache_dir": "cache"},
        ["cache_dir: has no effect without cache_latents_to_disk: true"],
    ),
    (
        "train_data_dir and datasets",
        {"datasets": [{"train_data_dir": "a"}]},
        [
            "datasets: use either train_data_dir (one dataset) or datasets (several), not both; move "
            "train_data_dir into datasets as its first entry"
        ],
    ),
    (
        "metadata_path at the top with datasets",
        {"train_data_dir": None, "metadata_path": "a/metadata.csv", "datasets": [{"train_data_dir": "a"}]},
        ["metadata_path: with datasets, set metadata_path inside the entry whose folder it describes"],
    ),
    (
        "datasets all is_reg",
        {"train_data_dir": None, "datasets": [{"train_data_dir": "a", "is_reg": True}]},
        ["datasets: every entry has is_reg: true; at least one must hold training images"],
    ),
    (
        "unknown and top-level-only keys in an entry",
        {
            "train_data_dir": None,
            "datasets": [{"train_data_dir": "a", "shuffle_captions": True, "learning_rate": 1e-4}],
        },
        [
            "datasets[0].shuffle_captions: unknown key (did you mean 'shuffle_caption'?)",
            "datasets[0].learning_rate: cannot be set per dataset; set it once at the top level of the "
            "config",
        ],
    ),
    (
        "entry without train_data_dir",
        {"train_data_dir": None, "datasets": [{"train_data_dir": "a"}, {"resolution": 768}]},
        ["datasets[1].train_data_dir: missing required key (the folder of this dataset's images)"],
    ),
    (
        "lokr keys with another network type",
        {"network_type": "loha", "lokr_factor": 8, "lokr_full_matrix": True},
        [
            "lokr_factor: applies to network_type: lokr only (this config has loha)",
            "lokr_full_matrix: applies to network_type: lokr only (this config has loha)",
        ],
    ),
    (
        "lokr_factor 0",
        {"network_type": "lokr", "lokr_factor": 0},
        ["lokr_factor: 0 is neither -1 (automatic) nor a size of 1 or more"],
    ),
    (
        "network_dropout with lokr",
        {"network_type": "lokr", "network_dropout": 0.1},
        [
            "network_dropout: applies to lora, locon and dora networks; lokr has no dropout on its input "
            "(leave network_dropout out)"
        ],
    ),
]


@pytest.mark.parametrize(("values", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_conflict_gives_its_message(values: dict[str, Any], expected: list[str]) -> None:
    assert problems(**values) == expected


def test_reg_images_in_a_datasets_entry_allow_prior_loss_weight() -> None:
    data = {
        **BASE,
        "train_data_dir": None,
        "prior_loss_weight": 0.5,
        "datasets": [{"train_data_dir": "a"}, {"train_data_dir": "reg", "is_reg": True}],
    }
    config = validate_config_dict({k: v for k, v in data.items() if v is not None}, "<t>", check_paths=False)
    assert config.prior_loss_weight == 0.5


def test_center_crop_false_alone_means_random_crop() -> None:
    config = validate_config_dict({**BASE, "center_crop": False}, "<t>", check_paths=False)
    assert (config.random_crop, config.center_crop) == (True, False)


def test_every_conflict_is_reported_at_once() -> None:
    messages = problems(cache_latents=True, random_crop=True, conv_alpha=4, huber_c=0.2, min_bucket_reso=512)
    keys = [message.split(":")[0] for message in messages]
    assert keys == ["cache_latents", "conv_alpha", "huber_c", "min_bucket_reso"]


# Every dataset feature at once, each value a non-default that no rule objects to.
FULL_RUN: dict[str, Any] = {
    "base_model": "m.safetensors",
    "output_dir": "out",
    "datasets": [
        {"train_data_dir": "a", "resolution": 512, "num_repeats": 3, "caption_prefix": "sks"},
        {"train_data_dir": "b", "caption_extension": ".caption", "keep_tokens": 1, "flip_aug": True},
    ],
    "reg_data_dir": "reg",
    "prior_loss_weight": 0.5,
    "enable_bucket": True,
    "min_bucket_reso": 320,
    "max_bucket_reso": 960,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": True,
    "cache_latents_to_disk": True,
    "cache_dir": "cache",
    "cache_text_encoder_outputs": True,
    "conv_rank": 4,
    "loss_type": "huber",
    "huber_c": 0.2,
}


@pytest.mark.parametrize(
    "extra",
    [{}, {"center_crop": False, "cache_latents_to_disk": False, "cache_dir": None}, {"random_crop": False}],
    ids=["caches", "center_crop false", "random_crop false"],
)
def test_dumped_resolved_config_loads_back(tmp_path: Path, extra: dict[str, Any]) -> None:
    data = {key: value for key, value in {**FULL_RUN, **extra}.items() if value is not None}
    config = validate_config_dict(data, "<t>", check_paths=False)
    dump_config(config, tmp_path / "config.yaml")
    dumped = yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))
    # every key is written out, defaults included, and the "has no effect" rules must not fire on them
    written = {"center_crop", "prior_loss_weight", "huber_schedule", "conv_alpha", "min_bucket_reso"}
    assert written <= set(dumped)
    assert validate_config_dict(dumped, "config.yaml", check_paths=False) == config


def test_several_changing_caption_keys_are_listed_together() -> None:
    message = problems(cache_text_encoder_outputs=True, shuffle_caption=True, caption_dropout_rate=0.1)
    assert message == [
        CACHE_CAPTIONS.format("shuffle_caption and caption_dropout_rate").replace(
            "changes them", "change them"
        )
    ]


ZERO_SNR_EPSILON = (
    "zero_terminal_snr: needs a v-prediction model (v_parameterization: true): with epsilon prediction the "
    "model cannot learn what to do at the pure-noise last timestep"
)


def test_zero_terminal_snr_true_on_an_epsilon_model_is_refused() -> None:
    assert problems(zero_terminal_snr=True, v_parameterization=False) == [ZERO_SNR_EPSILON]


@pytest.mark.parametrize("zero_snr", [None, False], ids=["left out", "false"])
def test_zero_terminal_snr_left_out_or_false_allows_epsilon(zero_snr: bool | None) -> None:
    values = {**BASE, "v_parameterization": False}
    if zero_snr is not None:
        values["zero_terminal_snr"] = zero_snr
    config = validate_config_dict(values, "<t>", check_paths=False)
    assert config.zero_terminal_snr is zero_snr  # None: from the checkpoint's `ztsnr` marker


def test_locon_trains_the_convs_at_the_network_rank() -> None:
    config = validate_config_dict(
        {**BASE, "network_type": "locon", "lora_rank": 8, "lora_alpha": 4}, "<t>", check_paths=False
    ).resolved()
    assert (config.conv_rank, config.conv_alpha) == (8, 4.0)
    explicit = {**BASE, "network_type": "locon", "lora_rank": 8, "conv_rank": 2}
    config = validate_config_dict(explicit, "<t>", check_paths=False).resolved()
    assert (config.conv_rank, config.conv_alpha) == (2, 2.0)


def test_flux_trains_plain_lora_only() -> None:
    from lora_scripts.models.flux import FluxFamily

    assert FluxFamily.key_problems({"network_type": "lora"}) == []
    assert FluxFamily.key_problems({"network_type": "dora"}) == [
        "network_type: dora is not written for FLUX.1 yet (its files fuse q/k/v into one layer, which only a "
        "plain LoRA of the parts matches exactly); use lora."
    ]
