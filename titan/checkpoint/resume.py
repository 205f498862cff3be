"""Which checkpoint a run continues from, and loading it.

A run resumes from the newest complete checkpoint in its folder that passes its integrity check, or from
`checkpoint.load_step`; with none it starts from `checkpoint.initial_load_path`'s weights (or its own initialised
ones). At start, commits a crash interrupted are finished or undone first (store.py:recover); a chosen checkpoint
whose files do not match its manifest is passed over, with a warning, for the newest one that passes (an explicit
`load_step` that fails is an error instead).

One history per folder: checkpoints newer than the one a run continues from would make a second history, and must be
moved out of the way on purpose (`checkpoint.branch` moves them to superseded/<run id>/). Checkpoints that failed
their check go there too, so that retention never counts them.

`Resume` works over the checkpoint folder and a process group; every rank constructs it and calls every method (the
ranks agree on every decision). What the states are is state.py's; writing checkpoints is save.py's.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from titan.checkpoint.state import TrainState, one_line, read_keys, stored_keys
from titan.checkpoint.store import MANIFEST, lineage_after, owner, read_manifest, recover, scan, supersede, verify
from titan.config import CHECKPOINT_STATES, Checkpoint
from titan.errors import ConfigError
from titan.lifecycle import agree, os_error
from titan.parallel.process_group import barrier, gather_objects

logger = logging.getLogger("titan")
MiB = 2**20


def check_writable(folder: Path, needed: int, group) -> None:
    """Fail before step 1 rather than at the first save: every rank can write to `folder`, and it has room for one
    more checkpoint (`needed` bytes, rough)."""
    error = None
    if folder.exists() and not folder.is_dir():
        error = f"checkpoint.folder: {folder} is a file, not a folder"
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{dist.get_rank()}"
            probe.write_bytes(b"")
            probe.unlink()
            free = shutil.disk_usage(folder).free
            if free < needed:
                error = (f"checkpoint.folder: {folder} has {free / MiB:.1f} MiB free, less than one checkpoint "
                         f"(about {needed / MiB:.1f} MiB from this node's ranks)")
        except OSError as e:
            error = f"checkpoint.folder: cannot write to {folder} ({os_error(e)})"
    agree(error, group)


class Resume:
    """Chooses the checkpoint to continue from (`choose`), loads it (`load`) and records where the run came from
    (`settle`). `group`: the process group its collectives use (the checkpointer's own gloo group)."""

    def __init__(self, cfg: Checkpoint, folder: Path, group):
        self.cfg, self.folder, self.group = cfg, folder, group
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.what = f"checkpoint.load_step={cfg.load_step}" if cfg.load_step != -1 else "checkpoint.folder"

    def choose(self, needed_bytes: int) -> tuple[int, Path, list[Path]] | None:
        """(the step to continue from, its folder, checkpoints to move aside), or None: no checkpoint, start fresh.
        `needed_bytes`: the room one more checkpoint takes (checked now, see `check_writable`)."""
        cfg = self.cfg
        if cfg.load_step != -1 and not self.folder.is_dir():
            raise ConfigError(f"checkpoint.load_step={cfg.load_step}: checkpoint folder {self.folder} does not exist")
        check_writable(self.folder, needed_bytes, self.group)
        if self.rank == 0:
            for note in recover(self.folder):
                logger.warning(f"checkpoint: {note}")
        barrier(self.group)
        complete, partial = scan(self.folder)
        for path in sorted(partial.values()):
            if self.rank == 0:
                logger.warning(f"checkpoint: ignoring incomplete {path} (interrupted save)")
        if cfg.load_step != -1 and cfg.load_step not in complete:
            have = ", ".join(map(str, sorted(complete))) or "none"
            raise ConfigError(f"checkpoint.load_step={cfg.load_step}: no complete checkpoint "
                              f"{self.folder / f'step-{cfg.load_step}'} (complete steps: {have})")
        step, rejected = self._newest_good(complete)
        if step is None:
            return None
        return step, complete[step], rejected + self._ahead(step, complete, rejected)

    def _newest_good(self, complete: dict[int, Path]) -> tuple[int | None, list[Path]]:
        """(the step to resume from or None, newer checkpoints that failed their integrity check)."""
        explicit = self.cfg.load_step != -1
        candidates = [self.cfg.load_step] if explicit else sorted(complete, reverse=True)
        rejected = []
        for step in candidates:
            problems = self.verify(complete[step])
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

    def verify(self, path: Path) -> list[str]:
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
        return sorted(p for rank_problems in gather_objects(problems, self.group) for p in rank_problems)

    def _ahead(self, step: int, complete: dict[int, Path], rejected: list[Path]) -> list[Path]:
        """Checkpoints at or after the step this run starts with: another history, which may only be moved aside
        on purpose (checkpoint.branch)."""
        # The step count starts again at 1 without a train_state: excluded, or not saved (a model_only save).
        excluded = "train_state" in self.cfg.exclude_from_loading
        restart = excluded or "train_state" not in read_keys(complete[step], self.what)
        first = 1 if restart else step + 1
        ahead = [p for s, p in sorted(complete.items()) if s >= first and p not in rejected]
        if ahead and not self.cfg.branch:
            names = ", ".join(p.name for p in ahead)
            why = (f"checkpoint.exclude_from_loading=train_state restarts the step count beside {names}" if excluded
                   else f"{complete[step].name} holds no train_state (a checkpoint.model_only save), so resuming it "
                        f"restarts the step count beside {names}" if restart
                   else f"checkpoint.load_step={step} is older than {names}")
            raise ConfigError(f"{why} in {self.folder}: training from it would mix two histories in one folder; set "
                              f"checkpoint.branch = true to move those to {self.folder / 'superseded'}/<run id>/ and "
                              f"train on from step-{step}")
        return ahead

    def load(self, path: Path, states: dict, train_state: TrainState) -> None:
        """Load `states` (name -> Stateful; those the checkpoint has and exclude_from_loading does not skip) from
        `path`: train_state first (it is small), so that a checkpoint of another tokenizer is refused before the big
        read."""
        start = time.perf_counter()
        keys = stored_keys(path, self.what)
        stored = {key.split(".", 1)[0] for key in keys}
        if "model" not in stored:
            raise ConfigError(f"{self.what}: {path} holds no model state (keys: {', '.join(sorted(stored))})")
        names = [n for n in CHECKPOINT_STATES if n in stored and n in states and n not in self.cfg.exclude_from_loading]
        train_state.stored = {k.split(".", 1)[1] for k in keys if k.startswith("train_state.")}
        for group in ([n for n in names if n == "train_state"], [n for n in names if n != "train_state"]):
            if not group:
                continue
            try:
                dcp.load({n: states[n] for n in group}, checkpoint_id=str(path), process_group=self.group)
            except ConfigError as e:  # a state refusing what it was given (the data loader: other data)
                raise ConfigError(f"{self.what}: {path}: {e}") from None
            # CheckpointException (a BaseException in torch 2.13) wraps whatever failed on each rank.
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - torn or garbled files: many types
                raise ConfigError(f"{self.what}: cannot load {path} ({one_line(e)})") from None
            if group == ["train_state"]:
                self._check_tokenizer(path, train_state)
                self._check_base(path, train_state)
        skipped = [n for n in CHECKPOINT_STATES if n not in names]
        logger.info(f"checkpoint: loaded {', '.join(names)} from {path} in {time.perf_counter() - start:.2f}s"
                    + (f" (not restored: {', '.join(skipped)})" if skipped else "")
                    + f"; continuing at step {train_state.step + 1}")

    def _check_tokenizer(self, path: Path, train_state: TrainState) -> None:
        saved, mine = train_state.loaded, train_state.identity
        if not saved.get("tokenizer") or not mine["tokenizer"] or saved["tokenizer"] in train_state.tokenizer_aliases:
            return  # the same (by content, or by the file bytes older checkpoints recorded), or not recorded
        text = (f"{path} was trained with the tokenizer {saved['tokenizer_name']} (sha256 {saved['tokenizer'][:16]}), "
                f"this run has {mine['tokenizer_name']} (sha256 {mine['tokenizer'][:16]})")
        if not self.cfg.allow_tokenizer_change:
            raise ConfigError(f"{self.what}: {text}; token ids would change meaning (set "
                              f"checkpoint.allow_tokenizer_change = true to resume anyway)")
        if self.rank == 0:
            logger.warning(f"checkpoint: {text}; resuming anyway (checkpoint.allow_tokenizer_change)")

    def _check_base(self, path: Path, train_state: TrainState) -> None:
        """Adapter-only checkpoints hold no base weights: the run must supply the ones they were trained on."""
        saved, mine = train_state.loaded, train_state.identity
        if not saved.get("base") or not mine["base"] or saved["base"] == mine["base"]:
            return  # the same, not adapter-only, or a checkpoint from before titan recorded it
        text = (f"{path} holds adapters trained on the base {saved['base_name']} (sha256 {saved['base'][:12]}), this "
                f"run's base is {mine['base_name']} (sha256 {mine['base'][:12]})")
        if not self.cfg.allow_base_change:
            raise ConfigError(f"{self.what}: {text}; the adapters would be applied to other weights (set "
                              f"checkpoint.initial_load_path and training.seed as when they were trained, or "
                              f"checkpoint.allow_base_change = true to resume anyway)")
        if self.rank == 0:
            logger.warning(f"checkpoint: {text}; resuming anyway (checkpoint.allow_base_change)")

    def settle(self, step: int, path: Path, aside: list[Path], run_id: str) -> tuple[dict, list[list]]:
        """Move checkpoints that are not this run's history out of the folder; returns where the run came from
        ({"step", "run"}) and its lineage (see store.py:lineage_after)."""
        try:
            manifest = read_manifest(path)
        except ValueError:
            manifest = None
        parent = {"step": step, "run": (manifest or {}).get("run")}
        if aside and self.rank == 0:
            target = supersede(self.folder, aside, run_id)
            logger.warning(f"checkpoint: moved {', '.join(p.name for p in aside)} to {target} (not this run's "
                           f"history: it continues from step-{step})")
        barrier(self.group)
        return parent, lineage_after(manifest, step, run_id)
