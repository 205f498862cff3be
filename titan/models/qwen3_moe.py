"""Qwen3-MoE: Qwen3's attention (titan/models/qwen3.py) with a Mixture-of-Experts feed-forward
(titan/models/moe.py) in every layer, or in every `decoder_sparse_step`-th one less `mlp_only_layers`, dense SwiGLU
layers in between, as Hugging Face's Qwen3MoeConfig says; softmax top-k routing with renormalised weights and no
shared expert in the official models (both kept as options). A table of flavors with the official shapes and the
Hugging Face mapping (`Qwen3MoeForCausalLM`, one tensor per expert on disk; titan stacks them).

The family's entry in the registry is in titan/models/__init__.py.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from titan.errors import ConfigError
from titan.models import qwen3
from titan.models.hf_adapter import DecoderAdapter
from titan.models.layers import Transformer, TransformerArgs, TransformerBlock
from titan.models.moe import MoE, moe_layers

logger = logging.getLogger("titan")


@dataclass
class Qwen3MoeArgs(qwen3.Qwen3Args):
    family: ClassVar[str] = "qwen3_moe"
    # What a Hugging Face folder must also agree on: the experts and the routing.
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = TransformerArgs.SHAPE_FIELDS + (
        "n_experts", "top_k", "moe_hidden_dim", "norm_topk_prob", "score_func", "decoder_sparse_step",
        "mlp_only_layers", "shared_hidden_dim")

    ffn_hidden_dim: int = 6144  # the dense layers' width (HF intermediate_size; unused when every layer is MoE)
    n_experts: int = 128
    top_k: int = 8
    moe_hidden_dim: int = 768  # each expert's SwiGLU width (HF moe_intermediate_size)
    norm_topk_prob: bool = True
    score_func: str = "softmax"  # or "sigmoid" (DeepSeek-V3's; not expressible as a Hugging Face Qwen3-MoE)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = field(default=())
    shared_hidden_dim: int = 0  # 0: no shared expert (Qwen3-MoE has none; Qwen2-MoE's is gated)
    shared_gate: bool = False
    # Training settings, from the [moe] config section (titan/models/__init__.py:model_args).
    grouped_mm: bool = True
    aux_loss_coef: float = 0.0
    bias_update_rate: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        if not 0 < self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1 ... n_experts={self.n_experts}")

    def is_moe_layer(self, layer_id: int) -> bool:
        """HF's rule: MoE unless listed in mlp_only_layers, on every decoder_sparse_step-th layer."""
        return layer_id not in self.mlp_only_layers and (layer_id + 1) % self.decoder_sparse_step == 0


class MoEBlock(TransformerBlock):
    def build_feed_forward(self, layer_id: int, args: Qwen3MoeArgs) -> nn.Module:
        if not args.is_moe_layer(layer_id):
            return super().build_feed_forward(layer_id, args)
        return MoE(args.dim, args.moe_hidden_dim, args.n_experts, args.top_k, score_func=args.score_func,
                   norm_topk_prob=args.norm_topk_prob, shared_hidden_dim=args.shared_hidden_dim,
                   shared_gate=args.shared_gate, grouped_mm=args.grouped_mm, aux_loss_coef=args.aux_loss_coef,
                   bias_update_rate=args.bias_update_rate)


class MoETransformer(Transformer):
    block_class = MoEBlock

    def init_buffers(self, device: torch.device | None = None):
        super().init_buffers(device)
        for _, m in moe_layers([self]):
            m.init_buffers()


# Official shapes from the config.json files of Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B: 4 K/V heads, head_dim
# 128, 128 experts of which 8 per token, renormalised top-k weights, every layer MoE, vocabulary 151,936.
_OFFICIAL = {"vocab_size": 151936, "head_dim": 128, "n_kv_heads": 4, "vocab_from_tokenizer": False,
             "n_experts": 128, "top_k": 8}

FLAVORS: dict[str, Qwen3MoeArgs] = {
    # Tests: small enough for several processes; 8 experts so that expert parallelism can split them 2 or 4 ways.
    "tiny": Qwen3MoeArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden_dim=128,
                         vocab_size=4096, n_experts=8, top_k=2, moe_hidden_dim=32),
    "debugmodel": Qwen3MoeArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64, ffn_hidden_dim=768,
                               vocab_size=4096, n_experts=16, top_k=2, moe_hidden_dim=256),
    "30B-A3B": Qwen3MoeArgs(dim=2048, n_layers=48, n_heads=32, ffn_hidden_dim=6144, moe_hidden_dim=768,
                            **_OFFICIAL),
    "235B-A22B": Qwen3MoeArgs(dim=4096, n_layers=94, n_heads=64, ffn_hidden_dim=12288, moe_hidden_dim=1536,
                              **_OFFICIAL),
}


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: Qwen3MoeForCausalLM. On disk each expert is its own gate/up/down_proj (transformers >= 5 stacks them
# in memory and splits them again when saving); titan's router is HF's `mlp.gate`.

_EXPERT = re.compile(r"(.+\.feed_forward\.experts)\.(\d+)\.(w[123])\.weight$")  # any block's (MTP's too)
_FFN_HF = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


class MoEAdapter(DecoderAdapter):
    """The decoder mapping plus, per MoE layer, the router and one name per expert matrix. The names table lists
    each expert under the per-expert name `layers.{i}.feed_forward.experts.{j}.w1.weight`, row j of the stacked
    parameter `layers.{i}.feed_forward.experts.w1`; `to_hf` splits the stacks into those, `from_hf` stacks them back."""

    def names(self, args: Qwen3MoeArgs) -> dict[str, str]:
        names = super().names(args)
        for i in range(args.n_layers):
            if not args.is_moe_layer(i):
                continue
            for w, hf_w in _FFN_HF.items():
                del names[f"layers.{i}.feed_forward.{w}.weight"]
                names.update({f"layers.{i}.feed_forward.experts.{j}.{w}.weight":
                              f"model.layers.{i}.mlp.experts.{j}.{hf_w}.weight" for j in range(args.n_experts)})
            names[f"layers.{i}.feed_forward.router.gate.weight"] = f"model.layers.{i}.mlp.gate.weight"
        return names

    def moe_prefixes(self, args) -> list[str]:
        """The blocks that have an MoE layer."""
        return [f"layers.{i}" for i in range(args.n_layers) if args.is_moe_layer(i)]

    def defaults(self, args) -> dict[str, torch.Tensor]:
        """The routers' expert bias (titan's, for the auxiliary-loss-free balancing) starts at zero where the
        checkpoint has none (Qwen3-MoE's never does)."""
        names = self.names(args)
        biases = [f"{p}.feed_forward.router.expert_bias" for p in self.moe_prefixes(args)]
        return {b: torch.zeros(args.n_experts) for b in biases if b not in names}

    def to_hf(self, state, args, dtype=None, partial=False):
        split = {}
        for name, w in state.items():
            m = re.match(r"(.+\.feed_forward\.experts)\.(w[123])$", name)
            if m is None:
                split[name] = w
                continue
            split.update({f"{m[1]}.{j}.{m[2]}.weight": w[j] for j in range(w.shape[0])})
        self.warn_dropped_bias(state, args)
        return super().to_hf(split, args, dtype, partial)

    def warn_dropped_bias(self, state, args) -> None:
        """A warning when the export leaves out expert biases that the bias update moved (the architecture has
        none), since Hugging Face may then route some tokens differently."""
        names = self.names(args)
        biased = [k for k, v in state.items() if k.endswith("expert_bias") and k not in names
                  and bool(v.abs().sum() > 0)]
        if biased:
            logger.warning(f"Hugging Face export: {self.architecture} has no expert bias; {len(biased)} layers' "
                           f"bias (from moe.bias_update_rate) is left out, so HF may route some tokens differently")

    def from_hf(self, tensors, args, where=""):
        state = super().from_hf(tensors, args, where)
        stacks: dict[str, list] = {}
        for name in [k for k in state if _EXPERT.match(k)]:
            prefix, j, w = _EXPERT.match(name).groups()
            stacks.setdefault(f"{prefix}.{w}", []).append((int(j), state.pop(name)))
        for name, rows in stacks.items():
            state[name] = torch.stack([w for _, w in sorted(rows, key=lambda r: r[0])])
        return state


def _hf_config(args: Qwen3MoeArgs) -> dict:
    if args.score_func != "softmax" or args.shared_hidden_dim:
        raise ConfigError(f"Hugging Face export: Qwen3MoeForCausalLM routes by softmax without a shared expert; "
                          f"this model has score_func={args.score_func}, shared_hidden_dim={args.shared_hidden_dim}")
    return {**qwen3._hf_config(args), "decoder_sparse_step": args.decoder_sparse_step,
            "mlp_only_layers": list(args.mlp_only_layers), "moe_intermediate_size": args.moe_hidden_dim,
            "norm_topk_prob": args.norm_topk_prob, "num_experts": args.n_experts, "num_experts_per_tok": args.top_k,
            "output_router_logits": False, "router_aux_loss_coef": args.aux_loss_coef}


def _args_from_hf(config: dict, where: str) -> Qwen3MoeArgs:
    try:
        # transformers >= 5 writes the expert count as num_local_experts (Qwen3MoeConfig's attribute_map).
        n_experts = config["num_experts"] if "num_experts" in config else config["num_local_experts"]
        moe = {"n_experts": n_experts, "top_k": config["num_experts_per_tok"],
               "moe_hidden_dim": config["moe_intermediate_size"],
               "norm_topk_prob": bool(config.get("norm_topk_prob", False)),
               "decoder_sparse_step": config.get("decoder_sparse_step", 1),
               "mlp_only_layers": tuple(config.get("mlp_only_layers") or ())}
    except KeyError as e:
        raise ConfigError(f"{where}: config.json has no {e.args[0]!r}") from None
    try:
        return qwen3._args_from_hf(config, where, cls=Qwen3MoeArgs, **moe)
    except ValueError as e:  # e.g. more experts per token than experts
        raise ConfigError(f"{where}: {e}") from None


HF = MoEAdapter(model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", config=_hf_config, args=_args_from_hf,
                transformers_version="4.51.0")
