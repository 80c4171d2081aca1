"""Stop a run cleanly on Ctrl-C, SIGTERM or a stop file: finish the optimizer step under way, save, say how to
resume.

The first SIGINT or SIGTERM only sets a flag, which the training loop reads after each step. The same signal
a second time raises KeyboardInterrupt at once (the CLI ends with code 130, no traceback); every save is
atomic, so the last saved state stays valid. A different second signal does not escalate: `torchrun` and
`accelerate launch` answer the terminal's Ctrl-C by sending SIGTERM to processes that already got the
SIGINT, and those should still finish their step and save. Under several processes the flag is summed over
them, so all stop after the same step.

`<output_dir>/STOP` (training/progress_file.py) sets the same flag, for programs that cannot send a signal
(on Windows); the main process looks for it when the loop asks whether to stop.

Fault injection, for the test suite only: `LORA_SCRIPTS_TEST_FAULT=<action>@<step>[:<rank>]` makes the
process (of that rank only, when given) signal or kill itself at a step (`sigint`, `sigint-twice`, `sigterm`,
`sigkill` after the step; `sigkill-in-save` half-way through writing that step's training state). It is
read in `FaultInjection.from_env` only, and nothing else in lora-scripts uses it; never set it for real
training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from lora_scripts.training.progress_file import STOP_FILE_NAME, StopFile

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FAULT_ENV = "LORA_SCRIPTS_TEST_FAULT"
_AFTER_STEP = {"sigint": 1, "sigint-twice": 2, "sigterm": 1, "sigkill": 1}
_ACTIONS = (*_AFTER_STEP, "sigkill-in-save")


class StopRequest:
    """Set by the first SIGINT/SIGTERM or the stop file; `signal_name` says which ("SIGINT", "STOP file"),
    None until then."""

    def __init__(self, stop_file: StopFile | None = None) -> None:
        self.signal_name: str | None = None
        self.stop_file = stop_file

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether to stop after this step: this process's flag, or any process's when there are several
        (a collective call: every process must make it after every step)."""
        if self.signal_name is None and self.stop_file is not None and self.stop_file.requested():
            self.signal_name = f"{STOP_FILE_NAME} file"
            log.warning("%s: stopping after this step and saving the training state", self.stop_file.path)
        wanted = self.signal_name is not None
        if accelerator.num_processes == 1:
            return wanted
        flag = torch.tensor([1.0 if wanted else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


@contextlib.contextmanager
def stop_on_signals(stop_file: StopFile | None = None) -> Iterator[StopRequest]:
    """Install the SIGINT/SIGTERM handlers described above for the `with` block, then put back the old ones;
    `stop_file` (the main process's) is looked for too.

    Outside the main thread (a UI running `train` in a worker) Python cannot install handlers: only the stop
    file then stops the run cleanly, and Ctrl-C behaves as it did.
    """
    request = StopRequest(stop_file)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if request.signal_name == name:
            raise KeyboardInterrupt
        if request.signal_name is None:
            request.signal_name = name
            log.warning(
                "%s: stopping after this step and saving the training state (press Ctrl-C again to stop at "
                "once; the last saved state stays valid)",
                name,
            )

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            # None: a handler not installed from Python; the default is the closest we can put back.
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def resume_command(config_path: str | Path, argv0: str, environ: Mapping[str, str] = os.environ) -> str:
    """The command that continues a stopped run, in the form the user started it: `python train.py`,
    `lora-scripts train`, or under a launcher (read from the variables it sets: accelerate launch sets
    ACCELERATE_MIXED_PRECISION in every process, torchrun TORCHELASTIC_RUN_ID) with the same number of
    processes, which a resume must keep."""
    is_script = Path(argv0).name == "train.py"
    program = [argv0] if is_script else ["-m", "lora_scripts", "train"]
    processes = environ.get("WORLD_SIZE", "1")
    if "ACCELERATE_MIXED_PRECISION" in environ:
        start = ["accelerate", "launch"]
        if processes != "1":
            start += ["--num_processes", processes]
        start += program
    elif "TORCHELASTIC_RUN_ID" in environ:
        start = ["torchrun", "--nproc_per_node", environ.get("LOCAL_WORLD_SIZE", processes), *program]
    elif is_script:
        start = ["python", argv0]
    else:
        start = ["lora-scripts", "train"]
    return shlex.join([*start, "--config", str(config_path), "--resume", "auto"])


@dataclass(frozen=True)
class FaultInjection:
    """The test suite's `LORA_SCRIPTS_TEST_FAULT` (see the module doc)."""

    action: str
    step: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultInjection | None:
        value = environ.get(FAULT_ENV)
        if not value:
            return None
        action, _, where = value.partition("@")
        step, _, rank = where.partition(":")
        if action not in _ACTIONS or not step.isdigit() or not (rank.isdigit() or rank == ""):
            raise ValueError(f"{FAULT_ENV}={value!r}: expected <{'|'.join(_ACTIONS)}>@<step>[:<rank>]")
        if rank and rank != environ.get("RANK", "0"):
            return None
        log.warning("%s=%s: test fault injection is on", FAULT_ENV, value)
        return cls(action, int(step))

    def after_step(self, step: int) -> None:
        """Signal or kill this process when `step` is the chosen one."""
        if step != self.step or self.action not in _AFTER_STEP:
            return
        sig = {"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}.get(self.action, signal.SIGINT)
        for _ in range(_AFTER_STEP[self.action]):
            os.kill(os.getpid(), sig)

    def during_save(self, step: int) -> None:
        """Kill this process half-way through saving the state of `step` (`sigkill-in-save`)."""
        if step == self.step and self.action == "sigkill-in-save":
            os.kill(os.getpid(), signal.SIGKILL)
