"""FSDP2 (`fully_shard`): shards parameters, gradients and optimizer state over `dp_shard_cp`, and replicates over
`dp_replicate` (HSDP) when that degree is > 1.

Units: the embedding, each transformer block, the final norm + output together, then the root for whatever is left.
With expert parallelism each MoE layer's experts are a unit of their own, sharded over `expert_fsdp` (what `ep` leaves
of dp_shard_cp), by expert, or by the next dimension where an expert group holds fewer experts than that has ranks.
Collectives added: per unit, an all-gather of its parameters before forward (and again before backward if they were
resharded) and a reduce-scatter of its gradients after backward (plus an all-reduce across replicas for HSDP).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from titan.models.layers import Transformer
from titan.models.moe import moe_layers


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, param_dtype, reduce_dtype, reshard: str,
               cpu_offload: bool, pipeline: bool = False, expert_mesh: DeviceMesh | None = None) -> None:
    kwargs = {"mesh": dp_mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)}
    if cpu_offload:
        # Pinned host memory lets the host-to-device copies before each all-gather overlap compute; pinning needs an
        # accelerator (a CPU mesh, as in the tests, keeps ordinary memory).
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=dp_mesh.device_type == "cuda")
    # "default": free gathered weights after forward (they come back for backward), except under pipelining, where
    # each micro-batch's forward would gather them again.
    reshard_blocks = {"default": not pipeline, "always": True, "never": False}[reshard]
    tied = model.args.tie_embeddings
    if model.tok_embeddings is not None and not tied:  # a tied table belongs to the root, with the output
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard_blocks, **kwargs)
    # Multi-token prediction depths (DeepSeek-V3) are units like blocks, with their MoE layer's experts.
    for block in [*model.layers.values(), *(getattr(model, "mtp", None) or {}).values()]:
        if expert_mesh is not None:
            _shard_experts(block, expert_mesh, reshard_blocks, kwargs)
        fully_shard(block, reshard_after_forward=reshard_blocks, **kwargs)
    if model.norm is not None and model.output is not None and not tied:
        # Backward starts here right after forward ends, so by default these stay gathered.
        fully_shard([model.norm, model.output], reshard_after_forward=reshard == "always", **kwargs)
    fully_shard(model, reshard_after_forward=reshard == "always", **kwargs)
    # The loop divides the loss by the global token count already, so gradients must be summed over data-parallel
    # ranks, not averaged (the default would divide by the dp size a second time).
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def _shard_experts(block, expert_mesh: DeviceMesh, reshard: bool, kwargs: dict) -> None:
    """The EP-sharded experts first, over `expert_mesh` (the block's unit then leaves them out)."""
    for _, moe in moe_layers([block]):
        n_local = moe.experts.w1.to_local().shape[0]
        by_expert = n_local >= expert_mesh.size(expert_mesh.ndim - 1)  # else shards would be empty or padded
        fully_shard(moe.experts, reshard_after_forward=reshard, **{**kwargs, "mesh": expert_mesh},
                    shard_placement_fn=None if by_expert else (lambda p: Shard(1)))


def adopt_swapped_param(old) -> None:
    """Prepare FSDP2 to adopt a parameter that replaces `old` (a sharded DTensor parameter it manages) on its module
    before the first forward, such as QLoRA's NF4 weight: its lazy init re-reads every parameter and its all-gather
    extension (torch >= 2.6; "allow monkey patch after init"). Freeing `old`'s storage also makes FSDP see the swap
    (torch 2.13's check for an unchanged shard reads storage pointers, which a wrapper subclass such as NF4Tensor
    has none of) and returns its memory at once."""
    old.to_local().untyped_storage().resize_(0)
