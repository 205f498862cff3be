"""What keeps a run alone and stoppable: the one-writer lock on job.dump_folder, the worker's tie to its launcher,
and stop requests (SIGTERM, SIGUSR1, SIGINT) that every rank honours after the same step. Also `RunFailed`, how a run
that cannot go on ends with one line and its own exit code.

It does not own what a stop saves (titan/checkpoint.py) nor the loop (titan/train.py polls `StopRequests` once per
step, so every way out of the loop is written there).

Exit codes of `python -m titan.train`: 0 done (or stopped by a signal, after saving), 1 a crash (traceback),
2 bad input (ConfigError), 3 too many skipped steps in a row (titan/guard.py), 4 a checkpoint could not be saved,
130 a second Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from titan.errors import ConfigError
from titan.parallel.process_group import new_group

logger = logging.getLogger("titan")

EXIT_DIVERGED, EXIT_SAVE_FAILED, EXIT_INTERRUPTED = 3, 4, 130


class RunFailed(Exception):
    """The run cannot go on, for a reason its one-line message gives; `python -m titan.train` exits with `code`."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def os_error(e: OSError) -> str:
    """`ENOSPC: No space left on device`: the errno's name and text, for one-line messages."""
    name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else type(e).__name__
    return f"{name}: {e.strerror or e}"


def agree(error: str | None, group=None, exception: type[Exception] = ConfigError) -> None:
    """Raise `exception` on every rank if any rank has an error (the lowest rank's message wins): a check that fails
    on one rank must stop all of them, not leave the others waiting in their next collective."""
    if dist.get_world_size(group) > 1:
        errors = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
        error = next((e for e in errors if e), None)
    if error:
        raise exception(error)


# ---------------------------------------------------------------------------------------------------------------
# One writer per dump folder

LOCK_FILE = "titan.lock"
HEARTBEAT_SECONDS = 30  # the holder refreshes the lock's mtime this often
STALE_SECONDS = 120  # a lock from another host not refreshed for this long belongs to a dead run


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), so that a reused pid is not mistaken for it."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    try:  # a zombie (exited, not yet reaped: a container whose pid 1 reaps nothing keeps them) is dead
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    """<job.dump_folder>/titan.lock, created exclusively by rank 0 at start and removed at exit. It holds the holder's
    host, pid, process start and start time; a daemon thread touches it every HEARTBEAT_SECONDS.

    A lock is stale, and taken over with a warning, when its holder is on this host and gone (or its pid now names
    another process), or is on another host and has not touched the lock for STALE_SECONDS (a run killed with SIGKILL
    leaves its lock behind). Otherwise a second run is refused with one line naming the holder."""

    def __init__(self, path: Path | None = None, record: dict | None = None):
        self.path, self.record = path, record  # None: not the holder (ranks other than 0)
        self._stop = threading.Event()
        if path is not None:
            threading.Thread(target=self._heartbeat, name="titan-lock", daemon=True).start()

    @classmethod
    def acquire(cls, folder: str, wait: float | None = None) -> "RunLock":
        """Take the lock; `wait` (default $TITAN_LOCK_WAIT, else 0) seconds for a live holder on this host to go
        away first: scripts/run_train.sh sets it for a relaunch, whose crashed predecessor may still be exiting."""
        if wait is None:
            try:
                wait = float(os.environ.get("TITAN_LOCK_WAIT", "0"))
            except ValueError:
                wait = 0.0
        deadline = time.monotonic() + wait
        while True:
            try:
                return cls._acquire(folder)
            except ConfigError as e:
                if "in use by another run" not in str(e) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.5)

    @classmethod
    def _acquire(cls, folder: str) -> "RunLock":
        path = Path(folder) / LOCK_FILE
        record = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"job.dump_folder: {folder} is a file, not a folder")
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            for _ in range(3):  # a stale lock is moved away and the create retried
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    cls._take_over_if_stale(path, record)
                    continue
                with os.fdopen(fd, "w") as f:
                    json.dump(record, f)
                return cls(path, record)
        except OSError as e:
            raise ConfigError(f"job.dump_folder: cannot write to {folder} ({os_error(e)})") from None
        raise ConfigError(f"job.dump_folder: {path} keeps reappearing; another run is starting in {folder}")

    @staticmethod
    def _take_over_if_stale(path: Path, me: dict) -> None:
        try:
            text = path.read_text()
            holder = json.loads(text)
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: retry the create
        except (OSError, ValueError):
            holder, age, text = {}, float("inf"), None  # unreadable: a torn write of a dead run
        same_host = holder.get("host") == me["host"]
        if same_host and holder.get("pid") == me["pid"] and holder.get("process_start") == me["process_start"]:
            why = None  # this very process (an earlier build that was not closed)
        elif same_host and isinstance(holder.get("pid"), int):
            why = None if not _alive(holder["pid"], holder.get("process_start")) else "alive"
        else:
            why = None if age > STALE_SECONDS else "alive"
        if why:
            raise ConfigError(
                f"job.dump_folder: {path.parent} is in use by another run (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, started {holder.get('started')}; {path} touched {age:.0f}s ago); use another "
                f"job.dump_folder, or stop that run")
        if holder.get("pid") != me["pid"] or not same_host:
            logger.warning(f"run lock: taking over the stale {path} of host {holder.get('host')} pid "
                           f"{holder.get('pid')} (started {holder.get('started')}; no longer running)")
        aside = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return  # another starter moved it first: retry the create
        # Another starter may have replaced the stale lock between our read and the rename: then it is theirs.
        if text is not None and aside.read_text() != text:
            os.replace(aside, path)
            raise ConfigError(f"job.dump_folder: {path.parent} is being taken by another run starting now")
        aside.unlink()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the next start judges the lock by its holder's pid (same host) or its age

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent)."""
        self._stop.set()
        if self.path is None:
            return
        path, self.path = self.path, None
        try:
            if json.loads(path.read_text()) == self.record:
                path.unlink()
        except (OSError, ValueError):
            pass


def claim_dump_folder(folder: str) -> RunLock:
    """Rank 0 takes the lock (which also proves the folder writable); every rank learns the outcome."""
    lock, error = RunLock(), None
    if dist.get_rank() == 0:
        try:
            lock = RunLock.acquire(folder)
        except ConfigError as e:
            error = str(e)
    try:
        agree(error)
    except ConfigError:
        lock.release()
        raise
    return lock


# ---------------------------------------------------------------------------------------------------------------
# The launcher

_PR_SET_PDEATHSIG = 1
_launcher: int | None = None  # the pid of torchrun's agent, under torchrun


def tie_to_launcher() -> None:
    """Under torchrun, die with the launcher: torchrun (2.13) starts each worker in a session of its own, so workers
    of a SIGKILLed agent would otherwise keep training and writing beside its relaunch. Linux kills the worker
    (SIGKILL, as if it had crashed: the checkpoints stay consistent) when its parent exits; elsewhere
    `StopRequests.poll` notices a changed parent at the end of the step."""
    global _launcher
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # a plain `python -m titan.train` keeps running under nohup when its shell goes away
    _launcher = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _exit_if_orphaned()  # the launcher may have died before prctl took effect


def _exit_if_orphaned() -> None:
    if _launcher is not None and os.getppid() != _launcher:
        logger.error(f"rank {os.environ.get('RANK', 0)}: the launcher (pid {_launcher}) is gone; exiting")
        os._exit(1)


# ---------------------------------------------------------------------------------------------------------------
# Stop requests


class StopRequests:
    """SIGTERM, SIGUSR1 (Slurm's --signal, a preemption notice, `kill`) and SIGINT (Ctrl-C) ask the run to stop after
    the current step, which is saved. Used as `with StopRequests(world_size) as stop:` around the loop; `poll()` at
    the end of every step says whether to stop and why. Every rank must stop after the same step, so `poll` takes
    the maximum over the ranks: one tiny all-reduce on a CPU gloo group of its own (no device sync). The handlers are
    installed at the first poll, when the first step is over (before it a signal keeps its default action, as there
    is nothing to save yet), and restored at exit. A second Ctrl-C stops at once (KeyboardInterrupt, exit 130)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, world_size: int):
        self._group = new_group(backend="gloo") if world_size > 1 else None  # with the run's timeout
        self._received = 0
        self._old_handlers: dict | None = None

    def __enter__(self) -> "StopRequests":
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in (self._old_handlers or {}).items():
            signal.signal(sig, handler)
        self._old_handlers = None

    def _on_signal(self, signum, frame) -> None:
        self._received = signum  # acted on at the end of the current step, on every rank together
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def poll(self) -> str | None:
        """The name of the signal any rank received (None: go on)."""
        _exit_if_orphaned()
        if self._old_handlers is None and threading.current_thread() is threading.main_thread():
            self._old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        received = self._received
        if self._group is not None:  # a host tensor on a gloo group: no device is involved
            flag = torch.tensor(received)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            received = int(flag)
        return signal.Signals(received).name if received else None


def exit_with(line: str, code: int) -> int:
    """Print the line (rank 0) and return the exit code; also write it to $TITAN_EXIT_FILE, through which
    scripts/run_train.sh tells a failure worth a relaunch (a crash) from one that would fail again (bad input,
    divergence, a full disk): torchrun reports every worker failure as exit code 1."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr)
    if os.environ.get("TITAN_EXIT_FILE"):
        with contextlib.suppress(OSError):
            Path(os.environ["TITAN_EXIT_FILE"]).write_text(f"{code}\n")
    return code
