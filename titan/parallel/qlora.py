"""QLoRA on a sharded model: the frozen base weight of every LoRA-wrapped linear, once loaded, quantized to NF4
(torchao) whole, as a single process does it, then cut into this rank's rows, so that every layout holds the same codes
and FSDP all-gathers the 4-bit data. The adapters and the NF4 format are titan/models/lora.py's.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from titan.config import LoRA
from titan.errors import ConfigError
from titan.models import lora
from titan.parallel.fsdp import adopt_swapped_param

logger = logging.getLogger("titan")


def _row_shards(weight: torch.Tensor) -> list[tuple[int, int]]:
    """(mesh dim, its size) of each mesh dimension that splits `weight` by rows (FSDP's Shard(0)); a replicated
    weight has none."""
    if not isinstance(weight, DTensor):
        return []
    out = []
    for dim, placement in enumerate(weight.placements):
        if placement != Replicate() and placement != Shard(0):
            raise ConfigError(f"lora.quantize_base: cannot quantize a weight placed as {weight.placements}")
        if placement == Shard(0):
            out.append((dim, weight.device_mesh.size(dim)))
    return out


def quantize_bases(parts: list[nn.Module], cfg: LoRA, dtype: torch.dtype) -> None:
    """`quantize_base` on each of this rank's model parts, and the line that says what it saved."""
    counts = [quantize_base(part, cfg, dtype) for part in parts]
    layers, before, after = (sum(c[i] for c in counts) for i in range(3))
    logger.info(f"lora: quantize_base={cfg.quantize_base}: {layers} base weights quantized (blocks of "
                f"{lora.NF4_BLOCK}, scales in blocks of {cfg.nf4_scaler_block_size}); they take "
                f"{after / 2**20:,.2f} MiB on this rank instead of {before / 2**20:,.2f} MiB")


@torch.no_grad()
def quantize_base(model: nn.Module, cfg: LoRA, dtype: torch.dtype) -> tuple[int, int, int]:
    """QLoRA: replace the frozen weight of every LoRALinear in `model` (materialised and loaded: the base weights are
    final) by its NF4 quantization in `dtype`. Each weight is quantized whole, as a single process does it (a sharded
    one is gathered first, one at a time), then cut into this rank's rows, so every layout holds the same codes and
    FSDP all-gathers the 4-bit data. Returns (layers, bytes before, bytes after) of those weights on this rank."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    lora.check_nf4_layout({f"{name}.weight": (m.weight.shape, math.prod(size for _, size in _row_shards(m.weight)))
                           for name, m in layers}, cfg)  # before anything changes
    before = after = 0
    for _, m in layers:
        weight = m.weight
        full = weight.full_tensor() if isinstance(weight, DTensor) else weight
        quantized = lora.to_nf4(full.to(dtype), cfg.nf4_scaler_block_size)
        before += lora.nbytes(weight.to_local() if isinstance(weight, DTensor) else weight)
        if isinstance(weight, DTensor):
            local, coordinate = quantized, weight.device_mesh.get_coordinate()
            for dim, size in _row_shards(weight):
                local = torch.chunk(local, size, dim=0)[coordinate[dim]]  # torchao splits the codes and scales
            after += lora.nbytes(local)
            quantized = DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False,
                                           shape=weight.shape, stride=weight.stride())
            adopt_swapped_param(weight)
        else:
            after += lora.nbytes(quantized)
        m.weight = nn.Parameter(quantized, requires_grad=False)
    return len(layers), before, after
