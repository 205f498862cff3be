"""The one place that applies the parallel axes to a model built on the meta device, in a fixed order, and then
materialises its weights so that every layout starts from the single-process run's values. (QLoRA's quantization of the
loaded base, the same on every layout, is titan/parallel/qlora.py's.)

Order: float8 -> expert parallel -> tensor parallel -> context parallel -> activation checkpointing -> torch.compile
-> FSDP.
  float8 first: it swaps nn.Linear modules for torchao's Float8Linear, which TP (float8 styles) and FSDP (float8
  all-gather) then recognise. EP next: it shards MoE experts by expert over `ep` (DTensors), which TP leaves as
  they are (an MoE layer is replicated over tp) and FSDP shards further over `expert_fsdp`. TP next: it swaps
  parameters for DTensors sharded over `tp`, which AC, compile and FSDP then see as ordinary parameters. CP swaps
  each block's attention kernel for one that attends across sequence shards (the weights are untouched) and sums
  MoE routing counts over those shards. AC wraps each block before compile, so the compiled graph contains the
  recomputation (a block with an MoE layer compiles all but that layer, inside AC: `compile_blocks`). FSDP last:
  it groups whatever parameters the block ends up with and shards them over `dp_shard_cp` (HSDP over
  `dp_replicate`).
"""

from __future__ import annotations

import logging
import zlib

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from titan.config import DTYPES, ActivationCheckpoint, Compile, Float8, LoRA, Parallelism, Training
from titan.errors import ConfigError
from titan.models import build_model
from titan.models.layers import Transformer
from titan.models.lora import apply_lora, init_adapters
from titan.models.moe import MoE
from titan.parallel.activation_checkpoint import apply_ac
from titan.parallel.context_parallel import apply_cp
from titan.parallel.expert_parallel import apply_ep, reduce_load
from titan.parallel.float8 import convert as convert_to_float8
from titan.parallel.fsdp import apply_fsdp
from titan.parallel.mesh import ParallelDims
from titan.parallel.tensor_parallel import apply_tp

logger = logging.getLogger("titan")

def check_options(parallelism: Parallelism, compile_cfg: Compile, training: Training, dims: ParallelDims,
                  device_type: str) -> None:
    """What the GPU-only options need, for a job on `device_type` (the dry run checks a GPU job on a CPU mesh)."""
    if parallelism.enable_async_tensor_parallel and (dims.tp == 1 or not compile_cfg.enable):
        raise ConfigError("parallelism.enable_async_tensor_parallel needs tensor_parallel_degree > 1 and "
                          "compile.enable = true (inductor does the overlapping)")
    if parallelism.enable_async_tensor_parallel and device_type != "cuda":
        raise ConfigError("parallelism.enable_async_tensor_parallel needs CUDA (symmetric memory)")
    if training.enable_cpu_offload and device_type == "cpu":
        raise ConfigError("training.enable_cpu_offload needs a GPU: on a CPU run the parameters are in CPU memory "
                          "already (and FSDP2's offload policy requires an accelerator)")
    if training.enable_cpu_offload and not dims.fsdp_enabled:
        raise ConfigError("training.enable_cpu_offload needs FSDP (data-parallel degree > 1)")


def parallelize(model: Transformer, mesh: dict[str, DeviceMesh], dims: ParallelDims, parallelism: Parallelism,
                ac: ActivationCheckpoint, compile_cfg: Compile, training: Training,
                float8: Float8 | None = None) -> None:
    """Apply float8 -> EP -> TP -> CP -> AC -> compile -> FSDP to a model or pipeline stage still on the meta device
    (pipeline splitting happens before, in titan.parallel.pipeline, so each stage gets exactly this treatment)."""
    check_options(parallelism, compile_cfg, training, dims, mesh["tp"].device_type)
    float8_tp = convert_to_float8(model, float8 or Float8(), dims.fsdp_enabled, mesh["tp"].device_type,
                                  compiled=compile_cfg.enable and "model" in compile_cfg.components)
    if dims.ep > 1:
        apply_ep(model, mesh["ep"])
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], parallelism.enable_loss_parallel, parallelism.enable_async_tensor_parallel,
                 float8_tp)
    if dims.cp > 1:
        apply_cp(model, mesh["cp"], parallelism.context_parallel_rotate_method)
        reduce_load(model, mesh["cp"])
    apply_ac(model, ac.mode, ac.selective_ac_option)
    if compile_cfg.enable and "model" in compile_cfg.components:
        # fullgraph, except that the ring's send/recv (context parallel) has to stay outside the graph.
        compile_blocks(model, fullgraph=not (dims.cp > 1 and parallelism.context_parallel_rotate_method == "ring"))
    if dims.fsdp_enabled:
        apply_fsdp(model, mesh["fsdp"], DTYPES[training.mixed_precision_param], DTYPES[training.mixed_precision_reduce],
                   parallelism.fsdp_reshard_after_forward, training.enable_cpu_offload, pipeline=dims.pp > 1,
                   expert_mesh=mesh.get("expert_fsdp"))


def compile_blocks(model: Transformer, fullgraph: bool) -> None:
    """torch.compile each block in place (parameter names, and checkpoints, are the same with and without). A block
    with a Mixture-of-Experts layer compiles its other parts (norms, attention) and runs the MoE layer eagerly:
    routing gives each expert a data-dependent number of rows, which the per-expert loop and EP's all-to-alls turn
    into Python ints (host syncs, graph breaks), and `_grouped_mm`'s compiled form takes bf16 only (torch 2.13)."""
    for block in model.layers.values():
        inner = getattr(block, "_checkpoint_wrapped_module", block)  # inside activation checkpointing's wrapper
        if not any(isinstance(m, MoE) for m in inner.modules()):
            block.compile(fullgraph=fullgraph)
            continue
        for child in inner.children():
            if not isinstance(child, MoE):
                child.compile(fullgraph=fullgraph)


def _init_units(model: Transformer) -> list[str]:
    """Names of the model's top-level pieces present on this rank (pipeline stages hold a subset)."""
    units = [] if model.tok_embeddings is None else ["tok_embeddings"]
    units += [f"layers.{i}" for i in model.layers]
    units += [] if model.norm is None else ["norm"]
    if model.output is not None and not model.args.tie_embeddings:
        units.append("output")
    units += [f"mtp.{k}" for k in getattr(model, "mtp", None) or {}]  # multi-token prediction depths
    return units


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int, lora_cfg: LoRA | None = None,
                cpu_offload: bool = False) -> None:
    """Allocate the (possibly sharded) parameters on `device` and fill them exactly as a single-process run would.
    With `cpu_offload` (FSDP2's CPUOffloadPolicy, training.enable_cpu_offload) the parameters are allocated in CPU
    memory, where FSDP keeps them (it refuses parameters on the GPU at its first forward), and the buffers (RoPE
    table, MoE statistics) on `device`, where the forward uses them; the values are drawn on `device` all the same,
    so a run with offloading starts from the weights of one without.

    Each unit (embedding, one block, ...) is initialised in full on a throw-away unsharded copy, under a seed
    derived from the unit's name, then loaded through DCP's full-state-dict path, which slices out whatever this
    rank holds for any mix of FSDP/TP placements. So the weights do not depend on the layout, and peak extra memory
    is one unit, not the whole model. With `lora_cfg` the model carries LoRA adapters (titan.models.lora): they are
    drawn after the unit's base weights, so the base is the same as without LoRA.
    """
    model.to_empty(device="cpu" if cpu_offload else device)
    if cpu_offload:
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = torch.empty_like(buffer, device=device)
    model.init_buffers(device)
    with torch.device("meta"):
        reference = build_model(model.args)  # (type(model) is FSDP's subclass once sharded)
        if lora_cfg is not None:
            apply_lora(reference, lora_cfg)
    for name in _init_units(model):
        unit = reference.get_submodule(name)
        unit.to_empty(device=device)
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        reference.init_weights()  # only `unit` is real; init on meta tensors does nothing and draws no randoms
        init_adapters(unit)
        full = {f"{name}.{key}": value for key, value in unit.state_dict().items()}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        unit.to_empty(device="meta")
