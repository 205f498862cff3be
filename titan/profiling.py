"""torch.profiler traces and CUDA memory snapshots of the training loop, set by `[profiling]` (torchtitan's names).

`Profiler` is a context manager the loop enters once around its steps, calling `.step()` after each step. With
`enable_profiling` it profiles step `profile_freq`, `2 * profile_freq`, ... (after up to 3 warm-up steps, which
torch.profiler records but discards) and writes one Chrome trace per rank to
`<dump_folder>/<save_traces_folder>/iteration_<step>/rank<r>_trace.json` (open it in chrome://tracing or
https://ui.perfetto.dev). With `enable_memory_snapshot` (CUDA only) it records the CUDA caching allocator's history
and dumps `<dump_folder>/<save_memory_snapshot_folder>/iteration_<step>/rank<r>_memory_snapshot.pickle` at the same
steps, and once more into `iteration_<step>_exit/` when the loop ends with an exception (e.g. out of memory); view it
at https://pytorch.org/memory_viz. `HostReads` counts the step's host syncs from Python's side
(tests/test_host_syncs.py, scripts/gpu_check.py on CPU). It owns no step timing (that is `titan.metrics.StepTimer`).
"""

from __future__ import annotations

import collections
import logging
import os
import traceback
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titan.config import Profiling
from titan.errors import ConfigError

logger = logging.getLogger("titan")

WARMUP_STEPS = 3  # steps torch.profiler records and discards before the profiled one (fewer if profile_freq is small)
MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept (torchtitan's value); older ones are dropped


class Profiler:
    """`with Profiler(...) as profiler:` around the loop, `profiler.step()` after every training step; a no-op when
    both features are off. Raises ConfigError for a memory snapshot on a non-CUDA device (there is no CPU
    allocator history to record), so the run stops at start-up instead of training without what was asked for."""

    def __init__(self, cfg: Profiling, dump_folder: str, rank: int, device: torch.device, first_step: int = 1):
        if cfg.enable_memory_snapshot and torch.device(device).type != "cuda":
            raise ConfigError("profiling.enable_memory_snapshot needs a CUDA device (it records the CUDA caching "
                              "allocator); use profiling.enable_profiling for CPU traces")
        self.cfg, self.rank, self.device = cfg, rank, torch.device(device)
        self.trace_folder = os.path.join(dump_folder, cfg.save_traces_folder)
        self.snapshot_folder = os.path.join(dump_folder, cfg.save_memory_snapshot_folder)
        self.step_num = first_step - 1  # the last completed training step
        self._torch_profiler: torch.profiler.profile | None = None

    def __enter__(self) -> Profiler:
        freq = self.cfg.profile_freq
        if self.cfg.enable_profiling:
            warmup = min(WARMUP_STEPS, freq - 1)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch_profiler = torch.profiler.profile(
                activities=activities,
                # One cycle is profile_freq steps: wait, warm up, then record the cycle's last step.
                schedule=torch.profiler.schedule(wait=freq - 1 - warmup, warmup=warmup, active=1),
                on_trace_ready=self._save_trace,
                record_shapes=True,
            )
            self._torch_profiler.__enter__()
            # Aligns the schedule with the training step (a resumed run starts past 1), as torchtitan does.
            self._torch_profiler.step_num = self.step_num
            logger.info(f"profiling: a trace every {freq} steps to {self.trace_folder}")
        if self.cfg.enable_memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            logger.info(f"profiling: CUDA memory snapshots every {freq} steps to {self.snapshot_folder}")
        return self

    def step(self) -> None:
        """Call once after each training step."""
        self.step_num += 1
        if self._torch_profiler is not None:
            self._torch_profiler.step()  # saves the trace (via _save_trace) when the profiled step just ended
        if self.cfg.enable_memory_snapshot and self.step_num % self.cfg.profile_freq == 0:
            self._dump_snapshot(f"iteration_{self.step_num}")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._torch_profiler is not None:
            self._torch_profiler.__exit__(exc_type, exc, tb)
            self._torch_profiler = None
        if self.cfg.enable_memory_snapshot:
            if exc_type is not None:  # e.g. torch.OutOfMemoryError: the history shows what filled the memory
                self._dump_snapshot(f"iteration_{self.step_num + 1}_exit")
            torch.cuda.memory._record_memory_history(enabled=None)

    def _save_trace(self, prof: torch.profiler.profile) -> None:
        folder = os.path.join(self.trace_folder, f"iteration_{self.step_num}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{self.rank}_trace.json")
        prof.export_chrome_trace(path)
        logger.info(f"profiling: wrote {path}")

    def _dump_snapshot(self, name: str) -> None:
        folder = os.path.join(self.snapshot_folder, name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{self.rank}_memory_snapshot.pickle")
        torch.cuda.memory._dump_snapshot(path)
        logger.info(f"profiling: wrote {path}")


# ---------------------------------------------------------------------------------------------------------------
# Host reads: every place the host waits for a tensor's value


HOST_PIPELINE = (f"titan{os.sep}data{os.sep}", f"torch{os.sep}utils{os.sep}data{os.sep}", f"torchdata{os.sep}")


class HostReads(TorchDispatchMode):
    """`with HostReads() as reads:` records every read of a tensor's value by the host, with the line of titan
    (or the first caller outside torch) that made it. On CUDA each one makes the host wait until the device has
    computed that value (a sync); on CPU nothing waits, but the same calls are made, so a CPU run counts the syncs a
    GPU run would have. Counted: scalar reads (`.item()`, `float()`, `bool()` of a tensor: `_local_scalar_dense`),
    `.tolist()` and `.numpy()` (patched: they read memory without dispatching an op), ops whose output size
    depends on the data (`nonzero`, `masked_select`, boolean indexing, `unique`, `bincount`, `repeat_interleave`
    without `output_size`, ...), tensors made from Python data (`torch.tensor`, `new_tensor`: a copy from pageable
    host memory on CUDA) and copies between devices. Not counted: reads made by `host_code` (by default the input
    pipeline, titan/data and torch's data loaders, whose tensors are on the host in a GPU run too), and tensors for
    which `ignore(tensor)` is true."""

    _DATA_DEPENDENT = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "bincount",
                       "equal", "_local_scalar_dense", "lift_fresh", "lift_fresh_copy"}

    def __init__(self, ignore: Callable[[torch.Tensor], bool] = lambda t: False,
                 host_code: tuple[str, ...] = HOST_PIPELINE):
        super().__init__()
        self.ignore, self.host_code, self.reads = ignore, host_code, []  # reads: (what, where)
        self._patched: dict[str, Callable] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if self._reads_host(name, func, args, kwargs) and not (args and isinstance(args[0], torch.Tensor)
                                                                and self.ignore(args[0])):
            self._record(name)
        return func(*args, **kwargs)

    @staticmethod
    def _reads_host(name: str, func, args, kwargs) -> bool:
        if name in HostReads._DATA_DEPENDENT:
            return True
        if name == "repeat_interleave":  # with a tensor of repeats, the output size is their sum
            return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
        if name in ("index", "index_put", "index_put_"):  # a boolean mask index is a nonzero inside
            return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device") or src.device
            return isinstance(src, torch.Tensor) and torch.device(dst).type != src.device.type
        return False

    def _record(self, what: str) -> None:
        stack = traceback.extract_stack()
        if not any(part in frame.filename for frame in stack for part in self.host_code):
            self.reads.append((what, _caller(stack)))

    def __enter__(self):
        for method in ("tolist", "numpy"):
            original = self._patched[method] = getattr(torch.Tensor, method)

            def reading(tensor, *args, _original=original, _method=method, **kwargs):
                if not self.ignore(tensor):
                    self._record(_method)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, reading)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched.items():
            setattr(torch.Tensor, method, original)
        self._patched = {}
        return super().__exit__(*exc)

    def where(self) -> dict[str, int]:
        """{"what at file:line": count}."""
        return dict(collections.Counter(f"{what} at {site}" for what, site in self.reads))


def _caller(stack) -> str:
    """file:line of the innermost frame outside torch and this file."""
    here = os.path.abspath(__file__)
    for frame in stack[::-1]:
        path = os.path.abspath(frame.filename)
        if path != here and f"{os.sep}torch{os.sep}" not in path:
            return f"{os.path.relpath(path)}:{frame.lineno}"
    return "?"
