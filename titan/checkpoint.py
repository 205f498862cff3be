"""Checkpoints: the training state saved and restored with torch.distributed.checkpoint (DCP), synchronously or in
the background; retention; the seed checkpoint; stopping cleanly on SIGTERM / SIGUSR1.

Owns the folder layout `<job.dump_folder>/<checkpoint.folder>/step-<N>` and when a checkpoint counts as complete. It
does not own the Hugging Face format (titan/hf.py) nor the loop (titan/train.py calls `end_of_step` once per step).

Crash safety: a save is written to `step-<N>.tmp` and renamed to `step-<N>` by rank 0 once DCP has finished on every
rank (DCP's coordinator writes `.metadata` only after gathering every rank's write results). A folder named
`step-<N>` is therefore complete; a `.tmp` one is an interrupted save, ignored with a warning when resuming and
deleted only once a newer checkpoint is complete.

What is saved, each under its own top-level key (names as in torchtitan, usable in `exclude_from_loading`):
  model, optimizer  sharded as they live (DTensors), so a resume at another FSDP/TP layout reshards on load
  lr_scheduler      LambdaLR state (the step count)
  dataloader        the loader's state; its `position` counts global samples and is the same on every rank, so DCP
                    keeps one copy (it de-duplicates identical non-sharded keys) and any dp size can continue it
  train_state       step, tokens seen, the RNG state of rank 0
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from titan.config import CHECKPOINT_STATES, DTYPES, Checkpoint, ConfigError
from titan.models.lora import is_adapter

logger = logging.getLogger("titan")

_STEP_DIR = re.compile(r"^step-(\d+)(\.tmp)?$")


# ---------------------------------------------------------------------------------------------------------------
# The state, as DCP `Stateful` objects: DCP calls state_dict() before saving / loading and load_state_dict() after.


class ModelState:
    """The model's (or this rank's pipeline stages') parameters under their unsharded names. `only`: "adapters"
    keeps LoRA's adapters (save_adapter_only), "base" everything else (initial weights for a LoRA model)."""

    def __init__(self, parts: list[torch.nn.Module], only: str | None = None):
        self.parts, self.only = parts, only

    def _wanted(self, name: str) -> bool:
        return self.only is None or is_adapter(name) == (self.only == "adapters")

    def state_dict(self) -> dict:
        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items() if self._wanted(k)}

    def load_state_dict(self, state: dict) -> None:
        # strict only for a whole model: a pipeline stage holds a subset of the names, a filtered state a part.
        options = StateDictOptions(strict=len(self.parts) == 1 and self.only is None)
        for part in self.parts:
            set_model_state_dict(part, state, options=options)


def load_initial_weights(parts: list[torch.nn.Module], cfg: Checkpoint, process_group=None) -> None:
    """checkpoint.initial_load_path's weights (a DCP checkpoint, or an HF folder with initial_load_in_hf) into the
    model's base weights; LoRA adapters keep their initial values. Nothing happens when no path is set."""
    if not cfg.initial_load_path:
        return
    path, key = Path(cfg.initial_load_path), "checkpoint.initial_load_path"
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    if cfg.initial_load_in_hf:
        from titan import hf

        hf.load_into(parts, path)
    else:
        if "model" not in _read_keys(path, key):
            raise ConfigError(f"{key}: {path} holds no model state")
        try:
            dcp.load({"model": ModelState(parts, only="base")}, checkpoint_id=str(path), process_group=process_group)
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            raise ConfigError(f"{key}: cannot load {path} ({_one_line(e)})") from None
    logger.info(f"checkpoint: initial weights from {path}")


class OptimizerState:
    """The optimizer state keyed by parameter name (not by position), so it reshards like the model."""

    def __init__(self, parts: list[torch.nn.Module], optimizer: torch.optim.Optimizer):
        if len(parts) != 1:
            # One optimizer over several stages' parameters has no single module to name them by.
            raise ConfigError("checkpoint.enable with more than one pipeline stage per rank is not supported yet "
                              "(use a single-stage schedule such as 1F1B)")
        self.part, self.optimizer = parts[0], optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.part, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.part, self.optimizer, state)


class TrainState:
    """Progress counters and the RNG state (dropout-free Llama draws no randoms while training; kept for
    extensions). The RNG state is rank 0's: DCP keeps one copy of a non-sharded key."""

    def __init__(self):
        self.step, self.tokens_seen = 0, 0

    def state_dict(self) -> dict:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])


# ---------------------------------------------------------------------------------------------------------------
# Folder scanning


def scan(folder: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    """({step: complete checkpoint}, {step: interrupted `.tmp` save}) in `folder` (empty if it does not exist)."""
    complete, partial = {}, {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                (partial if m.group(2) else complete)[int(m.group(1))] = p
    return complete, partial


def _read_keys(path: Path, what: str) -> set[str]:
    """Top-level state names stored in a DCP checkpoint; ConfigError naming `path` if it is not one."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - missing file, unpickling garbage, ...: all mean "not a checkpoint"
        raise ConfigError(f"{what}: {path} is not a readable checkpoint ({_one_line(e)})") from None
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, CheckpointException) and lines:
        text = lines[-1]  # it carries each failed rank's traceback; the last line is the error itself
    else:
        text = f"{type(e).__name__}: {' '.join(lines)}"
    return text if len(text) < 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------------------------


class Checkpointer:
    """Loads at start (`load`), saves at `interval` and the last step (`end_of_step`), stops after a save on
    SIGTERM/SIGUSR1, and waits for a background save at `close`. Every rank calls every method."""

    def __init__(self, cfg: Checkpoint, dump_folder: str, model_parts: list[torch.nn.Module],
                 optimizer: torch.optim.Optimizer, scheduler, dataloader, total_steps: int, hf_export=None,
                 adapters_only: bool = False):
        self.cfg, self.total_steps, self.hf_export = cfg, total_steps, hf_export
        self.adapters_only = adapters_only  # lora.save_adapter_only: save (and resume) the adapters alone
        self.folder = Path(dump_folder) / cfg.folder
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if cfg.create_seed_checkpoint and self.world_size > 1:
            raise ConfigError(f"checkpoint.create_seed_checkpoint runs on one process (got {self.world_size}); the "
                              f"weights do not depend on the layout")
        if cfg.last_save_in_hf and sum(len(p.layers) for p in model_parts) != model_parts[0].args.n_layers:
            raise ConfigError("checkpoint.last_save_in_hf is not supported with pipeline parallelism yet (a rank holds "
                              "only its stages); convert a step folder with scripts/convert_checkpoint.py to-hf")
        self.model_parts = model_parts
        self.train_state = TrainState()
        self.states = {"model": ModelState(model_parts, "adapters" if adapters_only else None),
                       "lr_scheduler": scheduler, "dataloader": dataloader,
                       "train_state": self.train_state}
        if cfg.enable:
            self.states["optimizer"] = OptimizerState(model_parts, optimizer)
        # Saves run their collectives on a gloo group of their own: a background save on the default group would
        # interleave with the training loop's collectives (gloo aborts: "data size doesn't match", torch 2.13).
        self._pg = dist.new_group(backend="gloo") if cfg.enable else None
        self._signal_pg = dist.new_group(backend="gloo") if cfg.enable and self.world_size > 1 else None
        self._pending: Future | None = None  # the background write + commit of the last async save
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="titan-ckpt") if cfg.async_mode != "disabled" \
            else None
        self._stager = self._pinned_stager() if cfg.enable and cfg.async_mode == "async_with_pinned_mem" else None
        self._signal: int | None = None
        self._old_handlers = None  # installed when the first step ends, restored by close()

    @property
    def step(self) -> int:
        """The last completed step (0 before training); the loop continues at step + 1."""
        return self.train_state.step

    # -- loading ----------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Resume from the newest complete checkpoint (or `load_step`); else start from `initial_load_path`'s
        weights if set; else keep the initialised weights."""
        cfg = self.cfg
        if cfg.create_seed_checkpoint:
            return
        complete, partial = scan(self.folder) if cfg.enable else ({}, {})
        for step, path in sorted(partial.items()):
            if self.rank == 0:
                logger.warning(f"checkpoint: ignoring incomplete {path} (interrupted save)")
        if cfg.enable and cfg.load_step != -1:
            if not self.folder.is_dir():
                raise ConfigError(f"checkpoint.load_step={cfg.load_step}: checkpoint folder {self.folder} does not "
                                  f"exist")
            if cfg.load_step not in complete:
                have = ", ".join(map(str, sorted(complete))) or "none"
                raise ConfigError(f"checkpoint.load_step={cfg.load_step}: no complete checkpoint "
                                  f"{self.folder / f'step-{cfg.load_step}'} (complete steps: {have})")
            self._load_base_for_adapters()
            self._load(complete[cfg.load_step], f"checkpoint.load_step={cfg.load_step}")
        elif complete:
            self._load_base_for_adapters()
            self._load(complete[max(complete)], "checkpoint.folder")
        else:
            load_initial_weights(self.model_parts, cfg, self._pg)

    def _load_base_for_adapters(self) -> None:
        """Adapter-only checkpoints (lora.save_adapter_only) hold no base weights: they come from where the run
        started."""
        if self.adapters_only:
            load_initial_weights(self.model_parts, self.cfg, self._pg)

    def _load(self, path: Path, what: str) -> None:
        start = time.perf_counter()
        stored = _read_keys(path, what)
        if "model" not in stored:
            raise ConfigError(f"{what}: {path} holds no model state (keys: {', '.join(sorted(stored))})")
        names = [n for n in CHECKPOINT_STATES if n in stored and n in self.states
                 and n not in self.cfg.exclude_from_loading]
        try:
            dcp.load({n: self.states[n] for n in names}, checkpoint_id=str(path), process_group=self._pg)
        # CheckpointException (a BaseException in torch 2.13) wraps whatever failed on each rank.
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - torn or garbled files: many types
            raise ConfigError(f"{what}: cannot load {path} ({_one_line(e)})") from None
        if "lr_scheduler" in names:
            # The saved lr was computed by the saving run's schedule; if training.steps changed since (a run extended
            # or shortened), the lr for the next step must come from this run's schedule: re-evaluate it.
            scheduler = self.states["lr_scheduler"]
            scheduler.last_epoch -= 1
            with warnings.catch_warnings():  # "step() before optimizer.step()": intended, nothing is skipped
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
        skipped = [n for n in CHECKPOINT_STATES if n not in names]
        logger.info(f"checkpoint: loaded {', '.join(names)} from {path} in {time.perf_counter() - start:.2f}s"
                    + (f" (not restored: {', '.join(skipped)})" if skipped else "")
                    + f"; continuing at step {self.step + 1}")

    # -- saving -----------------------------------------------------------------------------------------------

    def end_of_step(self, step: int, tokens: int) -> bool:
        """Count the step; save at `interval`, at the last step, or after a signal. True = stop now (signal)."""
        self.train_state.step = step
        self.train_state.tokens_seen += tokens
        if not self.cfg.enable:
            return False
        if self._old_handlers is None and threading.current_thread() is threading.main_thread():
            self._old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        stop = self._signalled()
        last = step == self.total_steps
        if stop or last or step % self.cfg.interval == 0:
            self.save(step, model_only=last and self.cfg.model_only)
        if last and self.cfg.last_save_in_hf and self.hf_export is not None:
            self.export_hf(step)
        if stop:
            logger.info(f"checkpoint: received {signal.Signals(self._signal or signal.SIGTERM).name}; saved step "
                        f"{step}, exiting")
        return stop

    def save(self, step: int, model_only: bool = False) -> None:
        """Write step-<N>: in the foreground, or (async) stage a copy, write it in the background, return."""
        self.wait()  # one save at a time: the next reuses the gloo group and may supersede the previous folder
        start = time.perf_counter()
        tmp = self.folder / f"step-{step}.tmp"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash at this step before the resume
            tmp.mkdir(parents=True)
        dist.barrier(group=self._pg)  # nobody writes into the folder before it is fresh
        if model_only:
            dtype = DTYPES[self.cfg.export_dtype]
            state = {"model": {k: v.to(dtype) for k, v in self.states["model"].state_dict().items()}}
        else:
            state = dict(self.states)
        if self.cfg.async_mode == "disabled":
            dcp.save(state, checkpoint_id=str(tmp), process_group=self._pg)
            self._commit(step)
            logger.info(f"checkpoint: saved {self.folder / f'step-{step}'} in {time.perf_counter() - start:.2f}s")
            return
        result = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._pg, async_stager=self._stager)
        if self._stager is not None:  # AsyncSaveResponse: wait for the copy into pinned memory only
            result.staging_completion.result()
            result = result.upload_completion
        self._pending = self._committer.submit(self._commit_when_written, result, step)
        logger.info(f"checkpoint: staged step {step} in {time.perf_counter() - start:.2f}s, writing in the background")

    def save_seed(self) -> None:
        """step-0: the initialised weights only, in fp32 (create_seed_checkpoint)."""
        tmp = self.folder / "step-0.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        dcp.save({"model": self.states["model"].state_dict()}, checkpoint_id=str(tmp))
        self._commit(0)
        logger.info(f"checkpoint: wrote seed checkpoint {self.folder / 'step-0'}")

    def export_hf(self, step: int) -> None:
        """The model as a Hugging Face folder <folder>/step-<N>-hf (gathered to rank 0, which writes it)."""
        self.wait()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = {k: v for part in self.model_parts for k, v in get_model_state_dict(part, options=options).items()}
        if self.rank == 0:
            out = self.folder / f"step-{step}-hf"
            self.hf_export(full, out, DTYPES[self.cfg.export_dtype])
            logger.info(f"checkpoint: exported {out} (Hugging Face format)")

    def _commit_when_written(self, upload: Future, step: int) -> None:
        start = time.perf_counter()
        upload.result()  # raises if the background write failed: no commit then
        self._commit(step)
        seconds = time.perf_counter() - start
        logger.info(f"checkpoint: saved {self.folder / f'step-{step}'} (background write {seconds:.2f}s "
                    f"after staging)")

    def _commit(self, step: int) -> None:
        """Rank 0 renames step-N.tmp -> step-N: from here on the checkpoint counts. Then retention."""
        if self.rank != 0:
            return
        final, tmp = self.folder / f"step-{step}", self.folder / f"step-{step}.tmp"
        if final.exists():
            shutil.rmtree(final)  # an older save of this step (the run was resumed from before it)
        os.replace(tmp, final)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
        self._purge()

    def _purge(self) -> None:
        """Keep the newest keep_latest_k complete checkpoints (>= 1, so never the only one) and drop interrupted
        saves older than the newest complete one."""
        complete, partial = scan(self.folder)
        newest = max(complete)
        doomed = [p for s, p in partial.items() if s < newest]
        if self.cfg.keep_latest_k > 0:
            doomed += [complete[s] for s in sorted(complete)[: -self.cfg.keep_latest_k]]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    def wait(self) -> None:
        """Block until the background save (if any) is written and committed; re-raises its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    # -- signals ----------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum  # acted on at the end of the current step, on every rank together

    def _signalled(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1; all ranks must agree, so one tiny all-reduce per step (on a CPU
        gloo group: no device sync)."""
        flag = torch.tensor(0 if self._signal is None else self._signal)
        if self._signal_pg is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._signal_pg)
        if flag.item() and self._signal is None:
            self._signal = int(flag.item())
        return bool(flag.item())

    def _pinned_stager(self):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if not torch.cuda.is_available():
            logger.info("checkpoint: async_with_pinned_mem needs CUDA; staging to ordinary CPU memory")
            return None
        # Pinned + shared buffers are allocated once and reused by every save; the copy is non-blocking.
        return DefaultStager(StagingOptions(True, True, True, True))

    def close(self) -> None:
        """Wait for a background save (a job must not exit before its last checkpoint is written)."""
        try:
            self.wait()
        finally:
            if self._committer is not None:
                self._committer.shutdown(wait=True)
            if self._stager is not None:
                self._stager.close()
            for sig, handler in (self._old_handlers or {}).items():
                signal.signal(sig, handler)
            self._old_handlers = None
