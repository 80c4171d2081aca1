"""Named sets of LoRA target layers (`target_modules: kohya`), resolved to full module paths.

sd-scripts (networks/lora.py) picks layers by the class of the block that holds them:
    UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]          every Linear and 1x1 Conv2d inside
    UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]   with conv_dim
    TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
The `kohya` presets and `locon_targets` do the same by class name, so a file trained here has the modules an
sd-scripts file of the same settings has (diffusers' and sd-scripts' UNet class names agree).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lora_scripts.errors import UserError
from lora_scripts.models.lora import check_targets, matching_module_names

UNET_PRESETS = ("attn", "attn-ff", "kohya")
TEXT_ENCODER_PRESETS = ("attn", "attn-mlp", "kohya")
FLUX_PRESETS = ("attn", "kohya")

_UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
_TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
# T5 (FLUX.1's T5-XXL, sd-scripts' lora_te3) names its layers otherwise: SelfAttention's q, k, v, o, and
# the gated MLP's wi_0, wi_1, wo. The text-encoder presets take these blocks' Linears on an encoder that has
# none of CLIP's names, so one preset (or the default, CLIP's attention names) covers CLIP-L and T5 together.
_T5_ATTENTION_BLOCKS = ("T5Attention",)
_T5_MLP_BLOCKS = ("T5DenseGatedActDense",)

_KOHYA_UNET_BLOCKS = ("Transformer2DModel",)
# sd-scripts' TEXT_ENCODER_TARGET_REPLACE_MODULE, T5's classes included (FLUX's lora_te3).
_KOHYA_TEXT_ENCODER_BLOCKS = (
    "CLIPAttention",
    "CLIPSdpaAttention",
    "CLIPMLP",
    "T5Attention",
    "T5DenseGatedActDense",
)
# FLUX (diffusers' FluxTransformer2DModel): both streams' attention projections; sd-scripts' default trains
# every Linear of its DoubleStreamBlock and SingleStreamBlock, diffusers' FluxTransformerBlock and
# FluxSingleTransformerBlock (qkv, projections, MLPs and the modulation layers).
_FLUX_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_KOHYA_FLUX_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
_LOCON_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def _inside_blocks(module: nn.Module, block_classes: tuple[str, ...], keep: Callable[[nn.Module], bool]):
    """Full paths of the layers inside blocks whose class name is in `block_classes` that `keep` accepts,
    in module order, each once. By class name, as sd-scripts does, so any UNet implementation works."""
    found: dict[str, None] = {}
    for block_name, block in module.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for child_name, child in block.named_modules():
            # Layers peft already wraps count once, by their own name (not `.base_layer` / `.lora_A.x`).
            if not child_name or ".lora_" in f".{child_name}" or not keep(child):
                continue
            path = f"{block_name}.{child_name}" if block_name else child_name
            found[path.removesuffix(".base_layer")] = None
    return list(found)


def _is_linear(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear)


def _text_encoder_layers(encoder: nn.Module, clip_names: list[str], t5_blocks: tuple[str, ...]) -> list[str]:
    """CLIP's layers `clip_names`, or on a T5 encoder (which has none of them) the Linears of `t5_blocks`."""
    return matching_module_names(encoder, clip_names) or _inside_blocks(encoder, t5_blocks, _is_linear)


def text_encoder_preset(targets: list[str] | str) -> list[str] | str:
    """`targets` as each text encoder reads them: the default, CLIP's attention names (q_proj, k_proj, v_proj,
    out_proj, in any order), is the `attn` preset, so that it means T5's attention on FLUX.1's T5 too."""
    if not isinstance(targets, str) and sorted(targets) == sorted(_TEXT_ENCODER_ATTENTION):
        return "attn"
    return targets


def _is_linear_or_1x1(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))


def _is_spatial_conv(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)


def kohya_locon_linear_targets(unet: nn.Module) -> list[str]:
    """The Linear and 1x1 conv layers of the LoCon blocks (resnets' time_emb_proj and conv_shortcut):
    sd-scripts trains them at the linear rank whenever conv_dim is set, so the `kohya` preset with conv_rank
    adds them too, and sd-scripts LoCon files continue here unchanged (network_weights)."""
    return _inside_blocks(unet, _LOCON_BLOCKS, _is_linear_or_1x1)


def unet_lora_layers(
    unet: nn.Module, targets: list[str] | str, *, conv: bool, key: str = "target_modules"
) -> tuple[list[str], list[str]]:
    """(layers at lora_rank, 3x3 convs at conv_rank) of the UNet; what training and `check` both adapt."""
    linear = resolve_targets(unet, targets, key=key, component="UNet", presets=UNET_PRESETS)
    if not conv:
        return linear, []
    if targets == "kohya":
        linear = list(dict.fromkeys([*linear, *kohya_locon_linear_targets(unet)]))
    return linear, locon_targets(unet)


def resolve_lora_layers(
    unet: nn.Module,
    text_encoders: list[nn.Module],
    targets: object,
    *,
    conv: bool,
    presets: tuple[str, ...] = UNET_PRESETS,
    component: str = "UNet",
) -> tuple[list[str], list[str], list[list[str]] | None]:
    """(denoiser layers at lora_rank, 3x3 convs at conv_rank, each text encoder's layers or None when the
    text encoders stay frozen) for `targets` (a models.family.LoraTargets). The denoiser is a UNet (presets
    UNET_PRESETS) or FLUX's transformer (FLUX_PRESETS, no convs). Raises one UserError listing every target
    that matches nothing, denoiser and text encoders together."""
    unet_targets: list[str] = []
    conv_targets: list[str] = []
    te_targets: list[list[str]] | None = None
    problems: list[str] = []
    try:
        if presets == UNET_PRESETS:
            unet_targets, conv_targets = unet_lora_layers(unet, targets.unet, conv=conv)  # type: ignore[attr-defined]
        else:
            unet_targets = resolve_targets(
                unet,
                targets.unet,
                key="target_modules",
                component=component,
                presets=presets,  # type: ignore[attr-defined]
            )
    except UserError as err:
        problems += err.messages
    if targets.text_encoder is not None:  # type: ignore[attr-defined]
        te_targets = []
        mask = targets.text_encoder_mask or (True,) * len(text_encoders)  # type: ignore[attr-defined]
        for number, (encoder, trained) in enumerate(zip(text_encoders, mask, strict=True), start=1):
            if not trained:  # a frozen encoder (FLUX.1's T5 by default): its names need not match
                te_targets.append([])
                continue
            component = "text encoder" if len(text_encoders) == 1 else f"text encoder {number}"
            try:
                te_targets.append(
                    resolve_targets(
                        encoder,
                        text_encoder_preset(targets.text_encoder),  # type: ignore[attr-defined]
                        key="text_encoder_target_modules",
                        component=component,
                        presets=TEXT_ENCODER_PRESETS,
                    )
                )
            except UserError as err:
                problems += [m for m in err.messages if m not in problems]
    if problems:
        raise UserError(problems)
    return unet_targets, conv_targets, te_targets


def locon_targets(unet: nn.Module) -> list[str]:
    """The convs LoCon (`conv_rank`) adapts: every non-1x1 Conv2d inside ResnetBlock2D, Downsample2D and
    Upsample2D (resnet conv1/conv2 and the down/upsampler convs; not conv_in/conv_out, not the 1x1
    conv_shortcut)."""
    return _inside_blocks(unet, _LOCON_BLOCKS, _is_spatial_conv)


_PRESET_RULES: dict[tuple[str, ...], dict[str, Callable[[nn.Module], list[str]]]] = {
    UNET_PRESETS: {
        "attn": lambda m: matching_module_names(m, _UNET_ATTENTION),
        "attn-ff": lambda m: matching_module_names(m, [*_UNET_ATTENTION, "ff.net.0.proj", "ff.net.2"]),
        "kohya": lambda m: _inside_blocks(m, _KOHYA_UNET_BLOCKS, _is_linear_or_1x1),
    },
    FLUX_PRESETS: {
        "attn": lambda m: matching_module_names(m, _FLUX_ATTENTION),
        "kohya": lambda m: _inside_blocks(m, _KOHYA_FLUX_BLOCKS, _is_linear),
    },
    TEXT_ENCODER_PRESETS: {
        "attn": lambda m: _text_encoder_layers(m, _TEXT_ENCODER_ATTENTION, _T5_ATTENTION_BLOCKS),
        "attn-mlp": lambda m: _text_encoder_layers(
            m, [*_TEXT_ENCODER_ATTENTION, "mlp.fc1", "mlp.fc2"], (*_T5_ATTENTION_BLOCKS, *_T5_MLP_BLOCKS)
        ),
        "kohya": lambda m: _inside_blocks(m, _KOHYA_TEXT_ENCODER_BLOCKS, _is_linear_or_1x1),
    },
}


def resolve_targets(
    module: nn.Module, targets: list[str] | str, *, key: str, component: str, presets: tuple[str, ...]
) -> list[str]:
    """Full paths of the layers of `module` to adapt.

    targets: a preset name from `presets` (UNET_PRESETS or TEXT_ENCODER_PRESETS), or a list of layer names
        matched as peft does (the full path or a dotted suffix of it).
    Raises UserError for an unknown preset, or (naming each) list entries that match no layer.
    """
    if isinstance(targets, str):
        rules = _PRESET_RULES[presets]
        if targets not in rules:
            raise UserError(
                f"{key}: '{targets}' is not a preset; use one of {', '.join(presets)}, "
                "or a list of layer names."
            )
        names = rules[targets](module)
        if not names:
            raise UserError(
                f"{key}: preset '{targets}' matches no layer of the {component}; give a list of layer names."
            )
        return names
    check_targets(module, list(targets), key=key, component=component)
    return matching_module_names(module, targets)
