"""Datasets by Hugging Face name: `training.dataset = "hf:org/name"` (also `hf:org/name/subset`, `hf:org/name:split`,
or `hf:/a/folder` written by `Dataset.save_to_disk` or holding data files), through the `datasets` library (the
`datasets` extra), from its local cache or a local folder; with HF_DATASETS_OFFLINE=1 (and HF_HUB_OFFLINE=1) it never
touches the network.

The split's records are written once as a JSONL file in the datasets cache (`<HF_DATASETS_CACHE>/titan-jsonl/`), after
renaming columns to the fields titan reads (`dataset_columns = ["field=column", ...]`), and every reader then takes
that file as it takes any local JSONL: pre-training documents (and scripts/prepare_data.py's `--input hf:...`),
SFT conversations, preference pairs, and whatever a recipe reads through `titan.data.documents.locate` (KTO and GRPO
prompt data too). With `dataset_streaming`, records are streamed into the file one by one, for sets larger than
memory or the Arrow cache. A dataset that is not cached while the Hub cannot be reached is one line naming it and the
fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from titan.errors import ConfigError

logger = logging.getLogger("titan")

PREFIX = "hf:"


def parse(name: str) -> tuple[str, str | None, str | None]:
    """`hf:org/name[/subset][:split]` or `hf:/folder[:split]` -> (repo id or folder, subset or None, split or None)."""
    rest = name[len(PREFIX):]
    split = None
    if ":" in rest and "/" not in rest.rsplit(":", 1)[1] and not Path(rest).exists():
        rest, split = rest.rsplit(":", 1)
    if Path(rest).exists() or rest.startswith(("/", ".")):
        return rest, None, split
    parts = rest.split("/")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None), split


def _datasets(key: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError(f'{key}: a Hugging Face dataset needs the datasets package: pip install -e ".[datasets]"') \
            from None
    datasets.logging.set_verbosity_error()  # its progress bars and "using the cached version" lines
    datasets.disable_progress_bars()
    return datasets


def _load(key: str, name: str, split: str, streaming: bool):
    datasets = _datasets(key)
    source, subset, wanted = parse(name)
    split = wanted or split
    try:
        folder = Path(source)
        if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
            data = datasets.load_from_disk(str(folder))  # Dataset.save_to_disk / DatasetDict.save_to_disk
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ConfigError(f"{key}={name}: no split {split!r} in {folder} (it has {', '.join(data)})")
                data = data[split]
            return (data.to_iterable_dataset() if streaming else data), split
        return datasets.load_dataset(source, subset, split=split, streaming=streaming), split
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - not cached, offline, no such split: all "cannot be had here"
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ConfigError(
            f"{key}={name}: split {split!r} is not in the local Hugging Face datasets cache and cannot be fetched "
            f"({reason}); {'offline mode is on (HF_DATASETS_OFFLINE); ' if offline else ''}load it once where the Hub "
            f"is reachable (datasets.load_dataset({source!r}{', ' + repr(subset) if subset else ''})) and copy "
            f"HF_DATASETS_CACHE here, or save it with save_to_disk and set {key} = hf:/that/folder") from None


def _renames(key: str, columns: list[str]) -> dict[str, str]:
    """["field=column", ...] -> {column: field}."""
    out = {}
    for item in columns:
        field, sep, column = item.partition("=")
        if not sep or not field or not column:
            raise ConfigError(f"{key}: dataset_columns entry {item!r} is not field=column")
        out[column] = field
    return out


def materialize(key: str, name: str, split: str, columns: list[str] | tuple = (), streaming: bool = False) -> Path:
    """The split of a Hugging Face dataset as a local JSONL file (written once; reused while the dataset's fingerprint
    and the column mapping are the same). `key` names the setting in errors (training.dataset)."""
    renames = _renames(key, list(columns))
    data, split = _load(key, name, split, streaming)
    cache = Path(_datasets(key).config.HF_DATASETS_CACHE) / "titan-jsonl"
    identity = json.dumps([name, split, renames, None if streaming else getattr(data, "_fingerprint", None)])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    path = cache / f"{parse(name)[0].strip('/').replace('/', '--')}-{split}-{digest}.jsonl"
    if path.is_file():  # (a streamed split is written once: delete the file to read it again)
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # every rank may write it: each its own, then a rename
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in data:
            record = {renames.get(k, k): v for k, v in record.items()}
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            n += 1
    if not n:
        tmp.unlink()
        raise ConfigError(f"{key}={name}: split {split!r} holds no records")
    tmp.replace(path)
    logger.info(f"data: {name} split {split}: {n:,} records as {path}")
    return path
