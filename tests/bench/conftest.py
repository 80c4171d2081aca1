"""The bench tests' small settings, a module-wide workspace (images + the tiny model) and a loss runner."""

from __future__ import annotations

import pytest
from accelerate.utils import set_seed

from lora_scripts.bench.measure import PhaseClock
from lora_scripts.bench.workspace import BenchSettings, make_images, prepare_base_model

SETTINGS = BenchSettings(steps=2, warmup=1, batch_size=2, num_images=4, device="cpu")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_images(root / "data", SETTINGS.image_count, SETTINGS.image_size)
    return root, prepare_base_model(root, "tiny")


def losses_of(loop, steps: int) -> list[float]:
    """`steps` steps from seed 0, their losses; the loop is closed afterwards (its TensorBoard run ends)."""
    set_seed(0)
    clock = PhaseClock(loop.device, sync=False)
    clock.start()
    losses = [loop.step(clock).item() for _ in range(steps)]
    loop.close()
    return losses
