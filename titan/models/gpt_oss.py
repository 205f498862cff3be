"""gpt-oss (OpenAI's open-weight 20B and 120B): grouped-query attention with biases on every projection, a learned
sink logit per head (titan/models/sinks.py), a 128-token sliding window on every other layer (the first one
included) and full attention on the rest, YaRN RoPE scaling; every layer a Mixture-of-Experts layer (titan/models/
moe.py) whose router has a bias and whose experts have biases and gpt-oss's clamped SwiGLU; softmax top-k routing
(Hugging Face's softmax over the top-k logits is the same as softmax, top-k, renormalise). No shared expert.

A table of flavors with the official shapes and the Hugging Face mapping (`GptOssForCausalLM`, as transformers
writes it: experts stacked, gate and up interleaved in one `gate_up_proj`; the released MXFP4 expert weights are
dequantised on import). The family's entry in the registry is in titan/models/__init__.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from titan.errors import ConfigError
from titan.models.attention import MaskBuilder
from titan.models.hf_adapter import DecoderAdapter, decoder_sizes, rope_settings, yarn_from_hf, yarn_to_hf
from titan.models.layers import (
    Attention,
    LayerCache,
    TransformerArgs,
    TransformerBlock,
    YarnScaling,
)
from titan.models.moe import GroupedExperts, MoE, Router, clamped_swiglu
from titan.models.qwen3_moe import MoEAdapter, MoETransformer
from titan.models.sinks import WindowSinkSDPA

logger = logging.getLogger("titan")

SLIDING, FULL = "sliding_attention", "full_attention"  # Hugging Face's layer_types


@dataclass
class GptOssArgs(TransformerArgs):
    family: ClassVar[str] = "gpt_oss"
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = TransformerArgs.SHAPE_FIELDS + (
        "n_experts", "top_k", "moe_hidden_dim", "sliding_window", "layer_types", "swiglu_alpha", "swiglu_limit",
        "attention_bias")

    dim: int = 2880
    n_layers: int = 24
    n_heads: int = 64
    n_kv_heads: int | None = 8
    head_dim: int = 64
    vocab_size: int = 201088
    rope_theta: float = 150000.0
    attention_bias: bool = True
    sliding_window: int = 128
    layer_types: tuple[str, ...] | None = None  # None: sliding on even layers (0, 2, ...), full on odd ones
    n_experts: int = 32
    top_k: int = 4
    moe_hidden_dim: int = 2880  # each expert's width (HF intermediate_size)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # Training settings, from the [moe] config section (titan/models/__init__.py:model_args).
    grouped_mm: bool = True
    aux_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    # What memory.py and the registry ask of an MoE family: fixed for gpt-oss.
    score_func: ClassVar[str] = "softmax"
    norm_topk_prob: ClassVar[bool] = True
    shared_hidden_dim: ClassVar[int] = 0
    shared_gate: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - {SLIDING, FULL}:
                raise ValueError(f"layer_types must name {SLIDING} or {FULL} for each of the {self.n_layers} layers")
        if not 0 < self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1 ... n_experts={self.n_experts}")

    @property
    def ffn_hidden_dim(self) -> int:
        return self.moe_hidden_dim  # no dense feed-forward layers

    def layer_type(self, layer_id: int) -> str:
        return self.layer_types[layer_id] if self.layer_types is not None else (SLIDING if layer_id % 2 == 0 else FULL)

    def window(self, layer_id: int) -> int:
        return self.sliding_window if self.layer_type(layer_id) == SLIDING else 0

    def is_moe_layer(self, layer_id: int) -> bool:
        return True


class GptOssAttention(Attention):
    """The shared attention (with its biases) plus `sinks` [n_heads] and the layer's window, both applied in its
    kernel (`WindowSinkSDPA`)."""

    def __init__(self, args: GptOssArgs, layer_id: int):
        super().__init__(args, layer_id)
        self.sinks = nn.Parameter(torch.empty(args.n_heads))
        self.sdpa = WindowSinkSDPA()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               cache: LayerCache | None) -> torch.Tensor:
        if cache is None:
            return self.sdpa(q, k, v, mask, self.window, sinks=self.sinks)  # (context parallelism swaps this kernel)
        k, v = cache.update(k, v)  # generation: the window counts in cache columns
        return self.sdpa(q, k, v, mask, self.window, sinks=self.sinks, q_columns=cache.owner.slots)

    def init_weights(self, init_std: float):
        super().init_weights(init_std)
        nn.init.zeros_(self.sinks)  # a sink logit of 0: at first, one extra key with score 0 and no value


class GptOssBlock(TransformerBlock):
    def build_attention(self, layer_id: int, args: GptOssArgs) -> nn.Module:
        return GptOssAttention(args, layer_id)

    def build_feed_forward(self, layer_id: int, args: GptOssArgs) -> nn.Module:
        router = Router(args.dim, args.n_experts, args.top_k, "softmax", norm_topk_prob=True, bias=True)
        glu = partial(clamped_swiglu, alpha=args.swiglu_alpha, limit=args.swiglu_limit)
        experts = GroupedExperts(args.dim, args.moe_hidden_dim, args.n_experts, args.grouped_mm, bias=True, glu=glu)
        return MoE(args.dim, args.moe_hidden_dim, args.n_experts, args.top_k, aux_loss_coef=args.aux_loss_coef,
                   bias_update_rate=args.bias_update_rate, router=router, experts=experts)


class GptOssTransformer(MoETransformer):
    block_class = GptOssBlock

    def __init__(self, args: GptOssArgs):
        super().__init__(args)
        # Sinks need the scores (titan/models/sinks.py): dense additive masks, never FlexAttention's BlockMasks.
        self.mask_builder = MaskBuilder(set(self.mask_builder.windows), flex=False)


# Official shapes from the config.json files of openai/gpt-oss-20b and openai/gpt-oss-120b: 64 query heads of 64
# channels on a 2880-wide model, 8 K/V heads, experts of width 2880, 4 per token, YaRN x32 over 4,096 positions.
_OFFICIAL = {"vocab_from_tokenizer": False, "rope_scaling": YarnScaling(
    factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, truncate=False)}

_DEBUG_YARN = YarnScaling(factor=4.0, original_max_position_embeddings=64, truncate=False)

FLAVORS: dict[str, GptOssArgs] = {
    # Tests: windows of 8 tokens, so that the sliding layers differ from the full ones at test lengths.
    "tiny": GptOssArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=4096, sliding_window=8,
                       n_experts=8, top_k=2, moe_hidden_dim=32, rope_scaling=_DEBUG_YARN),
    "debugmodel": GptOssArgs(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32, vocab_size=4096,
                             sliding_window=32, n_experts=16, top_k=2, moe_hidden_dim=128, rope_scaling=_DEBUG_YARN),
    "20B": GptOssArgs(n_layers=24, n_experts=32, **_OFFICIAL),
    "120B": GptOssArgs(n_layers=36, n_experts=128, **_OFFICIAL),
}


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: GptOssForCausalLM. Experts stacked on disk: gate_up_proj [E, dim, 2 x hidden] with gate and up in
# alternate columns, down_proj [E, hidden, dim] (inputs first: x @ W), and their biases; the router is mlp.router
# (with a bias), the sinks self_attn.sinks. RoPE is rotate-half: q/k rows and biases are permuted per head.

_BIASES = {f"attention.{t}.bias": f"self_attn.{h}.bias" for t, h in
           (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))}
_LAYER = {
    "attention.sinks": "self_attn.sinks",
    "feed_forward.router.gate.weight": "mlp.router.weight",
    "feed_forward.router.gate.bias": "mlp.router.bias",
    # to_hf / from_hf turn titan's stacked w1, w3, w2 and biases into these and back
    "feed_forward.experts.gate_up": "mlp.experts.gate_up_proj",
    "feed_forward.experts.gate_up_bias": "mlp.experts.gate_up_proj_bias",
    "feed_forward.experts.down": "mlp.experts.down_proj",
    "feed_forward.experts.down_bias": "mlp.experts.down_proj_bias",
}
_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """OpenAI's MXFP4 expert weights -> fp32 [E, in, out] (x @ W layout). `blocks` uint8 [E, out, G, 16]: 32 fp4
    (e2m1) values per group of 16 bytes, the low nibble first; `scales` uint8 [E, out, G]: one power of two per
    group, biased by 127. Exact in fp32 (every value is a small integer multiple of a power of two)."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()  # [E, out, G, 32]
    values = torch.ldexp(_FP4[codes], (scales.long() - 127).unsqueeze(-1).float())
    return values.flatten(-2).transpose(1, 2).contiguous()


class GptOssAdapter(MoEAdapter):
    def names(self, args: GptOssArgs) -> dict[str, str]:
        names = DecoderAdapter.names(self, args)
        for i in range(args.n_layers):
            for w in ("w1", "w2", "w3"):
                del names[f"layers.{i}.feed_forward.{w}.weight"]
            own = {**(_BIASES if args.attention_bias else {}), **_LAYER}
            names.update({f"layers.{i}.{t}": f"model.layers.{i}.{h}" for t, h in own.items()})
        return names

    def _heads(self, name: str, args) -> int | None:
        return DecoderAdapter._heads(name.replace(".bias", ".weight"), args)  # a q/k bias is permuted like its rows

    def to_hf(self, state, args, dtype=None, partial=False):
        self.warn_dropped_bias(state, args)
        state = dict(state)
        for prefix in {k.rsplit(".", 1)[0] for k in state if k.endswith(".experts.w1")}:
            w1, w2, w3 = (state.pop(f"{prefix}.{w}") for w in ("w1", "w2", "w3"))
            b1, b2, b3 = (state.pop(f"{prefix}.{b}") for b in ("b1", "b2", "b3"))
            # [E, hidden, dim] each -> rows interleaved (gate, up, gate, ...) -> [E, dim, 2 x hidden]
            state[f"{prefix}.gate_up"] = torch.stack([w1, w3], dim=2).flatten(1, 2).transpose(1, 2)
            state[f"{prefix}.gate_up_bias"] = torch.stack([b1, b3], dim=-1).flatten(-2)
            state[f"{prefix}.down"], state[f"{prefix}.down_bias"] = w2.transpose(1, 2), b2
        return DecoderAdapter.to_hf(self, state, args, dtype, partial)

    def from_hf(self, tensors, args, where=""):
        tensors = _dequantized(tensors, args, where)
        state = DecoderAdapter.from_hf(self, tensors, args, where)
        for prefix in {k.rsplit(".", 1)[0] for k in state if k.endswith(".experts.gate_up")}:
            gate_up = state.pop(f"{prefix}.gate_up").transpose(1, 2)  # [E, 2 x hidden, dim]
            state[f"{prefix}.w1"], state[f"{prefix}.w3"] = gate_up[:, 0::2], gate_up[:, 1::2]
            bias = state.pop(f"{prefix}.gate_up_bias")
            state[f"{prefix}.b1"], state[f"{prefix}.b3"] = bias[:, 0::2], bias[:, 1::2]
            state[f"{prefix}.w2"] = state.pop(f"{prefix}.down").transpose(1, 2)
            state[f"{prefix}.b2"] = state.pop(f"{prefix}.down_bias")
        return {k: v.contiguous() for k, v in state.items()}


def _dequantized(tensors: dict[str, torch.Tensor], args: GptOssArgs, where: str) -> dict[str, torch.Tensor]:
    """The released checkpoints hold each layer's expert weights as MXFP4 `*_blocks` + `*_scales`: dequantised to
    fp32 here (titan trains them in high precision; a bf16 run casts them, exactly, on loading)."""
    packed = [k.removesuffix("_blocks") for k in tensors if k.endswith("_proj_blocks")]
    if not packed:
        return tensors
    out = {k: v for k, v in tensors.items() if not k.endswith(("_proj_blocks", "_proj_scales"))}
    for name in packed:
        out[name] = dequantize_mxfp4(tensors[f"{name}_blocks"], tensors[f"{name}_scales"])
    logger.info(f"{where}: dequantised the MXFP4 expert weights of {len(packed) // 2} layers to float32")
    return out


def _hf_config(args: GptOssArgs) -> dict:
    layer_types = [args.layer_type(i) for i in range(args.n_layers)]
    return {"attention_bias": True, "experts_per_token": args.top_k, "head_dim": args.head_dim,
            "intermediate_size": args.moe_hidden_dim, "layer_types": layer_types, "num_experts_per_tok": args.top_k,
            "num_local_experts": args.n_experts, "output_router_logits": False,
            # Without scaling, say so: transformers' GptOssConfig defaults to YaRN x32 when rope_scaling is absent.
            "rope_scaling": yarn_to_hf(args.rope_scaling) if args.rope_scaling else {"rope_type": "default"},
            "router_aux_loss_coef": args.aux_loss_coef, "sliding_window": args.sliding_window,
            "swiglu_alpha": args.swiglu_alpha, "swiglu_limit": args.swiglu_limit}


def _args_from_hf(config: dict, where: str) -> GptOssArgs:
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise ConfigError(f"{where}: quantization_config.quant_method={quant!r} is not supported (titan reads "
                          f"unquantised gpt-oss folders and dequantises the released MXFP4 experts)")
    sizes = decoder_sizes({**config, "attention_bias": False}, where)  # gpt-oss's biases are this family's own
    scaling, window = rope_settings(config)[1], config.get("sliding_window")
    layer_types = config.get("layer_types") or None
    if not window:  # no window at all: every layer attends to the whole sequence
        window, layer_types = 1, [FULL] * sizes["n_layers"]
    if layer_types == [SLIDING if i % 2 == 0 else FULL for i in range(sizes["n_layers"])]:
        layer_types = None  # the default pattern
    try:
        return GptOssArgs(
            **sizes, head_dim=config.get("head_dim") or sizes["dim"] // sizes["n_heads"],
            attention_bias=bool(config.get("attention_bias", True)), sliding_window=window,
            layer_types=tuple(layer_types) if layer_types else None,
            n_experts=config["num_local_experts"], top_k=config.get("num_experts_per_tok") or
            config["experts_per_token"], moe_hidden_dim=config["intermediate_size"],
            swiglu_alpha=float(config.get("swiglu_alpha", 1.702)), swiglu_limit=float(config.get("swiglu_limit", 7.0)),
            rope_scaling=None if scaling is None else yarn_from_hf(scaling, where))
    except KeyError as e:
        raise ConfigError(f"{where}: config.json has no {e.args[0]!r}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


HF = GptOssAdapter(model_type="gpt_oss", architecture="GptOssForCausalLM", config=_hf_config, args=_args_from_hf,
                   transformers_version="4.55.0", export_fields=("quantization_config",))  # exports are dequantised
