"""Checkpoints: the training state saved and restored with torch.distributed.checkpoint (DCP), synchronously or in
the background; which checkpoint a run resumes from; the seed checkpoint.

Owns what goes into a checkpoint and which rank does what when. The folder on disk (manifests with checksums and
lineage, the commit, recovery from an interrupted one, retention) is titan/checkpoint_store.py's; stopping on a
signal is titan/lifecycle.py's; the loop (titan/train.py) calls `end_of_step` once per step.

Crash safety: a save is written to `step-<N>.tmp`; once DCP has finished on every rank (its coordinator writes
`.metadata` only after gathering every rank's write results), every rank checksums its own files, rank 0 writes
`manifest.json` and renames the folder to `step-<N>`. A `step-<N>` folder is therefore complete, and its manifest says
what its files must hold: at start the chosen checkpoint is verified and one that fails is passed over, with a warning,
for the newest one that passes. An interrupted save (`.tmp` without a manifest) is ignored and deleted once a newer
checkpoint is complete; an interrupted commit is finished at the next start.

One history per folder: a run resumes from the newest checkpoint, or from `load_step`; checkpoints newer than that
would make a second history and must be moved out of the way on purpose (`checkpoint.branch`). Retention deletes
only older checkpoints of this run's own lineage (see `checkpoint_store.purge`).

What is saved, each under its own top-level key (names as in torchtitan, usable in `exclude_from_loading`):
  model, optimizer  sharded as they live (DTensors), so a resume at another FSDP/TP layout reshards on load
  lr_scheduler      LambdaLR state (the step count)
  dataloader        the loader's state; its `position` counts global samples and is the same on every rank, so DCP
                    keeps one copy (it de-duplicates identical non-sharded keys) and any dp size can continue it
  train_state       step, tokens seen, skipped steps, the tokenizer's identity, the run's resolved config (so a
                    resume can say what changed), the RNG state of rank 0
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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from titan.checkpoint_store import (
    MANIFEST,
    checksums,
    data_files,
    kill_point,
    lineage_after,
    new_run_id,
    owner,
    publish,
    purge,
    read_manifest,
    recover,
    scan,
    supersede,
    verify,
    write_manifest,
)
from titan.config import CHECKPOINT_STATES, DTYPES, Checkpoint
from titan.errors import ConfigError
from titan.lifecycle import EXIT_SAVE_FAILED, RunFailed, agree, os_error
from titan.models.lora import is_adapter

logger = logging.getLogger("titan")
MiB = 2**20


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
    """Progress counters, what the run was trained with (its tokenizer, its resolved config), and the RNG state
    (dropout-free Llama draws no randoms while training; kept for extensions). The RNG state is rank 0's: DCP keeps
    one copy of a non-sharded key."""

    def __init__(self, tokenizer: str = "", tokenizer_name: str = "", run_config: str = ""):
        self.step, self.tokens_seen, self.skipped_steps = 0, 0, 0
        self.identity = {"tokenizer": tokenizer, "tokenizer_name": tokenizer_name, "config": run_config}
        self.loaded: dict[str, str] = {}  # those three as the loaded checkpoint recorded them ("" if it did not)
        self.stored: set[str] | None = None  # the keys the checkpoint being loaded has (older ones lack some)

    def state_dict(self) -> dict:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                 **self.identity, "rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state if self.stored is None else {k: v for k, v in state.items() if k in self.stored}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.loaded = {k: state.get(k, "") for k in self.identity}
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        self.stored = None


# ---------------------------------------------------------------------------------------------------------------
# Folder scanning


def _read_keys(path: Path, what: str) -> set[str]:
    """Top-level state names stored in a DCP checkpoint; ConfigError naming `path` if it is not one."""
    return {key.split(".", 1)[0] for key in stored_keys(path, what)}


def stored_keys(path: Path, what: str) -> set[str]:
    """Every state name stored in a DCP checkpoint (`model.layers.0...`, `optimizer...`); ConfigError naming `path`
    (as `what`) if it is not one."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - missing file, unpickling garbage, ...: all mean "not a checkpoint"
        raise ConfigError(f"{what}: {path} is not a readable checkpoint ({_one_line(e)})") from None
    return set(metadata.state_dict_metadata)


def _failure(e: BaseException, folder: Path, needed: int) -> str:
    """Why a save failed, in a few words: the errno of the first rank that hit an OSError (DCP wraps each rank's
    exception, with its traceback, in a CheckpointException). A full disk does not always raise one: torch.save's
    writer reports "unexpected pos 704 vs 598" (torch 2.13), so the free space is looked at too."""
    failures = [(rank, f[0] if isinstance(f, tuple) else f) for rank, f in sorted(getattr(e, "failures", {}).items())]
    for rank, exc in failures or [(None, e)]:
        if isinstance(exc, OSError):
            return os_error(exc) + ("" if rank is None else f", on rank {rank}")
    text = str(e) if isinstance(e, _SaveError) else _one_line(failures[0][1] if failures else e)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return text
    if free < needed:
        return f"ENOSPC: No space left on device, {free / MiB:.1f} MiB free; {text}"
    return text


class _SaveError(Exception):
    """A save failed on some rank: every rank raises it with the same text (lifecycle.agree)."""


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, CheckpointException) and lines:
        text = lines[-1]  # it carries each failed rank's traceback; the last line is the error itself
    else:
        text = f"{type(e).__name__}: {' '.join(lines)}"
    return text if len(text) < 200 else text[:197] + "..."


# ---------------------------------------------------------------------------------------------------------------


class Checkpointer:
    """Loads at start (`load`), saves at `interval`, the last step and on request (`end_of_step`), and waits for a
    background save at `close`. Every rank calls every method."""

    def __init__(self, cfg: Checkpoint, dump_folder: str, model_parts: list[torch.nn.Module],
                 optimizer: torch.optim.Optimizer, scheduler, dataloader, total_steps: int, hf_export=None,
                 adapters_only: bool = False, tokenizer=None, run_config: str = ""):
        self.cfg, self.total_steps, self.hf_export = cfg, total_steps, hf_export
        self.adapters_only = adapters_only  # lora.save_adapter_only: save (and resume) the adapters alone
        self.folder = Path(dump_folder) / cfg.folder
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if cfg.create_seed_checkpoint and self.world_size > 1:
            raise ConfigError(f"checkpoint.create_seed_checkpoint runs on one process (got {self.world_size}); the "
                              f"weights do not depend on the layout")
        self.model_parts = model_parts
        self.train_state = TrainState(getattr(tokenizer, "identity", ""), getattr(tokenizer, "name", ""), run_config)
        self.states = {"model": ModelState(model_parts, "adapters" if adapters_only else None),
                       "lr_scheduler": scheduler, "dataloader": dataloader,
                       "train_state": self.train_state}
        if cfg.enable:
            self.states["optimizer"] = OptimizerState(model_parts, optimizer)
        # Saves run their collectives on a gloo group of their own: a background save on the default group would
        # interleave with the training loop's collectives (gloo aborts: "data size doesn't match", torch 2.13).
        self._pg = dist.new_group(backend="gloo") if cfg.enable else None
        self._pending: tuple[Future, int, Path] | None = None  # the background write + commit of the last async save
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="titan-ckpt") if cfg.async_mode != "disabled" \
            else None
        self._stager = self._pinned_stager() if cfg.enable and cfg.async_mode == "async_with_pinned_mem" else None
        self.run_id = new_run_id()  # only rank 0's is written anywhere
        self.parent: dict | None = None  # {"step", "run"} of the checkpoint this run resumed from
        self.lineage = [[self.run_id, None]]  # see checkpoint_store.lineage_after
        self.newest: Path | None = None  # the newest committed checkpoint of this run's history
        self._owed = False  # a save fell due at a skipped step: the next updated step makes it

    @property
    def step(self) -> int:
        """The last completed step (0 before training); the loop continues at step + 1."""
        return self.train_state.step

    @property
    def resumed(self) -> bool:
        return self.parent is not None

    # -- loading ----------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Resume from the newest complete checkpoint that passes its integrity check (or `load_step`); else start
        from `initial_load_path`'s weights if set; else keep the initialised weights."""
        cfg = self.cfg
        if cfg.create_seed_checkpoint:
            return
        if not cfg.enable:
            load_initial_weights(self.model_parts, cfg, self._pg)
            return
        if cfg.load_step != -1 and not self.folder.is_dir():
            raise ConfigError(f"checkpoint.load_step={cfg.load_step}: checkpoint folder {self.folder} does not exist")
        self._check_folder()
        if self.rank == 0:
            for note in recover(self.folder):
                logger.warning(f"checkpoint: {note}")
        self._barrier()
        complete, partial = scan(self.folder)
        for path in sorted(partial.values()):
            if self.rank == 0:
                logger.warning(f"checkpoint: ignoring incomplete {path} (interrupted save)")
        if cfg.load_step != -1 and cfg.load_step not in complete:
            have = ", ".join(map(str, sorted(complete))) or "none"
            raise ConfigError(f"checkpoint.load_step={cfg.load_step}: no complete checkpoint "
                              f"{self.folder / f'step-{cfg.load_step}'} (complete steps: {have})")
        step, rejected = self._choose(complete)
        if step is None:
            load_initial_weights(self.model_parts, cfg, self._pg)
            return
        what = f"checkpoint.load_step={cfg.load_step}" if cfg.load_step != -1 else "checkpoint.folder"
        ahead = self._ahead(step, complete, rejected)
        self._load_base_for_adapters()
        self._load(complete[step], what)
        self._settle(step, complete[step], rejected + ahead)

    def _check_folder(self) -> None:
        """Fail before step 1 rather than at the first save: every rank can write to the folder, and it has room for
        one more checkpoint (rough: parameters plus AdamW's two moments, times the ranks of this node)."""
        error = None
        if self.folder.exists() and not self.folder.is_dir():
            error = f"checkpoint.folder: {self.folder} is a file, not a folder"
        else:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                probe = self.folder / f".write-test-{self.rank}"
                probe.write_bytes(b"")
                probe.unlink()
                free, need = shutil.disk_usage(self.folder).free, self._estimated_bytes()
                if free < need:
                    error = (f"checkpoint.folder: {self.folder} has {free / MiB:.1f} MiB free, less than one "
                             f"checkpoint (about {need / MiB:.1f} MiB from this node's ranks)")
            except OSError as e:
                error = f"checkpoint.folder: cannot write to {self.folder} ({os_error(e)})"
        agree(error, self._pg)

    def _estimated_bytes(self) -> int:
        local = [p.to_local() if isinstance(p, DTensor) else p for part in self.model_parts for p in part.parameters()]
        weights = sum(p.numel() * p.element_size() for p in local)
        moments = 2 * sum(p.numel() * p.element_size() for p in local if p.requires_grad)
        return (weights + (moments if "optimizer" in self.states else 0)) * int(os.environ.get("LOCAL_WORLD_SIZE", 1))

    def _choose(self, complete: dict[int, Path]) -> tuple[int | None, list[Path]]:
        """(the step to resume from or None, newer checkpoints that failed their integrity check)."""
        explicit = self.cfg.load_step != -1
        candidates = [self.cfg.load_step] if explicit else sorted(complete, reverse=True)
        rejected = []
        for step in candidates:
            problems = self._verify(complete[step])
            if not problems:
                return step, rejected
            detail = problems[0] + (f" and {len(problems) - 1} more" if len(problems) > 1 else "")
            if explicit:
                raise ConfigError(f"checkpoint.load_step={step}: {complete[step]} fails its integrity check ({detail})")
            if self.rank == 0:
                logger.warning(f"checkpoint: {complete[step]} fails its integrity check ({detail}); passing over it "
                               f"for an older checkpoint")
            rejected.append(complete[step])
        if rejected:
            raise ConfigError(f"checkpoint.folder: no checkpoint in {self.folder} passes its integrity check (see the "
                              f"warnings); choose one with checkpoint.load_step or move them away")
        return None, []

    def _verify(self, path: Path) -> list[str]:
        """Every rank checks the files it owns against the manifest; all ranks get every problem found."""
        try:
            manifest = read_manifest(path)
        except ValueError as e:
            problems = [f"{path / MANIFEST}: {e}"]
        else:
            if manifest is None:
                if self.rank == 0:
                    logger.warning(f"checkpoint: {path} has no {MANIFEST} (saved before titan wrote them, or "
                                   f"converted); loading it unverified")
                problems = []
            else:
                mine = [n for n in manifest["files"] if owner(n, self.world_size) == self.rank]
                problems = verify(path, manifest, mine)
        return sorted(p for rank_problems in self._gather(problems) for p in rank_problems)

    def _ahead(self, step: int, complete: dict[int, Path], rejected: list[Path]) -> list[Path]:
        """Checkpoints at or after the step this run starts with: another history, which may only be moved aside
        on purpose (checkpoint.branch)."""
        restart = "train_state" in self.cfg.exclude_from_loading  # the step count starts again at 1
        first = 1 if restart else step + 1
        ahead = [p for s, p in sorted(complete.items()) if s >= first and p not in rejected]
        if ahead and not self.cfg.branch:
            names = ", ".join(p.name for p in ahead)
            why = (f"checkpoint.exclude_from_loading=train_state restarts the step count beside {names}" if restart
                   else f"checkpoint.load_step={step} is older than {names}")
            raise ConfigError(f"{why} in {self.folder}: training from it would mix two histories in one folder; set "
                              f"checkpoint.branch = true to move those to {self.folder / 'superseded'}/<run id>/ and "
                              f"train on from step-{step}")
        return ahead

    def _settle(self, step: int, path: Path, aside: list[Path]) -> None:
        """Record where this run came from; move checkpoints that are not its history out of the folder."""
        try:
            manifest = read_manifest(path)
        except ValueError:
            manifest = None
        self.parent = {"step": step, "run": (manifest or {}).get("run")}
        self.lineage = lineage_after(manifest, step, self.run_id)
        self.newest = path
        if aside and self.rank == 0:
            target = supersede(self.folder, aside, self.run_id)
            logger.warning(f"checkpoint: moved {', '.join(p.name for p in aside)} to {target} (not this run's "
                           f"history: it continues from step-{step})")
        self._barrier()

    def _load_base_for_adapters(self) -> None:
        """Adapter-only checkpoints (lora.save_adapter_only) hold no base weights: they come from where the run
        started."""
        if self.adapters_only:
            load_initial_weights(self.model_parts, self.cfg, self._pg)

    def _load(self, path: Path, what: str) -> None:
        start = time.perf_counter()
        keys = stored_keys(path, what)
        stored = {key.split(".", 1)[0] for key in keys}
        if "model" not in stored:
            raise ConfigError(f"{what}: {path} holds no model state (keys: {', '.join(sorted(stored))})")
        names = [n for n in CHECKPOINT_STATES if n in stored and n in self.states
                 and n not in self.cfg.exclude_from_loading]
        self.train_state.stored = {k.split(".", 1)[1] for k in keys if k.startswith("train_state.")}
        # train_state first (it is small): a checkpoint of another tokenizer is refused before the big read.
        for group in ([n for n in names if n == "train_state"], [n for n in names if n != "train_state"]):
            if not group:
                continue
            try:
                dcp.load({n: self.states[n] for n in group}, checkpoint_id=str(path), process_group=self._pg)
            except ConfigError as e:  # a state refusing what it was given (the data loader: other data)
                raise ConfigError(f"{what}: {path}: {e}") from None
            # CheckpointException (a BaseException in torch 2.13) wraps whatever failed on each rank.
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - torn or garbled files: many types
                raise ConfigError(f"{what}: cannot load {path} ({_one_line(e)})") from None
            if group == ["train_state"]:
                self._check_tokenizer(path, what)
        skipped = [n for n in CHECKPOINT_STATES if n not in names]
        logger.info(f"checkpoint: loaded {', '.join(names)} from {path} in {time.perf_counter() - start:.2f}s"
                    + (f" (not restored: {', '.join(skipped)})" if skipped else "")
                    + f"; continuing at step {self.step + 1}")

    def _check_tokenizer(self, path: Path, what: str) -> None:
        saved, mine = self.train_state.loaded, self.train_state.identity
        if not saved.get("tokenizer") or not mine["tokenizer"] or saved["tokenizer"] == mine["tokenizer"]:
            return  # the same, or a checkpoint from before titan recorded it
        text = (f"{path} was trained with the tokenizer {saved['tokenizer_name']} (sha256 {saved['tokenizer'][:16]}), "
                f"this run has {mine['tokenizer_name']} (sha256 {mine['tokenizer'][:16]})")
        if not self.cfg.allow_tokenizer_change:
            raise ConfigError(f"{what}: {text}; token ids would change meaning (set checkpoint.allow_tokenizer_change "
                              f"= true to resume anyway)")
        if self.rank == 0:
            logger.warning(f"checkpoint: {text}; resuming anyway (checkpoint.allow_tokenizer_change)")

    @property
    def resumed_config(self) -> str:
        """The resolved config (TOML) of the run that saved the loaded checkpoint; "" if none was recorded."""
        return self.train_state.loaded.get("config", "")

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
            self._fresh(tmp)
            if self.cfg.async_mode == "disabled":
                dcp.save(state, checkpoint_id=str(tmp), process_group=self._pg)
                self._commit(step, tmp)
                logger.info(f"checkpoint: saved {self.newest} in {time.perf_counter() - start:.2f}s")
                return
            result = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._pg, async_stager=self._stager)
            if self._stager is not None:  # AsyncSaveResponse: wait for the copy into pinned memory only
                result.staging_completion.result()
                result = result.upload_completion
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - OSError, or DCP's wrapper of one
            self._failed(step, tmp, e)
            return
        self._pending = (self._committer.submit(self._commit_when_written, result, step, tmp), step, tmp)
        logger.info(f"checkpoint: staged step {step} in {time.perf_counter() - start:.2f}s, writing in the background")

    def save_seed(self) -> None:
        """step-0: the initialised weights only, in fp32 (create_seed_checkpoint)."""
        tmp = self.folder / "step-0.tmp"
        try:
            self._fresh(tmp)
            dcp.save({"model": self.states["model"].state_dict()}, checkpoint_id=str(tmp))
            self._commit(0, tmp)
            logger.info(f"checkpoint: wrote seed checkpoint {self.newest}")
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            self._failed(0, tmp, e)

    def export_hf(self, step: int) -> None:
        """The model as a Hugging Face folder <folder>/step-<N>-hf: gathered to rank 0, which writes it; under
        pipeline parallelism (a rank holds only its stages) every rank gathers its stages' tensors and DCP's
        Hugging Face writer puts them together."""
        self.wait()
        out = self.folder / f"step-{step}-hf"
        dtype = DTYPES[self.cfg.export_dtype]
        staged = sum(len(p.layers) for p in self.model_parts) != self.model_parts[0].args.n_layers
        # Without cpu_offload every rank gets the full tensors (with it, only global rank 0 would).
        options = StateDictOptions(full_state_dict=True, cpu_offload=not staged)
        full = {k: v for part in self.model_parts for k, v in get_model_state_dict(part, options=options).items()}
        if staged:
            self.hf_export({k: v.cpu() for k, v in full.items()}, out, dtype, process_group=self._pg)
        elif self.rank == 0:
            self.hf_export(full, out, dtype)
        if self.rank == 0:
            logger.info(f"checkpoint: exported {out} (Hugging Face format)")

    def _fresh(self, tmp: Path) -> None:
        """An empty `tmp` before anyone writes into it (a crash at this step may have left one)."""
        error = None
        if self.rank == 0:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = os_error(e)
        agree(error, self._pg, _SaveError)

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
        gathered = self._gather((mine, error))
        files = {name: entry for rank_files, _ in gathered for name, entry in rank_files.items()}
        error = next((e for _, e in gathered if e), None)
        if self.rank == 0 and error is None:
            try:
                info = {"step": step, "run": self.run_id, "parent": self.parent, "lineage": self.lineage}
                write_manifest(tmp, info, files)
                kill_point("commit:written")
                publish(tmp, self.folder / f"step-{step}")
                purge(self.folder, self.cfg.keep_latest_k, self.lineage, step)
            except OSError as e:
                error = os_error(e)
        agree(error, self._pg, _SaveError)
        self.newest = self.folder / f"step-{step}"

    def _failed(self, step: int, tmp: Path, e: BaseException) -> None:
        """A save that failed: remove what it wrote, say why in one line, stop the run (or go on, if configured)."""
        reason = _failure(e, self.folder, self._estimated_bytes())
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

    def _gather(self, obj) -> list:
        """`obj` of every rank (on the checkpoint group), in rank order."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._pg)
        return out

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._pg)

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
                self._committer = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None
