"""Training each network type end to end on the tiny SD 1.x and SDXL models: LoHa, LoKr (decomposed and
full matrix) and DoRA train with cached latents, LoCon convs and the text encoder; a run stopped mid-way and
resumed ends with the very same file; `network_weights` continues from each type's file exactly; the files
carry LyCORIS' metadata; a file of another type is refused in one sentence before anything is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_scripts.cli import main
from lora_scripts.export.lora_file import read_lora_metadata
from lora_scripts.models.tiny import build_tiny_sdxl
from tests.training.conftest import tiny_run_settings, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TYPES = {
    "loha": dict(network_type="loha"),
    "lokr": dict(network_type="lokr", lokr_factor=4),
    "lokr_full": dict(network_type="lokr", lokr_full_matrix=True),
    "dora": dict(network_type="dora"),
}
NETWORK = dict(
    lora_rank=4,
    lora_alpha=2,
    conv_rank=2,
    target_modules="kohya",
    train_text_encoder=True,
    text_encoder_target_modules="kohya",
    cache_latents=True,
    flip_aug=False,
)
STEPS = 4
# Each type's module suffixes (besides alpha) in the file.
SUFFIXES = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale"},
}


def _config(folder: Path, name: str, data: Path, model: Path, **values) -> Path:
    settings = tiny_run_settings(
        data, model, **{**NETWORK, "max_train_steps": STEPS, "save_steps": 2, **values}
    )
    return write_config(folder / f"{name}.yaml", **settings, output_dir=str(folder / name))


def _train(config: Path, *extra: str) -> int:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return main(["train", "--config", str(config), *extra])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _final(config: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(config.parent / config.stem / f"{config.stem}.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, dataset_dir) -> dict[str, Path]:
    """Each type's uninterrupted run: its config. One torch thread, as the tests' runs it is compared with
    (another thread count sums in another order)."""
    folder = tmp_path_factory.mktemp("types")
    configs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, values in TYPES.items():
            configs[name] = _config(folder, name, dataset_dir, tiny_model_dir, **values)
            assert _train(configs[name]) == 0
    finally:
        torch.set_num_threads(threads)
    return configs


@pytest.mark.parametrize("name", list(TYPES))
def test_each_type_trains_into_its_lycoris_file(trained, name):
    tensors = _final(trained[name])
    stems = {key.split(".", 1)[0] for key in tensors}
    assert len(stems) == 91  # the kohya layers, 18 3x3 convs and 12 text-encoder layers
    for stem in stems:
        suffixes = {key.split(".", 1)[1] for key in tensors if key.startswith(stem + ".")} - {"alpha"}
        if name in SUFFIXES:
            assert suffixes == SUFFIXES[name], stem
        else:
            assert suffixes <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
            if name == "lokr_full":
                assert suffixes == {"lokr_w1", "lokr_w2"}, stem
    # training moved the weights away from their start (a zero factor or up, magnitudes at the base norms)
    moved = {"loha": "hada_w2_b", "lokr": "lokr_w1", "lokr_full": "lokr_w1", "dora": "lora_up.weight"}[name]
    assert all(t.abs().max() > 0 for k, t in tensors.items() if k.endswith(moved))


@pytest.mark.parametrize("name", list(TYPES))
def test_each_type_carries_lycoris_metadata(trained, name):
    metadata = read_lora_metadata(trained[name].parent / name / f"{name}.safetensors")
    assert metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(metadata["ss_network_args"])
    assert args["algo"] == {"dora": "lora", "lokr_full": "lokr"}.get(name, name)
    assert (args["conv_dim"], args["conv_alpha"]) == ("2", "2.0")
    if name.startswith("lokr"):
        assert (args["factor"], args["full_matrix"]) == (
            ("-1", "True") if name == "lokr_full" else ("4", "False")
        )
    if name == "dora":
        assert (args["dora_wd"], args["wd_on_output"]) == ("True", "False")


@pytest.mark.parametrize("name", list(TYPES))
def test_stopped_and_resumed_equals_uninterrupted(
    trained, tmp_path, tiny_model_dir, dataset_dir, monkeypatch, name
):
    config = _config(tmp_path, f"{name}_stopped", dataset_dir, tiny_model_dir, **TYPES[name])
    monkeypatch.setenv("LORA_SCRIPTS_TEST_FAULT", "sigterm@3")
    assert _train(config) == 130
    monkeypatch.delenv("LORA_SCRIPTS_TEST_FAULT")
    assert _train(config, "--resume", "auto") == 0
    resumed, reference = _final(config), _final(trained[name])
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), "resumed file differs"


FROZEN = dict(optimizer_type="SGD", learning_rate=1e-20, max_train_steps=1)


@pytest.mark.parametrize("name", list(TYPES))
def test_network_weights_continues_from_each_type(trained, tmp_path, tiny_model_dir, dataset_dir, name):
    source = trained[name].parent / name / f"{name}.safetensors"
    values = {**TYPES[name], **FROZEN, "network_weights": str(source)}
    config = _config(tmp_path, "continued", dataset_dir, tiny_model_dir, **values)
    assert _train(config) == 0
    before, after = safetensors.torch.load_file(source), _final(config)
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        torch.testing.assert_close(after[key].float(), tensor.float(), rtol=1e-3, atol=1e-6, msg=key)


def test_a_file_of_another_type_is_refused_in_one_sentence(
    trained, tmp_path, tiny_model_dir, dataset_dir, capsys
):
    source = trained["loha"].parent / "loha" / "loha.safetensors"
    config = _config(tmp_path, "wrong", dataset_dir, tiny_model_dir, network_weights=str(source))
    capsys.readouterr()
    assert _train(config) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: network_weights: '{source}' is a LoHa file (e.g. lora_")
    assert errors[0].endswith("where this run trains LoRA; set network_type: loha.")
    assert not (tmp_path / "wrong").exists()


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.mark.parametrize("name", ["loha", "lokr", "dora"])
def test_each_type_trains_on_sdxl(tmp_path, tiny_sdxl_dir, dataset_dir, name):
    config = _config(tmp_path, name, dataset_dir, tiny_sdxl_dir, **TYPES[name], max_train_steps=2)
    assert _train(config) == 0
    tensors = _final(config)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    assert any(k.startswith("lora_te2_") for k in tensors)
    expected = SUFFIXES.get(name)
    if expected is not None:
        stems = {key.split(".", 1)[0] for key in tensors}
        assert all(f"{stem}.{suffix}" in tensors for stem in stems for suffix in expected)
