"""The benchmark report as a readable table (the JSON is `runner.build_report`'s dict as it is)."""

from __future__ import annotations

from lora_scripts.bench.measure import PHASES

_PHASE_LABELS = {
    "data": "data loading",
    "encode": "VAE + text encoder / cache read",
    "forward": "UNet forward + loss",
    "backward": "backward",
    "optimizer": "clip + optimizer + logging",
}


def _memory(mb: dict[str, float]) -> str:
    if "allocated" in mb:
        return f"{mb['allocated']:.0f} MB allocated / {mb['reserved']:.0f} MB reserved"
    return f"{mb['rss']:.0f} MB RSS"


def _batch(s: dict) -> str:
    """The batch per step, and the accumulation when memory_profile: low split it ("1 x 4 accumulated")."""
    per_step, accumulated = s.get("images_per_step", s["batch_size"]), s.get("gradient_accumulation_steps", 1)
    return f"{per_step} x {accumulated} accumulated" if accumulated > 1 else str(per_step)


def render_table(report: dict) -> str:
    """Settings, then ours vs reference (images/s, s/step, memory), then the phase breakdown; our loop alone
    when the report has no reference (SDXL), with the reason."""
    s = report["settings"]
    ours, ref = report["loops"]["ours"], report["loops"]["reference"]
    loops = [("ours", ours)] + ([("reference", ref)] if ref is not None else [])
    lines = [
        _header(s),
        f"device {report['device']} ({report['device_name']}), {report['torch_threads']} torch threads",
    ]
    if ref is None:
        lines.append(f"{report['reference_skipped']}.")

    def row(label: str, key: str, spec: str) -> str:
        return f"{label:<24}" + "".join(f"{format(loop[key], spec):>14}" for _, loop in loops)

    lines += [
        "",
        f"{'':<24}" + "".join(f"{name:>14}" for name, _ in loops),
        row("images/s", "images_per_sec", ".2f"),
        row("s/step", "s_per_step", ".4f"),
        row("setup (load, cache) s", "setup_s", ".2f"),
        row("mean loss" if ref is None else "mean loss (same draws)", "mean_loss", ".6f"),
    ]
    if ref is None:
        lines.append(f"peak memory: {_memory(ours['peak_memory_mb'])}")
    else:
        pairs = report["speedup_per_round"]
        memory = f"ours {_memory(ours['peak_memory_mb'])}, reference {_memory(ref['peak_memory_mb'])}"
        lines += [
            f"peak memory: {memory}",
            f"speedup: {report['speedup']:.2f}x (median of {len(pairs)} pairs of rounds, "
            f"{min(pairs):.2f}-{max(pairs):.2f}x)",
            f"UNet forward + backward: {100 * report['reference_unet_share']:.0f}% of the reference's step; "
            f"with them unchanged, the rest can give at most {report['speedup_bound_same_unet']:.2f}x",
        ]
    if report["flops_per_image"] is not None:
        flops = report["flops_per_image"]
        scaled = f"{flops / 1e12:.3f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.3f} GFLOP"
        lines.append(f"FLOPs per image (one training step, our loop): {scaled}")
    if report["mfu"] is not None:
        lines.append(f"MFU: {100 * report['mfu']:.1f}% of the device's bf16/fp16 peak")
    lines += ["", f"{'where the time goes (s/step)':<34}" + "".join(f"{name:>11}" for name, _ in loops)]
    for phase in PHASES:
        cells = "".join(f"{report['phases'][name][phase]:>11.4f}" for name, _ in loops)
        lines.append(f"{_PHASE_LABELS[phase]:<34}{cells}")
    totals = "".join(f"{loop['instrumented_s_per_step']:>11.4f}" for _, loop in loops)
    lines.append(f"{'total (instrumented run)':<34}{totals}")
    return "\n".join(lines) + "\n"


def _header(s: dict) -> str:
    checkpointing = s.get("effective_gradient_checkpointing", s["gradient_checkpointing"])
    header = (
        f"lora-scripts bench: model {s['model']}, {s['resolution']}², batch {_batch(s)}, "
        f"{s['steps']} steps after {s['warmup']} warm-up, precision {s['effective_precision']}, "
        f"cache {'on' if s['cache'] else 'off'}, gradient checkpointing {'on' if checkpointing else 'off'}"
    )
    if s.get("torch_compile"):
        header += ", torch.compile (ours)"
    if s.get("quantize_base", "no") != "no":
        header += f", UNet weights {s['quantize_base']}"
    if s.get("network_type", "lora") != "lora":
        header += f", network {s['network_type']} (ours; the reference trains a LoRA)"
    if s.get("memory_profile") == "low":
        header += f", memory_profile low ({s.get('effective_optimizer')})"
    return header
