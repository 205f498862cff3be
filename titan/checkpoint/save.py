"""Saving checkpoints: the `Checkpointer` the loop talks to. It writes the training state (state.py) with
torch.distributed.checkpoint (DCP), in the foreground or in the background, at `checkpoint.interval`, the last step
and on a stop request; the seed checkpoint; the Hugging Face export of the last step. At start it loads through
resume.py (which checkpoint a run continues from). The folder on disk (manifests with checksums and lineage, the
commit, recovery, retention) is store.py's; stopping on a signal is titan/lifecycle.py's; the loop
(titan/train.py) calls `end_of_step` once per step.

Crash safety: a save is written to `step-<N>.tmp`; once DCP has finished on every rank (its coordinator writes
`.metadata` only after gathering every rank's write results), every rank checksums its own files, rank 0 writes
`manifest.json` and renames the folder to `step-<N>`. A `step-<N>` folder is therefore complete, and its manifest says
what its files must hold. An interrupted save (`.tmp` without a manifest) is ignored and deleted once a newer
checkpoint is complete; an interrupted commit is finished at the next start. Retention deletes only older checkpoints
of this run's own lineage (see store.py:purge).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from titan.checkpoint.resume import Resume
from titan.checkpoint.staging import PinnedStager
from titan.checkpoint.state import ModelState, OptimizerState, TrainState, load_initial_weights, one_line
from titan.checkpoint.store import (
    DIVERGED,
    checksums,
    data_files,
    kill_point,
    lineage_members,
    new_run_id,
    owner,
    publish,
    purge,
    set_aside,
    write_manifest,
)
from titan.config import DTYPES, Checkpoint
from titan.errors import ConfigError
from titan.lifecycle import EXIT_SAVE_FAILED, RunFailed, agree, os_error
from titan.parallel.process_group import barrier, gather_objects, new_group

logger = logging.getLogger("titan")
MiB = 2**20


def _failure(e: BaseException, folder: Path, needed: int) -> str:
    """Why a save failed, in a few words: the errno of the first rank that hit an OSError (DCP wraps each rank's
    exception, with its traceback, in a CheckpointException). A full disk does not always raise one: torch.save's
    writer reports "unexpected pos 704 vs 598" (torch 2.13), so the free space is looked at too."""
    failures = [(rank, f[0] if isinstance(f, tuple) else f) for rank, f in sorted(getattr(e, "failures", {}).items())]
    for rank, exc in failures or [(None, e)]:
        if isinstance(exc, OSError):
            return os_error(exc) + ("" if rank is None else f", on rank {rank}")
    text = str(e) if isinstance(e, _SaveError) else one_line(failures[0][1] if failures else e)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return text
    if free < needed:
        return f"ENOSPC: No space left on device, {free / MiB:.1f} MiB free; {text}"
    return text


class _SaveError(Exception):
    """A save failed on some rank: every rank raises it with the same text (lifecycle.agree)."""


class Checkpointer:
    """Loads at start (`load`), saves at `interval`, the last step and on request (`end_of_step`), and waits for a
    background save at `close`. Every rank calls every method."""

    def __init__(self, cfg: Checkpoint, dump_folder: str, model_parts: list[torch.nn.Module],
                 optimizer: torch.optim.Optimizer, scheduler, dataloader, total_steps: int, hf_export=None,
                 adapters_only: bool = False, tokenizer=None, run_config: str = "", adapter_export=None,
                 semi_sync=None, base=("", "")):
        self.cfg, self.total_steps, self.hf_export = cfg, total_steps, hf_export
        self.adapter_export = adapter_export  # LoRA: (parts, folder, group) -> writes the PEFT folder (titan/peft.py)
        self.adapters_only = adapters_only  # lora.save_adapter_only: save (and resume) the adapters alone
        self.folder = Path(dump_folder) / cfg.folder
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if cfg.create_seed_checkpoint and self.world_size > 1:
            raise ConfigError(f"checkpoint.create_seed_checkpoint runs on one process (got {self.world_size}); the "
                              f"weights do not depend on the layout")
        self.model_parts = model_parts
        # `base`: what adapter-only checkpoints were trained on (state.py:base_identity), checked on resume.
        self.train_state = TrainState(getattr(tokenizer, "identity", ""), getattr(tokenizer, "name", ""), run_config,
                                      base if adapters_only else ("", ""))
        self.train_state.tokenizer_aliases.add(getattr(tokenizer, "file_identity", ""))  # titan's earlier record
        # DiLoCo (`semi_sync`, titan/parallel/semi_sync.py): each replica group saves its own weights (state.py).
        replica = getattr(semi_sync, "replica", 0)
        self.states = {"model": ModelState(model_parts, "adapters" if adapters_only else None, replica),
                       "lr_scheduler": scheduler, "dataloader": dataloader,
                       "train_state": self.train_state}
        if cfg.enable:
            self.states["optimizer"] = OptimizerState(model_parts, optimizer, replica)
        if cfg.enable and hasattr(semi_sync, "state_dict"):
            self.states["semi_sync"] = semi_sync
        # Saves run their collectives on a gloo group of their own: a background save on the default group would
        # interleave with the training loop's collectives (gloo aborts: "data size doesn't match", torch 2.13).
        self._pg = new_group(backend="gloo") if cfg.enable else None  # with the run's timeout
        self._pending: tuple[Future, int, Path] | None = None  # the background write + commit of the last async save
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="titan-ckpt") if cfg.async_mode != "disabled" \
            else None
        self._stager = None
        if cfg.enable and cfg.async_mode == "async_with_pinned_mem":  # see staging.py
            self._stager = PinnedStager(_device(model_parts))
            optimizer.register_step_pre_hook(lambda *_: self._stager and self._stager.before_update())
        self.run_id = new_run_id()  # only rank 0's is written anywhere
        self.parent: dict | None = None  # {"step", "run"} of the checkpoint this run resumed from
        self.lineage = [[self.run_id, None]]  # see store.py:lineage_after
        self.newest: Path | None = None  # the newest committed checkpoint of this run's history
        self._owed = False  # a save fell due at a skipped step: the next updated step makes it
        # A step the guard lets through confirms the state of every earlier step (see `_confirm`): `_good` is the
        # lineage key (run's position, step) up to which states are known good; `_unconfirmed` a commit's step that
        # retention looks at again once confirmed.
        self._good, self._unconfirmed = (0, -1), None

    @property
    def step(self) -> int:
        """The last completed step (0 before training); the loop continues at step + 1."""
        return self.train_state.step

    @property
    def resumed(self) -> bool:
        return self.parent is not None

    @property
    def resumed_config(self) -> str:
        """The resolved config (TOML) of the run that saved the loaded checkpoint; "" if none was recorded."""
        return self.train_state.loaded.get("config", "")

    def load(self) -> None:
        """Resume from the newest complete checkpoint that passes its integrity check (or `load_step`; see
        resume.py); else start from `initial_load_path`'s weights if set; else keep the initialised weights."""
        cfg = self.cfg
        if cfg.create_seed_checkpoint:
            return
        resume = Resume(cfg, self.folder, self._pg) if cfg.enable else None
        choice = resume.choose(estimated_bytes(self.model_parts, "optimizer" in self.states)) if resume else None
        if choice is None:
            load_initial_weights(self.model_parts, cfg, self._pg)
            return
        step, path, aside = choice
        if self.adapters_only:  # adapter-only checkpoints hold no base weights: they come from where the run started
            load_initial_weights(self.model_parts, cfg, self._pg)
        resume.load(path, self.states, self.train_state)
        self.parent, self.lineage = resume.settle(step, path, aside, self.run_id)
        self.newest = path
        self._good = (len(self.lineage) - 2, step - 1)  # the loaded state is judged by this run's first step

    # -- saving -----------------------------------------------------------------------------------------------

    def end_of_step(self, step: int, tokens: int, skipped_steps: int, *, updated: bool = True,
                    force: bool = False) -> None:
        """Count the step; save at `interval`, at the last step, or when `force`d (a stop request). A step whose
        update was skipped is never saved: a save due then is made at the next updated step."""
        self.train_state.step = step
        self.train_state.tokens_seen += tokens
        self.train_state.skipped_steps = skipped_steps
        if not self.cfg.enable:
            return
        if updated:
            self._confirm(step - 1)
        last = step == self.total_steps
        if not (force or last or self._owed or step % self.cfg.interval == 0):
            return
        if not updated:
            self._owed = True
            if self.rank == 0:
                logger.warning(f"checkpoint: not saving step {step}, whose update was skipped; {self.newest_text()}")
            return
        self._owed = False
        self.save(step, model_only=last and self.cfg.model_only)
        if last and self.cfg.last_save_in_hf and self.hf_export is not None:
            self.export_hf(step)

    def newest_text(self) -> str:
        return f"the newest checkpoint is {self.newest}" if self.newest else "no checkpoint has been saved"

    def _confirm(self, step: int) -> None:
        """The state after `step` is good: the guard let the next step through, and a step's loss is computed on the
        weights the previous update made. Retention may now count the save of that step as the last good one. No
        collective: rank 0 alone touches the folder, and not while a background commit may be renaming in it (that
        commit applies retention itself)."""
        self._good = (len(self.lineage) - 1, step)
        if self._unconfirmed is None or self._unconfirmed > step or self.rank != 0:
            return
        if self._pending is None or self._pending[0].done():
            self._unconfirmed = None
            purge(self.folder, self.cfg.keep_latest_k, self.lineage, step, self._good)

    def set_aside_unconfirmed(self) -> str:
        """The run diverged (the guard skipped the last step, or too many in a row): the saves no step has
        confirmed hold the state it diverged from. Move them to diverged/<run id>/, so that the next start resumes
        from the newest good checkpoint (which retention kept). Every rank calls it; returns what is left, in words."""
        if not self.cfg.enable:
            return self.newest_text()
        self.wait()
        moved = set_aside(self.folder, self.lineage, self._good, self.run_id) if self.rank == 0 else []
        barrier(self._pg)
        if moved:
            remaining = lineage_members(self.folder, self.lineage)
            self.newest = remaining[-1][1] if remaining else None
            logger.warning(f"checkpoint: moved {', '.join(p.name for p in moved)} to "
                           f"{self.folder / DIVERGED / self.run_id} (saved after the update the run diverged from)")
            return f"{self.newest_text()}; {', '.join(p.name for p in moved)} moved to {self.folder / DIVERGED}"
        return self.newest_text()

    def save(self, step: int, model_only: bool = False) -> None:
        """Write step-<N>: in the foreground, or (async) stage a copy, write it in the background, return."""
        self.wait()  # one save at a time: the next reuses the gloo group and may supersede the previous folder
        start = time.perf_counter()
        tmp = self.folder / f"step-{step}.tmp"
        if model_only:
            dtype = DTYPES[self.cfg.export_dtype]
            state = {"model": {k: v.to(dtype) for k, v in self.states["model"].state_dict().items()}}
        else:
            state = dict(self.states)
        try:
            _fresh(tmp, self.rank, self._pg)
            _write_adapter(self.adapter_export, self.model_parts, tmp / "adapter", self._pg)
            if self.cfg.async_mode == "disabled":
                dcp.save(state, checkpoint_id=str(tmp), process_group=self._pg)
                self._commit(step, tmp)
                logger.info(f"checkpoint: saved {self.newest} in {time.perf_counter() - start:.2f}s")
                return
            result = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._pg, async_stager=self._stager)
            # With the pinned stager on CUDA, an AsyncSaveResponse: the copy goes on during the next forward/backward
            # (the next optimizer step waits for it); the writer waits for it by itself.
            result = getattr(result, "upload_completion", result)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - OSError, or DCP's wrapper of one
            self._failed(step, tmp, e)
            return
        self._pending = (self._committer.submit(self._commit_when_written, result, step, tmp), step, tmp)
        logger.info(f"checkpoint: staged step {step} in {time.perf_counter() - start:.2f}s, writing in the background")

    def save_seed(self) -> None:
        """step-0: the initialised weights only, in fp32 (create_seed_checkpoint)."""
        tmp = self.folder / "step-0.tmp"
        try:
            _fresh(tmp, self.rank, self._pg)
            dcp.save({"model": self.states["model"].state_dict()}, checkpoint_id=str(tmp))
            self._commit(0, tmp)
            logger.info(f"checkpoint: wrote seed checkpoint {self.newest}")
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            self._failed(0, tmp, e)

    def export_hf(self, step: int) -> None:
        """The model as a Hugging Face folder <folder>/step-<N>-hf (see `export_hf`)."""
        self.wait()
        export_hf(self.model_parts, self.hf_export, self.folder / f"step-{step}-hf", DTYPES[self.cfg.export_dtype],
                  self._pg)
        _write_adapter(self.adapter_export, self.model_parts, self.folder / f"step-{step}-hf" / "adapter",
                       self._pg)

    def _commit_when_written(self, upload: Future, step: int, tmp: Path) -> None:
        start = time.perf_counter()
        upload.result()  # raises if the background write failed: no commit then
        self._commit(step, tmp)
        logger.info(f"checkpoint: saved {self.newest} (background write {time.perf_counter() - start:.2f}s after "
                    f"staging)")

    def _commit(self, step: int, tmp: Path) -> None:
        """From here on the checkpoint counts: every rank checksums its own files, rank 0 writes the manifest,
        renames step-N.tmp -> step-N and applies retention. All ranks learn whether it worked."""
        try:
            mine, error = checksums(tmp, [n for n in data_files(tmp) if owner(n, self.world_size) == self.rank]), None
        except OSError as e:
            mine, error = {}, f"{os_error(e)}, on rank {self.rank}"
        gathered = gather_objects((mine, error), self._pg)
        files = {name: entry for rank_files, _ in gathered for name, entry in rank_files.items()}
        error = next((e for _, e in gathered if e), None)
        if self.rank == 0 and error is None:
            try:
                info = {"step": step, "run": self.run_id, "parent": self.parent, "lineage": self.lineage}
                write_manifest(tmp, info, files)
                kill_point("commit:written")
                publish(tmp, self.folder / f"step-{step}")
                self._unconfirmed = step if self._good < (len(self.lineage) - 1, step) else None
                purge(self.folder, self.cfg.keep_latest_k, self.lineage, step, self._good)
            except OSError as e:
                error = os_error(e)
        agree(error, self._pg, _SaveError)
        self.newest = self.folder / f"step-{step}"

    def _failed(self, step: int, tmp: Path, e: BaseException) -> None:
        """A save that failed: remove what it wrote, say why in one line, stop the run (or go on, if configured)."""
        reason = _failure(e, self.folder, estimated_bytes(self.model_parts, "optimizer" in self.states))
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        message = f"checkpoint: cannot save step {step} to {tmp} ({reason}); removed the partial save; " \
                  f"{self.newest_text()}"
        if not self.cfg.continue_on_save_error:
            raise RunFailed(message, EXIT_SAVE_FAILED) from None
        if self.rank == 0:
            logger.warning(message + "; training goes on (checkpoint.continue_on_save_error)")

    def wait(self) -> None:
        """Block until the background save (if any) is written and committed; a failure is handled as in `save`."""
        if self._pending is not None:
            (pending, step, tmp), self._pending = self._pending, None
            try:
                pending.result()
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                self._failed(step, tmp, e)

    def close(self) -> None:
        """Wait for a background save (a job must not exit before its last checkpoint is written)."""
        try:
            self.wait()
        finally:
            if self._committer is not None:
                self._committer.shutdown(wait=True)
                self._committer = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None


# ---------------------------------------------------------------------------------------------------------------


def estimated_bytes(model_parts: list[torch.nn.Module], optimizer: bool) -> int:
    """Rough size of one checkpoint from this node's ranks: parameters plus, with the optimizer, AdamW's two moments
    (of the trainable ones), times the ranks of this node."""
    local = [p.to_local() if isinstance(p, DTensor) else p for part in model_parts for p in part.parameters()]
    weights = sum(p.numel() * p.element_size() for p in local)
    moments = 2 * sum(p.numel() * p.element_size() for p in local if p.requires_grad)
    return (weights + (moments if optimizer else 0)) * int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def _device(model_parts: list[torch.nn.Module]) -> torch.device:
    """Where the training state lives (the device the model computes on, also under CPU offload: its buffers)."""
    buffers = [b for part in model_parts for b in part.buffers()]
    return buffers[0].device if buffers else next(model_parts[0].parameters()).device


def export_hf(model_parts: list[torch.nn.Module], hf_export, out: Path, dtype: torch.dtype, group) -> None:
    """The model as a Hugging Face folder `out`: gathered to rank 0, which writes it; under pipeline parallelism (a
    rank holds only its stages) every rank gathers its stages' tensors and DCP's Hugging Face writer puts them
    together (on `group`)."""
    staged = sum(len(p.layers) for p in model_parts) != model_parts[0].args.n_layers
    # Without cpu_offload every rank gets the full tensors (with it, only global rank 0 would).
    options = StateDictOptions(full_state_dict=True, cpu_offload=not staged)
    full = {k: v for part in model_parts for k, v in get_model_state_dict(part, options=options).items()}
    rank = dist.get_rank()
    if staged:
        hf_export({k: v.cpu() for k, v in full.items()}, out, dtype, process_group=group)
    elif rank == 0:
        hf_export(full, out, dtype)
    if rank == 0:
        logger.info(f"checkpoint: exported {out} (Hugging Face format)")


def _fresh(tmp: Path, rank: int, group) -> None:
    """An empty `tmp` before anyone writes into it (a crash at this step may have left one); every rank calls it."""
    error = None
    if rank == 0:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = os_error(e)
    agree(error, group, _SaveError)


def _write_adapter(adapter_export, model_parts: list[torch.nn.Module], folder: Path, group) -> None:
    """LoRA (`adapter_export` set): the adapters as a PEFT folder (adapter_config.json + adapter_model.safetensors, a
    few MiB), inside the step folder (outside its manifest: the DCP files stay the checkpoint) or beside the merged
    export. Every rank calls it."""
    if adapter_export is None:
        return
    error = None
    try:
        adapter_export(model_parts, folder, group)
    except OSError as e:
        error = os_error(e)
    agree(error, group, _SaveError)
