"""Precomputed reference log-probabilities (`dpo.precompute_reference`): DPO's and IPO's reference model evaluated
once over every preference pair before training, instead of at every step. Training then holds no reference model
(the frozen copy of a full fine-tune is freed after the pass) and runs no reference forward pass.

Each pair's two summed log-probabilities go into its rows as "reference_logps", which the batches carry to
`DPOLoss` (preference.py). The pass is split over the data-parallel ranks (the same number of batches on each, as
FSDP's collectives need) and its results are exchanged, so every rank holds the whole table. It is stored in
`<dump_folder>/reference_logps.pt` with a fingerprint of the data and the reference's weights; a run with the same
fingerprint (a resumed one) reads it instead of computing it again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from titan.parallel.process_group import gather_objects

logger = logging.getLogger("titan")

FILE = "reference_logps.pt"


def fingerprint(pairs, reference_source: str) -> str:
    """What the table depends on: every pair's tokens and labels, and where the reference weights come from."""
    digest = hashlib.sha256(reference_source.encode())
    for pair in pairs.rows:
        for row in (pair["chosen"], pair["rejected"]):
            digest.update(row["input"].numpy().tobytes())
            digest.update(row["label"].numpy().tobytes())
    return digest.hexdigest()


def _compute(pairs, reference, batch_size: int, dp_rank: int, dp_size: int, device, autocast,
             loss_context) -> dict[int, torch.Tensor]:
    """{pair index: (chosen, rejected) log-probs} of this data-parallel rank's share of the pairs."""
    from titan.data.chat import collate_pairs

    mine = list(range(dp_rank, len(pairs.rows), dp_size))
    n_batches = -(-((len(pairs.rows) + dp_size - 1) // dp_size) // batch_size)  # the same count on every rank
    out = {}
    for b in range(n_batches):
        index = mine[b * batch_size:(b + 1) * batch_size] or mine[:1] or [0]  # a short rank repeats a pair
        batch = {k: v.to(device) for k, v in collate_pairs([pairs.rows[i] for i in index]).items()}
        with torch.no_grad(), autocast(), loss_context():
            logps = reference(batch).sum(dim=1)  # per-row summed log-probabilities (titan/build.py:reference_model)
        chosen, rejected = logps.float().cpu().chunk(2)
        out.update({i: torch.stack([c, r]) for i, c, r in zip(index, chosen, rejected)})
    return out


def precompute(pairs, reference, *, batch_size: int, dp_rank: int, dp_size: int, device, autocast, loss_context,
               dump_folder: str, reference_source: str) -> None:
    """Put every pair's reference log-probabilities into its rows (`pairs`: the preference dataset, whose `rows`
    are {"chosen": row, "rejected": row}); read from `dump_folder` when it holds them for the same data and weights."""
    key = fingerprint(pairs, reference_source)
    path = Path(dump_folder) / FILE
    table = None
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        table = stored["logps"] if stored.get("key") == key and len(stored["logps"]) == len(pairs.rows) else None
    if table is None:
        start = time.perf_counter()
        found = _compute(pairs, reference, batch_size, dp_rank, dp_size, device, autocast, loss_context)
        merged = {i: v for part in gather_objects(found) for i, v in part.items()}
        table = torch.stack([merged[i] for i in range(len(pairs.rows))])
        if dist.get_rank() == 0:
            tmp = path.with_suffix(".tmp")
            torch.save({"key": key, "logps": table}, tmp)
            tmp.replace(path)
        logger.info(f"dpo: reference log-probabilities of {len(table)} pairs computed in "
                    f"{time.perf_counter() - start:.1f}s (stored in {path})")
    else:
        logger.info(f"dpo: reference log-probabilities of {len(table)} pairs read from {path}")
    for pair, (chosen, rejected) in zip(pairs.rows, table):
        pair["chosen"]["reference_logps"], pair["rejected"]["reference_logps"] = chosen, rejected
