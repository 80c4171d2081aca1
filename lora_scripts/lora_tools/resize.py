"""`lora-scripts resize`: a LoRA at a lower rank, each module's update replaced by its best approximation of
that rank (SVD, lora_tools/svd.py), as sd-scripts' networks/resize_lora.py does it: a fixed rank (`--rank`,
`--conv-rank` for LoCon's 3x3 convs), or a rank per module chosen from its singular values (`--dynamic
sv_ratio|sv_fro|sv_cumulative --dynamic-param X`, with `--rank` / `--conv-rank` as the maximum).

Every module keeps its scale (alpha / rank), so its update is `scale · up_k @ down_k` with the same scale
before and after; a module never gets a higher rank than it has.

FLUX.1's fused layers (BFL's `qkv`, `linear1`: export/fused.py) are read as their parts. A block-diagonal
one (ours, sd-scripts' split_qkv) has a down per part: each part is resized on its own, the best
approximation of its own update, and written block-diagonal again (rank = parts × the new rank). A dense
one (sd-scripts' default: one down shared by the parts) is resized as one matrix, the parts' updates stacked
in their rows: the best approximation of the fused layer's update, written dense at the new rank, so a
resize never makes a file larger than it was. The output is written in the layout the
input came in (kohya, diffusers, or a peft folder), with sd-scripts' metadata updated as its script does.
LoHa, LoKr and DoRA files are refused: `merge --lora FILE --rank N` makes a plain LoRA of a LoHa / LoKr one
(the SVD of its update), and a DoRA file's update depends on the base weights.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora_scripts.devices import pick_device
from lora_scripts.errors import UserError
from lora_scripts.export.lora_model import LoraModel, LoraModule
from lora_scripts.lora_tools.files import (
    OpenedLora,
    check_output,
    history_entry,
    lora_facts,
    open_lora,
    output_metadata,
    refuse_unless_plain,
    save_lora,
)
from lora_scripts.lora_tools.svd import DYNAMIC_RULES, choose_rank, retained_fro, svd_of_product

log = logging.getLogger(__name__)

DYNAMIC_HINTS = {
    "sv_ratio": "the largest singular value over the smallest kept, 1 or more (e.g. 8)",
    "sv_fro": "the fraction of each module's Frobenius norm to keep, in (0, 1] (e.g. 0.9)",
    "sv_cumulative": "the fraction of the sum of each module's singular values to keep, in (0, 1] (e.g. 0.9)",
}


@dataclass(frozen=True)
class RankChoice:
    """How the new ranks are chosen: `rank` (`conv_rank` for 3x3 convs), or `dynamic` with `dynamic_param`
    and those as the maximum."""

    rank: int
    conv_rank: int
    dynamic: str | None = None
    dynamic_param: float | None = None

    def check(self) -> None:
        """UserError with every problem, named by the CLI's flags."""
        problems = []
        for flag, value in (("--rank", self.rank), ("--conv-rank", self.conv_rank)):
            if value < 1:
                problems.append(f"{flag} {value}: give a rank of 1 or more.")
        dynamic, param = self.dynamic, self.dynamic_param
        if dynamic is not None and dynamic not in DYNAMIC_RULES:
            problems.append(f"--dynamic {dynamic}: use one of {', '.join(DYNAMIC_RULES)}.")
        elif dynamic is not None and param is None:
            problems.append(f"--dynamic {dynamic} needs --dynamic-param: {DYNAMIC_HINTS[dynamic]}.")
        elif dynamic is None and param is not None:
            problems.append(f"--dynamic-param {param}: give --dynamic too ({', '.join(DYNAMIC_RULES)}).")
        elif dynamic is not None and not (param >= 1 if dynamic == "sv_ratio" else 0 < param <= 1):
            problems.append(f"--dynamic-param {param}: {dynamic} takes {DYNAMIC_HINTS[dynamic]}.")
        if problems:
            raise UserError(problems)

    def max_rank(self, module: LoraModule) -> int:
        return self.conv_rank if is_conv3x3(module) else self.rank


@dataclass(frozen=True)
class ModuleResize:
    """One module: its name (`component.path`), its rank before and after, its new alpha, and the fraction
    of its update's Frobenius norm the new rank keeps."""

    name: str
    old_rank: int
    new_rank: int
    alpha: float
    fro_retained: float


@dataclass(frozen=True)
class ResizeReport:
    output: Path
    layout: str
    version: str
    dynamic: str | None
    modules: tuple[ModuleResize, ...]

    @property
    def mean_fro_retained(self) -> float:
        return statistics.fmean(m.fro_retained for m in self.modules)


def resize(
    source: Path,
    output: Path,
    *,
    rank: int,
    dynamic: str | None = None,
    dynamic_param: float | None = None,
    conv_rank: int | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    config_dir: Path | None = None,
    allow_pickle: bool = False,
) -> ResizeReport:
    """Write the LoRA at `source` to `output` (same layout) at `rank` (`conv_rank` for 3x3 conv modules,
    default `rank`), or at the rank `dynamic` ("sv_ratio", "sv_fro", "sv_cumulative") with `dynamic_param`
    picks per module, at most `rank` / `conv_rank`. dtype: the saved weights' (None: each module's own);
    device: where the SVDs run ("cpu", "cuda"); config_dir: a diffusers folder whose configs name and size
    the layers (default: the family's full-size model, found from the file)."""
    choice = RankChoice(rank, rank if conv_rank is None else conv_rank, dynamic, dynamic_param)
    choice.check()
    where = pick_device(device)
    check_output(output, overwrite=overwrite, inputs=[source])
    opened = open_lora(source, key="resize", config_dir=config_dir, allow_pickle=allow_pickle)
    refuse_unless_plain(opened, "resize", resize_instead(opened))
    model = opened.model
    if dynamic:
        log.info("Ranks by %s %s, at most %d (conv %d)", dynamic, dynamic_param, rank, choice.conv_rank)

    modules: list[LoraModule] = []
    rows: list[ModuleResize] = []
    with torch.no_grad():
        for group in tqdm(shared_down_groups(model.modules), desc="resize", unit="module"):
            if len(group) == 1:
                new, row = resize_module(group[0], choice.max_rank(group[0]), dynamic, dynamic_param, where)
                modules.append(new)
                rows.append(row)
                continue
            max_rank = choice.max_rank(group[0])
            new_parts, part_rows = resize_shared(group, max_rank, dynamic, dynamic_param, where)
            modules += new_parts
            rows += part_rows
    resized = replace(model, modules=modules)

    params = asdict(choice) | {"dtype": None if dtype is None else str(dtype).removeprefix("torch.")}
    entry = history_entry("resize", [(Path(source), model.metadata, None)], **params)
    updates = sd_scripts_metadata(model, resized, choice, lora_facts(resized, opened.version))
    save_lora(
        output,
        resized,
        opened.base,
        output_metadata(model.metadata, entry, **updates),
        layout=model.layout,
        dtype=dtype,
    )
    report = ResizeReport(Path(output), model.layout, opened.version, dynamic, tuple(rows))
    log.info(
        "Wrote %d modules to %s; Frobenius norm retained: %.1f%% on average",
        len(rows),
        output,
        100 * report.mean_fro_retained,
    )
    return report


def resize_instead(opened: OpenedLora) -> str:
    """What to do with a LoHa / LoKr / DoRA file instead of resizing it (resize works on up @ down)."""
    if opened.model.network_type == "dora":
        return (
            "resize works on a plain LoRA's up @ down, and a DoRA file's update depends on the base weights; "
            "fuse it into a checkpoint with `merge --base` instead."
        )
    return (
        "resize works on a plain LoRA's up @ down; to make a plain LoRA of rank N from it, use "
        f"`lora-scripts merge --lora {opened.path} --rank N -o OUT.safetensors` (the SVD of its update)."
    )


def resize_module(
    module: LoraModule, max_rank: int, dynamic: str | None, dynamic_param: float | None, device: torch.device
) -> tuple[LoraModule, ModuleResize]:
    """`module` at the rank `choose_rank` gives (at most `max_rank` and its own rank), keeping its scale,
    with its weights in their dtype on the CPU; and its report row."""
    decomposition = svd_of_product(module.up.flatten(1), module.down.flatten(1), device=device)
    new_rank = min(choose_rank(decomposition.s, max_rank, dynamic, dynamic_param), module.rank)
    up, down = decomposition.factors(new_rank)
    # sd-scripts: new_alpha = scale · new_rank with scale = alpha / old_rank, so alpha / rank (the scale the
    # loaders apply) is the same before and after. In fp16 / bf16 files alpha is stored in that dtype, so a
    # ratio that is not a short binary fraction rounds there (as in sd-scripts' files).
    alpha = module.alpha * new_rank / module.rank
    dtype = module.down.dtype
    down = down.to(device="cpu", dtype=dtype).reshape(new_rank, *module.down.shape[1:])
    up = up.to(device="cpu", dtype=dtype).reshape(module.up.shape[0], new_rank, *module.up.shape[2:])
    row = ModuleResize(module.name, module.rank, new_rank, alpha, retained_fro(decomposition.s, new_rank))
    return replace(module, down=down, up=up, alpha=alpha), row


def shared_down_groups(modules: list[LoraModule]) -> list[list[LoraModule]]:
    """The modules in file order, those of one component that share one down (equal 2-D tensors) and scale
    grouped: the parts a dense fused module was read as (export/fused.py), from a kohya file or converted to
    diffusers / peft. Every other module alone."""
    groups: list[list[LoraModule]] = []
    buckets: dict[tuple, list[list[LoraModule]]] = {}
    for module in modules:
        key = (module.component, tuple(module.down.shape), module.down.dtype, module.scale)
        candidates = [] if module.is_conv else buckets.setdefault(key, [])
        for group in candidates:
            if torch.equal(module.down, group[0].down):
                group.append(module)
                break
        else:
            groups.append([module])
            candidates.append(groups[-1])
    return groups


def resize_shared(
    parts: list[LoraModule],
    max_rank: int,
    dynamic: str | None,
    dynamic_param: float | None,
    device: torch.device,
) -> tuple[list[LoraModule], list[ModuleResize]]:
    """Parts that share one down (one scale), resized as one matrix: their ups stacked by rows, the best
    approximation of that rank, one new down shared again; each part's report row gives the whole's
    retained fraction."""
    first = parts[0]
    stacked = torch.cat([p.up.flatten(1) for p in parts])
    decomposition = svd_of_product(stacked, first.down.flatten(1), device=device)
    new_rank = min(choose_rank(decomposition.s, max_rank, dynamic, dynamic_param), first.rank)
    up, down = decomposition.factors(new_rank)
    dtype = first.down.dtype
    down = down.to(device="cpu", dtype=dtype).contiguous()
    alpha = first.alpha * new_rank / first.rank
    retained = retained_fro(decomposition.s, new_rank)
    out, rows, start = [], [], 0
    for part in parts:
        rows_of_part = up[start : start + part.up.shape[0]].to(device="cpu", dtype=part.up.dtype)
        start += part.up.shape[0]
        out.append(replace(part, down=down, up=rows_of_part.contiguous(), alpha=alpha))
        rows.append(ModuleResize(part.name, part.rank, new_rank, alpha, retained))
    return out, rows


def is_conv3x3(module: LoraModule) -> bool:
    """LoCon's conv modules (conv_dim in sd-scripts), not the 1x1 convs (SD 1.x's proj_in / proj_out) that
    LoRA's network_dim covers. (sd-scripts' resize gives every 4-D module --new_conv_rank, 1x1 ones too.)"""
    return module.is_conv and tuple(module.down.shape[2:]) != (1, 1)


def sd_scripts_metadata(
    source: LoraModel, resized: LoraModel, choice: RankChoice, facts: dict[str, str]
) -> dict[str, str]:
    """The sd-scripts keys that change, as networks/resize_lora.py writes them: ss_network_dim /
    ss_network_alpha ("Dynamic" for dynamic ranks), ss_training_comment in its words (with the largest old
    rank); also conv_dim / conv_alpha in ss_network_args (which sd-scripts leaves stale) and the `facts` a
    file from diffusers or peft lacks (ss_base_model_version ...)."""
    updates = {k: v for k, v in facts.items() if k not in source.metadata}
    comment = source.metadata.get("ss_training_comment", "")
    old_dim = max(m.rank for m in source.modules)
    conv = [m for m in resized.modules if is_conv3x3(m)]
    linear = [m for m in resized.modules if not is_conv3x3(m)] or resized.modules
    if choice.dynamic is None:
        rank, conv_rank = choice.rank, choice.conv_rank
        conv_desc = "" if rank == conv_rank else f" (conv: {conv_rank})"
        updates["ss_training_comment"] = (
            f"dimension is resized from {old_dim} to {rank}{conv_desc}; {comment}"
        )
        # sd-scripts writes --new_rank and the last module's alpha; this is the most frequent (rank, alpha)
        # pair: the same for a file of one rank and alpha, and still true for the others.
        dim, alpha = _most_common(linear)
        updates["ss_network_dim"], updates["ss_network_alpha"] = str(dim), str(alpha)
        conv_dim, conv_alpha = _most_common(conv) if conv else ("", "")
    else:
        how = f"{choice.dynamic}: {float(choice.dynamic_param)}"  # type: ignore[arg-type]
        updates["ss_training_comment"] = f"Dynamic resize with {how} from {old_dim}; {comment}"
        updates["ss_network_dim"] = updates["ss_network_alpha"] = "Dynamic"
        conv_dim = conv_alpha = "Dynamic"
    network_args = updates.get("ss_network_args", source.metadata.get("ss_network_args"))
    if conv and (new_args := _with_conv(network_args, conv_dim, conv_alpha)) is not None:
        updates["ss_network_args"] = new_args
    return updates


def _most_common(modules: list[LoraModule]) -> tuple[int, float]:
    return Counter((m.rank, m.alpha) for m in modules).most_common(1)[0][0]


def _with_conv(network_args: str | None, conv_dim: object, conv_alpha: object) -> str | None:
    """ss_network_args (a JSON object of strings) with the new conv_dim / conv_alpha; None when it is not
    a JSON object (then it is left as it is)."""
    try:
        args = json.loads(network_args) if network_args else {}
    except json.JSONDecodeError:
        return None
    if not isinstance(args, dict):
        return None
    return json.dumps({**args, "conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)})


def format_report(report: ResizeReport) -> str:
    """The per-module table (module, rank before → after, new alpha, Frobenius norm retained) and a summary,
    for the CLI to print."""
    rows = report.modules
    width = max(len("module"), *(len(r.name) for r in rows))
    lines = [f"{'module':<{width}}  {'rank':>9}  {'alpha':>8}  fro retained"]
    for r in rows:
        lines.append(
            f"{r.name:<{width}}  {r.old_rank:>3} → {r.new_rank:<3}  {r.alpha:>8.4g}  {r.fro_retained:>11.2%}"
        )
    old = sorted({r.old_rank for r in rows})
    new = [r.new_rank for r in rows]
    worst = min(rows, key=lambda r: r.fro_retained)
    how = f"by {report.dynamic}" if report.dynamic else "fixed"
    lines += [
        "",
        f"{len(rows)} modules ({report.version}, {report.layout} layout), ranks {_span(old)} → {_span(new)} "
        f"({how}, mean new rank {statistics.fmean(new):.1f}).",
        f"Frobenius norm retained: mean {report.mean_fro_retained:.2%}, lowest {worst.fro_retained:.2%} "
        f"({worst.name}).",
        f"Wrote {report.output}",
    ]
    return "\n".join(lines)


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"
