"""Activation checkpointing per transformer block: keep fewer activations in forward and recompute them in backward.

full: recompute the whole block. selective N: full recompute on every N-th block only. selective op: recompute
every op except the expensive ones (matmuls, attention), whose outputs are saved. Adds no collectives, except that
under TP/FSDP the recomputed forward repeats the block's all-gathers unless they are saved too (reduce-scatter
outputs are saved for that reason).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from titan.models.layers import Transformer

_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


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
