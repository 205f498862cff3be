"""Raw documents: finding the input files, and reading their documents (plain strings), for the in-memory training
path (titan/data/pretrain.py) and for scripts/prepare_data.py (titan/data/prepare.py) alike, so both see the same
documents in the same order; and the datasets titan ships (`DATASETS`, looked up by name with `locate`).

Formats: `.txt` (the whole file is one document); `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per line, the
document in its `text_key` field); `.parquet` (one row per document, the `text_key` column; needs pyarrow, the
`data` extra). Every bad input is a ConfigError naming `key`, the file and, for JSONL, the line. Not tokenizing, not
the layout of prepared data.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from titan.errors import ConfigError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


# The datasets shipped with titan (`training.dataset` / `validation.dataset` names) and where they are read from.
_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "data"
DATASETS: dict[str, dict[str, Path]] = {
    "austen": {"train": _ASSETS / "austen" / "train.txt", "validation": _ASSETS / "austen" / "validation.txt"},
    # Fine-tuning fixtures (titan/data/chat.py formats), made by scripts/make_chat_fixtures.py.
    "tiny_chat": {"train": _ASSETS / "tiny_chat" / "train.jsonl",
                 "validation": _ASSETS / "tiny_chat" / "validation.jsonl"},
    "tiny_preferences": {"train": _ASSETS / "tiny_preferences" / "train.jsonl"},
    "tiny_alpaca": {"train": _ASSETS / "tiny_alpaca" / "train.jsonl",
                   "validation": _ASSETS / "tiny_alpaca" / "validation.jsonl"},
    "tiny_sharegpt": {"train": _ASSETS / "tiny_sharegpt" / "train.jsonl",
                     "validation": _ASSETS / "tiny_sharegpt" / "validation.jsonl"},
    "tiny_prompt_completion": {"train": _ASSETS / "tiny_prompt_completion" / "train.jsonl",
                              "validation": _ASSETS / "tiny_prompt_completion" / "validation.jsonl"},
    # The RL recipes' (titan/data/rl.py): KTO's labelled replies, GRPO's prompts with their answers.
    "tiny_feedback": {"train": _ASSETS / "tiny_feedback" / "train.jsonl"},
    "tiny_arithmetic": {"train": _ASSETS / "tiny_arithmetic" / "train.jsonl"},
    "arithmetic": {"train": _ASSETS / "arithmetic" / "train.jsonl",
                   "validation": _ASSETS / "arithmetic" / "validation.jsonl"},
}


def locate(section: str, dataset: str, dataset_path: str, split: str, columns: list[str] | tuple = (),
           streaming: bool = False) -> tuple[Path, str]:
    """(path to read, config key to blame): `dataset_path` overrides the named dataset's split. A Hugging Face
    dataset (`hf:org/name`, titan/data/hub.py) becomes a local JSONL file of the split, its columns renamed by
    `columns` ("field=column"), streamed into the file with `streaming`."""
    if dataset_path:
        return Path(dataset_path), f"{section}.dataset_path"
    if dataset.startswith("hf:"):
        from titan.data import hub

        return hub.materialize(f"{section}.dataset", dataset, split, columns, streaming), f"{section}.dataset"
    if dataset not in DATASETS:
        raise ConfigError(
            f"{section}.dataset: unknown dataset {dataset!r} (known: {', '.join(DATASETS)}, or hf:org/name); "
            f"or set {section}.dataset_path to a prepared folder, or to text files or a folder of them"
        )
    if split not in DATASETS[dataset]:
        raise ConfigError(f"{section}.dataset: {dataset!r} has no {split} split; set {section}.dataset_path")
    return DATASETS[dataset][split], f"{section}.dataset"


def suffix(path: Path) -> str | None:
    """The document format of `path` (one of SUFFIXES), or None."""
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def expand(patterns: list[str], key: str) -> list[Path]:
    """Files named by `patterns` (files, folders searched recursively, globs), each once, in a fixed order: the
    order of the patterns, and within a folder or glob sorted by path. Files of other formats inside folders are
    skipped; named explicitly they are an error."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            if suffix(path) is None:
                raise ConfigError(f"{key}: {path} is not one of {', '.join(SUFFIXES)}")
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and suffix(p) is not None)
            if not found:
                raise ConfigError(f"{key}: folder {path} has no {', '.join(SUFFIXES)} files")
        elif glob.has_magic(pattern):
            found = sorted(p for p in map(Path, glob.glob(pattern, recursive=True))
                           if p.is_file() and suffix(p) is not None)
            if not found:
                raise ConfigError(f"{key}: {pattern!r} matches no {', '.join(SUFFIXES)} files")
        else:
            raise ConfigError(f"{key}: {path} does not exist")
        files += [f for f in found if f not in files]
    return files


def _fail(key: str, path: Path, what: str) -> ConfigError:
    return ConfigError(f"{key}: {path} {what}".replace("\n", " "))


def _open_text_stream(path: Path, key: str):
    """(a binary stream of the decompressed JSONL file, the file underneath it)."""
    fmt = suffix(path)
    raw = open(path, "rb")
    if fmt == ".jsonl.gz":
        return gzip.GzipFile(fileobj=raw), raw
    if fmt == ".jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise ConfigError(f"{key}: reading {path} needs the zstandard package: pip install -e \".[data]\"") \
                from None
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), raw
    return raw, raw


_JSON = json.JSONDecoder()


def _record_text(line: bytes, key: str, path: Path, lineno, text_key: str) -> str:
    try:
        # The decoder's raw_decode on the stripped text: what json.loads does, less its per-call encoding detection
        # and wrapping (measured: a third of the time; JSONL is UTF-8).
        text = line.decode("utf-8-sig").strip()  # -sig: a byte-order mark (Windows editors) is no error
        record, end = _JSON.raw_decode(text)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except UnicodeDecodeError:
        raise _fail(key, path, f"line {lineno()} is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise _fail(key, path, f"line {lineno()} is not JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        raise _fail(key, path, f"line {lineno()} has no string {text_key!r} field")
    return record[text_key]


PROGRESS_BYTES = 1 << 20  # how often readers call `progress`: per MiB, not per line


def jsonl_documents(path: Path, key: str, text_key: str = "text", start: int = 0, end: int | None = None,
                    progress=None) -> Iterator[str]:
    """The documents of the lines whose first byte lies in [start, end) (plain .jsonl; compressed files are read
    whole). `progress(n_bytes)` is called about every MiB with the bytes of the file on disk consumed since the
    last call (for .gz / .zst the compressed bytes, so that progress and the input's size agree)."""
    try:
        stream, raw = _open_text_stream(path, key)
    except OSError as e:
        raise _fail(key, path, f"cannot be read ({e.strerror or e})") from None
    compressed = stream is not raw
    with stream:
        pos = start
        if start > 0:  # a line belongs to the piece holding its first byte: finish the one in progress
            stream.seek(start - 1)
            if stream.read(1) != b"\n":
                pos += len(stream.readline())
        marks = [pos, 0]  # where the last report was: decompressed position, and the raw one for .gz / .zst

        def report() -> None:
            if compressed:  # the raw file's position (read ahead by at most a buffer) measures the bytes on disk
                now = raw.tell()
                progress(now - marks[1])
                marks[1] = now
            else:
                progress(pos - marks[0])
            marks[0] = pos

        reader = io.BufferedReader(stream, 1 << 20) if not isinstance(stream, io.BufferedReader) else stream
        while end is None or pos < end:
            try:
                line = reader.readline()
            except (OSError, EOFError) as e:  # a truncated or corrupt .gz / .zst
                raise _fail(key, path, f"cannot be read past byte {pos} of its decompressed text ({e})") from None
            if not line:
                break
            line_start, pos = pos, pos + len(line)
            if progress is not None and pos - marks[0] >= PROGRESS_BYTES:
                report()
            if line.strip():
                yield _record_text(line, key, path, lambda start=line_start: _line_number(path, key, start), text_key)
        if progress is not None and not raw.closed:
            report()


def _line_number(path: Path, key: str, offset: int) -> int:
    """1-based number of the line starting at decompressed byte `offset` (counted only when reporting an error)."""
    count = 0
    stream, _ = _open_text_stream(path, key)
    with stream:
        while offset > 0:
            chunk = stream.read(min(offset, 1 << 24))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count + 1


def txt_document(path: Path, key: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(key, path, f"cannot be read ({e})") from None
    if not text.strip():
        raise _fail(key, path, "is empty")
    return text


def parquet_file(path: Path, key: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{key}: reading {path} needs pyarrow: pip install -e \".[data]\"") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise _fail(key, path, f"is not a readable parquet file ({e})") from None


def row_group_disk_bytes(metadata, group: int) -> int:
    """A parquet row group's size on disk (its columns' compressed sizes): what progress counts."""
    rg = metadata.row_group(group)
    return sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))


def parquet_documents(path: Path, key: str, text_key: str = "text", start: int = 0, end: int | None = None,
                      progress=None) -> Iterator[str]:
    """The `text_key` column of row groups [start, end)."""
    pf = parquet_file(path, key)
    if text_key not in pf.schema_arrow.names:
        raise _fail(key, path, f"has no {text_key!r} column (columns: {', '.join(pf.schema_arrow.names)})")
    end = pf.num_row_groups if end is None else end
    for group in range(start, end):
        column = pf.read_row_group(group, columns=[text_key]).column(0)
        if progress is not None:
            progress(row_group_disk_bytes(pf.metadata, group))
        for row, text in enumerate(column.to_pylist()):
            if not isinstance(text, str):
                raise _fail(key, path, f"row group {group} row {row}: {text_key!r} is not a string")
            yield text


def documents(path: Path, key: str, text_key: str = "text", start: int = 0, end: int | None = None,
              progress=None) -> Iterator[str]:
    """The documents of `path` (of the byte range [start, end) of a .jsonl, or row groups of a .parquet)."""
    fmt = suffix(path)
    if fmt == ".txt":
        text = txt_document(path, key)
        if progress is not None:
            progress(path.stat().st_size)
        yield text
    elif fmt == ".parquet":
        yield from parquet_documents(path, key, text_key, start, end, progress)
    else:
        yield from jsonl_documents(path, key, text_key, start, end, progress)


def read_documents(files: list[Path], key: str, text_key: str = "text") -> Iterator[str]:
    """Every document of `files` in order; a file that holds none is an error naming it."""
    for path in files:
        empty = True
        for text in documents(path, key, text_key):
            empty = False
            yield text
        if empty:
            raise _fail(key, path, "is empty")


def jsonl_records(path: Path, key: str) -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a JSONL file (chat and preference data); a line that is
    not JSON is an error naming `key`, the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(key, path, f"cannot be read ({e})") from None
    records = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends, which splitlines() breaks on.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise _fail(key, path, f"line {lineno} is not JSON ({e.msg})") from None
    return records
