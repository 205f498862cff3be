"""Tensor parallelism (Megatron-style) with sequence parallelism, as a DTensor plan over the `tp` mesh dim.

What it shards: attention heads (wq/wk/wv column-wise, wo row-wise), the FFN hidden dim (w1/w3 column-wise, w2
row-wise), the embedding table by rows (vocab) and the output projection by columns (vocab). Between blocks the
activations are split along the sequence (sequence parallel), so norms and residuals cost 1/tp of the memory.
Collectives added per block: all-gather of the sequence before attention and before the FFN, reduce-scatter after
wo and after w2 (forward; the mirror in backward). With loss parallel the logits stay sharded by vocab and the
cross-entropy reduces across tp instead of gathering the logits.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from titan.config import ConfigError
from titan.models.llama import Transformer


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool, async_tp: bool) -> None:
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,  # loss parallel needs the DTensor to know the vocab is sharded
        )
    parallelize_module(model, tp_mesh, top)

    block_plan = {
        "attention_norm": SequenceParallel(),
        # The block input arrives split along the sequence; attention needs all of it (freqs_cis is left alone).
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)

    if async_tp:
        enable_async_tp(tp_mesh)


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Let inductor fuse the TP all-gathers/reduce-scatters with the matmuls (symmetric memory, CUDA only)."""
    if tp_mesh.device_type != "cuda":
        raise ConfigError("parallelism.enable_async_tensor_parallel needs CUDA (symmetric memory)")
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)
