"""TensorBoard under `logging_dir`, through accelerate's tracker: started (or continued after a resume
without duplicated steps), flushed and closed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator

from lora_scripts.config import TrainConfig


@contextlib.contextmanager
def trackers_closed_on_error(accelerator: Accelerator) -> Iterator[None]:
    """When the loop ends in an error (a NaN, a second Ctrl-C), TensorBoard still gets the points logged
    before it; a normal end closes the trackers in `accelerator.end_training()`."""
    try:
        yield
    except BaseException:
        for tracker in accelerator.trackers:
            tracker.finish()
        raise


def start_tensorboard(accelerator: Accelerator, config: TrainConfig, resumed_step: int | None) -> None:
    """Start TensorBoard logging under `logging_dir`. A resumed run first drops the points logged after its
    state's step (a killed run logs on past its last state), so the curve has each step once."""
    purge = {}
    if resumed_step is not None:
        purge = {"tensorboard": {"purge_step": resumed_step + 1}}
        wait_for_a_later_event_file_name(config.logging_dir)
    accelerator.init_trackers(config.output_name, init_kwargs=purge)


def wait_for_a_later_event_file_name(logging_dir: Path) -> None:
    """Wait (at most a second) until a new TensorBoard event file's name sorts after the folder's others.

    TensorBoard reads a folder's event files in name order, and a name starts with the second its writer was
    made (`events.out.tfevents.<seconds>.<host>.<pid>.<n>`): a resume started within the same second as the
    run it continues could be read first, and its purge of the later steps would then come too early.
    """
    seconds = []
    for path in Path(logging_dir).rglob("events.out.tfevents.*"):
        field = path.name.split(".")[3]
        if field.isdigit():
            seconds.append(int(field))
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)


def tensorboard_writer(accelerator: Accelerator):  # -> SummaryWriter | None
    """The run's TensorBoard SummaryWriter (main process, after init_trackers), else None."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            return tracker.writer
    return None


def purge_after(accelerator: Accelerator, step: int) -> None:
    """Make TensorBoard drop the points logged after `step` (as `SummaryWriter(purge_step=step + 1)` does
    when it starts), for a run that goes back to an earlier step without restarting."""
    writer = tensorboard_writer(accelerator)
    if writer is None:
        return
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    start = SessionLog(status=SessionLog.START)
    writer._get_file_writer().add_event(Event(step=step + 1, session_log=start))
