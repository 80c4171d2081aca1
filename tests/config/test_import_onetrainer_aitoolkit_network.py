"""`lora-scripts import` of the network types of a OneTrainer JSON config (peft_type, lora_decompose, lokr_*)
and an ai-toolkit job (network.type, lokr_full_rank, lokr_factor): each option's config value or reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lora_scripts.config import load_config
from lora_scripts.config.importers import import_to_file, render_report

# The network keys OneTrainer writes into every config (TrainConfig.default_values), with their defaults.
OT_NETWORK: dict[str, Any] = {
    "peft_type": "LORA",
    "lora_rank": 16,
    "lora_alpha": 1.0,
    "lora_decompose": False,
    "lora_decompose_norm_epsilon": True,
    "lora_decompose_output_axis": False,
    "dropout_probability": 0.0,
    "oft_block_size": 32,
    "oft_block_share": False,
    "oft_scaled": False,
    "lokr_dim": 16,
    "lokr_decompose_both": False,
    "lokr_decompose_factor": -1,
    "lokr_use_tucker": False,
    "lokr_weight_decompose": False,
    "lokr_dora_on_output": True,
    "lokr_full_matrix": False,
    "lokr_vec_trick": True,
}


def _onetrainer(tmp_path: Path, model_type: str = "STABLE_DIFFUSION_XL_10_BASE", **network: Any) -> tuple:
    data = {
        "training_method": "LORA",
        "model_type": model_type,
        "base_model_name": "stabilityai/stable-diffusion-xl-base-1.0",
        "output_model_destination": "models/net.safetensors",
        "concepts": [{"path": "/data/a"}],
        **OT_NETWORK,
        **network,
    }
    source = tmp_path / "ot.json"
    source.write_text(json.dumps(data), encoding="utf-8")
    return _write(tmp_path, source)


def _write(tmp_path: Path, source: Path) -> tuple[dict[str, Any], str]:
    out = tmp_path / "config.yaml"
    report = import_to_file(source, out, force=True)
    load_config(out, check_paths=False)
    text = render_report(report, str(out))
    assert "Unknown" not in text
    return yaml.safe_load(out.read_text(encoding="utf-8")), text


def test_onetrainer_lora_keeps_lora_and_drops_the_other_types_keys(tmp_path: Path) -> None:
    config, report = _onetrainer(tmp_path, lora_rank=32, lora_alpha=16.0, dropout_probability=0.1)
    assert (config["network_type"], config["lora_rank"], config["lora_alpha"]) == ("lora", 32, 16.0)
    assert config["network_dropout"] == 0.1
    assert "lokr_factor" not in config and "lokr_full_matrix" not in config
    assert "lokr_dim = 16: LoKr only; OneTrainer ignores it with LORA" in report
    assert "oft_block_size = 32: OFT only; OFT is not trained here" in report
    assert "lora_decompose = False: false: the same as leaving it out" in report


def test_onetrainer_loha(tmp_path: Path) -> None:
    config, report = _onetrainer(tmp_path, peft_type="LOHA", lora_rank=8, lora_alpha=4.0)
    assert (config["network_type"], config["lora_rank"], config["lora_alpha"]) == ("loha", 8, 4.0)
    assert "network_dropout" not in config or config["network_dropout"] == 0.0


def test_onetrainer_loha_drops_dropout(tmp_path: Path) -> None:
    config, report = _onetrainer(tmp_path, peft_type="LOHA", dropout_probability=0.2)
    assert config["network_type"] == "loha" and "network_dropout" not in config
    assert "dropout_probability = 0.2: loha takes no dropout here" in report


def test_onetrainer_lokr_rank_factor_and_full_matrix(tmp_path: Path) -> None:
    config, report = _onetrainer(
        tmp_path, peft_type="LOKR", lokr_dim=10000, lokr_decompose_factor=8, lokr_full_matrix=True
    )
    assert config["network_type"] == "lokr" and config["lora_rank"] == 10000
    assert config["lokr_factor"] == 8 and config["lokr_full_matrix"] is True
    assert "lora_rank = 16: peft_type LOKR takes lokr_dim as its rank" in report
    assert "lokr_vec_trick = True: only changes how OneTrainer computes LoKr" in report
    assert "lokr_dora_on_output = True: applies to lokr_weight_decompose only" in report


def test_onetrainer_lokr_defaults(tmp_path: Path) -> None:
    config, _ = _onetrainer(tmp_path, peft_type="LOKR")
    assert (config["network_type"], config["lora_rank"]) == ("lokr", 16)
    assert config["lokr_factor"] == -1 and config["lokr_full_matrix"] is False


def test_onetrainer_lokr_switches_not_trained_here(tmp_path: Path) -> None:
    config, report = _onetrainer(
        tmp_path,
        peft_type="LOKR",
        lokr_decompose_both=True,
        lokr_use_tucker=True,
        lokr_weight_decompose=True,
        dropout_probability=0.1,
    )
    assert config["network_type"] == "lokr" and "network_dropout" not in config
    assert "lokr_decompose_both = True: decomposing LoKr's small factor too is not trained here" in report
    assert "lokr_use_tucker = True: LoKr's Tucker decomposition" in report
    assert "lokr_weight_decompose = True: DoRA on LoKr is not trained here; the LoKr is kept" in report
    assert "dropout_probability = 0.1: lokr takes no dropout here" in report


def test_onetrainer_dora_per_input_channel(tmp_path: Path) -> None:
    config, report = _onetrainer(tmp_path, lora_decompose=True, dropout_probability=0.05)
    assert config["network_type"] == "dora" and config["network_dropout"] == 0.05
    assert "lora_decompose = True -> network_type: 'dora'  (a magnitude per input channel" in report
    assert "lora_decompose_output_axis = False -> network_type: 'dora'" in report
    assert "lora_decompose_norm_epsilon = True: OneTrainer's guard on DoRA's norm" in report


def test_onetrainer_dora_on_the_output_axis_is_dropped(tmp_path: Path) -> None:
    config, report = _onetrainer(tmp_path, lora_decompose=True, lora_decompose_output_axis=True)
    assert config["network_type"] == "lora"
    assert "a magnitude per output channel; ours is per input channel, so a LoRA is trained instead" in report
    assert "lora_decompose_output_axis = True: true (a magnitude per output channel)" in report


def test_onetrainer_decompose_with_loha_is_dropped(tmp_path: Path) -> None:
    config, report = _onetrainer(tmp_path, peft_type="LOHA", lora_decompose=True)
    assert config["network_type"] == "loha"
    assert "lora_decompose = True: OneTrainer applies it with peft_type LORA only, not LOHA" in report


def test_onetrainer_oft_is_dropped(tmp_path: Path) -> None:
    config, report = _onetrainer(tmp_path, peft_type="OFT_2", lora_rank=8)
    assert (config["network_type"], config["lora_rank"]) == ("lora", 8)
    assert "peft_type = 'OFT_2': OFT is not trained here; a LoRA of lora_rank is trained instead" in report


def test_onetrainer_flux_trains_lora_only(tmp_path: Path) -> None:
    config, report = _onetrainer(tmp_path, "FLUX_DEV_1", peft_type="LOKR", lokr_decompose_factor=4)
    assert (config["network_type"], config["lora_rank"]) == ("lora", 16)
    assert "lokr_factor" not in config
    assert "peft_type = 'LOKR': FLUX.1 trains network_type lora only here" in report
    assert "lokr_decompose_factor = 4: LoKr only; see peft_type" in report
    config, report = _onetrainer(tmp_path, "FLUX_DEV_1", lora_decompose=True)
    assert config["network_type"] == "lora"
    assert "lora_decompose = True: FLUX.1 trains network_type lora only here" in report


JOB = """\
job: extension
config:
  name: net
  process:
    - type: sd_trainer
      training_folder: /runs
      network: {network}
      datasets:
        - {{folder_path: /data/a, resolution: [1024]}}
      train: {{steps: 100}}
      model: {model}
"""
SDXL = "{name_or_path: stabilityai/stable-diffusion-xl-base-1.0, is_xl: true}"
FLUX = "{name_or_path: black-forest-labs/FLUX.1-dev, is_flux: true}"


def _ai_toolkit(tmp_path: Path, network: str, model: str = SDXL) -> tuple[dict[str, Any], str]:
    source = tmp_path / "job.yaml"
    source.write_text(JOB.format(network=network, model=model), encoding="utf-8")
    return _write(tmp_path, source)


def test_ai_toolkit_lora(tmp_path: Path) -> None:
    config, _ = _ai_toolkit(tmp_path, "{type: lora, linear: 16, linear_alpha: 8, dropout: 0.1}")
    assert (config["network_type"], config["lora_rank"], config["lora_alpha"]) == ("lora", 16, 8.0)
    assert config["target_modules"] == "kohya" and config["network_dropout"] == 0.1
    assert "conv_rank" not in config


def test_ai_toolkit_locon_with_conv(tmp_path: Path) -> None:
    config, report = _ai_toolkit(tmp_path, "{type: locon, linear: 16, conv: 8, conv_alpha: 4}")
    assert (config["network_type"], config["conv_rank"], config["conv_alpha"]) == ("locon", 8, 4.0)
    assert "LyCORIS' LoCon: the 3x3 convs at network.conv" in report


def test_ai_toolkit_locon_without_conv_is_a_lora(tmp_path: Path) -> None:
    config, report = _ai_toolkit(tmp_path, "{type: lycoris, linear: 16}")
    assert config["network_type"] == "lora" and "conv_rank" not in config
    assert "ai-toolkit's LoCon trains the 3x3 convs only with network.conv: a LoRA" in report


def test_ai_toolkit_lokr_full_rank_by_default(tmp_path: Path) -> None:
    config, report = _ai_toolkit(tmp_path, "{type: lokr, linear: 16, lokr_factor: 4}")
    assert config["network_type"] == "lokr" and config["lokr_full_matrix"] is True
    assert config["lokr_factor"] == 4 and config["conv_rank"] == 16
    assert "ai-toolkit's lokr_full_rank: true" in report
    assert (
        "network.type = 'lokr' -> conv_rank: 16  (ai-toolkit's full-rank LoKr trains the 3x3 convs" in report
    )


def test_ai_toolkit_lokr_not_full_rank(tmp_path: Path) -> None:
    network = "{type: lokr, linear: 32, linear_alpha: 32, lokr_full_rank: false, dropout: 0.1}"
    config, report = _ai_toolkit(tmp_path, network)
    assert (config["network_type"], config["lora_rank"], config["lora_alpha"]) == ("lokr", 32, 32.0)
    assert config["lokr_full_matrix"] is False and "conv_rank" not in config
    assert config.get("lokr_factor", -1) == -1 and "network_dropout" not in config
    assert "network.dropout = 0.1: ai-toolkit's LoKr ignores it; lokr takes no dropout here" in report


def test_ai_toolkit_lokr_keys_without_lokr_are_dropped(tmp_path: Path) -> None:
    config, report = _ai_toolkit(tmp_path, "{type: lora, lokr_full_rank: true, lokr_factor: 4}")
    assert config["network_type"] == "lora" and "lokr_factor" not in config
    assert "lokr_full_matrix" not in config
    assert "network.lokr_factor = 4: lokr only; ai-toolkit ignores it with type lora" in report


def test_ai_toolkit_dora_fullrank_lorm_are_dropped(tmp_path: Path) -> None:
    config, report = _ai_toolkit(tmp_path, "{type: dora, linear: 8}")
    assert (config["network_type"], config["lora_rank"]) == ("lora", 8)
    assert "learns a magnitude per output channel, ours one per input channel" in report
    for kind, reason in (("fullrank", "full-rank weights"), ("lorm", "LoRM")):
        config, report = _ai_toolkit(tmp_path, f"{{type: {kind}}}")
        assert config["network_type"] == "lora" and f"{reason} " in report


def test_ai_toolkit_flux_trains_lora_only(tmp_path: Path) -> None:
    config, report = _ai_toolkit(tmp_path, "{type: lokr, linear: 16, lokr_factor: 4}", FLUX)
    assert config["network_type"] == "lora" and "lokr_full_matrix" not in config
    assert "conv_rank" not in config and "lokr_factor" not in config
    assert "FLUX.1 trains network_type lora only here" in report
    config, report = _ai_toolkit(tmp_path, "{type: locon, conv: 8}", FLUX)
    assert config["network_type"] == "lora" and "conv_rank" not in config
    assert "network.conv = 8: FLUX.1 has no 3x3 convs" in report
