"""Activation checkpointing per transformer block: keep fewer activations in forward and recompute them in backward.

full: recompute the whole block. selective N: full recompute on every N-th block only. selective op: recompute
every op except the expensive ones (matmuls, attention, float8 amaxes, collectives: `_save_list`), whose outputs are
saved. Adds no collectives: the saved reduce-scatter and all-to-all outputs are not fetched again in backward (an
all-gather inside a block is, under TP/FSDP).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from titan.models.layers import Transformer


def _save_list() -> set:
    """The ops whose outputs selective op AC keeps (what is expensive to recompute or must not run twice), as the op
    objects the policy sees below autograd:
      matmuls: mm (linear layers), _scaled_mm (float8 linears), _grouped_mm (MoE experts);
      attention: the fused SDPA kernels; the math fallback is no kernel of its own (CompositeImplicit: its bmm and
        _safe_softmax reach the policy, torch 2.13), so those are listed; FlexAttention's higher-order op;
      aten.max: float8's amax of a tensor, whose scale the recomputed cast must reproduce (torchtitan saves it too);
      collectives: reduce-scatter (TP/FSDP inside the block) and all_to_all_single (expert parallelism's token
        exchange), which would otherwise run again in backward."""
    aten, c10d = torch.ops.aten, torch.ops._c10d_functional
    ops = {aten.mm.default, aten._scaled_mm.default, aten._grouped_mm.default, aten.max.default,
           aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten.bmm.default, aten._safe_softmax.default,
           c10d.reduce_scatter_tensor.default, c10d.all_to_all_single.default}
    from torch._higher_order_ops import flex_attention

    return ops | {flex_attention}


_SAVE_OPS = _save_list()
_saving_paused = 0


@contextmanager
def recompute_all():
    """Inside it selective op AC saves nothing: for kernels that keep their own state for backward (the CP ring keeps
    q, k, v, its output and log-sum-exp), whose inner matmuls are per-hop fp32 scores, seq x seq / cp per layer."""
    global _saving_paused
    _saving_paused += 1
    try:
        yield
    finally:
        _saving_paused -= 1


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    saved = op in _SAVE_OPS and not _saving_paused
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: Transformer, mode: str, selective_option: str) -> None:
    if mode == "none":
        return
    for name, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        elif selective_option == "op":
            contexts = partial(create_selective_checkpoint_contexts, _save_matmuls_policy)
            wrapped = checkpoint_wrapper(block, context_fn=contexts, preserve_rng_state=False)
        elif int(name) % int(selective_option) == 0:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            continue
        model.layers[name] = wrapped
