"""Pre-training data: token streams (raw text tokenized at start, or prepared shards memory-mapped) -> windows of
seq_len + 1 tokens, from one or more sources, put in the global sample order of titan/data/order.py and served by its
resumable loaders.

Owns the windows (and document masking inside them) and the pre-training loaders. Not the tokenizer (tokenizer.py),
not reading files or the shipped datasets (documents.py), not the on-disk layout (tokens.py), not the sample order
and mixing (order.py), not chat/SFT data. Only rank-local work.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from titan.data import documents, tokens
from titan.data.documents import locate
from titan.data.order import GlobalOrderSampler, SequentialBlocks, make_loader
from titan.errors import ConfigError

if TYPE_CHECKING:
    from titan.config import Training, Validation
    from titan.data.tokenizer import Tokenizer

logger = logging.getLogger("titan")

IGNORE_INDEX = -100  # label value the loss skips; it counts valid labels with `label != IGNORE_INDEX`


# ---------------------------------------------------------------------------------------------------------------
# Token streams


_STREAMS: dict[tuple, tokens.TokenStream] = {}  # (data files, tokenizer files) -> raw text's stream, this process


def token_stream(path: Path, key: str, tokenizer: Tokenizer, allow_tokenizer_change: bool = False) \
        -> tokens.TokenStream:
    """The stream at `path`: a prepared folder (read on demand: start-up and memory do not grow with the corpus;
    made with this tokenizer unless `allow_tokenizer_change`, checkpoint's override key), or raw documents tokenized
    in memory now (for small corpora; reused within a process while neither the files nor the tokenizer change, so
    tests and scripts that build several runs tokenize a corpus once)."""
    if path.is_dir() and tokens.is_prepared(path):
        return tokens.open_prepared(path, key, tokenizer, allow_tokenizer_change)
    if path.is_dir() and any(path.glob("shard-*.idx")):
        raise ConfigError(f"{key}: {path} is an unfinished prepared dataset (no {tokens.MANIFEST} yet): finish "
                          f"scripts/prepare_data.py (every part, if it was split with --num_shards)")
    files = documents.expand([str(path)], key)
    ident = (tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files), tokenizer.source)
    if tokenizer.source is not None and ident in _STREAMS:
        return _STREAMS[ident]
    stream = tokens.in_memory(documents.read_documents(files, key), tokenizer, str(path))
    if tokenizer.source is not None:
        if len(_STREAMS) >= 4:  # a few corpora (train and validation splits); a long-lived process stays bounded
            _STREAMS.clear()
        _STREAMS[ident] = stream
    return stream


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document, for rows of contiguous documents (..., seq):
    ids [0 0 0 1 1 2] -> positions [0 1 2 0 1 0]."""
    idx = torch.arange(document_ids.shape[-1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=-1).values


class Windows(Dataset):
    """Sample i = stream[i*seq_len : i*seq_len + seq_len + 1] as {"input", "label"}: stride seq_len, so every token
    is predicted once. With `document_masking`, rows also carry "document_ids" (0, 1, ... within the row: attention
    stays inside a document) and the label that crosses a document boundary is IGNORE_INDEX (predicting the next
    document's BOS from the previous one's EOS teaches nothing); with `reset_positions` also "positions" that
    restart at 0 with each document."""

    def __init__(self, stream: tokens.TokenStream, seq_len: int, document_masking: bool = False,
                 reset_positions: bool = False):
        self.stream, self.seq_len = stream, seq_len
        self.document_masking, self.reset_positions = document_masking, reset_positions

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        start, n = i * self.seq_len, self.seq_len + 1
        window = torch.from_numpy(self.stream.read(start, n))
        row = {"input": window[:-1], "label": window[1:].clone()}
        if self.document_masking:
            docs = torch.from_numpy(self.stream.document_index(start, n))
            docs -= docs[0].clone()
            row["label"][docs[1:] != docs[:-1]] = IGNORE_INDEX
            row["document_ids"] = docs[:-1]
            if self.reset_positions:
                row["positions"] = document_positions(row["document_ids"])
        return row


def _windows(key: str, path: Path, tokenizer: Tokenizer, seq_len: int, cfg: Training,
             allow_tokenizer_change: bool = False) -> Windows:
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    stream = token_stream(path, key, tokenizer, allow_tokenizer_change)
    windows = Windows(stream, seq_len, cfg.document_masking, cfg.reset_positions)
    if len(windows) == 0:
        raise ConfigError(f"{key}: {path} has {len(windows.stream)} tokens, fewer than training.seq_len + 1 = "
                          f"{seq_len + 1} for one window")
    return windows


def source_names(paths: list[str]) -> list[str]:
    """Short names for the log: each path's last component, made unique with its position if two share one."""
    names = [Path(p).name.split(".")[0] or f"source{i}" for i, p in enumerate(paths)]
    return [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def build_pretrain_dataloader(cfg: Training, tokenizer: Tokenizer, dp_rank: int, dp_size: int, *,
                              allow_tokenizer_change: bool = False) -> StatefulDataLoader:
    """Infinite, shuffled batches {"input", "label"(, "document_ids", "positions")} of [local_batch_size, seq_len]
    for this dp rank, from training.dataset(_path) or the weighted mix of training.dataset_paths."""
    allow = allow_tokenizer_change
    if cfg.dataset_paths:
        sources = [_windows(f"training.dataset_paths[{i}]", Path(p), tokenizer, cfg.seq_len, cfg, allow)
                   for i, p in enumerate(cfg.dataset_paths)]
        names, weights = source_names(cfg.dataset_paths), cfg.dataset_weights
        logger.info("data: mixing " + ", ".join(f"{n} {w / sum(weights):.1%} ({len(s):,} windows)"
                                                for n, w, s in zip(names, weights, sources)))
    else:
        path, key = locate("training", cfg.dataset, cfg.dataset_path, "train", cfg.dataset_columns,
                           cfg.dataset_streaming)
        sources, names, weights = [_windows(key, path, tokenizer, cfg.seq_len, cfg, allow)], None, None
        kind = "prepared" if tokens.is_prepared(path) else "tokenized at start"
        logger.info(f"data: {path} ({kind}, {len(sources[0].stream):,} tokens, {len(sources[0]):,} windows)")
    sampler = GlobalOrderSampler([len(s) for s in sources], cfg.local_batch_size, cfg.seed, dp_rank, dp_size,
                                 weights, names)
    return make_loader(ConcatDataset(sources) if len(sources) > 1 else sources[0], sampler)


def tokens_per_source(loader: StatefulDataLoader, seq_len: int) -> dict[str, int]:
    """Tokens drawn from each mixed source so far (the same on every rank); {} unless mixing."""
    sampler = getattr(loader, "batch_sampler", None)  # GRPO's rollouts have none
    return sampler.tokens_per_source(seq_len) if isinstance(sampler, GlobalOrderSampler) else {}


def build_validation_dataloader(cfg: Validation, training: Training, tokenizer: Tokenizer, dp_rank: int,
                                dp_size: int, *, allow_tokenizer_change: bool = False) -> StatefulDataLoader:
    """Finite, unshuffled batches of the validation split; each iter() is one pass (partial last round dropped).
    Windows of validation.seq_len are cut (and masked) as training's are."""
    path, key = locate("validation", cfg.dataset, cfg.dataset_path, "validation", cfg.dataset_columns)
    seq_len = cfg.seq_len if cfg.seq_len > 0 else training.seq_len  # -1: training's (the config resolves it)
    rows = cfg.local_batch_size if cfg.local_batch_size > 0 else training.local_batch_size
    windows = _windows(key, path, tokenizer, seq_len, training, allow_tokenizer_change)
    sampler = SequentialBlocks(len(windows), rows, dp_rank, dp_size)
    if len(sampler) == 0:
        raise ConfigError(
            f"{key}: {path} has {len(windows)} windows of validation.seq_len={seq_len}, fewer than "
            f"validation.local_batch_size x dp = {rows * dp_size}"
        )
    return make_loader(windows, sampler)
