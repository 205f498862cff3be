"""Tensor parallelism (Megatron-style) with sequence parallelism, as a DTensor plan over the `tp` mesh dim.

What it shards: attention heads (wq/wk/wv column-wise with their biases, wo row-wise; gpt-oss's sinks by head;
MLA's per-head projections wq or wq_b and wkv_b column-wise, its latents computed whole on every rank), the FFN
hidden dim (w1/w3 column-wise, w2 row-wise; a Mixture-of-Experts layer is not tensor-sharded: see ReplicatedMoE),
the embedding table by rows (vocab) and the output projection by columns (vocab). A per-head q/k norm (Qwen3's
QK-norm) keeps its one head_dim weight whole on every rank and normalises the rank's own heads; its gradient is
summed over tp (DTensor's reduction of a replicated weight). The plan follows the module names of
titan/models/layers.py, so every family built from those layers gets it. Between blocks the
activations are split along the sequence (sequence parallel), so norms and residuals cost 1/tp of the memory.
Collectives added per block: all-gather of the sequence before attention and before the FFN, reduce-scatter after
wo and after w2 (forward; the mirror in backward). With loss parallel the logits stay sharded by vocab and the
cross-entropy reduces across tp instead of gathering the logits. With float8 (tensorwise recipe), torchao's float8
styles cast the block input before the sequence all-gathers, which then move 1-byte activations. LoRA adapters
follow their base weight's split (`LoRAColwiseParallel` / `LoRARowwiseParallel`) and add no collective.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from titan.config import Parallelism
from titan.errors import ConfigError
from titan.models.layers import Transformer
from titan.models.lora import LoRALinear
from titan.models.mla import MLAttention
from titan.models.moe import MoE
from titan.parallel.expert_parallel import ReplicatedMoE, local_params
from titan.parallel.float8 import TPStyles, tp_styles
from titan.parallel.float8_cpu import allow_float8_all_gather_on_gloo
from titan.parallel.mesh import ParallelDims


def loss_parallel_context(cfg: Parallelism, dims: ParallelDims):
    """Wraps loss and backward: with loss parallel, cross-entropy runs on vocab-sharded logits."""
    if dims.tp > 1 and cfg.enable_loss_parallel:
        return loss_parallel
    return contextlib.nullcontext


def _distribute(module: nn.Module, mesh: DeviceMesh, src_data_rank, **placements) -> None:
    for name, placement in placements.items():
        param = getattr(module, name)
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank),
            requires_grad=param.requires_grad))


class LoRAColwiseParallel(ColwiseParallel):
    """Column-wise for a LoRALinear: W (out x in) and B (out x rank) split by output rows, A (rank x in) replicated,
    so x A^T is computed whole on every rank and x A^T B^T comes out split like x W^T."""

    def _partition_linear_fn(self, name, module, device_mesh):
        bias = {} if module.bias is None else {"bias": Shard(0)}
        _distribute(module, device_mesh, self.src_data_rank, weight=Shard(0), lora_a=Replicate(), lora_b=Shard(0),
                    **bias)


class LoRARowwiseParallel(RowwiseParallel):
    """Row-wise for a LoRALinear: W and A split by input columns (the split of the incoming activation), so x W^T
    and x A^T are both partial sums; B replicated keeps x A^T B^T partial, reduced with x W^T in one collective."""

    def _partition_linear_fn(self, name, module, device_mesh):
        bias = {} if module.bias is None else {"bias": Replicate()}
        _distribute(module, device_mesh, self.src_data_rank, weight=Shard(1), lora_a=Shard(1), lora_b=Replicate(),
                    **bias)


LORA_STYLES = TPStyles(LoRAColwiseParallel, LoRARowwiseParallel, PrepareModuleInput)


class Replicated(ParallelStyle):
    """A module computed whole on every tp rank (MLA's latents): parameters replicated, the input a replicated DTensor
    (made one if it arrives local), the output a local tensor whose incoming gradient must be whole."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        _distribute(module, mesh, None, **{n: Replicate() for n, _ in module.named_parameters(recurse=False)})
        module.register_forward_pre_hook(lambda m, args: tuple(
            DTensor.from_local(a, mesh, [Replicate()], run_check=False) if type(a) is torch.Tensor else a
            for a in args))
        module.register_forward_hook(lambda m, args, out: out.to_local() if isinstance(out, DTensor) else out)
        return module


class SumGradients(ParallelStyle):
    """For an identity hook module: forward unchanged, backward the gradient summed over tp (each rank's heads give
    a part of it: MLA's shared RoPE key)."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        module.register_forward_hook(lambda m, args, out: DTensor.from_local(
            out, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()]))
        return module


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool, async_tp: bool,
             float8: bool = False) -> None:
    """`float8`: the blocks' linears were converted by titan.parallel.float8 with the tensorwise recipe, so their
    styles cast to float8 before the sequence all-gathers (1-byte activations on the wire); see `tp_styles`."""
    # SequenceParallel re-creates the norm weights as trainable Parameters (torch 2.13): remember what was frozen
    # (everything but LoRA's adapters, with LoRA) and freeze it again afterwards.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        colwise = LoRAColwiseParallel if isinstance(model.output, LoRALinear) else ColwiseParallel
        top["output"] = colwise(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,  # loss parallel needs the DTensor to know the vocab is sharded
        )
    parallelize_module(model, tp_mesh, top)

    if float8 and tp_mesh.device_type == "cpu":
        allow_float8_all_gather_on_gloo()
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block, float8))
        if getattr(block.attention, "sinks", None) is not None:  # one sink logit per head: split like the heads
            _distribute(block.attention, tp_mesh, None, sinks=Shard(0))
            local_params(block.attention)

    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)

    if async_tp:
        enable_async_tp(tp_mesh)


def _block_plan(block, float8: bool) -> dict:
    moe = isinstance(block.feed_forward, MoE)

    def styles(name: str):  # plain, LoRA's, or torchao's float8 styles where every linear fed is a Float8Linear
        module = block.get_submodule(name)
        return LORA_STYLES if isinstance(module, LoRALinear) else tp_styles(module, float8)

    plan = {
        "attention_norm": SequenceParallel(),
        # The block input arrives split along the sequence; attention needs all of it (freqs_cis is left alone).
        "attention": styles("attention").prepare_input(
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
        ),
        "attention.wo": styles("attention.wo").rowwise(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
    }
    if isinstance(block.attention, MLAttention):
        # The latents are small and shared by every head: computed whole on every rank, their weights replicated.
        # The per-head projections after them split by heads; their inputs' gradients are summed over tp (and the
        # shared RoPE key's, through its hook), so the replicated weights get whole, identical gradients.
        whole = ("wq_a", "q_a_norm", "wkv_a", "kv_a_norm") if block.attention.wq is None else ("wkv_a", "kv_a_norm")
        plan.update({f"attention.{n}": Replicated() for n in whole})
        plan.update({f"attention.{n}": styles(f"attention.{n}").colwise()
                     for n in ("wq" if block.attention.wq is not None else "wq_b", "wkv_b")})
        plan["attention.rope_key"] = SumGradients()
    else:
        plan.update({f"attention.{n}": styles(f"attention.{n}").colwise() for n in ("wq", "wk", "wv")})
    if moe:  # not tensor-sharded: computed whole on every tp rank (titan/parallel/expert_parallel.py)
        plan["feed_forward"] = ReplicatedMoE()
    else:
        plan.update({
            "feed_forward": styles("feed_forward").prepare_input(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": styles("feed_forward.w1").colwise(),
            "feed_forward.w2": styles("feed_forward.w2").rowwise(output_layouts=Shard(1)),
            "feed_forward.w3": styles("feed_forward.w3").colwise(),
        })
    if getattr(block.attention, "q_norm", None) is not None:
        # q/k arrive as this rank's heads (batch, seq, heads/tp, head_dim): the norm sees them as a DTensor split on
        # dim 2, so the replicated weight's gradient is all-reduced over tp; plain tensors go on to attention.
        for name in ("attention.q_norm", "attention.k_norm"):
            plan[name] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Let inductor fuse the TP all-gathers/reduce-scatters with the matmuls (symmetric memory, CUDA only)."""
    if tp_mesh.device_type != "cuda":
        raise ConfigError("parallelism.enable_async_tensor_parallel needs CUDA (symmetric memory)")
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)
