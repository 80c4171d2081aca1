"""Config keys that keep a run from being lost: training state and resume, overwrite protection, the NaN
policy, and validation with the best checkpoint. Mixed into `TrainConfig` (schema.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator
from pydantic_core import PydanticCustomError

from lora_scripts.config.fields import Float, Int, PathValue, field

NanPolicy = Literal["stop", "rollback"]


def _resume(value: Any) -> Any:
    """`auto`, or the path of a saved state folder."""
    if isinstance(value, str) and not value.strip():
        raise PydanticCustomError("lora_empty", "is empty (write auto, or the path of a state folder)", {})
    return value


class StateKeys(BaseModel):
    """Training state, resume and overwrite protection (section "saving")."""

    resume: Annotated[str, BeforeValidator(_resume)] | None = field(
        "saving",
        "Continue an interrupted run: 'auto' takes the newest state in output_dir/state (starting fresh if "
        "there is none), a path takes that state folder. Steps, learning-rate schedule, data order and "
        "random numbers continue exactly, so the result equals an uninterrupted run.",
        None,
        default_doc="none (start a new run)",
        allowed_doc="auto, or a state folder",
    )
    save_state: bool = field(
        "saving",
        "Save the full training state (LoRA, optimizer, schedule, random numbers, data position) with every "
        "save_steps file, and when training is stopped with Ctrl-C, so the run can be resumed.",
        True,
    )
    save_last_n_states: Int = field(
        "saving",
        "How many saved training states to keep in output_dir/state; older ones are deleted.",
        2,
        ge=1,
    )
    overwrite: bool = field(
        "saving",
        "Allow training into an output_dir that already holds another run's files: they are first moved to "
        "output_dir/previous_runs/YYYYmmdd-HHMMSS/ (nothing is deleted). Without it such a run stops before "
        "anything is written.",
        False,
    )


class SafetyKeys(BaseModel):
    """What happens when the loss goes bad, and validation (section "validation")."""

    nan_policy: NanPolicy = field(
        "validation",
        "What to do when the loss becomes NaN or infinite: 'stop' (save nothing more, name the likely "
        "causes and the last good file) or 'rollback' (go back to the last saved state with half the "
        "learning rate and carry on).",
        "stop",
    )
    validation_split: Float = field(
        "validation",
        "Fraction of the training images held out to measure a validation loss (0.1 = one in ten); 0 "
        "turns it off unless validation_data_dir is set.",
        0.0,
        ge=0,
        lt=1,
    )
    validation_data_dir: PathValue | None = field(
        "validation",
        "Folder of captioned images to measure a validation loss on: captions from its own metadata.csv if "
        "it has one, else from caption files (caption_extension) beside the images.",
        None,
        default_doc="none",
    )
    validate_every_n_steps: Int | None = field(
        "validation",
        "Measure the validation loss every this many steps (and at the end); the checkpoint with the lowest "
        "one is kept as <output_name>-best.safetensors.",
        None,
        default_doc="none (at the end only, when validation is on)",
        ge=1,
    )
    early_stopping_patience: Int | None = field(
        "validation",
        "Stop when the validation loss has not improved for this many validations in a row.",
        None,
        default_doc="none (never stop early)",
        ge=1,
    )
