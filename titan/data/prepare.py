"""Tokenize a corpus once into the prepared layout of titan/data/tokens.py: in parallel processes, resumably, across
many machines (`--num_shards K --shard_index I`), with a progress line. scripts/prepare_data.py is its command line.

The work is cut into units that depend only on the inputs (their list and sizes) and `shard_mb`: small files are
grouped until a unit holds about `shard_mb` MB, a large plain .jsonl (or .parquet) is cut into pieces of about that
size at line (row group) boundaries, and each unit becomes one shard `shard-<unit>`. So the output is byte-identical
whatever the number of workers or machines, and a run over K parts writes exactly the files one run would.

A unit is done when its `shard-<n>.json` exists (written last, after its .bin and .idx were renamed into place) and
describes the same unit; a rerun skips done units. `manifest.json` is written last of all, when every unit (of
every part) is done. Nothing else in the output folder is ever touched: a folder holding other files is refused.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from titan.data import documents, tokens
from titan.errors import ConfigError

KEY = "--input"  # what bad input is blamed on
OUR_FILES = ("manifest.json",)


@dataclass(frozen=True)
class Piece:
    """Documents of one file (of `size` bytes): the lines starting in bytes [start, end) of a plain .jsonl, row groups
    [start, end) of a .parquet, or the whole file (start = 0, end = -1). `nbytes`: its share of the input, for
    planning and progress (for row groups, their uncompressed size)."""

    path: str
    size: int
    nbytes: int
    start: int = 0
    end: int = -1


def _pieces(path: Path, piece_bytes: int) -> list[Piece]:
    size = path.stat().st_size
    fmt = documents.suffix(path)
    if size == 0:
        raise ConfigError(f"{KEY}: {path} is empty")
    if fmt == ".jsonl" and size > piece_bytes:
        cuts = list(range(0, size, piece_bytes)) + [size]
        return [Piece(str(path), size, b - a, a, b) for a, b in zip(cuts, cuts[1:])]
    if fmt == ".parquet":
        meta = documents.parquet_file(path, KEY).metadata
        pieces, start, acc = [], 0, 0
        for g in range(meta.num_row_groups):
            acc += meta.row_group(g).total_byte_size
            if acc >= piece_bytes or g == meta.num_row_groups - 1:
                pieces.append(Piece(str(path), size, acc, start, g + 1))
                start, acc = g + 1, 0
        return pieces or [Piece(str(path), size, size)]
    return [Piece(str(path), size, size)]


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


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


# ---------------------------------------------------------------------------------------------------------------
# Workers: one unit -> shard files


_WORKER: dict = {}  # per process: the tokenizer and the shared progress counter


def _init_worker(tokenizer_path: str, counter, ignore_sigint: bool = True) -> None:
    import signal

    from titan.data.tokenizer import load_tokenizer

    if ignore_sigint:  # Ctrl-C reaches the whole process group: the driver alone handles it (and stops the pool)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    _WORKER["tokenizer"] = load_tokenizer(tokenizer_path)
    _WORKER["counter"] = counter


def _report(n_bytes: int) -> None:
    counter = _WORKER.get("counter")
    if counter is not None:
        with counter.get_lock():
            counter.value += n_bytes


def prepare_unit(job: tuple[int, tuple[Piece, ...], str, str]) -> tuple[int, int, int] | str:
    """Write shard `index` from its pieces. Returns (index, tokens, documents), or the one-line error message."""
    index, unit, out_dir, text_key = job
    tok = _WORKER["tokenizer"]
    dtype = tokens.token_dtype(tok.vocab_size)
    out, name = Path(out_dir), shard_name(index)
    bin_tmp, idx_tmp = out / f"{name}.bin.tmp{os.getpid()}", out / f"{name}.idx.tmp{os.getpid()}"
    pending, starts, n_tokens = [], [0], 0
    try:
        with open(bin_tmp, "wb") as bin_file:
            for piece in unit:
                path = Path(piece.path)
                end = None if piece.end == -1 else piece.end
                n_docs = 0
                for text in documents.documents(path, KEY, text_key, piece.start, end, progress=_report):
                    ids = tok.encode(text, bos=True, eos=True)
                    pending.append(np.asarray(ids, dtype=dtype))
                    n_tokens += len(ids)
                    starts.append(n_tokens)
                    n_docs += 1
                    if len(pending) >= 4096:
                        np.concatenate(pending).tofile(bin_file)
                        pending.clear()
                if n_docs == 0 and piece.start == 0 and piece.end == -1:
                    raise ConfigError(f"{KEY}: {path} holds no documents")
            if pending:
                np.concatenate(pending).tofile(bin_file)
        np.asarray(starts, dtype=tokens.OFFSET_DTYPE).tofile(idx_tmp)
        os.replace(bin_tmp, out / f"{name}.bin")
        os.replace(idx_tmp, out / f"{name}.idx")
        record = {"unit": [asdict(p) for p in unit], "num_tokens": n_tokens, "num_documents": len(starts) - 1,
                  "tokenizer": tok.identity}
        tokens.write_atomically(out / f"{name}.json", tokens.json_bytes(record))
        return index, n_tokens, len(starts) - 1
    except ConfigError as e:
        return str(e)
    except OSError as e:
        return f"{out}: cannot write shard {name} ({e.strerror or e})"
    finally:
        for tmp in (bin_tmp, idx_tmp):
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# The driver


def _check_output(out: Path) -> None:
    """The output folder must be new, empty, or one of ours (an interrupted or finished preparation)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output: {out} exists and is not a folder")
    if not out.is_dir():
        return
    for entry in out.iterdir():
        name = entry.name
        ours = name in OUR_FILES or (name.startswith(("shard-", "part-", "manifest.json.tmp"))
                                     and entry.is_file())
        if not ours:
            raise ConfigError(f"--output: {out} holds {name!r}, which scripts/prepare_data.py did not write; "
                              f"choose a new or empty folder (nothing was changed)")


def _unit_done(out: Path, index: int, unit: tuple[Piece, ...], identity: str) -> tuple[int, int] | None:
    name = shard_name(index)
    try:
        record = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("unit") != [asdict(p) for p in unit] or record.get("tokenizer") != identity:
        return None
    if not (out / f"{name}.bin").is_file() or not (out / f"{name}.idx").is_file():
        return None
    return record["num_tokens"], record["num_documents"]


class Progress:
    """One status line: input MB done, MB/s, tokens/s, shards, ETA. Rewritten in place on a terminal, a plain line
    every 10 s otherwise (logs of batch jobs)."""

    def __init__(self, total_bytes: int, total_units: int, stream=sys.stderr):
        self.total_bytes, self.total_units, self.stream = total_bytes, total_units, stream
        self.tty = stream.isatty()
        self.start = self.last = time.perf_counter()
        self.tokens = self.units = 0

    def update(self, done_bytes: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done_bytes / elapsed
        eta = (self.total_bytes - done_bytes) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
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


def _inputs_record(files: list[Path]) -> list[dict]:
    return [{"path": str(f), "size": f.stat().st_size} for f in files]


def _plan_id(units, identity: str, text_key: str) -> str:
    text = json.dumps([[asdict(p) for p in u] for u in units] + [identity, text_key], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prepare(inputs: list[str], output: str, tokenizer_path: str = "", workers: int = 1, text_key: str = "text",
            shard_mb: float = 256.0, num_shards: int = 1, shard_index: int = 0, log=None) -> bool:
    """Prepare part `shard_index` of `num_shards` of the inputs into `output`; write the manifest once every part is
    done. Returns whether the dataset is complete."""
    from titan.data.tokenizer import load_tokenizer

    log = log or _log
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    if not (num_shards >= 1 and 0 <= shard_index < num_shards):
        raise ConfigError(f"--shard_index must be in [0, --num_shards) (got {shard_index} of {num_shards})")
    if not shard_mb > 0:
        raise ConfigError(f"--shard_mb must be > 0 (got {shard_mb})")
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
            raise ConfigError(f"--output: {out} already holds a prepared dataset of other inputs, tokenizer or "
                              f"options; choose a new folder (nothing was changed)")
        log(f"prepare: {out} is already complete ({manifest['num_tokens']:,} tokens)")
        return True
    out.mkdir(parents=True, exist_ok=True)

    mine = range(shard_index * len(units) // num_shards, (shard_index + 1) * len(units) // num_shards)
    for i in mine:  # temporary files of this part's shards, left by a killed run (other parts' are theirs)
        for tmp in out.glob(f"{shard_name(i)}.*.tmp*"):
            tmp.unlink()
    done = {i: _unit_done(out, i, units[i], tok.identity) for i in mine}
    todo = [i for i in mine if done[i] is None]
    unit_bytes = {i: sum(p.nbytes for p in units[i]) for i in todo}
    if len(todo) < len(mine):
        log(f"prepare: resuming, {len(mine) - len(todo)} of {len(mine)} shards already done")
    log(f"prepare: {len(files)} input files, {sum(f.stat().st_size for f in files) / 1e6:,.1f} MB -> "
        f"{len(units)} shards" + (f" (this is part {shard_index} of {num_shards}: shards {mine.start}..{mine.stop - 1})"
                                   if num_shards > 1 else "") + f", {workers} worker(s), tokenizer {tok.name}")
    _run_units(todo, units, unit_bytes, out, tokenizer_path, text_key, workers)
    tokenizer_label = tokenizer_path or "debug"

    part = {"plan": plan_id, "num_shards": num_shards, "shard_index": shard_index, "units": list(mine)}
    tokens.write_atomically(out / f"part-{shard_index:05d}-of-{num_shards:05d}.json", tokens.json_bytes(part))
    return finish(out, units, files, tok, tokenizer_label, plan_id, text_key, num_shards, log)


def _run_units(todo, units, unit_bytes, out: Path, tokenizer_path: str, text_key: str, workers: int) -> None:
    progress = Progress(sum(unit_bytes.values()), len(todo))
    counter = mp.get_context("spawn").Value("q", 0)
    jobs = [(i, units[i], str(out), text_key) for i in todo]
    error = None
    if workers == 1:
        _init_worker(tokenizer_path, counter, ignore_sigint=False)
        results, pool = map(prepare_unit, jobs), None
    else:
        pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_path, counter))
        results = pool.imap_unordered(prepare_unit, jobs)
    stopped = True  # until the loop ends normally: an error or Ctrl-C stops the workers at once
    try:
        for result in results:
            if isinstance(result, str):
                error = result
                break
            _, n_tokens, _ = result
            progress.tokens += n_tokens
            progress.units += 1
            progress.update(counter.value)
        else:
            stopped = False
    finally:
        if pool is not None:
            pool.terminate() if stopped else pool.close()
            pool.join()
        if stopped:  # a stopped worker leaves its temporary files: never anything that looks like a shard
            for i in todo:
                for tmp in out.glob(f"{shard_name(i)}.*.tmp*"):
                    tmp.unlink(missing_ok=True)
        _WORKER.clear()
    if error:
        progress.close()
        raise ConfigError(error)
    if todo:
        progress.update(counter.value, force=True)
        progress.close()


def finish(out: Path, units, files: list[Path], tok, tokenizer_label: str, plan_id: str, text_key: str,
           num_shards: int, log=_log) -> bool:
    """Write manifest.json if every part of this plan is done; else say which parts are missing."""
    parts = {}
    for f in out.glob(f"part-*-of-{num_shards:05d}.json"):
        record = json.loads(f.read_text())
        if record.get("plan") != plan_id:
            raise ConfigError(f"--output: {f} was written for other inputs, tokenizer or options than this part; "
                              f"every part must be given the same --input, --tokenizer, --text_key and --shard_mb")
        parts[record["shard_index"]] = record
    missing = sorted(set(range(num_shards)) - set(parts))
    if missing:
        log(f"prepare: part(s) {', '.join(map(str, missing))} of {num_shards} not finished yet; the last part to "
            f"finish writes {tokens.MANIFEST}")
        return False
    shards = []
    for i, unit in enumerate(units):
        counts = _unit_done(out, i, unit, tok.identity)
        if counts is None:
            raise ConfigError(f"--output: {out / shard_name(i)}.json is missing or stale although its part is done; "
                              f"run the preparation again (finished shards are kept)")
        shards.append({"name": shard_name(i), "num_tokens": counts[0], "num_documents": counts[1]})
    manifest = {
        "format": tokens.FORMAT, "version": tokens.VERSION, "plan": plan_id,
        "dtype": tokens.token_dtype(tok.vocab_size).name,
        "tokenizer": {"path": tokenizer_label, "sha256": tok.identity, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "document_format": "BOS text EOS", "text_key": text_key,
        "num_tokens": sum(s["num_tokens"] for s in shards), "num_documents": sum(s["num_documents"] for s in shards),
        "shards": shards, "inputs": _inputs_record(files),
    }
    tokens.write_atomically(out / tokens.MANIFEST, tokens.json_bytes(manifest))
    log(f"prepare: wrote {out / tokens.MANIFEST}: {manifest['num_documents']:,} documents, "
        f"{manifest['num_tokens']:,} tokens in {len(shards)} shards ({manifest['dtype']})")
    return True
