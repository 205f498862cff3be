"""Expert parallelism, and how a Mixture-of-Experts layer (titan/models/moe.py) meets the other parallel axes.

What EP shards: each MoE layer's routed experts (`GroupedExperts`: w1, w2, w3, stacked by expert) by expert over
the `ep` mesh dim, as DTensors `Shard(0)`: rank i of an expert group holds experts i*n/ep ... (i+1)*n/ep - 1.
The router, the shared expert and everything outside the MoE layers are untouched. `ep` borrows ranks of
dp_shard x cp (titan/parallel/mesh.py), so FSDP shards the experts over what remains (`expert_fsdp`, see
titan/parallel/fsdp.py) and the rest of the model over dp_shard x cp as before.

Collectives added per MoE layer (`ExpertParallel`, hooks around `MoE.experts(x_sorted, counts)`), forward:
  1. all-to-all of the token counts per expert (n_experts integers), so every rank knows how many rows it receives;
  2. all-to-all of the routed token rows (variable split sizes), to the ranks owning their experts;
  3. after the experts: all-to-all of the outputs back, in the order the rows came from.
Backward runs the two row all-to-alls in reverse (autograd-aware `all_to_all_single_autograd`). Step 1 is a host
sync (the split sizes are Python ints), which also keeps `torch.compile` from taking a whole MoE block in one graph.

With context parallelism a sequence's tokens are spread over the cp ranks: the routing counts per sequence
(`MoE.load`) are summed over `cp` so that the balance loss sees whole sequences (`reduce_load`).
With tensor parallelism the MoE layer is not tensor-sharded (`ReplicatedMoE`): its input is all-gathered along
the sequence (as the dense FFN's is), every tp rank routes and computes the whole sequence, and keeps its own
sequence shard of the output. Its parameters are DTensors replicated over tp (whole gradients on every tp rank:
nothing to reduce), which the MoE code sees as plain local tensors (`local_params`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import all_reduce, all_to_all_single, all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from titan.models.moe import moe_layers


def _distribute_params(module: nn.Module, mesh: DeviceMesh, placement) -> None:
    for name, p in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(p, mesh, [placement]),
                                                     requires_grad=p.requires_grad))


def local_params(module: nn.Module) -> None:
    """While `module` runs, `module.<name>` reads its DTensor parameters as this rank's local tensors (autograd
    flows back to the DTensor), so model code computes on plain tensors of dynamic shapes. An instance attribute
    shadows nn.Module's parameter lookup; FSDP, which runs first (its hooks are prepended) and sets parameters in
    `_parameters`, is unaffected."""

    def shadow(mod, args):
        for name, p in mod._parameters.items():
            if isinstance(p, DTensor):
                mod.__dict__[name] = p.to_local()

    def unshadow(mod, args, out):
        for name in mod._parameters:
            mod.__dict__.pop(name, None)

    module.register_forward_pre_hook(shadow)
    module.register_forward_hook(unshadow)


class ExpertParallel:
    """Hooks that send each routed row to the rank owning its expert and the output back (module docstring)."""

    def __init__(self, ep_mesh: DeviceMesh):
        self.group, self.ep = ep_mesh.get_group(), ep_mesh.size()
        self.state = None  # (order, input splits, output splits) from dispatch to combine

    def dispatch(self, experts: nn.Module, args):
        x, counts = args  # rows sorted by global expert, counts [n_experts]
        with torch.no_grad():
            # received[s * n_local + j]: rows rank s sends to my local expert j
            received = all_to_all_single(counts, None, None, self.group).wait()
            sent_splits = counts.view(self.ep, -1).sum(1).tolist()
            received = received.view(self.ep, -1)
            received_splits = received.sum(1).tolist()  # host sync: split sizes must be ints
            n_local = received.shape[1]
            # Rows arrive grouped by source rank, then expert: regroup them by local expert (stable: deterministic).
            local_expert = torch.arange(self.ep * n_local, device=counts.device) % n_local
            order = torch.argsort(torch.repeat_interleave(local_expert, received.flatten()), stable=True)
        rows = all_to_all_single_autograd(x, received_splits, sent_splits, self.group)
        self.state = order, sent_splits, received_splits
        return rows[order], received.sum(0)

    def combine(self, experts: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        order, sent_splits, received_splits = self.state
        self.state = None
        rows = torch.empty_like(out).index_copy(0, order, out)  # back to arrival order
        return all_to_all_single_autograd(rows, sent_splits, received_splits, self.group)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over `ep` and route tokens to them (before AC/compile/FSDP wrap blocks)."""
    for _, moe in moe_layers([model]):
        experts = moe.experts
        _distribute_params(experts, ep_mesh, Shard(0))
        ep = ExpertParallel(ep_mesh)
        # Order: tokens travel first, then the local experts' weights are shadowed; on the way out the reverse.
        experts.register_forward_pre_hook(ep.dispatch)
        local_params(experts)
        experts.register_forward_hook(ep.combine)


def keep_statistics_out_of(stage) -> None:
    """A PipelineStage infers its activations' shapes with a real forward of the first micro-batch (torch 2.13's
    `_forward_metadata_inference`), which would count MoE routing statistics that no single process counts (and so
    move the expert biases differently): put them back as they were before it."""
    infer = stage._forward_metadata_inference

    def inferring(*args, **kwargs):
        layers = [m for _, m in moe_layers([stage.submod])]
        saved = [(m.tokens_per_expert.clone(), m.aux_loss_sum.clone()) for m in layers]
        try:
            return infer(*args, **kwargs)
        finally:
            with torch.no_grad():
                for m, (tokens, aux) in zip(layers, saved):
                    m.tokens_per_expert.copy_(tokens)
                    m.aux_loss_sum.copy_(aux)

    stage._forward_metadata_inference = inferring


def reduce_load(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Sum each MoE layer's per-sequence routing counts over the cp ranks holding the other parts of the sequences."""
    group = cp_mesh.get_group()
    for _, moe in moe_layers([model]):
        moe.load.register_forward_hook(lambda mod, args, counts: all_reduce(counts, "sum", group).wait())


class ReplicatedMoE(ParallelStyle):
    """TP plan entry for an MoE layer: computed whole on every tp rank (module docstring). Input: the block's
    sequence shard (a DTensor `Shard(1)` from the sequence-parallel norm); output: this rank's sequence shard,
    a plain tensor as the dense FFN's row-wise w2 gives it. Experts sharded by EP keep their `ep` placement."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for sub in module.modules():
            if any(not isinstance(p, DTensor) for p in sub.parameters(recurse=False)):
                _distribute_params(sub, device_mesh, Replicate())
                local_params(sub)

        def gather(mod, args):
            (x,) = args
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, [Shard(1)], run_check=False)
            return x.redistribute(device_mesh, [Replicate()]).to_local()

        def split(mod, args, out):
            return DTensor.from_local(out, device_mesh, [Replicate()], run_check=False).redistribute(
                device_mesh, [Shard(1)]).to_local()

        module.register_forward_pre_hook(gather)
        module.register_forward_hook(split)
        return module
