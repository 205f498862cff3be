"""Measure what a real run holds, for tests/test_dry_run.py to hold the dry run's figures against.

`SavedActivations` counts the bytes one forward pass leaves alive for backward: every storage an op creates during
the forward is watched through a weak reference, and after the forward the storages still alive (other than
parameters and buffers) are what autograd, activation checkpointing and the pipeline keep. It sees inside
checkpointed blocks, where `torch.autograd.graph.saved_tensors_hooks` cannot (checkpointing installs its own hooks,
innermost, and they win); on a forward without checkpointing the two counts agree (a test checks it).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _local(t):
    return t._local_tensor if isinstance(t, DTensor) else t


def storages(modules) -> set[int]:
    """Data pointers of the storages of the modules' parameters and buffers (local shards, gathered FSDP weights)."""
    ptrs = set()
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            t = _local(t)
            if t.device.type != "meta":
                ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


class SavedActivations(TorchDispatchMode):
    """`with SavedActivations() as probe: out = forward()`, then `probe.live_bytes(exclude)`."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, StorageWeakRef] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                t = _local(t)
                if t.device.type != "meta":
                    storage = t.untyped_storage()
                    ref = self._refs.get(storage._cdata)
                    if ref is None or ref.expired():  # a freed storage's address taken by a new one: track the new
                        self._refs[storage._cdata] = StorageWeakRef(storage)
        return out

    def live_bytes(self, exclude: set[int]) -> int:
        total = 0
        for ref in self._refs.values():
            if ref.expired():
                continue
            storage = torch.UntypedStorage._new_with_weak_ptr(ref.cdata)
            # FSDP frees gathered weights by resizing their storage to 0 bytes.
            if storage is None or not storage.nbytes():
                continue
            try:
                ptr = storage.data_ptr()
            except RuntimeError:  # a wrapper subclass's (funcol's AsyncCollectiveTensor): its data is an inner op's
                continue
            if ptr not in exclude:
                total += storage.nbytes()
        return total


def hooked_saved_bytes(fn, exclude: set[int]) -> tuple[object, int]:
    """(fn(), bytes autograd saved for backward, by saved_tensors_hooks: distinct storages, less `exclude`)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = _local(t).untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def local_state_bytes(model_parts, optimizer) -> dict[str, int]:
    """Parameter, gradient and Adam-moment bytes of this rank's local shards (after an optimizer step)."""
    params = {id(p): p for part in model_parts for p in part.parameters()}.values()
    nbytes = lambda t: _local(t).numel() * t.element_size()  # noqa: E731
    moments = sum(nbytes(state[k]) for state in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    return {"params": sum(nbytes(p) for p in params),
            "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": moments}
