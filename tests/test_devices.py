"""Device choice shared by label and generate."""

import pytest
import torch

from lora_scripts.devices import pick_device
from lora_scripts.errors import UserError


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type in {"cpu", "cuda", "mps"}
    with pytest.raises(UserError, match="--device: 'toaster' is not a device"):
        pick_device("toaster")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_a_user_error():
    with pytest.raises(UserError, match="not available on this machine"):
        pick_device("cuda")
