"""Pre-training data: token streams (raw text tokenized at start, or prepared shards memory-mapped) -> windows of
seq_len + 1 tokens, mixed from one or more sources by weight, in a global order that does not depend on the
data-parallel layout, served by resumable `StatefulDataLoader`s.

Owns the dataset registry, the windows (and document masking inside them), the sample order (a seeded permutation
per epoch that is computed, never stored), mixing, and its split over dp ranks. Not the tokenizer (tokenizer.py),
not reading files (documents.py) or the on-disk layout (tokens.py), not chat/SFT data. Only rank-local work.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from titan.data import documents, tokens
from titan.errors import ConfigError

if TYPE_CHECKING:
    from titan.config import Training, Validation
    from titan.data.tokenizer import Tokenizer

logger = logging.getLogger("titan")

IGNORE_INDEX = -100  # label value the loss skips; it counts valid labels with `label != IGNORE_INDEX`

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
}


def locate(section: str, dataset: str, dataset_path: str, split: str) -> tuple[Path, str]:
    """(path to read, config key to blame): `dataset_path` overrides the named dataset's split."""
    if dataset_path:
        return Path(dataset_path), f"{section}.dataset_path"
    if dataset not in DATASETS:
        raise ConfigError(
            f"{section}.dataset: unknown dataset {dataset!r} (known: {', '.join(DATASETS)}); "
            f"or set {section}.dataset_path to a prepared folder, or to text files or a folder of them"
        )
    if split not in DATASETS[dataset]:
        raise ConfigError(f"{section}.dataset: {dataset!r} has no {split} split; set {section}.dataset_path")
    return DATASETS[dataset][split], f"{section}.dataset"


# ---------------------------------------------------------------------------------------------------------------
# Token streams


_STREAMS: dict[tuple, tokens.TokenStream] = {}  # (data files, tokenizer files) -> raw text's stream, this process


def token_stream(path: Path, key: str, tokenizer: Tokenizer) -> tokens.TokenStream:
    """The stream at `path`: a prepared folder (memory-mapped: start-up and memory do not grow with the corpus), or
    raw documents tokenized in memory now (for small corpora; reused within a process while neither the files nor
    the tokenizer change, so tests and scripts that build several runs tokenize a corpus once)."""
    if path.is_dir() and tokens.is_prepared(path):
        return tokens.open_prepared(path, key, tokenizer)
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


def collate_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------------------------------
# Sample order. Global positions g = 0, 1, 2, ... are cut into blocks of local_batch_size; block b goes to dp rank
# b % dp_size. One optimizer step takes global_batch_size consecutive positions, so dp=2 x 2 micro-steps sees the
# same samples as dp=1 x 4 micro-steps. Position g is the k-th draw of one source (mixing); draw k of a source of N
# samples is sample perm_e(k mod N) with e = k // N, a fresh permutation each epoch.

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wraps mod 2**64): a cheap, well-spread integer hash."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


class Permutation:
    """A seeded bijection of [0, n), computed per index in O(1) memory: a 6-round Feistel network over the smallest
    even-bit domain >= n, with cycle walking back into [0, n). Nothing of size n is ever built, so a corpus of 10^10
    windows costs no more than one of ten."""

    ROUNDS = 6

    def __init__(self, n: int, key: int):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = _U64((1 << self.half) - 1)
        self.keys = _mix64(np.array([(key * self.ROUNDS + r) & _MASK64 for r in range(self.ROUNDS)], dtype=_U64))

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        half = _U64(self.half)
        left, right = x >> half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << half) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        y = self._round_trip(np.asarray(i, dtype=_U64))
        outside = y >= _U64(self.n)
        while outside.any():  # at most 4x the domain: a few walks on average
            y[outside] = self._round_trip(y[outside])
            outside = y >= _U64(self.n)
        return y.astype(np.int64)


def _epoch_key(seed: int, source: int, epoch: int) -> int:
    # Mix seed, source and epoch so that seed s, epoch e+1 does not replay seed s+1, epoch e.
    return int(_mix64(np.array([(seed * 1_000_003 + source * 7_919 + epoch * 104_729) & _MASK64], dtype=_U64))[0])


class GlobalOrderSampler:
    """Infinite batch sampler over one or more sources of `sizes` samples, drawn with `weights` (one source: weight
    1). Yields global sample ids `offset[source] + sample`, as a ConcatDataset of the sources numbers them.

    Mixing is deterministic: position g draws from the source furthest below its share, argmax_s w_s (g + 1) - c_s
    (c_s: draws so far; ties to the first), as Megatron-LM blends datasets, so every prefix of the order is within one
    sample per source of the weights. The state is `position` (global positions consumed by all dp ranks together)
    and `counts` (draws per source), the same on every rank: a loader with another dp_size, dp_rank or
    local_batch_size continues from it. StatefulDataLoader saves it through `state_dict` and, because this class is
    Stateful, restores it without also fast-forwarding.
    """

    def __init__(self, sizes: list[int] | int, local_batch_size: int, seed: int, dp_rank: int, dp_size: int,
                 weights: list[float] | None = None, names: list[str] | None = None):
        sizes = [sizes] if isinstance(sizes, int) else list(sizes)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} not in [0, dp_size={dp_size})")
        weights = [1.0] * len(sizes) if weights is None else list(weights)
        total = sum(weights)
        self.sizes, self.weights = sizes, [w / total for w in weights]
        self.names = names or [str(i) for i in range(len(sizes))]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])[:-1].astype(np.int64)
        self.local_batch_size, self.seed, self.dp_rank, self.dp_size = local_batch_size, seed, dp_rank, dp_size
        self.position, self.counts = 0, [0] * len(sizes)
        self._perms: dict[tuple[int, int], Permutation] = {}

    def _draw(self, source: int, k: np.ndarray) -> np.ndarray:
        """Sample ids (within the source) of its draws k."""
        n = self.sizes[source]
        epochs, within = np.divmod(k, n)
        out = np.empty(len(k), dtype=np.int64)
        for e in np.unique(epochs):
            key = (source, int(e))
            if key not in self._perms:
                if len(self._perms) > 8:
                    self._perms.clear()
                self._perms[key] = Permutation(n, _epoch_key(self.seed, source, int(e)))
            sel = epochs == e
            out[sel] = self._perms[key](within[sel])
        return out

    def plan(self, position: int, counts: list[int], n: int) -> tuple[np.ndarray, list[int]]:
        """(global sample ids of positions position .. position + n - 1, counts after them)."""
        counts = list(counts)
        if len(self.sizes) == 1:
            picks, draws = np.zeros(n, dtype=np.int64), np.arange(counts[0], counts[0] + n, dtype=np.int64)
            counts[0] += n
        else:
            picks, draws = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
            for j in range(n):
                deficits = [w * (position + j + 1) - c for w, c in zip(self.weights, counts)]
                s = max(range(len(deficits)), key=deficits.__getitem__)
                picks[j], draws[j] = s, counts[s]
                counts[s] += 1
        ids = np.empty(n, dtype=np.int64)
        for s in np.unique(picks):
            sel = picks == s
            ids[sel] = self.offsets[s] + self._draw(int(s), draws[sel])
        return ids, counts

    def sample_at(self, g: int) -> int:
        """The global sample id at position g (from the start of the order: for tests and tools)."""
        return int(self.plan(0, [0] * len(self.sizes), g + 1)[0][-1])

    def __iter__(self):
        # Reads the state on every step, so a load_state_dict before the first next() takes effect.
        while True:
            n = self.dp_size * self.local_batch_size
            ids, counts = self.plan(self.position, self.counts, n)
            block = ids[self.dp_rank * self.local_batch_size:(self.dp_rank + 1) * self.local_batch_size]
            # Advance before yielding: with num_workers=0 the loader draws indices exactly when it builds the batch,
            # so after each batch the state already counts it (a generator resumes only at the next draw).
            self.position, self.counts = self.position + n, counts
            yield block.tolist()

    def state_dict(self) -> dict:
        return {"position": self.position, "counts": list(self.counts), "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        counts = [int(c) for c in state.get("counts", [state["position"]])]  # one-source states before mixing
        sizes = state.get("sizes")
        if len(counts) != len(self.sizes) or (sizes is not None and list(sizes) != self.sizes):
            raise ConfigError(
                f"the checkpoint's data order is for {len(counts)} source(s) of {sizes or '?'} samples, this run's "
                f"data has {self.sizes}: the same position would mean other samples. Set checkpoint."
                f"exclude_from_loading = [\"dataloader\"] to start the new data from its beginning"
            )
        self.position, self.counts = int(state["position"]), counts

    def tokens_per_source(self, seq_len: int) -> dict[str, int]:
        """Tokens drawn so far from each source (by all ranks), for the log; {} with one source."""
        if len(self.sizes) == 1:
            return {}
        return {f"tokens_{name}": c * seq_len for name, c in zip(self.names, self.counts)}


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
# Loaders. num_workers=0: a batch is a few slices of memory-mapped (or in-memory) arrays, far faster than a step, and
# a worker's prefetch would put the sampler ahead of the batches actually consumed.


def make_loader(dataset: Dataset, sampler, collate_fn=collate_rows) -> StatefulDataLoader:
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13: a warning the user can do nothing about.
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=0)


def _windows(key: str, path: Path, tokenizer: Tokenizer, seq_len: int, cfg: Training) -> Windows:
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    windows = Windows(token_stream(path, key, tokenizer), seq_len, cfg.document_masking, cfg.reset_positions)
    if len(windows) == 0:
        raise ConfigError(f"{key}: {path} has {len(windows.stream)} tokens, fewer than training.seq_len + 1 = "
                          f"{seq_len + 1} for one window")
    return windows


def source_names(paths: list[str]) -> list[str]:
    """Short names for the log: each path's last component, made unique with its position if two share one."""
    names = [Path(p).name.split(".")[0] or f"source{i}" for i, p in enumerate(paths)]
    return [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def build_pretrain_dataloader(cfg: Training, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> StatefulDataLoader:
    """Infinite, shuffled batches {"input", "label"(, "document_ids", "positions")} of [local_batch_size, seq_len]
    for this dp rank, from training.dataset(_path) or the weighted mix of training.dataset_paths."""
    if cfg.dataset_paths:
        sources = [_windows(f"training.dataset_paths[{i}]", Path(p), tokenizer, cfg.seq_len, cfg)
                   for i, p in enumerate(cfg.dataset_paths)]
        names, weights = source_names(cfg.dataset_paths), cfg.dataset_weights
        logger.info("data: mixing " + ", ".join(f"{n} {w / sum(weights):.1%} ({len(s):,} windows)"
                                                for n, w, s in zip(names, weights, sources)))
    else:
        path, key = locate("training", cfg.dataset, cfg.dataset_path, "train")
        sources, names, weights = [_windows(key, path, tokenizer, cfg.seq_len, cfg)], None, None
    sampler = GlobalOrderSampler([len(s) for s in sources], cfg.local_batch_size, cfg.seed, dp_rank, dp_size,
                                 weights, names)
    return make_loader(ConcatDataset(sources) if len(sources) > 1 else sources[0], sampler)


def tokens_per_source(loader: StatefulDataLoader, seq_len: int) -> dict[str, int]:
    """Tokens drawn from each mixed source so far (the same on every rank); {} unless mixing."""
    sampler = loader.batch_sampler
    return sampler.tokens_per_source(seq_len) if isinstance(sampler, GlobalOrderSampler) else {}


def build_validation_dataloader(cfg: Validation, training: Training, tokenizer: Tokenizer, dp_rank: int,
                                dp_size: int) -> StatefulDataLoader:
    """Finite, unshuffled batches of the validation split; each iter() is one pass (partial last round dropped).
    Windows are cut (and masked) as training's are."""
    path, key = locate("validation", cfg.dataset, cfg.dataset_path, "validation")
    windows = _windows(key, path, tokenizer, training.seq_len, training)
    sampler = SequentialBlocks(len(windows), cfg.local_batch_size, dp_rank, dp_size)
    if len(sampler) == 0:
        raise ConfigError(
            f"{key}: {path} has {len(windows)} windows of seq_len={training.seq_len}, fewer than "
            f"validation.local_batch_size x dp = {cfg.local_batch_size * dp_size}"
        )
    return make_loader(windows, sampler)
