"""transformers' adapter API refusing the installed peft, as transformers >= 5.24 does with peft 0.21.

Our text-encoder LoRA must not depend on that API (it is attached and read through peft itself), so tests
run training and generation with every one of its methods raising the error transformers raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

VETO_MESSAGE = "The version of PEFT you are using is not compatible, please use a version >= 99.0.0"
_METHODS = (
    "add_adapter",
    "load_adapter",
    "set_adapter",
    "enable_adapters",
    "disable_adapters",
    "delete_adapter",
    "get_adapter_state_dict",
)


@contextmanager
def transformers_refuses_peft() -> Iterator[None]:
    from transformers.integrations.peft import PeftAdapterMixin

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError(VETO_MESSAGE)

    with pytest.MonkeyPatch.context() as patch:
        for name in _METHODS:
            patch.setattr(PeftAdapterMixin, name, refuse)
        yield
