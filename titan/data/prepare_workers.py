"""The worker side of titan/data/prepare.py: processes that tokenize chunks (a byte range of a .jsonl, row groups of a
.parquet, or a whole file) into token ids and document lengths, and the pool that feeds them one chunk at a time.
Unlike multiprocessing.Pool it notices at once when a worker dies (the OOM killer's SIGKILL), so a preparation fails
within seconds instead of waiting forever. No torch is imported here: a worker's start-up costs the tokenizer only.
"""

from __future__ import annotations

import array
import contextlib
import multiprocessing as mp
import signal
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from titan.data import documents, tokens
from titan.errors import ConfigError

KEY = "--input"  # what bad input is blamed on
BLOCK_TOKENS = 1 << 18


class PrepareFailed(Exception):
    """The preparation cannot go on for a reason that is not bad input (a worker died): one line, exit code 1."""


_WORKER: dict = {}  # per process: the tokenizer and the shared progress counter


def init_worker(tokenizer_path: str, counter) -> None:
    from titan.data.tokenizer import load_tokenizer

    _WORKER.update(tokenizer=load_tokenizer(tokenizer_path), counter=counter)


def _report(n_bytes: int) -> None:
    """Add to the shared progress counter (the readers call this about once per MiB, so the lock is cheap)."""
    _WORKER["counter"].add(n_bytes)


def tokenize_chunk(job: tuple) -> tuple[int, np.ndarray, np.ndarray] | str:
    """(job index, token ids, document lengths) of a chunk, or the one-line error message. `job`: (index, a
    titan.data.prepare.Piece, text_key). The ids are gathered in a Python list and turned into one array per
    BLOCK_TOKENS (measured: half the time of extending an array.array per document, and far less than one numpy
    array per document, while the list's int objects stay bounded)."""
    index, piece, text_key = job
    tok = _WORKER["tokenizer"]
    dtype = tokens.token_dtype(tok.vocab_size)
    pending, parts, lengths = [], [], array.array("q")
    end = None if piece.end == -1 else piece.end
    try:
        for text in documents.documents(Path(piece.path), KEY, text_key, piece.start, end, progress=_report):
            doc = tok.encode(text, bos=True, eos=True)
            pending += doc
            lengths.append(len(doc))
            if len(pending) >= BLOCK_TOKENS:
                parts.append(np.array(pending, dtype=dtype))
                pending = []
    except ConfigError as e:
        return str(e)
    except OSError as e:
        return f"{KEY}: {piece.path} cannot be read ({e.strerror or e})"
    parts.append(np.array(pending, dtype=dtype))
    return index, np.concatenate(parts), np.frombuffer(lengths, dtype=np.int64)


class Counter:
    """Progress shared by the worker processes: a multiprocessing Value (or a plain int in one process); it travels
    to the workers as their start-up argument."""

    def __init__(self, shared: bool):
        self.value_ = mp.get_context("spawn").Value("q", 0) if shared else None
        self.local = 0

    def add(self, n: int) -> None:
        if self.value_ is None:
            self.local += n
        else:
            with self.value_.get_lock():
                self.value_.value += n

    @property
    def value(self) -> int:
        return self.local if self.value_ is None else self.value_.value


def _worker_main(conn, tokenizer_path: str, counter) -> None:
    """A worker process: tokenize the chunks the driver sends until it sends None (or goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the driver handles it
    init_worker(tokenizer_path, counter)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            result = tokenize_chunk(job)
        except Exception as e:  # noqa: BLE001 - sent back as one line rather than a worker's traceback
            result = f"{KEY}: {job[1].path}: {type(e).__name__}: {e}".replace("\n", " ")
        conn.send(result)


class Pool:
    """Worker processes, each fed one chunk at a time over its own pipe. Unlike multiprocessing.Pool, a worker that
    dies (SIGKILL from the OOM killer, say) is noticed at once through its process sentinel, so the run fails within
    seconds instead of waiting forever for a result that will never come."""

    def __init__(self, n: int, tokenizer_path: str, counter: Counter):
        ctx = mp.get_context("spawn")
        self.workers = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, tokenizer_path, counter), daemon=True)
            proc.start()
            child.close()
            self.workers.append((proc, parent))
        self.busy: dict[int, tuple] = {}  # worker -> its job

    def idle(self) -> list[int]:
        return [w for w in range(len(self.workers)) if w not in self.busy]

    def submit(self, worker: int, job: tuple) -> None:
        self.busy[worker] = job
        try:
            self.workers[worker][1].send(job)
        except OSError:  # it died while idle
            self._check(worker)

    def results(self, timeout: float) -> list:
        """Results that arrived within `timeout` seconds; PrepareFailed if a busy worker died."""
        conns = {self.workers[w][1]: w for w in self.busy}
        sentinels = [self.workers[w][0].sentinel for w in self.busy]
        out = []
        for ready in wait([*conns, *sentinels], timeout):
            if ready in conns:
                try:
                    out.append(ready.recv())
                except (EOFError, OSError):
                    continue  # it died: _check says how
                self.busy.pop(conns[ready])
        for w in list(self.busy):
            self._check(w)
        return out

    def _check(self, w: int) -> None:
        proc, job = self.workers[w][0], self.busy[w]
        if proc.is_alive():
            return
        code = proc.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        if code == -signal.SIGKILL:
            how += "; the OOM killer does this when memory runs out"
        raise PrepareFailed(f"worker process {proc.pid} died ({how}) while tokenizing {job[1].path} [{job[1].start}, "
                            f"{job[1].end}); finished shards are kept: run the same command again to resume (with "
                            f"fewer --workers if memory ran out)")

    def close(self, stop: bool) -> None:
        for proc, conn in self.workers:
            if stop:
                proc.kill()
            else:
                with contextlib.suppress(OSError):
                    conn.send(None)
        for proc, conn in self.workers:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
