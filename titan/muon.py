"""Muon for the hidden weight matrices, AdamW for the rest, as one optimizer (`optimizer.name = "muon"`).

Owns which parameters take Muon (`is_hidden_matrix`), Muon's update (the same arithmetic as torch.optim.Muon in
PyTorch 2.13: momentum, Nesterov, Newton–Schulz orthogonalisation, decoupled weight decay, the lr adjusted to the
matrix's shape) for whole matrices, stacked experts and sharded (DTensor) matrices, and the param groups. The AdamW
half and bf16 states are titan/optim_states.py's; the lr schedule drives both halves' lrs (titan/optim.py).

Why not torch.optim.Muon itself: it takes plain 2-D tensors only, while titan's matrices are DTensors under FSDP/TP,
MoE experts are stacked 3-D tensors (one matrix per expert), and bf16 states need a rounding step. The update here
is checked against torch.optim.Muon on one process (tests/test_muon.py).

Sharded matrices: orthogonalisation needs the whole matrix, and a DTensor holds a block of its rows or columns per
rank. Each rank all-gathers the update of one matrix (`full_tensor()`, over every mesh dimension that shards it),
iterates on the whole matrix and keeps its own block (`distribute_tensor(..., src_data_rank=None)` only slices: every
rank computed the same matrix, so nothing travels back). Cost per optimizer step, per rank: it receives (n-1)/n of
every hidden matrix in fp32 (n = ranks sharding it) - as many bytes as one FSDP all-gather of those weights in fp32,
twice a bf16 one - and runs the iteration on every matrix, the same work as one process, not 1/n of it. Distributed
Muon implementations instead orthogonalise each matrix on one rank and send the result's shards back, spreading the
iteration's compute over the ranks; that is the next step where the iteration's time shows (docs/optimizers.md).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from titan.config import DTYPES
from titan.optim_states import Adam, rounding_seed, store_

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's quintic)
NS_EPS = 1e-7  # torch.optim.Muon's eps: the floor of the norm the update is divided by
OUTSIDE = ("tok_embeddings", "output")  # modules whose matrices take AdamW: the embedding table and the output head


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """Muon's parameters: 2-D weights of the hidden layers (attention and MLP projections, MLA's latent projections,
    the MoE router, shared experts, MTP's eh_proj) and 3-D stacked experts (one matrix per expert). Embeddings, the
    output head, norms, biases (gpt-oss's stacked expert biases are 2-D: one bias row per expert, not a linear map)
    and attention sinks take AdamW: an embedding row or a logit row is a lookup, not a linear map whose shape Muon's
    orthogonal update suits."""
    parts = name.split(".")
    is_matrix = param.ndim == 3 or (param.ndim == 2 and parts[-1] == "weight")
    return is_matrix and not any(part in OUTSIDE for part in parts)


def newton_schulz(g: torch.Tensor, steps: int, coefficients, eps: float, dtype: str) -> torch.Tensor:
    """The approximately orthogonal matrix nearest `g` (torch.optim.Muon's quintic iteration, in `dtype`, a name in
    titan.config.DTYPES); a 3-D `g` is a stack of matrices, each orthogonalised on its own."""
    a, b, c = coefficients
    x = g.to(DTYPES[dtype], copy=True)  # a copy: `g` may be the momentum buffer itself (no Nesterov)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps) if x.ndim == 3
           else x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        if x.ndim == 2:  # torch.optim.Muon's exact ops, so that one process matches it bit for bit
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        else:
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def orthogonalize(update: torch.Tensor, steps: int, coefficients, eps: float, dtype: str) -> torch.Tensor:
    """`newton_schulz` of a whole matrix; for a sharded (DTensor) one: gather, iterate, keep this rank's block (see
    the module docstring for the communication)."""
    if not isinstance(update, DTensor):
        return newton_schulz(update, steps, coefficients, eps, dtype)
    whole = newton_schulz(update.full_tensor(), steps, coefficients, eps, dtype)
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


def adjusted_lr(lr: float, shape: torch.Size, rule: str) -> float:
    """torch.optim.Muon's lr for an A x B matrix: "original" sqrt(max(1, A / B)) (Keller Jordan), "match_rms_adamw"
    0.2 sqrt(max(A, B)) (Moonshot: the update's RMS matches AdamW's, so AdamW's lr and weight decay carry over).
    A stacked expert uses one expert's matrix shape."""
    rows, cols = shape[-2:]
    return lr * (math.sqrt(max(1.0, rows / cols)) if rule == "original" else 0.2 * math.sqrt(max(rows, cols)))


class Muon(Adam):
    """Groups with `muon=True` take Muon's update, the others AdamW's (titan.optim_states.Adam). Muon groups carry
    lr, weight_decay, momentum, nesterov, ns_steps, ns_coefficients, ns_eps, ns_dtype and adjust_lr."""

    def _group_step(self, group: dict, group_index: int) -> None:
        if group.get("muon"):
            self._muon_group(group, group_index)
        else:
            self._adam_group(group, group_index)

    def _muon_group(self, group: dict, group_index: int) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["momentum_buffer"] = torch.zeros_like(p.grad, dtype=self.state_dtype)
            state["step"] += 1
            buf = state["momentum_buffer"]
            work = buf.float() if self.low_precision else buf
            work.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(work, momentum) if group["nesterov"] else work
            if self.low_precision:
                store_(buf, work, rounding_seed(int(state["step"]), group_index * 1_000_000 + i),
                       self.stochastic_rounding)
            update = orthogonalize(update, group["ns_steps"], group["ns_coefficients"], group["ns_eps"],
                                   group["ns_dtype"])
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-adjusted_lr(lr, p.shape, group["adjust_lr"]))


def param_groups(named_params, muon_settings: dict, adamw_settings: dict) -> list[dict]:
    """Two groups: the hidden matrices (Muon, with `muon_settings`: lr, weight_decay, momentum, nesterov, ns_steps,
    ns_coefficients, ns_eps, ns_dtype, adjust_lr) and the rest (AdamW, with `adamw_settings`: lr, weight_decay, ...).
    A group that would be empty is left out."""
    matrices, rest = [], []
    for name, p in named_params:
        (matrices if is_hidden_matrix(name, p) else rest).append(p)
    groups = [{"params": matrices, "muon": True, **muon_settings}, {"params": rest, "muon": False, **adamw_settings}]
    return [g for g in groups if g["params"]]
