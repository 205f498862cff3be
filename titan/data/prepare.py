"""Tokenize a corpus once into the prepared layout of titan/data/tokens.py: in parallel processes, resumably, across
many machines (`--num_shards K --shard_index I`), with a progress line. scripts/prepare_data.py is its command line.

The work is cut into units that depend only on the inputs (their list, sizes and modification times) and
`shard_mb`: small files are grouped until a unit holds about `shard_mb` MB, a large plain .jsonl (or .parquet) is cut
into pieces of about that size at line (row group) boundaries, and each unit becomes one shard `shard-<unit>`. Inside
a shard the work is cut again into chunks of CHUNK_BYTES (byte ranges at line boundaries, or row groups), which the
worker processes tokenize in parallel; the driver writes their tokens into the shard in order. Both cuts are fixed
by the inputs, so the output is byte-identical whatever the number of workers or machines, and one big file keeps
every worker busy.

A unit is done when its `shard-<n>.json` exists (written last, after its .bin and .idx were renamed into place) and
describes the same unit (the same files, sizes and modification times: an input edited since is prepared again); a
rerun skips done units. `manifest.json` is written last of all, when every unit (of every part) is done. Nothing
else in the output folder is ever touched: a folder holding other files is refused, and each part is locked while a
run prepares it (`prepare-<I>-of-<K>.lock`). A worker that dies (the OOM killer, say) stops the run within seconds
with one line; finished shards are kept. This module imports no torch: a worker's start-up costs the tokenizer only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import socket
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from titan.data import documents, tokens
from titan.data.prepare_workers import KEY, Counter, Pool, PrepareFailed, init_worker, tokenize_chunk
from titan.errors import ConfigError

__all__ = ["PrepareFailed", "chunks", "finish", "part_lock", "plan_units", "prepare"]

OUR_FILES = ("manifest.json",)
CHUNK_BYTES = 16 * 2**20  # a worker's unit of work inside a shard: fixed, so the output does not depend on workers
MAX_WORKERS = 1024

@dataclass(frozen=True)
class Piece:
    """Documents of one file (of `size` bytes, modified at `mtime` ns): the lines starting in bytes [start, end) of a
    plain .jsonl, row groups [start, end) of a .parquet, or the whole file (start = 0, end = -1). `nbytes`: its share
    of the input, for planning (for row groups, their uncompressed size); `disk`: the bytes of the file it reads, for
    progress."""

    path: str
    size: int
    mtime: int
    nbytes: int
    disk: int
    start: int = 0
    end: int = -1


def _pieces(path: Path, piece_bytes: int) -> list[Piece]:
    stat = path.stat()
    size, mtime, fmt = stat.st_size, stat.st_mtime_ns, documents.suffix(path)
    if size == 0:
        raise ConfigError(f"{KEY}: {path} is empty")
    if fmt == ".jsonl" and size > piece_bytes:
        cuts = list(range(0, size, piece_bytes)) + [size]
        return [Piece(str(path), size, mtime, b - a, b - a, a, b) for a, b in zip(cuts, cuts[1:])]
    if fmt == ".parquet":
        meta = documents.parquet_file(path, KEY).metadata
        pieces, start, acc, disk = [], 0, 0, 0
        for g in range(meta.num_row_groups):
            acc += meta.row_group(g).total_byte_size
            disk += documents.row_group_disk_bytes(meta, g)
            if acc >= piece_bytes or g == meta.num_row_groups - 1:
                pieces.append(Piece(str(path), size, mtime, acc, disk, start, g + 1))
                start, acc, disk = g + 1, 0, 0
        return pieces or [Piece(str(path), size, mtime, size, size)]
    return [Piece(str(path), size, mtime, size, size)]


def plan_units(files: list[Path], shard_mb: float) -> list[tuple[Piece, ...]]:
    """The units of work (each one shard), in the order their documents appear in the stream: consecutive pieces
    grouped until they hold about shard_mb MB."""
    piece_bytes = max(1, int(shard_mb * 2**20))
    units, current, acc = [], [], 0
    for f in files:
        for piece in _pieces(f, piece_bytes):
            current.append(piece)
            acc += piece.nbytes
            if acc >= piece_bytes:
                units.append(tuple(current))
                current, acc = [], 0
    if current:
        units.append(tuple(current))
    return units


def chunks(piece: Piece) -> list[Piece]:
    """A piece cut into the chunks workers tokenize: byte ranges of CHUNK_BYTES of a plain .jsonl (a line belongs to
    the chunk holding its first byte), row groups of about CHUNK_BYTES of a .parquet; other files whole."""
    fmt = documents.suffix(Path(piece.path))
    if fmt == ".jsonl":
        lo, hi = piece.start, piece.size if piece.end == -1 else piece.end
        cuts = list(range(lo, hi, CHUNK_BYTES)) + [hi]
        return [Piece(piece.path, piece.size, piece.mtime, b - a, b - a, a, b) for a, b in zip(cuts, cuts[1:])]
    if fmt == ".parquet" and piece.end - piece.start > 1:
        meta = documents.parquet_file(Path(piece.path), KEY).metadata
        out, start, acc, disk = [], piece.start, 0, 0
        for g in range(piece.start, piece.end):
            acc += meta.row_group(g).total_byte_size
            disk += documents.row_group_disk_bytes(meta, g)
            if acc >= CHUNK_BYTES or g == piece.end - 1:
                out.append(Piece(piece.path, piece.size, piece.mtime, acc, disk, start, g + 1))
                start, acc, disk = g + 1, 0, 0
        return out
    return [piece]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


# ---------------------------------------------------------------------------------------------------------------
# The driver


class ShardWriter:
    """Writes one shard from its chunks' results, in order: .bin and .idx under temporary names, CRC-32 as they are
    written, then renamed into place and recorded in shard-<n>.json (last: the mark that the unit is done)."""

    def __init__(self, out: Path, index: int, unit: tuple[Piece, ...], identity: str):
        self.out, self.name, self.unit, self.identity = out, shard_name(index), unit, identity
        self.piece_docs = [0] * len(unit)  # documents of each piece: a whole file that held none is an error
        self.bin_tmp = out / f"{self.name}.bin.tmp{os.getpid()}"
        self.idx_tmp = out / f"{self.name}.idx.tmp{os.getpid()}"
        self.bin, self.idx = open(self.bin_tmp, "wb"), open(self.idx_tmp, "wb")
        self.bin_crc, self.idx_crc, self.tokens, self.docs = 0, 0, 0, 0
        self._write_offsets(np.zeros(1, dtype=np.int64))

    def _write_offsets(self, offsets: np.ndarray) -> None:
        data = offsets.astype(tokens.OFFSET_DTYPE).tobytes()
        self.idx.write(data)
        self.idx_crc = zlib.crc32(data, self.idx_crc)

    def add(self, piece: int, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.piece_docs[piece] += len(lengths)
        data = ids.tobytes()
        self.bin.write(data)
        self.bin_crc = zlib.crc32(data, self.bin_crc)
        self._write_offsets(self.tokens + np.cumsum(lengths))
        self.tokens += len(ids)
        self.docs += len(lengths)

    def finish(self) -> None:
        for piece, n in zip(self.unit, self.piece_docs):
            if n == 0 and piece.start == 0 and piece.end == -1:  # a piece of a large file may hold none
                raise ConfigError(f"{KEY}: {piece.path} holds no documents")
        self.bin.close()
        self.idx.close()
        os.replace(self.bin_tmp, self.out / f"{self.name}.bin")
        os.replace(self.idx_tmp, self.out / f"{self.name}.idx")
        record = {"unit": [asdict(p) for p in self.unit], "num_tokens": self.tokens, "num_documents": self.docs,
                  "tokenizer": self.identity, "bin_crc32": self.bin_crc, "idx_crc32": self.idx_crc}
        tokens.write_atomically(self.out / f"{self.name}.json", tokens.json_bytes(record))

    def discard(self) -> None:
        for f, tmp in ((self.bin, self.bin_tmp), (self.idx, self.idx_tmp)):
            f.close()
            tmp.unlink(missing_ok=True)


def _check_output(out: Path) -> None:
    """The output folder must be new, empty, or one of ours (an interrupted or finished preparation)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output: {out} exists and is not a folder")
    if not out.is_dir():
        return
    for entry in out.iterdir():
        name = entry.name
        ours = name in OUR_FILES or (name.startswith(("shard-", "part-", "prepare-", "manifest.json.tmp"))
                                     and entry.is_file())
        if not ours:
            raise ConfigError(f"--output: {out} holds {name!r}, which scripts/prepare_data.py did not write; "
                              f"choose a new or empty folder (nothing was changed)")


@contextlib.contextmanager
def part_lock(out: Path, shard_index: int, num_shards: int):
    """One run per part of an output folder: an exclusive flock(2) on prepare-<I>-of-<K>.lock, released by the
    kernel when the holder exits however it exits (a killed run leaves no stale lock), and the file removed at the
    end (the output holds only the dataset). The holder writes its host and pid into it, for the message a second
    run gets. A lock taken on a file that its holder removed meanwhile is taken again on the new file."""
    path = out / f"prepare-{shard_index:05d}-of-{num_shards:05d}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"--output: cannot write to {out} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"--output: part {shard_index} of {num_shards} of {out} is being prepared by another "
                              f"run ({holder}); wait for it, or stop it") from None
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == path.stat().st_ino:
                break
        os.close(fd)  # the file was removed by the run that held it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding the lock
        os.close(fd)


def _unit_done(out: Path, index: int, unit: tuple[Piece, ...], identity: str) -> dict | None:
    """The record of a finished shard of exactly this unit (the same files, sizes and mtimes, and tokenizer)."""
    name = shard_name(index)
    try:
        record = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("unit") != [asdict(p) for p in unit] or \
            record.get("tokenizer") != identity or not all(type(record.get(k)) is int for k in
                                                           ("num_tokens", "num_documents")):
        return None
    if not (out / f"{name}.bin").is_file() or not (out / f"{name}.idx").is_file():
        return None
    return record


class Progress:
    """One status line: input MB done (of the files on disk), MB/s, tokens/s, shards, ETA. Rewritten in place on a
    terminal, a plain line every 10 s otherwise (logs of batch jobs)."""

    def __init__(self, total_bytes: int, total_units: int, stream=None):
        self.total_bytes, self.total_units, self.stream = total_bytes, total_units, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.tokens = self.units = 0

    def update(self, done_bytes: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        done_bytes = min(done_bytes, self.total_bytes)  # a compressed reader's read-ahead can pass the end
        elapsed = max(now - self.start, 1e-9)
        rate = done_bytes / elapsed
        eta = max(0.0, (self.total_bytes - done_bytes) / rate) if rate > 0 else math.inf
        eta_text = "?" if eta == math.inf else f"{int(eta) // 3600}:{int(eta) // 60 % 60:02d}:{int(eta) % 60:02d}"
        line = (f"prepare: {done_bytes / 1e6:,.1f}/{self.total_bytes / 1e6:,.1f} MB "
                f"({100 * done_bytes / max(self.total_bytes, 1):.0f}%)  {rate / 1e6:.2f} MB/s  "
                f"{self.tokens / elapsed / 1e6:.2f} M tokens/s  shards {self.units}/{self.total_units}  ETA {eta_text}")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # with the progress line, on one stream, in order


def _plan_id(units, identity: str, text_key: str) -> str:
    text = json.dumps([[asdict(p) for p in u] for u in units] + [identity, text_key], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_options(workers: int, shard_mb: float, num_shards: int, shard_index: int, text_key: str) -> None:
    """Every option's range, so that a bad value is one line naming it (never a traceback or a hang)."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be in [1, {MAX_WORKERS}] (got {workers})")
    if not (math.isfinite(shard_mb) and 2**-20 <= shard_mb <= 2**20):
        raise ConfigError(f"--shard_mb must be a number of MB in [1e-6, 1048576] (got {shard_mb})")
    if not 1 <= num_shards <= 10**6:
        raise ConfigError(f"--num_shards must be in [1, 1000000] (got {num_shards})")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard_index must be in [0, --num_shards) (got {shard_index} of {num_shards})")
    if not text_key.strip():
        raise ConfigError("--text_key must name a field (got an empty string)")


def prepare(inputs: list[str], output: str, tokenizer_path: str = "", workers: int = 1, text_key: str = "text",
            shard_mb: float = 256.0, num_shards: int = 1, shard_index: int = 0, log=None) -> bool:
    """Prepare part `shard_index` of `num_shards` of the inputs into `output`; write the manifest once every part is
    done. Returns whether the dataset is complete."""
    from titan.data.tokenizer import load_tokenizer

    log = log or _log
    check_options(workers, shard_mb, num_shards, shard_index, text_key)
    if not output.strip() or any(not p.strip() for p in inputs):
        raise ConfigError(f"{'--output' if not output.strip() else KEY} must name a path (got an empty string)")
    tok = load_tokenizer(tokenizer_path)
    files = documents.expand(inputs, KEY)
    out = Path(output)
    _check_output(out)
    units = plan_units(files, shard_mb)
    plan_id = _plan_id(units, tok.identity, text_key)
    manifest_path = out / tokens.MANIFEST
    if manifest_path.is_file():
        manifest = tokens.read_manifest(out, "--output")
        if manifest.get("plan") != plan_id:
            raise ConfigError(f"--output: {out} already holds a prepared dataset of other inputs (or inputs edited "
                              f"since), tokenizer or options; choose a new folder (nothing was changed)")
        log(f"prepare: {out} is already complete ({manifest['num_tokens']:,} tokens)")
        return True
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output: cannot create {out} ({e.strerror or e})") from None
    with part_lock(out, shard_index, num_shards):
        mine = range(shard_index * len(units) // num_shards, (shard_index + 1) * len(units) // num_shards)
        for i in mine:  # temporary files of this part's shards, left by a killed run (other parts' are theirs)
            for tmp in out.glob(f"{shard_name(i)}.*.tmp*"):
                tmp.unlink()
        todo = [i for i in mine if _unit_done(out, i, units[i], tok.identity) is None]
        if len(todo) < len(mine):
            log(f"prepare: resuming, {len(mine) - len(todo)} of {len(mine)} shards already done")
        log(f"prepare: {len(files)} input files, {sum(f.stat().st_size for f in files) / 1e6:,.1f} MB -> "
            f"{len(units)} shards" + (f" (this is part {shard_index} of {num_shards}: shards {mine.start}.."
                                      f"{mine.stop - 1})" if num_shards > 1 else "")
            + f", {workers} worker(s), tokenizer {tok.name}")
        try:
            _run_units(todo, units, out, tokenizer_path, text_key, workers, tok.identity)
        except OSError as e:  # the output folder (a full disk, no permission): the inputs' errors are ConfigErrors
            raise ConfigError(f"--output: cannot write to {out} ({e.strerror or e})") from None
        part = {"plan": plan_id, "num_shards": num_shards, "shard_index": shard_index, "units": list(mine)}
        tokens.write_atomically(out / f"part-{shard_index:05d}-of-{num_shards:05d}.json", tokens.json_bytes(part))
        return finish(out, units, files, tok, tokenizer_path or "debug", plan_id, text_key, num_shards, log)


def _run_units(todo: list[int], units, out: Path, tokenizer_path: str, text_key: str, workers: int,
               identity: str) -> None:
    """Tokenize the chunks of every unit in `todo` (in worker processes, or here with one worker) and write each
    shard as its chunks come back, in order."""
    jobs = [(i, j, chunk) for i in todo for j, piece in enumerate(units[i]) for chunk in chunks(piece)]
    ends = {job[0]: k for k, job in enumerate(jobs)}  # each shard's last job
    progress = Progress(sum(p.disk for i in todo for p in units[i]), len(todo))
    counter = Counter(shared=workers > 1)
    pool = Pool(min(workers, len(jobs)), tokenizer_path, counter) if workers > 1 and jobs else None
    if pool is None:
        init_worker(tokenizer_path, counter)
    writers: dict[int, ShardWriter] = {}
    done: dict[int, tuple] = {}  # results that arrived before their turn
    submitted = written = 0
    stopped = True  # until every shard is written: an error or Ctrl-C stops the workers at once
    try:
        while written < len(jobs):
            if pool is None:
                done[written] = tokenize_chunk((written, jobs[written][2], text_key))
            else:  # keep every worker busy, at most 2 chunks per worker ahead of the one written next
                for w in pool.idle():
                    if submitted < len(jobs) and submitted - written < 2 * len(pool.workers):
                        pool.submit(w, (submitted, jobs[submitted][2], text_key))
                        submitted += 1
                for result in pool.results(timeout=0.5):
                    done[result[0] if isinstance(result, tuple) else -1] = result
            if -1 in done or isinstance(done.get(written), str):
                raise ConfigError(done.get(-1) or done[written])
            while written in done:
                _, ids, lengths = done.pop(written)
                i, piece, _ = jobs[written]
                if i not in writers:
                    writers[i] = ShardWriter(out, i, units[i], identity)
                writers[i].add(piece, ids, lengths)
                progress.tokens += len(ids)  # per 16 MiB chunk: a shard's total came only at its end (0 tokens/s first)
                if written == ends[i]:
                    writers[i].finish()
                    del writers[i]
                    progress.units += 1
                written += 1
            progress.update(counter.value)
        stopped = False
    finally:
        if pool is not None:
            pool.close(stop=stopped)
        for writer in writers.values():  # a stopped run leaves nothing that looks like a shard
            writer.discard()
    if todo:
        progress.update(counter.value, force=True)
        progress.close()


def finish(out: Path, units, files: list[Path], tok, tokenizer_label: str, plan_id: str, text_key: str,
           num_shards: int, log=_log) -> bool:
    """Write manifest.json if every part of this plan is done; else say which parts are missing."""
    parts = {}
    for f in out.glob(f"part-*-of-{num_shards:05d}.json"):
        try:
            record = json.loads(f.read_text())
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict) or record.get("plan") != plan_id:
            raise ConfigError(f"--output: {f} was written for other inputs, tokenizer or options than this part; "
                              f"every part must be given the same --input, --tokenizer, --text_key and --shard_mb")
        parts[record.get("shard_index")] = record
    missing = sorted(set(range(num_shards)) - set(parts))
    if missing:
        log(f"prepare: part(s) {', '.join(map(str, missing))} of {num_shards} not finished yet; the last part to "
            f"finish writes {tokens.MANIFEST}")
        return False
    shards = []
    for i, unit in enumerate(units):
        record = _unit_done(out, i, unit, tok.identity)
        if record is None:
            raise ConfigError(f"--output: {out / shard_name(i)}.json is missing or stale although its part is done; "
                              f"run the preparation again (finished shards are kept)")
        shards.append({"name": shard_name(i), "num_tokens": record["num_tokens"],
                       "num_documents": record["num_documents"],
                       **{k: record[k] for k in ("bin_crc32", "idx_crc32") if type(record.get(k)) is int}})
    manifest = {
        "format": tokens.FORMAT, "version": tokens.VERSION, "plan": plan_id,
        "dtype": tokens.token_dtype(tok.vocab_size).name,
        "tokenizer": {"path": tokenizer_label, "sha256": tok.identity, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "document_format": "BOS text EOS", "text_key": text_key,
        "num_tokens": sum(s["num_tokens"] for s in shards), "num_documents": sum(s["num_documents"] for s in shards),
        "shards": shards, "inputs": [{"path": str(f), "size": f.stat().st_size} for f in files],
    }
    tokens.write_atomically(out / tokens.MANIFEST, tokens.json_bytes(manifest))
    log(f"prepare: wrote {out / tokens.MANIFEST}: {manifest['num_documents']:,} documents, "
        f"{manifest['num_tokens']:,} tokens in {len(shards)} shards ({manifest['dtype']})")
    return True
