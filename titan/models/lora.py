"""LoRA (low-rank adaptation): y = x W^T + (alpha / rank) * dropout(x) A^T B^T, with the pretrained W frozen and only
A (rank x in) and B (out x rank) trained. B starts at zero, so a fresh adapter leaves the model unchanged.

Owns the adapted linear layer, swapping it into a model, freezing the base, initialising adapters and merging them
back (W + scale * B A) for export. Like the model it knows nothing of distribution: `LoRALinear` is an `nn.Linear`
whose weight keeps its name (`layers.0.attention.wq.weight`), so Hugging Face import/export and checkpoints see the
same names as without LoRA; the adapters are `...wq.lora_a` / `...wq.lora_b`. Tensor parallelism places them in
titan/parallel/tensor_parallel.py.

QLoRA (Dettmers et al., 2023; lora.quantize_base = "nf4"): the frozen W is held as torchao's `NF4Tensor`, 4-bit
NormalFloat codes in blocks of 64 weights with one absmax scale each, the scales themselves quantized to int8 in
blocks of `nf4_scaler_block_size` ("double quantization"): about 0.52 bytes per weight. `F.linear` on it dequantizes
W on the fly in forward and backward (W gets no gradient). This module owns the per-tensor quantization and the
checks of the block layout; titan/parallel/parallelize.py:quantize_base applies it to a built, loaded model.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from titan.config import LoRA
from titan.errors import ConfigError
from titan.models.output_head import OutputHead

logger = logging.getLogger("titan")

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")  # names of the linears LoRA can adapt
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank))
        self.adapters_enabled = True  # False = the base model (DPO's reference, see `disabled`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.adapters_enabled:
            return out
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        return out + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def init_adapters(self) -> None:
        """A like nn.Linear's default init, B zero (meta tensors: a no-op that draws no random numbers)."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def _targets(model: nn.Module, target_modules: list[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every linear whose attribute name is listed."""
    unknown = sorted(set(target_modules) - set(TARGETS))
    if unknown:
        raise ConfigError(f"lora.target_modules: unknown module {unknown[0]!r} (valid: {', '.join(TARGETS)})")
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if attr in target_modules and type(child) in (nn.Linear, OutputHead):
                found.append((parent, attr, child))
    return found


def apply_lora(model: nn.Module, cfg: LoRA) -> None:
    """Swap the targeted linears for LoRALinear (keeping each base weight Parameter, so tied weights stay tied) and
    freeze everything but the adapters. Works on the meta device, before any parallelism."""
    if cfg.rank <= 0:
        raise ConfigError(f"lora.rank must be > 0 (got {cfg.rank})")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1) (got {cfg.dropout})")
    if "output" in cfg.target_modules and getattr(getattr(model, "args", None), "tie_embeddings", False):
        raise ConfigError("lora.target_modules: 'output' is tied to the embedding in this model; an adapter on it "
                          "could not be merged into one shared matrix")
    targets = _targets(model, cfg.target_modules)
    if not targets:
        raise ConfigError(f"lora.target_modules={cfg.target_modules} matches no linear layer of the model")
    model.requires_grad_(False)
    for parent, attr, linear in targets:
        with torch.device(linear.weight.device):
            lora = LoRALinear(linear.in_features, linear.out_features, cfg.rank, cfg.alpha, cfg.dropout,
                              bias=linear.bias is not None)
        lora.weight = linear.weight  # the same Parameter: frozen, and still tied where it was
        if linear.bias is not None:
            lora.bias = linear.bias  # (gpt-oss's attention biases), frozen with the weight
        setattr(parent, attr, lora)


def adapted(modules: list[nn.Module]) -> list[str]:
    """The target names that matched a linear layer (on an all-MoE model w1/w2/w3 match none: its experts are stacked
    parameters), in `TARGETS` order."""
    found = {name.rsplit(".", 1)[-1] for module in modules for name, m in module.named_modules()
             if isinstance(m, LoRALinear)}
    return [t for t in TARGETS if t in found]


def init_adapters(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.init_adapters()


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


@contextlib.contextmanager
def disabled(modules: list[nn.Module]):
    """The base model, for the duration: every adapter off (DPO uses this as its frozen reference)."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.adapters_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.adapters_enabled = True


def merge(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full state dict with adapters folded into their base weights (W + scale * B A) and the adapter keys
    dropped: a plain Llama, for Hugging Face export. NF4 base weights are dequantized first."""
    merged = {k: dequantize(v) for k, v in state.items() if not is_adapter(k)}
    for key in state:
        if key.endswith(".lora_a"):
            base = key.removesuffix(".lora_a")
            a, b = state[key], state[base + ".lora_b"]
            w = merged[base + ".weight"]
            merged[base + ".weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return merged


def merging(export, scale: float):
    """Wrap an exporter `(full state, folder, dtype) -> None` so that it receives merged weights."""

    def merged_export(state: dict[str, torch.Tensor], folder, dtype, **kwargs) -> None:
        if any(is_nf4(v) for v in state.values()):
            logger.info("lora: the export dequantizes the NF4 base weights and adds the adapters: the merged model "
                        "carries NF4's rounding of the original weights (it is not the original plus the adapters)")
        export(merge(state, scale), folder, dtype, **kwargs)

    return merged_export


# ---------------------------------------------------------------------------------------------------------------
# QLoRA: NF4 base weights (torchao)

NF4_BLOCK = 64  # weights per NF4 block, each with its own scale (QLoRA's and torchao's choice)


def _nf4_module():
    try:  # torchao >= 0.15
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:  # older torchao
        from torchao.dtypes import nf4tensor as nf4_tensor
    return nf4_tensor


def to_nf4(weight: torch.Tensor, scaler_block_size: int) -> torch.Tensor:
    """torchao's NF4 quantization of a whole (unsharded) weight; it keeps `weight`'s dtype for dequantizing."""
    return _nf4_module().to_nf4(weight.contiguous(), NF4_BLOCK, scaler_block_size)


def is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"  # by name: torchao is imported only when QLoRA is on


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """An NF4 weight as the dense tensor it stands for; anything else unchanged."""
    return t.get_original_weight() if is_nf4(t) else t


def nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: for NF4 its codes, scales, scale factors and lookup table."""
    if is_nf4(t):
        return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def nf4_misfit(shape: torch.Size, shards: int, scaler_block_size: int) -> str | None:
    """Why a weight of `shape`, split into `shards` row blocks (FSDP), cannot hold whole NF4 scale blocks of
    NF4_BLOCK x scaler_block_size weights in each shard (torchao quantizes and all-gathers in those units); None
    if it can."""
    rows, numel = shape[0], math.prod(shape)
    unit = NF4_BLOCK * scaler_block_size
    size = " x ".join(map(str, shape))
    if rows % shards:
        return f"{size}: {rows} rows do not split evenly over {shards} FSDP ranks"
    if (numel // shards) % unit:
        held = f"{size} in {shards} FSDP shards of {numel // shards} weights" if shards > 1 else f"{size} weights"
        return f"{held}: not a whole number of NF4 scale blocks ({NF4_BLOCK} x {scaler_block_size} = {unit} weights)"
    return None


def check_nf4_layout(weights: dict[str, tuple[torch.Size, int]], cfg: LoRA) -> None:
    """ConfigError naming lora.nf4_scaler_block_size and the first weight ({name: (shape, FSDP shards)}) that does
    not fit, with the largest power-of-two scaler block size that fits them all."""
    misfits = {n: nf4_misfit(shape, k, cfg.nf4_scaler_block_size) for n, (shape, k) in weights.items()}
    name = next((n for n, why in misfits.items() if why), None)
    if name is None:
        return
    size = 1 << (cfg.nf4_scaler_block_size.bit_length() - 1)
    while size >= 1 and any(nf4_misfit(shape, k, size) for shape, k in weights.values()):
        size //= 2
    hint = f"lora.nf4_scaler_block_size = {size} fits every adapted weight" if size >= 1 else \
        f"no scaler block size fits: the weights must split into whole blocks of {NF4_BLOCK}"
    raise ConfigError(f"lora.nf4_scaler_block_size={cfg.nf4_scaler_block_size}: {name}: {misfits[name]}; {hint}")
