"""Training metrics: one fixed-width log line per logged step, TensorBoard scalars, `metrics.jsonl`, MFU and memory.

Owns the FLOPs-per-token formula, the table of accelerator peaks, `MetricsLogger` and the loop's `StepTimer`. It does
not reduce values across ranks: the loop passes globally reduced numbers and only rank 0 prints or writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import sys
import time
from dataclasses import dataclass

import torch

from titan.config import Metrics
from titan.trackers import flatten, open_trackers

logger = logging.getLogger("titan")

GiB = 2**30


def setup_logging() -> None:
    """titan's log lines on stdout: info and up on global rank 0, warnings and errors on the other ranks."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(format="[titan %(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout, force=True)


def num_flops_per_token(
    num_params: int, num_embedding_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int
) -> float:
    """Training FLOPs (forward + backward) per token, the PaLM appendix B / torchtitan convention.

    6 per non-embedding parameter (2 forward + 4 backward for each multiply-add; the embedding is a lookup, not a
    matmul) plus the attention scores and weighted sum: forward 2 * 2 * n_heads * head_dim * seq_len per layer,
    times 3 for forward + backward. The causal mask is not discounted, as in PaLM and torchtitan.
    """
    return 6 * (num_params - num_embedding_params) + 12 * n_layers * n_heads * head_dim * seq_len


@dataclass(frozen=True)
class _Peak:
    """Dense (no 2:4 sparsity) peak FLOP/s of one device, from the vendor's datasheet."""

    bf16: float
    tf32: float | None  # None: not published, or not knowable from torch settings (see MI300X)
    fp32: float | None  # fp32 matmuls without TF32


# First match wins: each row lists the tokens the lower-cased `torch.cuda.get_device_name()` must contain, e.g.
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "AMD Instinct MI300X".
# Whole tokens, so "L4" does not match "L40S" and "H20" does not match "H200".
_PEAKS: list[tuple[tuple[str, ...], _Peak]] = [
    (("gb200",), _Peak(2.5e15, 1.25e15, 80e12)),  # per GPU of a GB200 NVL72
    (("b200",), _Peak(2.25e15, 1.125e15, 75e12)),  # HGX B200, per GPU
    (("h200", "nvl"), _Peak(835e12, 417.5e12, 60e12)),
    (("h200",), _Peak(989.5e12, 494.5e12, 67e12)),  # H200 SXM: same compute as H100 SXM
    (("h100", "nvl"), _Peak(835e12, 417.5e12, 60e12)),
    (("h100", "pcie"), _Peak(756e12, 378e12, 51e12)),
    (("h100", "hbm2e"), _Peak(756e12, 378e12, 51e12)),  # some PCIe boards report their memory, not their form
    (("h100",), _Peak(989.5e12, 494.5e12, 67e12)),  # SXM reports as "H100 80GB HBM3"
    (("a100",), _Peak(312e12, 156e12, 19.5e12)),  # SXM and PCIe, 40 and 80 GB
    (("a10g",), _Peak(125e12, 62.5e12, 31.2e12)),  # NVIDIA publishes no A10G sheet; these are the A10's
    (("l40s",), _Peak(362e12, 183e12, 91.6e12)),
    (("l4",), _Peak(121e12, 60e12, 30.3e12)),
    # ROCm reports AMD GPUs as "cuda" devices. TF32 (xf32) on ROCm also depends on HIPBLASLT_ALLOW_TF32, so which
    # peak applies to an fp32 run is unknowable from torch alone: None rather than a guess.
    (("mi325x",), _Peak(1307.4e12, None, 163.4e12)),
    (("mi300x",), _Peak(1307.4e12, None, 163.4e12)),
]


def _lookup_peak(device_name: str) -> _Peak | None:
    tokens = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    for required, peak in _PEAKS:
        if tokens.issuperset(required):
            return peak
    return None


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one `device` for matmuls in `dtype`; None on CPU or an unknown device (never a guess).

    bf16 and fp16 use the bf16 column (same rate on every listed GPU); float8 training also does, so its MFU is in
    bf16-equivalent FLOPs and comparable with a bf16 run. fp32 uses the TF32 peak when
    `torch.backends.cuda.matmul.allow_tf32` is on (also set by `torch.set_float32_matmul_precision("high")`).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = _lookup_peak(torch.cuda.get_device_name(device))
    if peak is None:
        return None
    if dtype in (torch.bfloat16, torch.float16) or (dtype.is_floating_point and dtype.itemsize == 1):
        return peak.bf16
    if dtype == torch.float32:
        return peak.tf32 if torch.backends.cuda.matmul.allow_tf32 else peak.fp32
    return None


def keep_earlier_metrics(path: str) -> None:
    """A run starting at step 1 beside an earlier run's non-empty metrics.jsonl: move that file to the first free
    metrics.<n>.jsonl (a new run must never truncate what another logged)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    stem = path[: -len(".jsonl")]
    n = 1
    while os.path.exists(f"{stem}.{n}.jsonl"):
        n += 1
    os.replace(path, f"{stem}.{n}.jsonl")
    logger.warning(f"metrics: {path} held an earlier run's steps; moved it to {stem}.{n}.jsonl (this run starts at "
                   f"step 1)")


def _format_eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Called every step on every rank; on logged steps rank 0 prints one line and appends to jsonl / TensorBoard.

    A step is logged when it is the first this logger sees (step 1, or the first step after a resume), a multiple
    of `cfg.log_freq`, or the last. Throughput and step time are averaged over all steps since the previous log;
    loss, grad norm, lr and extras are the logged step's own values.

    `<dump_folder>/metrics.jsonl` is appended to by a run resumed from a checkpoint (`append=True`); a run that
    starts at step 1 first moves an earlier run's file to metrics.<n>.jsonl (`keep_earlier_metrics`: never
    truncated), so metrics.jsonl describes one history. It gets one JSON object per logged step (`step`, `loss`,
    `grad_norm`, `lr`, `tps`, `tps_per_device`, `mfu` (percent, null without a known peak), `step_time`,
    `data_time` (when the loop passes it), `memory_gib`, extras such as `skipped_steps`; an extra that is a dict,
    e.g. MoE's `expert_load`, goes to the file and TensorBoard but not the printed line) and `{"step", "val_loss",
    ...}` per validation, flushed line by line so a crash keeps what was logged.
    Non-finite values are written as NaN / Infinity, which Python's json reads back.
    """

    def __init__(
        self,
        cfg: Metrics,
        dump_folder: str,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        flops_per_token: float,
        peak_flops: float | None,
        total_steps: int,
        extra_header: str = "",
        append: bool = False,
        run_config: dict | None = None,
    ):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.flops_per_token, self.peak_flops, self.total_steps = flops_per_token, peak_flops, total_steps
        self._step_width = len(str(total_steps))
        self._tokens, self._time, self._steps = 0, 0.0, 0  # since the last log
        self._data_time: float | None = None  # since the last log, when the loop reports it
        self._logged_any = False
        self._jsonl = self._tb = None
        self._trackers = []  # W&B, MLflow (titan/trackers.py): the TensorBoard scalars, under the same tags
        if rank != 0:
            return
        os.makedirs(dump_folder, exist_ok=True)
        path = os.path.join(dump_folder, "metrics.jsonl")
        if not append:
            keep_earlier_metrics(path)
        self._jsonl = open(path, "a")
        if cfg.enable_tensorboard:
            # Imported lazily: tensorboard costs ~1 s to import and is unused when disabled or off rank 0.
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(dump_folder, "tb"))
        if cfg.wandb or cfg.mlflow:
            self._trackers = open_trackers(cfg, dump_folder, run_config)
        peak = f"{peak_flops / 1e12:.1f} TFLOP/s per device" if peak_flops else "unknown for this device (MFU n/a)"
        header = f"metrics: every {cfg.log_freq} steps, {flops_per_token:.3e} FLOPs/token, peak {peak}"
        logger.info(header + (f"; {extra_header}" if extra_header else ""))

    # -----------------------------------------------------------------------------------------------------------

    def step(self, step: int, *, loss: float, grad_norm: float, lr: float, tokens: int, step_time: float,
             data_time: float | None = None, force: bool = False, **extra: float) -> None:
        """Record one training step; `tokens` counts each token of the whole job once, `step_time` in seconds, of
        which `data_time` waiting for the batch (averaged over the window like step_time into jsonl `data_time`).
        `force` logs the step whatever log_freq says (the loop forces skipped steps)."""
        if self.rank != 0:
            return
        self._tokens += tokens
        self._time += step_time
        self._data_time = None if data_time is None else (self._data_time or 0.0) + data_time
        self._steps += 1
        if self._logged_any and step % self.cfg.log_freq and step != self.total_steps and not force:
            return
        self._logged_any = True
        # float() here, not per step: a caller may pass 0-d tensors and pay the device sync only on logged steps.
        loss, grad_norm, lr = float(loss), float(grad_norm), float(lr)
        details = {k: _plain(v) for k, v in extra.items() if isinstance(v, dict)}  # jsonl and TensorBoard only
        extra = {k: float(v) for k, v in extra.items() if k not in details}
        # tps counts each token once, so dividing by the world size gives what each device contributes even
        # with TP / PP / CP, where several devices work on the same tokens.
        tps = self._tokens / self._time if self._time > 0 else 0.0
        tps_per_device = tps / self.world_size
        avg_step_time = self._time / self._steps
        timing = {} if self._data_time is None else {"data_time": self._data_time / self._steps}
        mfu = 100 * self.flops_per_token * tps_per_device / self.peak_flops if self.peak_flops else None
        mem, mem_text = self._memory()
        eta = avg_step_time * max(0, self.total_steps - step)
        self._tokens, self._time, self._steps, self._data_time = 0, 0.0, 0, None

        mfu_text = f"{mfu:6.2f}%" if mfu is not None else f"{'n/a':>7}"
        line = (
            f"step {step:>{self._step_width}d}  loss {loss:8.4f}  grad_norm {grad_norm:8.4f}  lr {lr:.3e}  "
            f"tok/s {tps:>12,.0f} ({tps_per_device:>10,.0f}/dev)  mfu {mfu_text}  {mem_text}  "
            f"step_time {avg_step_time:7.3f}s  eta {_format_eta(eta):>8}"
        )
        line += "".join(f"  {k} {v:.4g}" for k, v in extra.items())
        logger.info(line)

        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tps": tps,
                  "tps_per_device": tps_per_device, "mfu": mfu, "step_time": avg_step_time, **timing, **mem, **extra,
                  **details}
        self._write(record)
        if self._tb is not None or self._trackers:
            scalars = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr,
                       "throughput/tps": tps, "throughput/tps_per_device": tps_per_device,
                       "time/step_time_s": avg_step_time, **{f"time/{k}_s": v for k, v in timing.items()},
                       **{f"memory/{k}": v for k, v in mem.items()},
                       **{f"train/{k}": v for k, v in extra.items()}}
            if mfu is not None:
                scalars["throughput/mfu_pct"] = mfu
            self._tb_write(step, {**scalars, **flatten(details, "train")})

    def validation(self, step: int, *, loss: float, **extra: float) -> None:
        """Record one validation result (already averaged over the validation batches and ranks)."""
        if self.rank != 0:
            return
        loss, extra = float(loss), {k: float(v) for k, v in extra.items()}
        logger.info(
            f"validate step {step:>{self._step_width}d}  val_loss {loss:8.4f}"
            + "".join(f"  val_{k} {v:.4g}" for k, v in extra.items())
        )
        self._write({"step": step, "val_loss": loss, **{f"val_{k}": v for k, v in extra.items()}})
        if self._tb is not None or self._trackers:
            self._tb_write(step, {"val/loss": loss, **{f"val/{k}": v for k, v in extra.items()}})

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []

    # -----------------------------------------------------------------------------------------------------------

    def _memory(self) -> tuple[dict[str, float], str]:
        """Peak memory since the previous log as (jsonl fields, printed text)."""
        if self.device.type == "cuda":
            alloc = torch.cuda.max_memory_allocated(self.device) / GiB
            reserved = torch.cuda.max_memory_reserved(self.device) / GiB
            # Peaks per logging window, so a spike shows at the step that caused it rather than forever after.
            torch.cuda.reset_peak_memory_stats(self.device)
            # Since start: cudaMalloc retries (the allocator freed its cache to satisfy a request: memory is nearly
            # full and steps slow down) and out-of-memory errors caught and survived.
            stats = torch.cuda.memory_stats(self.device)
            retries, ooms = stats.get("num_alloc_retries", 0), stats.get("num_ooms", 0)
            return ({"memory_gib": alloc, "memory_reserved_gib": reserved, "alloc_retries": retries, "ooms": ooms},
                    f"mem {alloc:6.2f}/{reserved:6.2f} GiB (max alloc/reserved) retries {retries} ooms {ooms}")
        # The process's peak RSS since start (it cannot be reset); Linux reports KiB, macOS bytes.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / GiB
        return {"memory_gib": rss}, f"peak_rss {rss:6.2f} GiB"

    def _write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()  # one line per log step: a crash keeps everything logged so far

    def _tb_write(self, step: int, scalars: dict[str, float | list[float]]) -> None:
        plain = {tag: value for tag, value in scalars.items() if not isinstance(value, list)}
        for tracker in self._trackers:
            tracker.log(step, plain)
        if self._tb is None:
            return
        for tag, value in scalars.items():
            if isinstance(value, list):  # e.g. a layer's tokens per expert: a histogram per step
                self._tb.add_histogram(tag, torch.tensor(value, dtype=torch.float32), step)
            else:
                self._tb.add_scalar(tag, value, step)
        self._tb.flush()  # the default is every 120 s; a log step is rare enough to flush each time


def _plain(value):
    """Nested dicts of tensors / numbers -> the same of floats and lists of floats (for JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return [float(v) for v in value.tolist()]
    return float(value)


class StepTimer:
    """Wall time of each training step and of named regions inside it (`with timer("data"): ...`).

    `lap()` returns the seconds since the previous lap (or `start()`) and the regions' seconds within it, so a step's
    time includes everything the loop did since the last step, e.g. a blocking checkpoint save. A region entered
    with `in_step=False` (validation) is reported but its time is left out of the step's.

    By default it only reads `time.perf_counter()`, adding no host-device sync to the loop; on CUDA the regions then
    measure how long the host took to issue the work. With `sync=True` (scripts/benchmark.py) it synchronises the
    CUDA device before every clock read, so regions measure the device's work, at the cost of those syncs.
    `history` keeps every lap as {"step": s, region: s, ...} when `keep_history=True`.
    """

    def __init__(self, device: torch.device | str = "cpu", *, sync: bool = False, keep_history: bool = False):
        self.device = torch.device(device)
        self.sync = sync and self.device.type == "cuda"
        self.history: list[dict[str, float]] | None = [] if keep_history else None
        self._regions: dict[str, float] = {}
        self._excluded = 0.0
        self._last = time.perf_counter()

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)  # the queued kernels belong to the region that issued them
        return time.perf_counter()

    def start(self) -> None:
        """Start the first step's clock (and forget regions timed before)."""
        self._regions, self._excluded = {}, 0.0
        self._last = self._now()

    @contextlib.contextmanager
    def __call__(self, name: str, *, in_step: bool = True):
        begin = self._now()
        try:
            yield
        finally:
            seconds = self._now() - begin
            self._regions[name] = self._regions.get(name, 0.0) + seconds
            if not in_step:
                self._excluded += seconds

    def lap(self) -> tuple[float, dict[str, float]]:
        """(step seconds, {region: seconds}) since the previous lap; regions not entered are absent."""
        now = self._now()
        step_time, regions = now - self._last - self._excluded, self._regions
        self._last, self._regions, self._excluded = now, {}, 0.0
        if self.history is not None:
            self.history.append({"step": step_time, **regions})
        return step_time, regions
