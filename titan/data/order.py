"""The sample order every recipe trains in: a seeded, global order of samples that does not depend on the
data-parallel layout (so a run resumes at another dp size, micro-batch split or local batch size and sees the same
samples), mixing several sources by weight, its split over dp ranks, and the resumable loaders that serve it.

Owns the order and its state; not what a sample is (pre-training windows: titan/data/pretrain.py; chat and preference
rows: titan/data/chat.py). Only rank-local work: every rank computes the same order and keeps its own blocks.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from titan.errors import ConfigError

# Global positions g = 0, 1, 2, ... are cut into blocks of local_batch_size; block b goes to dp rank
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


def collate_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def make_loader(dataset: Dataset, sampler, collate_fn=collate_rows) -> StatefulDataLoader:
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.13: a warning the user can do nothing about.
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=0)


