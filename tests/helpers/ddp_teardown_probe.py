"""Run train.py (argv as given) with a probe on torch.distributed.destroy_process_group that prints how many
DistributedDataParallel wrappers are still alive then. One alive lets its Reducer drop the process group's
last reference while holding the GIL, which can hang the process at the end of a run (torch issue #56297)."""

from __future__ import annotations

import gc
import runpy
import sys
from pathlib import Path

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_destroy = dist.destroy_process_group


def _probed_destroy(*args: object, **kwargs: object) -> None:
    gc.collect()
    alive = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
    print(f"rank {dist.get_rank()}: {alive} DDP wrappers alive at destroy_process_group", flush=True)
    _destroy(*args, **kwargs)


dist.destroy_process_group = _probed_destroy
sys.argv = [str(Path(__file__).resolve().parents[2] / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
