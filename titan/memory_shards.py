"""Per-shard state sizes of a layout from the parameters' shapes alone: what `scripts/plan.py` gives
`titan.memory.estimate_rank` for layouts it never builds (tests/test_dry_run.py holds them equal to the real shards
the dry run reads)."""

from __future__ import annotations

import math

import torch

from titan.memory import Units

# Which dimension tensor parallelism splits (titan.parallel.tensor_parallel): column-wise linears and the embedding
# rows split dim 0, row-wise linears dim 1; the norms are replicated.
# MLA's per-head projections (wq_b, wkv_b) split like wq; its latents (wq_a, wkv_a and their norms) are replicated.
# A bias splits with a column-wise linear's rows and is replicated on a row-wise one; gpt-oss's sinks split by head.
_TP_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "tok_embeddings": 0, "output": 0,
           "wq_b": 0, "wkv_b": 0, "attention.sinks": 0}


def shard_numel(shape: tuple[int, ...], name: str, tp: int, fsdp: int, ep: int = 1) -> tuple[int, int]:
    """(elements of a parameter's shard on rank 0, elements before FSDP's sharding): split by TP where the plan
    splits it, then FSDP's dim-0 chunk (rank 0's is the largest, rounded up, as DTensor's and FSDP's). Routed
    experts (stacked by expert) are split by expert over `ep` instead, then by FSDP over the fsdp / ep ranks left
    (`expert_fsdp`): by expert, or by the hidden dimension where a rank holds fewer experts (titan/parallel/fsdp.py)."""
    shape = list(shape)
    leaf = name.split(".")[-2] if name.endswith((".weight", ".bias")) else ".".join(name.split(".")[-2:])
    if name.endswith(".bias") and _TP_DIM.get(leaf) == 1 or ".shared_expert." in name:
        leaf = None  # a row-wise linear's bias is added once, whole; an MoE layer's shared expert is not TP-split
    if ep > 1 and ".experts." in name:
        shape[0] //= ep
        fsdp, dim = fsdp // ep, 0 if shape[0] >= fsdp // ep else 1
        tp_local = math.prod(shape)
        shape[dim] = -(-shape[dim] // fsdp)
        return math.prod(shape), tp_local
    if tp > 1 and leaf in _TP_DIM:
        shape[_TP_DIM[leaf]] = -(-shape[_TP_DIM[leaf]] // tp)
    tp_local = math.prod(shape)
    if fsdp > 1:
        shape[0] = -(-shape[0] // fsdp)
    return math.prod(shape), tp_local


def state_from_shapes(named_shapes: list[tuple[str, tuple[int, ...]]], tp: int, fsdp: int,
                      tied: bool = False, ep: int = 1) -> tuple[int, Units]:
    """(parameter elements on rank 0, FSDP units) of a stage's (or the whole model's) parameters, by name; FSDP
    shards over `fsdp` ranks (1: no FSDP), routed experts over `ep` x the rest. A tied embedding belongs to the
    head's unit (the root); a block's experts count in its unit (gathered while it computes)."""
    total, embedding, blocks, head = 0, 0, {}, 0
    for name, shape in named_shapes:
        local, tp_local = shard_numel(shape, name, tp, fsdp, ep)
        total += local
        if name.startswith("tok_embeddings") and not tied:
            embedding += tp_local
        elif name.startswith(("layers.", "mtp.")):  # a block, or a multi-token prediction depth: a unit each
            block = ".".join(name.split(".")[:2])
            blocks[block] = blocks.get(block, 0) + tp_local
        else:
            head += tp_local
    return total, Units(embedding, list(blocks.values()), head)


def named_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, global shape) of each parameter, tied ones once."""
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]
