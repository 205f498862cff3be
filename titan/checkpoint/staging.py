"""`checkpoint.async_mode = "async_with_pinned_mem"`: the copy of the training state into host memory that a
background save writes from (a DCP `AsyncStager`; save.py hands it to `dcp.async_save`).

On CUDA the copy runs on a stream of its own so that it overlaps the next step's forward and backward, and is
ordered by two events instead of host waits:
  1. the copy stream waits for the compute stream as it is when the save starts, i.e. after the step's optimizer
     kernels: the copy never reads weights or Adam moments mid-update (DCP's own stager, torch 2.13, copies on a
     fresh stream from a worker thread without such a wait);
  2. the next `optimizer.step()` (a pre-hook, `before_update`) makes the compute stream wait for the copy to end,
     so the update cannot overwrite what is still being copied (torchtitan waits there too, on the host);
  3. the background writer waits for the copy on the host (a worker thread), then DCP writes the staged copy.
The host copy is pinned (page-locked) memory allocated at the first save and reused while the state's structure
stays the same; not /dev/shm: titan's writer is a thread, which needs no shared memory. Python values (the data
loader's and scheduler's state) are deep-copied at once. On a CPU run the copy is made at once and synchronously, in
the same order. Only a GPU can show the overlap and the absence of a race (scripts/gpu_check.py's checkpoint line).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.tensor import DTensor


class PinnedStager:
    """A DCP `AsyncStager`: `stage(state_dict)` returns the host copy (CPU run) or a Future of it (CUDA)."""

    _synchronize_after_execute = False  # DCP must not wait for the copy: it overlaps the next step

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._cache, self._layout = None, None  # the host copies, and the structure they were made for
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._copied = None  # the event that ends the last copy, until the next optimizer step waited for it
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="titan-stage") if self.cuda else None

    @property
    def should_synchronize_after_execute(self) -> bool:
        return self._synchronize_after_execute

    def stage(self, state_dict: dict):
        layout = _layout(state_dict)
        if layout != self._layout:
            pin = torch.cuda.is_available()
            self._cache, self._layout = _create_cpu_state_dict(state_dict, pin_memory=pin), layout
            if pin:
                _pin_scalars(self._cache)
        if not self.cuda:
            return _copy_state_dict(state_dict, self._cache, type_check=False)
        self._stream.wait_stream(torch.cuda.current_stream())  # 1: after the step's kernels
        with torch.cuda.stream(self._stream):
            staged = _copy_state_dict(state_dict, self._cache, non_blocking=True, type_check=False)
        for tensor in _device_tensors(state_dict):  # the allocator must not reuse a temporary the copy still reads
            tensor.record_stream(self._stream)
        copied = self._copied = torch.cuda.Event()
        copied.record(self._stream)
        return self._waiter.submit(_when_done, copied, staged)  # 3

    def before_update(self) -> None:
        """2: the compute stream waits (on the device, not the host) for the last copy before the weights change."""
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)
            self._copied = None

    def synchronize_staging(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.shutdown(wait=True)
        self._cache = self._layout = None


def _when_done(event, staged: dict) -> dict:
    event.synchronize()
    return staged


def _layout(value):
    """What the host copies depend on: the nesting, and each tensor's shape, dtype and kind (not the values)."""
    if isinstance(value, dict):
        return tuple((k, _layout(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_layout(v) for v in value)
    if isinstance(value, torch.Tensor):
        local = value._local_tensor if isinstance(value, DTensor) else value
        return isinstance(value, DTensor), tuple(value.shape), tuple(local.shape), value.dtype, local.device.type
    return type(value).__name__


def _pin_scalars(cache) -> None:
    """_create_cpu_state_dict leaves 0-d tensors in pageable memory (torch 2.13), and a non-blocking copy into
    pageable memory makes the host wait for the device: pin them too."""
    items = cache.items() if isinstance(cache, dict) else enumerate(cache) if isinstance(cache, list) else ()
    for key, value in items:
        if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim() == 0:
            cache[key] = value.pin_memory()
        elif isinstance(value, (dict, list)):
            _pin_scalars(value)


def _device_tensors(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _device_tensors(v)
    elif isinstance(value, torch.Tensor):
        local = value._local_tensor if isinstance(value, DTensor) else value
        if local.is_cuda:
            yield local

