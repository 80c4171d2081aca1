"""Turn an sd-scripts setup (a --config_file TOML, a --dataset_config TOML, or a pasted command line) into
our config, noting for each option what it became (see sd_scripts_table for the mapping itself)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from lora_scripts.config.importers import converters as c
from lora_scripts.config.importers.command_line import parse_command_line
from lora_scripts.config.importers.kohya_gui import read_kohya_gui
from lora_scripts.config.importers.report import ImportReport, ReportLine
from lora_scripts.config.importers.sd_scripts_table import (
    DROPPED,
    FLUX_DEFAULTS,
    LYCORIS_PRESETS,
    MAPPED,
    NETWORK_MODULES,
    SD_SCRIPTS_DEFAULTS,
    SD_TRAINER_LYCORIS,
)
from lora_scripts.config.keys_data import PER_DATASET_KEYS
from lora_scripts.errors import UserError

# sd-scripts' dataset TOML spells a few options differently from its command line.
_DATASET_ALIASES = {"batch_size": "train_batch_size", "image_dir": "train_data_dir"}
_SD_SCRIPTS_MAX_TRAIN_STEPS = 1600  # train_util.py's default when neither steps nor epochs is given


@dataclass
class Imported:
    config: dict[str, Any]
    report: ImportReport


class _Builder:
    """Collects our config and the report while options are applied."""

    def __init__(self, source: str) -> None:
        self.config: dict[str, Any] = {}
        self.report = ImportReport(source)
        self.seen: set[str] = set()  # sd-scripts option names given anywhere

    def line(self, option: str, name: str, value: Any) -> tuple[str, Any] | None:
        """Report one option; return (our key, our value) when it maps, else None."""
        self.seen.add(name)
        rule = MAPPED.get(name)
        if rule is None:
            reason = DROPPED.get(name)
            status = "dropped" if reason is not None else "unknown"
            self.report.add(
                ReportLine(option, value, status, note=reason or "not an option the importer knows")
            )
            return None
        try:
            new_value = rule.convert(value)
        except (ValueError, TypeError) as exc:
            self.report.add(ReportLine(option, value, "dropped", note=str(exc)))
            return None
        self.report.add(ReportLine(option, value, "mapped", rule.key, new_value, rule.note))
        return rule.key, new_value

    def apply(self, option: str, name: str, value: Any) -> None:
        """Map a run-wide option to a top-level key (network_args is split into its key=value items)."""
        if name in ("network_args", "network_args_custom"):  # _custom: Akegarasu SD-Trainer's extra items
            items = value if isinstance(value, list) else str(value).split()
            for item in items:
                arg, _, arg_value = str(item).partition("=")
                self.apply(f"{option}.{arg}", f"network_args.{arg.strip()}", arg_value.strip())
            return
        mapped = self.line(option, name, value)
        if mapped is not None:
            self.config[mapped[0]] = mapped[1]

    def default(self, option: str, key: str, value: Any, note: str) -> None:
        if option not in self.seen and key not in self.config:
            self.config[key] = value
            self.report.add(ReportLine(option, None, "default", key, value, note))


def import_sd_scripts(source: Path, dataset_config: Path | None = None) -> Imported:
    """Read `source` (.toml: a --config_file, sd-scripts' or Akegarasu SD-Trainer's; .json: a kohya_ss GUI
    preset; anything else: a command line) and an optional dataset TOML."""
    builder = _Builder(str(source))
    labels: dict[str, str] = {}
    if source.suffix.lower() == ".json" and source.is_file():
        preset = read_kohya_gui(source)
        options, script, labels = preset.options, preset.script, preset.labels
        builder.report.lines.extend(preset.lines)
        builder.config.update(preset.config)
        builder.seen.update(preset.config)
    else:
        options, script = _read_source(source)
    if str(options.get("model_train_type", "")).startswith("flux"):
        script = "flux_train_network.py"  # Akegarasu SD-Trainer's model type picks the script
    if options.get("enable_preview") is False:
        _drop_samples(builder, options)
    options = _split_network_args(builder, options, labels)
    _network_type(builder, options, labels, _is_flux(options, script))
    dataset_path = dataset_config
    if dataset_path is None and "dataset_config" in options:
        dataset_path = _resolve(str(options["dataset_config"]), source.parent)
    for name, value in options.items():
        if name == "train_data_dir" and dataset_path is not None:
            builder.seen.add(name)
            builder.report.add(
                ReportLine(name, value, "dropped", note="sd-scripts ignores it with a dataset config")
            )
            continue
        if name == "dataset_config" and dataset_path is not None:
            builder.seen.add(name)
            builder.report.add(ReportLine(name, value, "mapped", "datasets", str(dataset_path), "read below"))
            continue
        builder.apply(labels.get(name, name), name, value)
    if dataset_path is not None:
        _apply_dataset_config(builder, dataset_path)
    _apply_defaults(builder, options, script)
    return Imported(builder.config, builder.report)


_LYCORIS = "lycoris.kohya"
# LyCORIS switches whose false is its default: nothing to carry over.
_LYCORIS_SWITCHES = (
    "use_tucker",
    "use_cp",
    "use_conv_cp",
    "use_scalar",
    "bypass_mode",
    "train_norm",
    "decompose_both",
    "rescaled",
    "rs_lora",
    "unbalanced_factorization",
    "rank_dropout_scale",
    "train_on_input",
)
_DORA_AXIS = (
    "LyCORIS 3.2+ defaults to wd_on_output=True, a magnitude per output channel; ours is per input channel "
    "(wd_on_output=False, the one A1111 and ComfyUI apply)"
)


def _split_network_args(builder: _Builder, options: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    """network_args (and SD-Trainer's network_args_custom) as one `network_args.NAME` option per item, in
    their place; with lycoris.kohya, SD-Trainer's own LyCORIS fields (lycoris_algo, lokr_factor, ...) become
    the items its UI passes for them."""
    lycoris = str(options.get("network_module", "")).strip() == _LYCORIS
    out: dict[str, Any] = {}

    def put(name: str, label: str, value: Any) -> None:
        if name in out:  # sd-scripts reads the items into a dict: the later one wins
            builder.seen.add(name)
            note = "given again later; the later value wins"
            builder.report.add(ReportLine(labels.get(name, name), out.pop(name), "dropped", note=note))
        out[name] = value
        if label != name:
            labels[name] = label

    for name, value in options.items():
        if name in ("network_args", "network_args_custom"):  # _custom: Akegarasu SD-Trainer's extra items
            for item in value if isinstance(value, list) else str(value).split():
                arg, _, arg_value = str(item).partition("=")
                put(f"network_args.{arg.strip()}", f"{name}.{arg.strip()}", arg_value.strip())
        elif name in SD_TRAINER_LYCORIS and name not in labels.values():
            if lycoris:
                put(SD_TRAINER_LYCORIS[name], name, value)
            else:
                builder.seen.add(name)
                note = "SD-Trainer passes it only with network_module lycoris.kohya"
                builder.report.add(ReportLine(name, value, "dropped", note=note))
        else:
            out[name] = value
    return out


def _is_flux(options: dict[str, Any], script: str) -> bool:
    return (
        script.startswith("flux") or "ae" in options or options.get("network_module") == "networks.lora_flux"
    )


def _network_type(builder: _Builder, options: dict[str, Any], labels: dict[str, str], flux: bool) -> None:
    """The network type from network_module and its network_args together (LyCORIS' algo, dora_wd, preset,
    factor, ...): each of those options is reported here and taken out of `options`; the rest (conv_dim,
    conv_alpha, the dropped ones) are left to the table."""
    module = str(options.get("network_module", "networks.lora")).strip()
    lycoris = module == _LYCORIS

    def take(name: str) -> tuple[str, Any] | None:
        if name not in options:
            return None
        builder.seen.add(name)
        return labels.get(name, name), options.pop(name)

    def drop(name: str, note: str) -> None:
        taken = take(name)
        if taken is not None:
            builder.report.add(ReportLine(taken[0], taken[1], "dropped", note=note))

    def mapped(name: str, value: Any, key: str, new_value: Any, note: str) -> None:
        builder.report.add(ReportLine(labels.get(name, name), value, "mapped", key, new_value, note))

    for switch in _LYCORIS_SWITCHES:  # `use_tucker=False` and the like: LyCORIS' defaults
        name = f"network_args.{switch}"
        try:
            off = name in options and not c.as_bool(options[name])
        except ValueError:
            off = False
        if off:
            drop(name, "false: the same as leaving it out")
    if not lycoris:
        ignored = f"a LyCORIS argument; {module} ignores it"
        for arg in ("algo", "dora_wd", "wd_on_output", "preset", "dropout", "full_matrix"):
            drop(f"network_args.{arg}", ignored)
        network_type = NETWORK_MODULES.get(module) or "lora"
        if network_type == "lokr":
            _factor(builder, take("network_args.factor"))
        else:
            drop("network_args.factor", f"LoKr only; {module} ignores it")
        if network_type != "lora":
            builder.config["network_type"] = network_type
            mapped("network_module", module, "network_type", network_type, "sd-scripts' own LoHa/LoKr")
            drop("network_dropout", f"{network_type} takes no dropout here")
        return
    # lycoris.kohya: LyCORIS reads its own `dropout` item, not sd-scripts' network_dropout.
    drop("network_dropout", "LyCORIS ignores it (it reads its own dropout network argument)")
    convs = True
    preset = take("network_args.preset")
    if preset is not None:
        rule = MAPPED["network_args.preset"]
        try:
            builder.config[rule.key] = rule.convert(preset[1])
            convs = LYCORIS_PRESETS[str(preset[1]).strip().strip("\"'")]
            note = rule.note if convs else "attn-mlp: the transformer blocks, no 3x3 convs"
            builder.report.add(ReportLine(preset[0], preset[1], "mapped", rule.key, "kohya", note))
        except ValueError as exc:
            builder.report.add(ReportLine(preset[0], preset[1], "dropped", note=str(exc)))
    convs = convs and not flux  # FLUX.1 has no 3x3 convs
    algo = take("network_args.algo")
    try:
        network_type = "locon" if algo is None else MAPPED["network_args.algo"].convert(algo[1])
    except ValueError as exc:
        builder.report.add(ReportLine(algo[0], algo[1], "dropped", note=str(exc)))
        algo, network_type = None, "lora"
    else:
        if network_type == "locon" and not convs:
            network_type = "lora"
        note = {
            "locon": "LyCORIS' lora/locon: the 3x3 convs too, conv_dim defaulting to network_dim",
            "lora": "FLUX.1 has no 3x3 convs" if flux else "no 3x3 convs under this preset",
        }.get(network_type, "")
        if algo is None:
            note = f"LyCORIS' default algo lora; {note}"
            line = ReportLine("network_args.algo", None, "default", "network_type", network_type, note)
            builder.report.add(line)
        else:
            mapped("network_args.algo", algo[1], "network_type", network_type, note)
    dora = take("network_args.dora_wd")
    axis = take("network_args.wd_on_output")
    if dora is not None:
        try:
            wanted = MAPPED["network_args.dora_wd"].convert(dora[1]) == "dora"
        except ValueError as exc:
            wanted = False
            builder.report.add(ReportLine(dora[0], dora[1], "dropped", note=str(exc)))
        if wanted and network_type in ("loha", "lokr"):
            note = "DoRA on LoHa/LoKr is not trained here; the LoHa/LoKr is kept"
            builder.report.add(ReportLine(dora[0], dora[1], "dropped", note=note))
        elif wanted:
            network_type = "dora"
            note = "a magnitude per input channel" if axis is not None else _DORA_AXIS
            builder.report.add(ReportLine(dora[0], dora[1], "mapped", "network_type", "dora", note))
    if axis is not None:
        if network_type != "dora":
            builder.report.add(ReportLine(axis[0], axis[1], "dropped", note="applies to dora_wd=True only"))
        else:
            try:
                MAPPED["network_args.wd_on_output"].convert(axis[1])
                note = "a magnitude per input channel, as here"
                builder.report.add(ReportLine(axis[0], axis[1], "mapped", "network_type", "dora", note))
            except ValueError as exc:
                builder.report.add(ReportLine(axis[0], axis[1], "dropped", note=str(exc)))
    if network_type == "lokr":
        _factor(builder, take("network_args.factor"))
        full = take("network_args.full_matrix")
        if full is not None:
            _convert(builder, full, "network_args.full_matrix")
    else:
        ignored = f"LoKr only; LyCORIS ignores it with network_type {network_type}"
        drop("network_args.factor", ignored)
        drop("network_args.full_matrix", ignored)
    dropout = take("network_args.dropout")
    if dropout is not None:
        if network_type in ("loha", "lokr"):
            note = f"{network_type} takes no dropout here"
            builder.report.add(ReportLine(dropout[0], dropout[1], "dropped", note=note))
        else:
            _convert(builder, dropout, "network_args.dropout")
    builder.config["network_type"] = network_type
    if not convs:
        for arg in ("conv_dim", "conv_alpha"):
            note = "FLUX.1 has no 3x3 convs" if flux else "this LyCORIS preset trains no 3x3 convs"
            drop(f"network_args.{arg}", note)
    elif network_type in ("loha", "lokr", "dora") and "network_args.conv_dim" not in options:
        # LyCORIS trains the 3x3 convs of every algo at conv_dim = network_dim, conv_alpha = network_alpha.
        try:
            rank = c.as_int(options.get("network_dim", 4))
            alpha = c.as_float(options.get("network_alpha", 1.0))
        except ValueError:
            return
        note = "LyCORIS trains the 3x3 convs too, at network_dim"
        builder.default("network_args.conv_dim", "conv_rank", rank, note)
        if "network_args.conv_alpha" not in options:
            builder.default("network_args.conv_alpha", "conv_alpha", alpha, "LyCORIS' default: network_alpha")


def _factor(builder: _Builder, taken: tuple[str, Any] | None) -> None:
    if taken is not None:
        _convert(builder, taken, "network_args.factor")


def _convert(builder: _Builder, taken: tuple[str, Any], name: str) -> None:
    """One taken option through its MAPPED rule (reported; set in the config when it converts)."""
    rule = MAPPED[name]
    try:
        value = rule.convert(taken[1])
    except (ValueError, TypeError) as exc:
        builder.report.add(ReportLine(taken[0], taken[1], "dropped", note=str(exc)))
        return
    builder.config[str(rule.key)] = value
    builder.report.add(ReportLine(taken[0], taken[1], "mapped", rule.key, value, rule.note))


def _drop_samples(builder: _Builder, options: dict[str, Any]) -> None:
    """Akegarasu SD-Trainer keeps the sample settings but passes none of them with enable_preview = false."""
    for name in [n for n in options if n.startswith("sample_") or n in ("prompt_file", "positive_prompts")]:
        builder.seen.add(name)
        note = "enable_preview = false: SD-Trainer renders no samples"
        builder.report.add(ReportLine(name, options.pop(name), "dropped", note=note))


def _read_source(source: Path) -> tuple[dict[str, Any], str]:
    """The options given (a config_file named on a command line is read under it) and the script name."""
    if not source.is_file():
        raise UserError(f"{source}: no such file.")
    if source.suffix.lower() == ".toml":
        return _read_config_toml(source), ""
    command = parse_command_line(source.read_text(encoding="utf-8", errors="replace"), str(source))
    options = dict(command.options)
    if "config_file" in options:
        path = _resolve(str(options.pop("config_file")), source.parent)
        # sd-scripts: options on the command line win over the config file's.
        options = {**_read_config_toml(path), **options}
    return options, Path(command.script).name


def _read_config_toml(path: Path) -> dict[str, Any]:
    """sd-scripts' read_config_from_file: sections are flattened, a later section's key wins."""
    flat: dict[str, Any] = {}
    for name, value in _read_toml(path).items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[name] = value
    return flat


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file.") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc}).") from exc


def _resolve(path: str, base: Path) -> Path:
    """A path as sd-scripts would open it (from the current folder), else beside the source file."""
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    beside = base / candidate
    return beside if beside.exists() else candidate


def _apply_dataset_config(builder: _Builder, path: Path) -> None:
    """[general] and dataset-level keys become top-level keys (a per-dataset key such as resolution goes into
    each of its subsets instead); each [[datasets.subsets]] becomes one `datasets` entry."""
    data = _read_toml(path)
    for name, value in data.get("general", {}).items():
        builder.apply(f"general.{name}", _DATASET_ALIASES.get(name, name), value)
    entries: list[dict[str, Any]] = []
    for i, dataset in enumerate(data.get("datasets", [])):
        inherited: dict[str, Any] = {}
        for name, value in dataset.items():
            if name == "subsets":
                continue
            option = f"datasets[{i}].{name}"
            mapped = builder.line(option, _DATASET_ALIASES.get(name, name), value)
            if mapped is None:
                continue
            key, new_value = mapped
            if key in PER_DATASET_KEYS:
                inherited[key] = new_value
            elif key in builder.config and builder.config[key] != new_value and i > 0:
                builder.report.lines[-1] = ReportLine(
                    option, value, "dropped", note=f"one {key} per run here; {builder.config[key]} is kept"
                )
            else:
                builder.config[key] = new_value
        for j, subset in enumerate(dataset.get("subsets", [])):
            entries.append(_subset_entry(builder, f"datasets[{i}].subsets[{j}]", subset, inherited))
    if entries:
        builder.config["datasets"] = entries


def _subset_entry(builder: _Builder, where: str, subset: dict[str, Any], inherited: dict[str, Any]) -> dict:
    entry = dict(inherited)
    for name, value in subset.items():
        option = f"{where}.{name}"
        if name == "is_reg":
            builder.report.add(ReportLine(option, value, "mapped", f"datasets[].{name}", bool(value)))
            entry["is_reg"] = bool(value)
            continue
        mapped = builder.line(option, _DATASET_ALIASES.get(name, name), value)
        if mapped is None:
            continue
        key, new_value = mapped
        if key in PER_DATASET_KEYS:
            entry[key] = new_value
        else:
            builder.report.lines[-1] = ReportLine(
                option, value, "dropped", note=f"{key} cannot be set per dataset"
            )
    if "num_repeats" not in entry:
        # sd-scripts' dataset config repeats each subset once and ignores N_name folder numbers.
        entry["num_repeats"] = 1
        builder.report.add(
            ReportLine(
                f"{where}.num_repeats", None, "default", "num_repeats", 1, "sd-scripts' default, not N_name"
            )
        )
    return entry


def _apply_defaults(builder: _Builder, options: dict[str, Any], script: str) -> None:
    for option, key, value, note in SD_SCRIPTS_DEFAULTS:
        builder.default(option, key, value, note)
    if "max_train_steps" not in builder.seen and "max_train_epochs" not in builder.seen:
        builder.default(
            "max_train_steps", "max_train_steps", _SD_SCRIPTS_MAX_TRAIN_STEPS, "sd-scripts' default"
        )
    if _is_flux(options, script):
        for option, key, value, note in FLUX_DEFAULTS:
            builder.default(option, key, value, note)
        if "timestep_sampling" not in builder.seen:
            builder.report.add(
                ReportLine(
                    "timestep_sampling",
                    None,
                    "dropped",
                    note="sd-scripts' default 'sigma' has no equivalent; ours is 'shift'",
                )
            )
    # sd-scripts trains a text-encoder LoRA too unless told not to (or the encoder outputs are cached).
    if "train_text_encoder" not in builder.config:
        cached = builder.config.get("cache_text_encoder_outputs") is True
        builder.seen.discard(
            "network_train_unet_only"
        )  # `= false` is dropped as "the same as leaving it out"
        builder.default(
            "network_train_unet_only",
            "train_text_encoder",
            not cached,
            "sd-scripts trains the text encoder too" if not cached else "cached text-encoder outputs",
        )
    if builder.config.get("train_text_encoder") and builder.config.get("target_modules") == "kohya":
        builder.default(
            "network_module (text encoder)",
            "text_encoder_target_modules",
            "kohya",
            "networks.lora's layer set",
        )
