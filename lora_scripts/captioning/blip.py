"""BLIP sentence captions through transformers (`BlipForConditionalGeneration` + `BlipProcessor`).

`load_blip` resolves the model (a local folder or a hub id), picks the device, and turns every way loading
can fail into one UserError sentence, before any image is read. The hub is never allowed to stall a run:
when it cannot be reached, the model comes from the local cache or the run stops with the command that
downloads it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from PIL import Image

from lora_scripts.devices import pick_device
from lora_scripts.errors import UserError

DEFAULT_BLIP_MODEL = "Salesforce/blip-image-captioning-base"
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}

logger = logging.getLogger(__name__)


class BlipCaptioner:
    """A loaded BLIP model: `caption(images)` returns one lower-case sentence per RGB image, in order."""

    name = "blip"

    def __init__(
        self,
        model: torch.nn.Module,
        processor: object,
        device: torch.device,
        *,
        max_new_tokens: int = 40,
        num_beams: int = 1,
    ) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        # fp16 halves memory and roughly doubles speed on GPUs; CPUs lack fast fp16 kernels.
        self.dtype = torch.float16 if device.type in ("cuda", "mps") else torch.float32
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.model.to(device=device, dtype=self.dtype).eval()

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        """Greedy (num_beams=1) or beam-search captions; deterministic either way (no sampling)."""
        if not images:
            return []
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        try:
            tokens = self.model.generate(
                pixel_values=pixels.to(self.device, self.dtype),
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
                do_sample=False,
            )
        except torch.cuda.OutOfMemoryError as exc:  # = torch.OutOfMemoryError, which torch < 2.5 lacks
            raise UserError(
                f"--batch-size {len(images)}: out of {self.device.type} memory while captioning; "
                "lower --batch-size or --num-beams."
            ) from exc
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]


def load_blip(
    model: str = DEFAULT_BLIP_MODEL,
    *,
    device: str | None = None,
    max_new_tokens: int = 40,
    num_beams: int = 1,
) -> BlipCaptioner:
    """Load BLIP from a local folder or a hub id onto `device` (None: cuda, then mps, then cpu).

    Raises UserError for a bad option, a missing folder, an unknown hub id, or a model neither reachable
    nor cached.
    """
    problems = []
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens: {max_new_tokens} is out of range; use 1 or more (default 40).")
    if num_beams < 1:
        problems.append(f"--num-beams: {num_beams} is out of range; use 1 (greedy) or more (beam search).")
    if problems:
        raise UserError(problems)
    torch_device = pick_device(device)
    source, local_files_only = _resolve_source(model)
    try:
        # Imported here: transformers takes seconds to import, and only a run that captions needs it.
        from transformers import BlipForConditionalGeneration, BlipProcessor

        processor = BlipProcessor.from_pretrained(source, local_files_only=local_files_only)
        blip = BlipForConditionalGeneration.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise UserError(_load_failure_message(model, source, local_files_only, exc)) from exc
    logger.info("Loaded BLIP %s on %s", model, torch_device)
    return BlipCaptioner(blip, processor, torch_device, max_new_tokens=max_new_tokens, num_beams=num_beams)


def _resolve_source(model: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only) for a `--model` value.

    A hub id is probed with one request first: huggingface_hub retries unreachable hosts with backoff for
    minutes per file, so an offline machine would otherwise sit silently before failing.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise UserError(f"--model: '{model}' is a file; pass the folder holding config.json, or a hub id.")
    if _looks_like_path(model):
        raise UserError(
            f"--model: folder '{model}' not found; pass the folder holding the model's config.json, or a "
            f"hub id such as {DEFAULT_BLIP_MODEL}."
        )
    if _offline_mode():
        return model, True
    return model, not _hub_reachable(model)


def _looks_like_path(model: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else the user typed must be meant as a folder."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or model.endswith("/")


def _offline_mode() -> bool:
    # The constant is read by huggingface_hub at import; the variable may have been set after that.
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in _OFFLINE_VALUES
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _hub_reachable(repo_id: str) -> bool:
    """True if the hub answers for `repo_id`; False if it cannot be reached. Raises UserError if the hub
    says the repository does not exist (or is gated)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().repo_info(repo_id, timeout=10)
    except GatedRepoError as exc:
        raise UserError(
            f"--model: '{repo_id}' is gated on the Hugging Face Hub; accept its terms on huggingface.co and "
            "log in with `hf auth login`, or pass a local folder."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise UserError(
            f"--model: '{repo_id}' is neither a local folder nor a model on the Hugging Face Hub; check "
            f"the name (default {DEFAULT_BLIP_MODEL}) or pass the folder holding config.json."
        ) from exc
    except HfHubHTTPError:
        return False  # a 5xx or a proxy page: try the cache
    except Exception:  # noqa: BLE001 - each huggingface_hub version raises its own HTTP library's errors
        return False
    return True


def _load_failure_message(model: str, source: str, local_files_only: bool, exc: Exception) -> str:
    """One sentence for a failed from_pretrained, saying how to get a working model."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if Path(source).is_dir():
        return (
            f"--model: '{model}' is not a BLIP captioning model folder ({reason}); it needs config.json, "
            "the weights, preprocessor_config.json and the tokenizer files, e.g. from "
            f"`hf download {DEFAULT_BLIP_MODEL} --local-dir <folder>`."
        )
    if local_files_only:
        return (
            f"--model: '{model}' is not in the Hugging Face cache and the hub cannot be reached (offline); "
            f"download it once with `hf download {model}` (`huggingface-cli download {model}` with an older "
            "huggingface_hub), or pass --model <folder> with a downloaded copy."
        )
    return (
        f"--model: '{model}' could not be loaded ({reason}); check that it is a BLIP captioning model, or "
        "pass --model <folder> with a downloaded copy."
    )
