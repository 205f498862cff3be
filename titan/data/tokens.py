"""Token data as training reads it: a sequence of documents, each `BOS text EOS`, concatenated into one stream of
token ids, held either in memory (raw text tokenized at start) or as memory-mapped shards of a prepared folder.

A prepared folder (written by scripts/prepare_data.py, or by any tool that follows this layout; see docs/data.md):

    manifest.json          {"format": "titan.tokens", "version": 1, "dtype": "uint16", "tokenizer": {...},
                            "num_tokens": T, "num_documents": D, "shards": [{"name", "num_tokens", "num_documents"}],
                            "inputs": [...]}   -- written last: a folder without it is not (yet) a dataset
    <name>.bin             the shard's token ids, little-endian, in `dtype` (the smallest that holds the vocabulary)
    <name>.idx             num_documents + 1 little-endian uint64 offsets into the shard: where each document starts,
                           then the shard's length

The stream is the shards in manifest order. This module owns the layout (reading it, and the small helpers that
write it) and reading the stream; not windows or the sample order (pretrain.py), nor tokenizing (prepare.py).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from titan.errors import ConfigError

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
    The files are opened on first use and closed by `close` (TokenStream keeps a few dozen open at most)."""

    def __init__(self, bin_file: Path, idx_file: Path, dtype: np.dtype, num_tokens: int, num_documents: int):
        self.bin_file, self.idx_file, self.dtype = bin_file, idx_file, dtype
        self.num_tokens, self.num_documents = num_tokens, num_documents
        self._fds: tuple[int, int] | None = None
        self._sparse: np.ndarray | None = None

    SPARSE = 1024  # offsets per block of the .idx search: 8 KiB read per window, 8 B per 1024 documents held

    def _read(self, which: int, dtype: np.dtype, lo: int, hi: int) -> np.ndarray:
        if self._fds is None:
            self._fds = (os.open(self.bin_file, os.O_RDONLY), os.open(self.idx_file, os.O_RDONLY))
        size = dtype.itemsize
        data = os.pread(self._fds[which], (hi - lo) * size, lo * size)
        if len(data) != (hi - lo) * size:
            raise OSError(f"{(self.bin_file, self.idx_file)[which]} is shorter than its manifest says")
        return np.frombuffer(data, dtype=dtype)

    def tokens(self, lo: int, hi: int) -> np.ndarray:
        return self._read(0, self.dtype, lo, hi)

    def documents_of(self, lo: int, hi: int) -> np.ndarray:
        """The (piece-local) document index of each position in [lo, hi): a search in every SPARSE-th offset (read
        once, on first use), then one read of the block of offsets that holds the answer."""
        n = self.num_documents + 1
        if self._sparse is None:
            self._sparse = np.array([self._read(1, OFFSET_DTYPE, j, j + 1)[0] for j in range(0, n, self.SPARSE)],
                                    dtype=np.int64)
        first = max(0, int(np.searchsorted(self._sparse, lo, "right")) - 1) * self.SPARSE
        last = min(n, (int(np.searchsorted(self._sparse, hi - 1, "right")) + 1) * self.SPARSE)
        block = self._read(1, OFFSET_DTYPE, first, last).astype(np.int64)
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


def open_prepared(path: Path, key: str, tokenizer) -> TokenStream:
    """The memory-mapped stream of a prepared folder. Checks, without reading any tokens: the tokenizer is the one
    the data was made with, every shard file exists with exactly the size the manifest implies."""
    manifest = read_manifest(path, key)
    made_with = manifest["tokenizer"]
    if made_with.get("sha256") != tokenizer.identity:
        raise ConfigError(
            f"{key}: {path} was prepared with tokenizer {made_with.get('path')!r} (sha256 "
            f"{str(made_with.get('sha256'))[:12]}), but this run's model.tokenizer_path is {tokenizer.name!r} "
            f"(sha256 {tokenizer.identity[:12]}); prepare the data again with --tokenizer, or set model.tokenizer_path"
        )
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    pieces = []
    for shard in manifest["shards"]:
        bin_file, idx_file = path / f"{shard['name']}.bin", path / f"{shard['name']}.idx"
        for file, expected in ((bin_file, shard["num_tokens"] * dtype.itemsize),
                               (idx_file, (shard["num_documents"] + 1) * OFFSET_DTYPE.itemsize)):
            try:
                size = file.stat().st_size
            except OSError:
                raise ConfigError(f"{key}: shard file {file} is missing") from None
            if size != expected:
                raise ConfigError(f"{key}: shard file {file} has {size} bytes, the manifest says {expected} "
                                  f"(truncated or overwritten; prepare the data again)")
        pieces.append(FilePiece(bin_file, idx_file, dtype, shard["num_tokens"], shard["num_documents"]))
    return TokenStream(pieces, str(path))
