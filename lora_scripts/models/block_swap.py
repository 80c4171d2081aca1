"""`blocks_to_swap`: the frozen weights of some transformer blocks live on the CPU and come to the GPU only
for their own forward (and, with gradient checkpointing, for the forward recomputed in the backward), the next
block's copy overlapping the current block's compute on a second CUDA stream.

sd-scripts (`custom_offloading_utils.ModelOffloader`) keeps a fixed set of device buffers and swaps weights
between blocks in place. Here the CPU copy is the only lasting one: frozen weights never change, so nothing
is ever copied back, and a block's device copy is freed once its forward is done (or its backward, which
holds it through autograd's saved tensors). The device holds the blocks that are not swapped, plus at most
two swapped blocks' weights at once (the one computing and the one arriving).

The trained LoRA weights in a swapped block stay on the device (the optimizer steps them there); only
frozen parameters and buffers move. Written by hand because neither accelerate's `cpu_offload` (hooks that
move whole modules, LoRA weights included, with no prefetch) nor diffusers' group offloading (inference
only, no backward recompute) trains with a LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Hosted:
    """One frozen tensor of a swapped block: where it goes back and its lasting copy on the host."""

    module: nn.Module
    name: str
    is_buffer: bool
    host: torch.Tensor


class BlockSwap:
    """Keeps `blocks`' frozen weights on `host` and lends them to `device` around each block's forward.

    `copy=True` copies even when `host` and `device` are the same (tests on a CPU: the swap then runs real
    copies, so that its hooks are exercised and its results compared bit for bit with no swap)."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        host: torch.device | str = "cpu",
        *,
        copy: bool = False,
    ):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.host = torch.device(host)
        self.copy = copy
        self.hosted: list[list[_Hosted]] = [[] for _ in self.blocks]
        self.arriving: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.resident: set[int] = set()
        self.peak_resident = 0  # the most swapped blocks on the device at once (logs and tests)
        self.moves_in = 0  # block copies brought to the device (each forward and each recompute)
        self._last = -1
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # --- placing the model ---

    @contextmanager
    def held_back(self, dtype: torch.dtype | None = None) -> Iterator[None]:
        """Around the caller's `model.to(device)`: the swapped blocks' frozen tensors are taken out of their
        modules (cast to `dtype` on the host, pinned for fast copies to a CUDA device) so that the move
        leaves them where they are, then put back as host tensors and the hooks installed."""
        pin = self._stream is not None
        for index, block in enumerate(self.blocks):
            hosted = []
            for module in block.modules():
                for name, tensor in list(module._parameters.items()):
                    if tensor is not None and not tensor.requires_grad:
                        hosted.append(_Hosted(module, name, False, _to_host(tensor, self.host, dtype, pin)))
                        module._parameters[name] = None
                for name, tensor in list(module._buffers.items()):
                    if tensor is not None:
                        hosted.append(_Hosted(module, name, True, _to_host(tensor, self.host, dtype, pin)))
                        module._buffers[name] = None
            self.hosted[index] = hosted
        try:
            yield
        finally:
            for index in range(len(self.blocks)):
                self._put(index, [entry.host for entry in self.hosted[index]])
            self._install()

    def hosted_bytes(self) -> int:
        """Bytes of the frozen weights kept off the device."""
        return sum(_nbytes(entry.host) for entries in self.hosted for entry in entries)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- the hooks ---

    def _install(self) -> None:
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._before(index)))
            self._handles.append(block.register_forward_hook(self._after(index)))

    def _before(self, index: int):
        def hook(module: nn.Module, args: object) -> None:
            # Blocks run in order in the forward and in reverse in the backward's recompute.
            step = 1 if index > self._last else -1
            self._last = index
            for stale in [i for i in self.arriving if i != index]:
                del self.arriving[stale]  # fetched for an order that did not come
            for done in [i for i in self.resident if i != index]:
                self._evict(done)  # a recompute that checkpointing stopped early skips the forward hook
            self._bring(index)
            self._arrive(index)
            following = index + step
            if 0 <= following < len(self.blocks):
                self._bring(following)
            self.peak_resident = max(self.peak_resident, len(self.resident) + len(self.arriving))

        return hook

    def _after(self, index: int):
        def hook(module: nn.Module, args: object, output: object) -> None:
            self._evict(index)

        return hook

    def _evict(self, index: int) -> None:
        """Block `index` back to its host tensors: its device copies are freed once nothing (autograd's saved
        tensors for its backward) holds them."""
        self._put(index, [entry.host for entry in self.hosted[index]])
        self.resident.discard(index)

    def _bring(self, index: int) -> None:
        """Start copying block `index`'s frozen tensors to the device (on the side stream with CUDA)."""
        if index in self.arriving or index in self.resident:
            return
        self.moves_in += 1
        hosts = [entry.host for entry in self.hosted[index]]
        if self._stream is None:
            self.arriving[index] = ([self._copy(host) for host in hosts], None)
            return
        with torch.cuda.stream(self._stream):
            copies = [self._copy(host) for host in hosts]
            event = torch.cuda.Event()
            event.record(self._stream)
        self.arriving[index] = (copies, event)

    def _arrive(self, index: int) -> None:
        """Put block `index`'s device copies in place once their copy is done."""
        if index in self.resident:
            return
        copies, event = self.arriving.pop(index)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in copies:  # made on the side stream, used on this one: free them only after its use
                for plain in _plain_tensors(tensor):
                    plain.record_stream(current)
        self._put(index, copies)
        self.resident.add(index)

    def _copy(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=True, copy=self.copy)

    def _put(self, index: int, tensors: list[torch.Tensor]) -> None:
        for entry, tensor in zip(self.hosted[index], tensors, strict=True):
            if entry.is_buffer:
                entry.module._buffers[entry.name] = tensor
            else:
                entry.module._parameters[entry.name] = nn.Parameter(tensor, requires_grad=False)


def _to_host(tensor: torch.Tensor, host: torch.device, dtype: torch.dtype | None, pin: bool) -> torch.Tensor:
    floating = (
        dtype is not None and tensor.is_floating_point() and type(tensor) in (torch.Tensor, nn.Parameter)
    )
    moved = tensor.detach().to(host, dtype=dtype if floating else None)
    if pin and type(moved) is torch.Tensor:
        moved = moved.pin_memory()
    return moved


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The ordinary tensors holding `tensor`'s data: itself, or the inner tensors of a tensor subclass
    (optimum-quanto's 8-bit weights keep their bytes and scales in two)."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [plain for name in names for plain in _plain_tensors(getattr(tensor, name))]


def _nbytes(tensor: torch.Tensor) -> int:
    return sum(plain.numel() * plain.element_size() for plain in _plain_tensors(tensor))
