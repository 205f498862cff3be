"""Pre-training data: documents -> one token stream -> windows of seq_len + 1 tokens, in a global order that does not
depend on the data-parallel layout, served by resumable `StatefulDataLoader`s.

Owns the dataset registry, reading .txt/.jsonl documents, packing, the global sample order and its split over dp
ranks. Not the tokenizer (tokenizer.py), not chat/SFT data. Only rank-local work: no collectives.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from titan.config import ConfigError

if TYPE_CHECKING:
    from titan.config import Training, Validation
    from titan.data.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label value the loss skips; it counts valid labels with `label != IGNORE_INDEX`

_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "data"
DATASETS: dict[str, dict[str, Path]] = {
    "austen": {"train": _ASSETS / "austen" / "train.txt", "validation": _ASSETS / "austen" / "validation.txt"},
    # Fine-tuning fixtures (titan/data/chat.py formats), made by scripts/make_chat_fixtures.py.
    "tiny_chat": {"train": _ASSETS / "tiny_chat" / "train.jsonl", "validation": _ASSETS / "tiny_chat" / "validation.jsonl"},
    "tiny_preferences": {"train": _ASSETS / "tiny_preferences" / "train.jsonl"},
}


# ---------------------------------------------------------------------------------------------------------------
# Documents and the token stream


def _locate(section: str, dataset: str, dataset_path: str, split: str) -> tuple[Path, str]:
    """(path to read, config key to blame): `dataset_path` overrides the named dataset's split."""
    if dataset_path:
        return Path(dataset_path), f"{section}.dataset_path"
    if dataset not in DATASETS:
        raise ConfigError(
            f"{section}.dataset: unknown dataset {dataset!r} (known: {', '.join(DATASETS)}); "
            f"or set {section}.dataset_path to a .txt/.jsonl file or folder"
        )
    if split not in DATASETS[dataset]:
        raise ConfigError(f"{section}.dataset: {dataset!r} has no {split} split; set {section}.dataset_path")
    return DATASETS[dataset][split], f"{section}.dataset"


def read_documents(path: Path, key: str) -> list[str]:
    """A .txt file is one document, each .jsonl line one document (its "text"); a folder = its files, sorted."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise ConfigError(f"{key}: folder {path} has no .txt or .jsonl files")
    elif path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise ConfigError(f"{key}: {path} is neither a .txt nor a .jsonl file")
        files = [path]
    else:
        raise ConfigError(f"{key}: {path} does not exist")
    return [doc for f in files for doc in _read_file(f, key)]


def read_text(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {path} ({e})".replace("\n", " ")) from None


def jsonl_records(path: Path, key: str) -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a JSONL file; a line that is not JSON is an error
    naming `key`, the file and the line."""
    records = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends, which splitlines() breaks on.
    for lineno, line in enumerate(read_text(path, key).split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: {path} line {lineno} is not JSON ({e.msg})") from None
    return records


def _read_file(path: Path, key: str) -> list[str]:
    if path.suffix == ".txt":
        text = read_text(path, key)
        if not text.strip():
            raise ConfigError(f"{key}: {path} is empty")
        return [text]
    records = jsonl_records(path, key)
    if not records:
        raise ConfigError(f"{key}: {path} is empty")
    for lineno, record in records:
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"{key}: {path} line {lineno} has no string \"text\" field")
    return [record["text"] for _, record in records]


def token_stream(docs: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """All documents as BOS doc EOS, concatenated; int32 halves the memory of int64 (ids < 2**31)."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc, bos=True, eos=True)
    return torch.tensor(ids, dtype=torch.int32)


class PackedWindows(Dataset):
    """Sample i = stream[i*seq_len : i*seq_len + seq_len + 1]: stride seq_len, so every token is predicted once."""

    def __init__(self, stream: torch.Tensor, seq_len: int):
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        return self.stream[i * self.seq_len : (i + 1) * self.seq_len + 1]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document, for rows of contiguous documents (..., seq):
    ids [0 0 0 1 1 2] -> positions [0 1 2 0 1 0]."""
    idx = torch.arange(document_ids.shape[-1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=-1).values


def collate(windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    w = torch.stack(windows).long()
    return {"input": w[:, :-1].contiguous(), "label": w[:, 1:].contiguous()}


_STREAMS: dict[tuple, torch.Tensor] = {}  # (data files, tokenizer files) -> token stream, for this process


def _cached_stream(path: Path, key: str, tokenizer: Tokenizer) -> torch.Tensor:
    """token_stream of the documents at `path`, reused while neither the files nor the tokenizer change (tests and
    scripts that build several runs in one process tokenize a corpus once)."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    ident = (tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()),
             tokenizer.source)
    if tokenizer.source is None or ident not in _STREAMS:
        stream = token_stream(read_documents(path, key), tokenizer)
        if tokenizer.source is None:
            return stream
        if len(_STREAMS) >= 4:  # a few corpora (train and validation splits); a long-lived process stays bounded
            _STREAMS.clear()
        _STREAMS[ident] = stream
    return _STREAMS[ident]


def _load_windows(section: str, cfg, split: str, tokenizer: Tokenizer, seq_len: int) -> tuple[PackedWindows, str]:
    """The windows and "key: path", for error messages about them."""
    path, key = _locate(section, cfg.dataset, cfg.dataset_path, split)
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    windows = PackedWindows(_cached_stream(path, key, tokenizer), seq_len)
    if len(windows) == 0:
        raise ConfigError(
            f"{key}: {path} has {len(windows.stream)} tokens, fewer than training.seq_len + 1 = {seq_len + 1} "
            f"for one window"
        )
    return windows, f"{key}: {path}"


# ---------------------------------------------------------------------------------------------------------------
# Sample order. Global positions g = 0, 1, 2, ... are cut into blocks of local_batch_size; block b goes to dp rank
# b % dp_size. One optimizer step takes global_batch_size consecutive positions, so dp=2 x 2 micro-steps sees the
# same samples as dp=1 x 4 micro-steps.


class GlobalOrderSampler:
    """Infinite batch sampler: position g -> sample perm_e[g % N] with e = g // N, a fresh permutation per epoch.

    Its state is `position`, the global positions consumed by all dp ranks together (the same number on every rank),
    so a loader with another dp_size, dp_rank or local_batch_size continues from it. StatefulDataLoader saves it
    through `state_dict` and, because this class is Stateful, restores it without also fast-forwarding.
    """

    def __init__(self, num_samples: int, local_batch_size: int, seed: int, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} not in [0, dp_size={dp_size})")
        self.num_samples, self.local_batch_size, self.seed = num_samples, local_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.position = 0
        self._perm_epoch, self._perm = -1, []

    def permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            # Mix seed and epoch so that seed s, epoch e+1 does not replay seed s+1, epoch e.
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._perm_epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=gen).tolist()
        return self._perm

    def sample_at(self, g: int) -> int:
        epoch, i = divmod(g, self.num_samples)
        return self.permutation(epoch)[i]

    def __iter__(self):
        # Reads self.position on every step, so a load_state_dict before the first next() takes effect.
        while True:
            start = self.position + self.dp_rank * self.local_batch_size
            block = [self.sample_at(g) for g in range(start, start + self.local_batch_size)]
            # Advance before yielding: with num_workers=0 the loader draws indices exactly when it builds the batch,
            # so after each batch the state already counts it (a generator resumes only at the next draw).
            self.position += self.dp_size * self.local_batch_size
            yield block

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class SequentialBlocks:
    """Finite batch sampler for validation: the same block split, unshuffled, one pass per iter().

    Only whole rounds of dp_size blocks are served (the tail of fewer than local_batch_size x dp_size windows is
    dropped), so every rank yields the same number of batches and no rank waits in a collective for a peer.
    """

    def __init__(self, num_samples: int, local_batch_size: int, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} not in [0, dp_size={dp_size})")
        self.local_batch_size, self.dp_rank, self.dp_size = local_batch_size, dp_rank, dp_size
        self.num_batches = num_samples // (local_batch_size * dp_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for k in range(self.num_batches):
            start = (k * self.dp_size + self.dp_rank) * self.local_batch_size
            yield list(range(start, start + self.local_batch_size))


# ---------------------------------------------------------------------------------------------------------------
# Loaders. num_workers=0: tokenising is done up front and a batch is a slice, and a worker's prefetch would put the
# sampler ahead of the batches actually consumed.


def _loader(dataset: Dataset, sampler, collate_fn=collate) -> StatefulDataLoader:
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13: a warning the user can do nothing about.
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=0)


def build_pretrain_dataloader(cfg: Training, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> StatefulDataLoader:
    """Infinite, shuffled batches {"input", "label"} of [local_batch_size, seq_len] for this dp rank."""
    windows, _ = _load_windows("training", cfg, "train", tokenizer, cfg.seq_len)
    sampler = GlobalOrderSampler(len(windows), cfg.local_batch_size, cfg.seed, dp_rank, dp_size)
    return _loader(windows, sampler)


def build_validation_dataloader(
    cfg: Validation, tokenizer: Tokenizer, seq_len: int, dp_rank: int, dp_size: int
) -> StatefulDataLoader:
    """Finite, unshuffled batches of the validation split; each iter() is one pass (partial last round dropped)."""
    windows, where = _load_windows("validation", cfg, "validation", tokenizer, seq_len)
    sampler = SequentialBlocks(len(windows), cfg.local_batch_size, dp_rank, dp_size)
    if len(sampler) == 0:
        raise ConfigError(
            f"{where} has {len(windows)} windows of seq_len={seq_len}, fewer than validation.local_batch_size x dp "
            f"= {cfg.local_batch_size * dp_size}"
        )
    return _loader(windows, sampler)
