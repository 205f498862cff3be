"""The checkpoint folder on disk: which `step-<N>` folders count as complete, the manifest each one carries (its
integrity record and lineage), the commit that publishes a save, recovery from an interrupted commit, moving
superseded checkpoints out of the way, and retention.

Plain files and renames only (no torch, no process group), so a test can SIGKILL a process anywhere in here and
check what the next start makes of it. What is saved is state.py's, which checkpoint a run continues from
resume.py's, and which rank writes what, and when, save.py's.

    <job.dump_folder>/<checkpoint.folder>/
      step-<N>/           complete: DCP's .metadata and __<rank>_<i>.distcp files, plus manifest.json
      step-<N>.tmp/       a save being written or cut short; written in full once it holds manifest.json
      step-<N>.old/       the previous copy of step-<N> while a re-save of the same step is published
      superseded/<run>/   checkpoints that a branched resume (checkpoint.branch) moved out of its way
      diverged/<run>/     saves whose state a later step found non-finite, moved aside when that run stopped

manifest.json, written by rank 0 once every rank's files are on disk and before the rename that commits:
    {"format": 1, "step": N, "run": "<run id>", "parent": {"step": P, "run": "<id>"} or null,
     "lineage": [["<run id>", last step or null], ...], "files": {"<name>": [bytes, crc32], ...}}
`lineage` lists the runs this checkpoint descends from, oldest first, each with the last step of it that the next
run resumed from (null for the run that wrote it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import zlib
from pathlib import Path

MANIFEST = "manifest.json"
SUPERSEDED, DIVERGED = "superseded", "diverged"
_STEP_DIR = re.compile(r"^step-(\d+)(\.tmp|\.old)?$")
_RANK_FILE = re.compile(r"^__(\d+)_")  # DCP's FileSystemWriter names each rank's files __<rank>_<i>.distcp


def kill_point(name: str) -> None:
    """Where the crash-safety tests SIGKILL this process (TITAN_TEST_KILL_AT=<name>): between the steps of a commit."""
    if os.environ.get("TITAN_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def new_run_id() -> str:
    """Names the run in manifests and in superseded/: start time and process id of rank 0."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


# ---------------------------------------------------------------------------------------------------------------
# Scanning


def scan(folder: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    """({step: complete checkpoint}, {step: `.tmp` save}) in `folder` (empty if it does not exist)."""
    complete, partial = {}, {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and m.group(2) != ".old":
                (partial if m.group(2) else complete)[int(m.group(1))] = p
    return complete, partial


def read_manifest(path: Path) -> dict | None:
    """The manifest of a step folder; None if it has none (written by titan before manifests, or by
    scripts/convert_checkpoint.py); ValueError if it cannot be read."""
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        entries = manifest["files"].items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{MANIFEST} is unreadable ({type(e).__name__})") from None
    for name, entry in entries:  # [bytes, crc32] each: a hand-edited or garbled entry is named, not a traceback
        if not (isinstance(entry, list) and len(entry) == 2 and all(type(x) is int and x >= 0 for x in entry)):
            raise ValueError(f"{MANIFEST} has a malformed entry for {name!r} (expected [bytes, crc32])")
    return manifest


def _is_written(tmp: Path) -> bool:
    try:
        return read_manifest(tmp) is not None
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Integrity: sizes and CRC-32s. zlib's crc32 runs at about 2.3 GB/s on one core here (and releases the GIL); every
# rank checksums its own files, which the page cache usually still holds right after the write.


def owner(name: str, world_size: int) -> int:
    """The rank that checksums (and verifies) a file: the one that wrote it where the name says, else rank 0."""
    m = _RANK_FILE.match(name)
    return int(m.group(1)) % world_size if m else 0


def data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and
                  not p.name.endswith(".part"))


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def checksums(folder: Path, names: list[str]) -> dict[str, list[int]]:
    return {name: [(folder / name).stat().st_size, file_crc32(folder / name)] for name in names}


def verify(folder: Path, manifest: dict, names: list[str]) -> list[str]:
    """What is wrong with the files `names` of `folder` against its manifest ([] = all good)."""
    problems = []
    for name in names:
        size, crc = manifest["files"][name]
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes, {size} recorded")
        elif (actual := file_crc32(path)) != crc:
            problems.append(f"{path} has CRC-32 {actual:08x}, {crc:08x} recorded")
    return problems


def write_manifest(tmp: Path, info: dict, files: dict[str, list[int]]) -> None:
    part = tmp / (MANIFEST + ".part")
    with open(part, "w") as f:
        json.dump({"format": 1, **info, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, tmp / MANIFEST)  # a manifest is either absent or whole


# ---------------------------------------------------------------------------------------------------------------
# Commit and recovery


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the renames in it durable
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Rename a written save `step-N.tmp` to `step-N`: the commit. A re-save of an existing step first renames the
    old copy to `step-N.old` and deletes it only after the new one is in place, so at every instant one complete copy
    is there under a name `recover` understands."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)  # left by an earlier re-save whose new copy was published
        os.replace(final, old)
        _fsync_dir(final.parent)
        kill_point("publish:aside")
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    kill_point("publish:renamed")
    shutil.rmtree(old, ignore_errors=True)


def recover(folder: Path) -> list[str]:
    """Finish or undo commits a crash interrupted (run by rank 0 at start, before anything is chosen); returns what
    it did. A `.tmp` that holds its manifest was written in full and is published; else an `.old` copy whose
    re-save never arrived is put back; an `.old` beside its published successor is deleted."""
    if not folder.is_dir():
        return []
    done = []
    steps = sorted({int(m.group(1)) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and m.group(2)})
    for step in steps:
        final = folder / f"step-{step}"
        tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
        if _is_written(tmp):
            publish(tmp, final)
            done.append(f"finished the interrupted commit of {final}")
        elif old.is_dir() and not final.exists():
            os.replace(old, final)
            _fsync_dir(folder)
            done.append(f"restored {final} (a re-save of it was interrupted before its new copy was written)")
        if old.is_dir():
            shutil.rmtree(old)
    return done


def supersede(folder: Path, paths: list[Path], run_id: str, into: str = SUPERSEDED) -> Path:
    """Move step folders out of the checkpoint folder's history into superseded/<run id>/ (or `into`/<run id>/;
    nothing is deleted)."""
    target = folder / into / run_id
    target.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.replace(path, target / path.name)
    _fsync_dir(folder)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Lineage and retention


def lineage_after(parent: dict | None, parent_step: int | None, run_id: str) -> list[list]:
    """The lineage of a run that resumed from a checkpoint with manifest `parent` at `parent_step` (None: a fresh
    start, or a parent without a manifest, which is then no part of the lineage)."""
    if parent is None:
        return [[run_id, None]]
    ancestors = [list(entry) for entry in parent.get("lineage", [])]
    if not ancestors:
        return [[run_id, None]]
    ancestors[-1][1] = parent_step
    return [*ancestors, [run_id, None]]


def lineage_position(manifest: dict | None, lineage: list[list]) -> int | None:
    """Where a checkpoint sits in `lineage` (its run's index), or None if it is not part of it."""
    if manifest is None:
        return None
    for i, (run, last) in enumerate(lineage):
        if manifest.get("run") == run and (last is None or manifest.get("step", -1) <= last):
            return i
    return None


def lineage_members(folder: Path, lineage: list[list]) -> list[tuple[tuple[int, int], Path]]:
    """The complete checkpoints of `folder` that belong to `lineage`, oldest first, each with its key (position of
    its run in the lineage, step): a run that restarted its step count still sorts after its parent."""
    members = []
    for step, path in scan(folder)[0].items():
        try:
            position = lineage_position(read_manifest(path), lineage)
        except ValueError:
            position = None
        if position is not None:
            members.append(((position, step), path))
    return sorted(members)


def purge(folder: Path, keep: int, lineage: list[list], committed: int,
          confirmed: tuple[int, int] | None = None) -> list[Path]:
    """Retention after the commit of step `committed`: keep the newest `keep` checkpoints of this run's lineage and
    also the newest one whose state is known good (its key <= `confirmed`: a later step's loss and gradient norm,
    computed on its weights, were finite; None = judge nothing), and delete older ones of the lineage; delete
    `.tmp` saves older than `committed`. So a save that a diverging update made never pushes the last good one out.
    Checkpoints outside the lineage (other runs' branches, folders without a manifest) are never deleted. `keep` = 0
    keeps everything."""
    _, partial = scan(folder)
    doomed = [path for step, path in partial.items() if step < committed]
    if keep > 0:
        members = lineage_members(folder, lineage)
        good = [path for key, path in members if confirmed is not None and key <= confirmed]
        kept = {path for _, path in members[-keep:]} | set(good[-1:])
        doomed += [path for _, path in members if path not in kept]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def set_aside(folder: Path, lineage: list[list], after: tuple[int, int], run_id: str) -> list[Path]:
    """Move the lineage's checkpoints newer than key `after` (states no later step has confirmed, in a run that
    diverged from them) to diverged/<run id>/: the next start resumes from the newest good one. Nothing is deleted."""
    unconfirmed = [path for key, path in lineage_members(folder, lineage) if key > after]
    if unconfirmed:
        supersede(folder, unconfirmed, run_id, DIVERGED)
    return unconfirmed
