"""LoRA (low-rank adaptation): y = x W^T + (alpha / rank) * dropout(x) A^T B^T, with the pretrained W frozen and only
A (rank x in) and B (out x rank) trained. B starts at zero, so a fresh adapter leaves the model unchanged.

Owns the adapted linear layer, swapping it into a model, freezing the base, initialising adapters and merging them
back (W + scale * B A) for export. Like the model it knows nothing of distribution: `LoRALinear` is an `nn.Linear`
whose weight keeps its name (`layers.0.attention.wq.weight`), so Hugging Face import/export and checkpoints see the
same names as without LoRA; the adapters are `...wq.lora_a` / `...wq.lora_b`. Tensor parallelism places them in
titan/parallel/tensor_parallel.py.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from titan.config import ConfigError, LoRA

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")  # names of the linears LoRA can adapt
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__(in_features, out_features, bias=False)
        self.rank, self.scale, self.dropout = rank, alpha / rank, dropout
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank))
        self.adapters_enabled = True  # False = the base model (DPO's reference, see `disabled`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
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
            if attr in target_modules and type(child) is nn.Linear:
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
            lora = LoRALinear(linear.in_features, linear.out_features, cfg.rank, cfg.alpha, cfg.dropout)
        lora.weight = linear.weight  # the same Parameter: frozen, and still tied where it was
        setattr(parent, attr, lora)


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
    dropped: a plain Llama, for Hugging Face export."""
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    for key in state:
        if key.endswith(".lora_a"):
            base = key.removesuffix(".lora_a")
            a, b = state[key], state[base + ".lora_b"]
            w = merged[base + ".weight"]
            merged[base + ".weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return merged


def merging(export, scale: float):
    """Wrap an exporter `(full state, folder, dtype) -> None` so that it receives merged weights."""
    return lambda state, folder, dtype: export(merge(state, scale), folder, dtype)
