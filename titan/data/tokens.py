"""Token data as training reads it: a sequence of documents, each `BOS text EOS`, concatenated into one stream of
token ids, held either in memory (raw text tokenized at start) or as memory-mapped shards of a prepared folder.

A prepared folder (written by scripts/prepare_data.py, or by any tool that follows this layout; see docs/data.md):

    manifest.json          {"format": "titan.tokens", "version": 1, "dtype": "uint16", "tokenizer": {...},
                            "num_tokens": T, "num_documents": D, "shards": [{"name", "num_tokens", "num_documents",
                            "bin_crc32", "idx_crc32"}], "inputs": [...]}   -- written last: a folder without it is
                            not (yet) a dataset (the CRC-32s are optional: folders written before them lack them)
    <name>.bin             the shard's token ids, little-endian, in `dtype` (the smallest that holds the vocabulary)
    <name>.idx             num_documents + 1 little-endian uint64 offsets into the shard: where each document starts,
                           then the shard's length

The stream is the shards in manifest order. This module owns the layout (reading it, its checks, and the small
helpers that write it) and reading the stream; not windows or the sample order (pretrain.py), nor tokenizing
(prepare.py). Checks: at start, cheaply (the manifest's totals, every listed shard present with the size it implies,
no unlisted one, each .idx starting at 0 and ending at its shard's length); while reading, what is read (ids inside
the vocabulary, offsets non-decreasing); in full with `verify` (scripts/prepare_data.py --verify: every byte against
its CRC-32, every id and offset).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from titan.errors import ConfigError

logger = logging.getLogger("titan")

FORMAT, VERSION = "titan.tokens", 1
MANIFEST = "manifest.json"
DTYPES = ("uint8", "uint16", "uint32")
OFFSET_DTYPE = np.dtype("<u8")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype holding every id below `vocab_size` (little-endian)."""
    for name in DTYPES:
        if vocab_size <= np.iinfo(name).max + 1:
            return np.dtype(name).newbyteorder("<")
    raise ValueError(f"vocabulary of {vocab_size} ids does not fit in uint32")


def write_atomically(path: Path, data: bytes) -> None:
    """Write then rename: a reader (or a resumed run) sees the whole file or none of it."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_bytes(obj) -> bytes:
    """Deterministic JSON (sorted keys, fixed indent): the same content always gives the same bytes."""
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()


class ArrayPiece:
    """A piece of a stream held in memory: its tokens and its document offsets (as in a .idx file)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self._tokens, self._offsets = tokens, offsets
        self.num_tokens, self.num_documents = len(tokens), len(offsets) - 1

    def tokens(self, lo: int, hi: int) -> np.ndarray:
        return self._tokens[lo:hi]

    def documents_of(self, lo: int, hi: int) -> np.ndarray:
        """The (piece-local) document index of each position in [lo, hi)."""
        return np.searchsorted(self._offsets, np.arange(lo, hi, dtype=np.int64), "right") - 1

    def close(self) -> None:
        pass


class FilePiece:
    """A shard on disk, read with pread(2) on demand. Not memory-mapped: a mapping counts every page it touches in
    the process's resident memory (measured: 2 MiB per random window where the page cache holds large folios), so
    resident memory would grow with the part of the corpus read; pages read with pread stay the kernel's cache.
    The files are opened on first use and closed by `close` (TokenStream keeps a few dozen open at most). What it
    reads is checked on the way (an id outside `vocab_size`, offsets going backwards): one line naming the file,
    where a corrupt shard used to raise an IndexError deep in the embedding or silently turn masking off."""

    def __init__(self, bin_file: Path, idx_file: Path, dtype: np.dtype, num_tokens: int, num_documents: int,
                 vocab_size: int | None = None, key: str = "training.dataset_path"):
        self.bin_file, self.idx_file, self.dtype = bin_file, idx_file, dtype
        self.num_tokens, self.num_documents = num_tokens, num_documents
        self.vocab_size, self.key = vocab_size, key
        self._fds: tuple[int, int] | None = None
        self._sparse: np.ndarray | None = None

    SPARSE = 1024  # offsets per block of the .idx search: 8 KiB read per window, 8 B per 1024 documents held

    def _read(self, which: int, dtype: np.dtype, lo: int, hi: int) -> np.ndarray:
        if self._fds is None:
            self._fds = (os.open(self.bin_file, os.O_RDONLY), os.open(self.idx_file, os.O_RDONLY))
        size = dtype.itemsize
        data = os.pread(self._fds[which], (hi - lo) * size, lo * size)
        if len(data) != (hi - lo) * size:
            raise ConfigError(f"{self.key}: {(self.bin_file, self.idx_file)[which]} is shorter than its manifest "
                              f"says (truncated while in use?)")
        return np.frombuffer(data, dtype=dtype)

    def _corrupt(self, file: Path, what: str) -> ConfigError:
        return ConfigError(f"{self.key}: {file} {what}: the shard is corrupt; check the folder with "
                           f"scripts/prepare_data.py --verify {file.parent}, and prepare it again")

    def tokens(self, lo: int, hi: int) -> np.ndarray:
        ids = self._read(0, self.dtype, lo, hi)
        if self.vocab_size is not None and len(ids) and int(ids.max()) >= self.vocab_size:
            at = int(np.argmax(ids >= self.vocab_size))
            raise self._corrupt(self.bin_file, f"holds token id {int(ids[at])} at position {lo + at}, outside the "
                                               f"tokenizer's {self.vocab_size} ids")
        return ids

    def _offsets(self, lo: int, hi: int) -> np.ndarray:
        block = self._read(1, OFFSET_DTYPE, lo, hi).astype(np.int64)
        if len(block) and (np.any(np.diff(block) < 0) or block[0] < 0 or block[-1] > self.num_tokens):
            raise self._corrupt(self.idx_file, f"has offsets out of order or past the shard's {self.num_tokens} "
                                               f"tokens (between entries {lo} and {hi})")
        return block

    def documents_of(self, lo: int, hi: int) -> np.ndarray:
        """The (piece-local) document index of each position in [lo, hi): a search in every SPARSE-th offset (read
        once, on first use), then one read of the block of offsets that holds the answer."""
        n = self.num_documents + 1
        if self._sparse is None:
            sparse = np.array([self._read(1, OFFSET_DTYPE, j, j + 1)[0] for j in range(0, n, self.SPARSE)],
                              dtype=np.int64)
            if np.any(np.diff(sparse) < 0):
                raise self._corrupt(self.idx_file, "has offsets out of order")
            self._sparse = sparse
        first = max(0, int(np.searchsorted(self._sparse, lo, "right")) - 1) * self.SPARSE
        last = min(n, (int(np.searchsorted(self._sparse, hi - 1, "right")) + 1) * self.SPARSE)
        block = self._offsets(first, last)
        return first + np.searchsorted(block, np.arange(lo, hi, dtype=np.int64), "right") - 1

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


class TokenStream:
    """The concatenated stream of one dataset's pieces: `read(start, n)` gives tokens [start, start + n) as int64,
    `document_index(start, n)` the document (numbered over the whole stream) holding each of those positions."""

    def __init__(self, pieces: list, name: str, max_open: int = 64):
        self.pieces, self.name = pieces, name
        self._offsets = np.concatenate([[0], np.cumsum([p.num_tokens for p in pieces], dtype=np.int64)])
        self._doc_offsets = np.concatenate([[0], np.cumsum([p.num_documents for p in pieces], dtype=np.int64)])
        self.num_tokens, self.num_documents = int(self._offsets[-1]), int(self._doc_offsets[-1])
        self._open: OrderedDict[int, None] = OrderedDict()  # pieces with open files, least recently used first
        self._max_open = max_open

    def __len__(self) -> int:
        return self.num_tokens

    def _piece(self, i: int):
        self._open[i] = None
        self._open.move_to_end(i)
        if len(self._open) > self._max_open:
            self.pieces[self._open.popitem(last=False)[0]].close()
        return self.pieces[i]

    def _spans(self, start: int, n: int):
        """(piece index, local lo, local hi) covering [start, start + n): usually one piece."""
        if start < 0 or n < 0 or start + n > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + n}) out of range [0, {self.num_tokens})")
        end = start + n
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < end:
            stop = min(end, int(self._offsets[i + 1]))
            yield i, start - int(self._offsets[i]), stop - int(self._offsets[i])
            start, i = stop, i + 1

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int64, across shard boundaries."""
        parts = [self._piece(i).tokens(lo, hi) for i, lo, hi in self._spans(start, n)]
        return (np.concatenate(parts) if len(parts) > 1 else parts[0]).astype(np.int64)

    def document_index(self, start: int, n: int) -> np.ndarray:
        """For each position in [start, start + n): the index of the document holding it."""
        parts = [self._doc_offsets[i] + self._piece(i).documents_of(lo, hi) for i, lo, hi in self._spans(start, n)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def in_memory(documents, tokenizer, name: str) -> TokenStream:
    """The stream of `documents` (an iterable of strings) tokenized now, as one in-memory piece."""
    dtype = token_dtype(tokenizer.vocab_size)
    ids, starts = [], [0]
    for text in documents:
        doc = tokenizer.encode(text, bos=True, eos=True)
        ids.append(np.asarray(doc, dtype=dtype))
        starts.append(starts[-1] + len(doc))
    tokens = np.concatenate(ids) if ids else np.zeros(0, dtype)
    return TokenStream([ArrayPiece(tokens, np.asarray(starts, dtype=OFFSET_DTYPE))], name)


def is_prepared(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_manifest(path: Path, key: str) -> dict:
    """The manifest of the prepared folder `path`, checked for the fields training relies on."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {file} ({e})".replace("\n", " ")) from None
    ok = (isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("dtype") in DTYPES
          and isinstance(manifest.get("shards"), list) and isinstance(manifest.get("tokenizer"), dict)
          and all(isinstance(s, dict) and isinstance(s.get("name"), str) and type(s.get("num_tokens")) is int
                  and type(s.get("num_documents")) is int for s in manifest["shards"]))
    if not ok:
        raise ConfigError(f"{key}: {file} is not a {FORMAT} manifest (see docs/data.md for the layout)")
    if manifest.get("version") != VERSION:
        raise ConfigError(f"{key}: {file} has format version {manifest.get('version')!r}; this titan reads "
                          f"version {VERSION}")
    return manifest


def _check_tokenizer(path: Path, key: str, manifest: dict, tokenizer, allow_change: bool) -> None:
    made_with = manifest["tokenizer"]
    if same_tokenizer(tokenizer, made_with.get("sha256")):
        return
    text = (f"{path} was prepared with tokenizer {made_with.get('path')!r} (sha256 "
            f"{str(made_with.get('sha256'))[:12]}), but this run's model.tokenizer_path is {tokenizer.name!r} "
            f"(sha256 {tokenizer.identity[:12]})")
    if not allow_change:
        raise ConfigError(f"{key}: {text}; prepare the data again with --tokenizer, or set model.tokenizer_path (or "
                          f"checkpoint.allow_tokenizer_change = true to read it anyway)")
    logger.warning(f"data: {text}; reading it anyway (checkpoint.allow_tokenizer_change)")


def same_tokenizer(tokenizer, recorded) -> bool:
    """Whether `recorded` (a manifest's or checkpoint's sha256) names this tokenizer: its content identity, or the
    sha256 of its files' bytes, which titan recorded before it compared content."""
    return recorded in (tokenizer.identity, getattr(tokenizer, "file_identity", tokenizer.identity))


def structure_problems(path: Path, manifest: dict) -> list[str]:
    """What the cheap start-up check finds wrong with a prepared folder (no token is read): the manifest's totals
    against its shards, every listed shard present with the size it implies and listed once, no unlisted shard file
    beside them, each .idx starting at 0 and ending at its shard's length."""
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    shards, problems = manifest["shards"], []
    for total in ("num_tokens", "num_documents"):
        if manifest.get(total) != sum(s[total] for s in shards):
            problems.append(f"{path / MANIFEST} says {total} {manifest.get(total)!r}, its shards add up to "
                            f"{sum(s[total] for s in shards)} (a shard missing from its list?)")
    names = [s["name"] for s in shards]
    listed = {f"{n}{ext}" for n in names for ext in (".bin", ".idx")}
    unlisted = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".idx") and f.name not in listed)
    if len(set(names)) != len(names) or unlisted:
        problems.append(f"{path / MANIFEST} lists {len(set(names))} of the shards in the folder "
                        f"({', '.join(unlisted[:3]) or 'a name twice'} not once)")
    for shard in shards:
        bin_file, idx_file = path / f"{shard['name']}.bin", path / f"{shard['name']}.idx"
        for file, expected in ((bin_file, shard["num_tokens"] * dtype.itemsize),
                               (idx_file, (shard["num_documents"] + 1) * OFFSET_DTYPE.itemsize)):
            try:
                size = file.stat().st_size
            except OSError:
                problems.append(f"shard file {file} is missing")
                continue
            if size != expected:
                problems.append(f"shard file {file} has {size} bytes, the manifest says {expected} (truncated or "
                                f"overwritten; prepare the data again)")
        if problems:
            continue
        with open(idx_file, "rb") as f:
            first = np.frombuffer(f.read(8), OFFSET_DTYPE)[0]
            f.seek(-8, os.SEEK_END)
            last = np.frombuffer(f.read(8), OFFSET_DTYPE)[0]
        if first != 0 or last != shard["num_tokens"]:
            problems.append(f"shard file {idx_file} runs from {first} to {last}, not from 0 to its "
                            f"{shard['num_tokens']} tokens (scrambled)")
    return problems


def open_prepared(path: Path, key: str, tokenizer, allow_tokenizer_change: bool = False) -> TokenStream:
    """The stream of a prepared folder, read on demand. Checks first, reading no token (`structure_problems`): the
    tokenizer is the one the data was made with (by content), the manifest adds up, every shard file is there with
    exactly the size the manifest implies, and nothing unlisted is beside them."""
    manifest = read_manifest(path, key)
    _check_tokenizer(path, key, manifest, tokenizer, allow_tokenizer_change)
    problems = structure_problems(path, manifest)
    if problems:
        raise ConfigError(f"{key}: {problems[0]}" + (f" (and {len(problems) - 1} more problems; scripts/"
                                                      f"prepare_data.py --verify lists them)" if len(problems) > 1
                                                      else ""))
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    pieces = [FilePiece(path / f"{s['name']}.bin", path / f"{s['name']}.idx", dtype, s["num_tokens"],
                        s["num_documents"], tokenizer.vocab_size, key) for s in manifest["shards"]]
    return TokenStream(pieces, str(path))


# ---------------------------------------------------------------------------------------------------------------
# The full check (scripts/prepare_data.py --verify)

_BLOCK = 1 << 24  # elements per read: bounded memory whatever the shard size


def verify(path: Path, key: str = "--verify") -> list[str]:
    """Everything wrong with the prepared folder `path`, one line each ([] = sound): the start-up checks, then every
    byte of every shard against the manifest's CRC-32 (where recorded), every token id inside the recorded
    vocabulary, every .idx non-decreasing from 0 to its shard's length."""
    manifest = read_manifest(path, key)
    problems = structure_problems(path, manifest)
    if problems:
        return problems
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    vocab = manifest["tokenizer"].get("vocab_size")
    for shard in manifest["shards"]:
        for ext, file_dtype in ((".bin", dtype), (".idx", OFFSET_DTYPE)):
            file, crc, previous, bad = path / f"{shard['name']}{ext}", 0, 0, None
            with open(file, "rb") as f:
                position = 0
                while chunk := f.read(_BLOCK * file_dtype.itemsize):
                    crc = zlib.crc32(chunk, crc)
                    values = np.frombuffer(chunk, file_dtype)
                    if bad is None and ext == ".bin" and isinstance(vocab, int) and values.max() >= vocab:
                        at = int(np.argmax(values >= vocab))
                        bad = f"holds token id {int(values[at])} at position {position + at}, outside {vocab} ids"
                    if bad is None and ext == ".idx":
                        steps = np.diff(np.concatenate([[previous], values.astype(np.int64)]))
                        if np.any(steps < 0):
                            bad = f"has offsets out of order (near entry {position + int(np.argmax(steps < 0))})"
                        previous = int(values[-1])
                    position += len(values)
            recorded = shard.get(f"{ext[1:]}_crc32")
            if bad is None and isinstance(recorded, int) and crc != recorded:
                bad = f"has CRC-32 {crc:08x}, {recorded:08x} recorded (bytes changed since it was prepared)"
            if bad:
                problems.append(f"shard file {file} {bad}")
    return problems
