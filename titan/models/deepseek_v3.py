"""DeepSeek-V3 (and its descendants Kimi K2 and Moonlight, same architecture): multi-head latent attention
(titan/models/mla.py) with YaRN RoPE scaling, dense SwiGLU in the first `n_dense_layers` layers (HF
first_k_dense_replace), then Mixture-of-Experts layers (titan/models/moe.py) with sigmoid routing limited to the best
`topk_groups` of `n_groups` expert groups, renormalised weights times `route_scale` (routed_scaling_factor), and a
shared expert of `shared_hidden_dim` (n_shared_experts x moe_intermediate_size) that every token passes through.
Multi-token prediction (titan/models/mtp.py; off unless `mtp_layers` > 0): after the main model, depth k predicts
token t+k+1 from the depth k-1 hidden state at t and the embedding of token t+k, through its own transformer block,
sharing the embedding and the output head; its cross-entropy, weighted, joins the loss's gradient.

A table of flavors with the official shapes and the Hugging Face mapping (`DeepseekV3ForCausalLM`, one tensor per
expert on disk as Qwen3-MoE's; an MTP depth is the checkpoint's extra layer `model.layers.{n_layers + k}`). The
family's entry in the registry is in titan/models/__init__.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from titan.errors import ConfigError
from titan.models.hf_adapter import decoder_sizes, rope_settings, yarn_from_hf, yarn_to_hf
from titan.models.layers import FeedForward, KVCache, TransformerArgs, TransformerBlock, YarnScaling
from titan.models.mla import MLAttention
from titan.models.moe import MoE, Router, _AuxLossGrad
from titan.models.mtp import MultiTokenPrediction, mtp_loss
from titan.models.qwen3_moe import MoEAdapter, MoETransformer

logger = logging.getLogger("titan")

@dataclass
class DeepSeekV3Args(TransformerArgs):
    family: ClassVar[str] = "deepseek_v3"
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "dim", "n_layers", "n_heads", "vocab_size", "tie_embeddings", "rope_theta", "norm_eps", "rope_scaling",
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden_dim",
        "n_dense_layers", "n_experts", "top_k", "moe_hidden_dim", "shared_hidden_dim", "score_func",
        "norm_topk_prob", "n_groups", "topk_groups", "route_scale")

    dim: int = 7168
    n_layers: int = 61
    n_heads: int = 128
    vocab_size: int = 129280
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # MLA (titan/models/mla.py); q_lora_rank 0 = queries from one projection (DeepSeek-V2-Lite, Moonlight).
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    latent_norm_eps: float = 1e-6
    # Feed-forward: dense SwiGLU in the first n_dense_layers, Mixture of Experts after.
    ffn_hidden_dim: int = 18432
    n_dense_layers: int = 3
    n_experts: int = 256
    top_k: int = 8
    moe_hidden_dim: int = 2048
    shared_hidden_dim: int = 2048  # n_shared_experts x moe_hidden_dim; 0 = none
    score_func: str = "sigmoid"
    norm_topk_prob: bool = True
    n_groups: int = 8
    topk_groups: int = 4
    route_scale: float = 2.5
    # Multi-token prediction: depths (HF num_nextn_predict_layers; 0 = off) and their loss weight.
    mtp_layers: int = 0
    mtp_loss_weight: float = 0.3
    # Training settings, from the [moe] config section (titan/models/__init__.py:model_args).
    grouped_mm: bool = True
    aux_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    shared_gate: ClassVar[bool] = False  # (what memory.py asks of an MoE family)

    def __post_init__(self):
        super().__post_init__()
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads}: MLA gives every head its own keys and values")
        if not 0 < self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1 ... n_experts={self.n_experts}")
        per_group = self.n_experts // self.n_groups
        if self.n_experts % self.n_groups or (self.n_groups > 1 and (
                per_group < 2 or self.top_k > self.topk_groups * per_group)):
            raise ValueError(f"n_experts={self.n_experts} must split into n_groups={self.n_groups} groups (of 2 or "
                             f"more) whose best topk_groups={self.topk_groups} hold top_k={self.top_k} experts")

    @property
    def head_dim(self) -> int:
        """A query's (and key's) channels per head: the part without position and the RoPE part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """MoE after the first n_dense_layers (MTP blocks, numbered from n_layers on, are MoE layers too)."""
        return layer_id >= self.n_dense_layers


class DeepSeekV3Block(TransformerBlock):
    def build_attention(self, layer_id: int, args: DeepSeekV3Args) -> nn.Module:
        return MLAttention(args)

    def build_feed_forward(self, layer_id: int, args: DeepSeekV3Args) -> nn.Module:
        if not args.is_moe_layer(layer_id):
            return FeedForward(args.dim, args.ffn_hidden_dim)
        # An MTP block's balance loss is weighted like the block's token loss (with weight 0 MTP changes nothing).
        aux = args.aux_loss_coef * (args.mtp_loss_weight if layer_id >= args.n_layers else 1.0)
        router = Router(args.dim, args.n_experts, args.top_k, args.score_func, args.norm_topk_prob,
                        n_groups=args.n_groups, topk_groups=args.topk_groups, route_scale=args.route_scale)
        return MoE(args.dim, args.moe_hidden_dim, args.n_experts, args.top_k, shared_hidden_dim=args.shared_hidden_dim,
                   grouped_mm=args.grouped_mm, aux_loss_coef=aux, bias_update_rate=args.bias_update_rate,
                   router=router)


class DeepSeekV3Transformer(MoETransformer):
    """The decoder with MLA blocks and, with `mtp_layers`, the MTP depths as `mtp` ("0", "1", ...). While training
    with `labels` given, the MTP cross-entropy (summed over the depths' labelled tokens) gets the gradient scale in
    `mtp_loss_scale` (set by the loop: weight / (depths x the step's items); 0 = no gradient) through the logits,
    as the MoE balance loss does, and its value is added to `mtp_loss_sum` for the metrics."""

    block_class = DeepSeekV3Block

    def __init__(self, args: DeepSeekV3Args):
        super().__init__(args)
        self.mtp = nn.ModuleDict({str(k): MultiTokenPrediction(args.n_layers + k, args, self.block_class)
                                  for k in range(args.mtp_layers)}) if args.mtp_layers else None
        self.register_buffer("mtp_loss_scale", torch.zeros(()), persistent=False)
        self.register_buffer("mtp_loss_sum", torch.zeros(()), persistent=False)

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        # The shared decoder's forward (titan/models/layers.py:Transformer), keeping the normalised hidden state.
        freqs_cis = self.freqs_cis if positions is None else self.freqs_cis[positions]
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        mask = cache.mask if cache is not None else self.batch_masks(h, document_ids, positions)
        for name, layer in self.layers.items():
            h = layer(h, freqs_cis, mask) if cache is None else layer(h, freqs_cis, mask, cache=cache.layer(name))
        h = self.norm(h) if self.norm is not None else h
        if self.output is None or self.output_hidden:  # (the chunked loss refuses MTP: titan/config.py)
            return h
        logits = self.output(h)
        if self.mtp is not None and labels is not None and self.training and torch.is_grad_enabled():
            loss = mtp_loss(self.mtp.values(), self.tok_embeddings, self.output, tokens, labels, h, freqs_cis, mask,
                            document_ids)
            with torch.no_grad():
                self.mtp_loss_sum += loss.detach()
            logits = _AuxLossGrad.apply(logits, loss, self.mtp_loss_scale)
        return logits

    def init_buffers(self, device: torch.device | None = None):
        super().init_buffers(device)
        self.mtp_loss_scale, self.mtp_loss_sum = torch.zeros((), device=device), torch.zeros((), device=device)

    @torch.no_grad()
    def init_weights(self):
        super().init_weights()
        for depth in (self.mtp or {}).values():
            depth.init_weights()


# Official shapes. 671B: deepseek-ai/DeepSeek-V3's config.json (MTP: one depth in the checkpoint, off here by
# default and not counted). 16B: moonshotai/Moonlight-16B-A3B (a DeepSeek-V3 with one query projection, 64 experts
# in one group, 2 shared, no YaRN).
_V3_YARN = YarnScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                       mscale_all_dim=1.0)

FLAVORS: dict[str, DeepSeekV3Args] = {
    # Tests: 8 experts in 4 groups of 2, 2 of them per token from the best 2 groups, a dense first layer.
    "tiny": DeepSeekV3Args(dim=64, n_layers=4, n_heads=4, vocab_size=4096, q_lora_rank=32, kv_lora_rank=32,
                           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_hidden_dim=128,
                           n_dense_layers=1, n_experts=8, top_k=2, moe_hidden_dim=32, shared_hidden_dim=32,
                           n_groups=4, topk_groups=2, route_scale=2.5, rope_scaling=None),
    "debugmodel": DeepSeekV3Args(dim=256, n_layers=6, n_heads=8, vocab_size=4096, q_lora_rank=128, kv_lora_rank=64,
                                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, ffn_hidden_dim=768,
                                 n_dense_layers=1, n_experts=16, top_k=2, moe_hidden_dim=128, shared_hidden_dim=128,
                                 n_groups=4, topk_groups=2, route_scale=2.5, rope_scaling=None),
    "16B": DeepSeekV3Args(dim=2048, n_layers=27, n_heads=16, vocab_size=163840, vocab_from_tokenizer=False,
                          norm_eps=1e-5, rope_theta=50000.0, rope_scaling=None, q_lora_rank=0, ffn_hidden_dim=11264,
                          n_dense_layers=1, n_experts=64, top_k=6, moe_hidden_dim=1408, shared_hidden_dim=2816,
                          n_groups=1, topk_groups=1, route_scale=2.446),
    "671B": DeepSeekV3Args(vocab_from_tokenizer=False, rope_scaling=_V3_YARN),
}


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: DeepseekV3ForCausalLM. Experts one tensor each on disk (split and stacked by qwen3_moe.MoEAdapter);
# the expert bias is HF's e_score_correction_bias; no RoPE permutation (rope_interleave = true).

_ATTENTION = {"wkv_a": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_Q_LORA = {"wq_a": "q_a_proj", "q_a_norm": "q_a_layernorm", "wq_b": "q_b_proj"}
_SWIGLU = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_MTP = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}
_MTP_COPIES = {"embed_tokens": "tok_embeddings", "shared_head.head": "output"}  # HF holds them again per depth


def _block_names(args: DeepSeekV3Args, layer_id: int) -> dict[str, str]:
    """A block's names (titan, relative to the block -> HF, relative to the layer)."""
    attention = {**_ATTENTION, **(_Q_LORA if args.q_lora_rank else {"wq": "q_proj"})}
    names = {f"attention.{t}.weight": f"self_attn.{h}.weight" for t, h in attention.items()}
    names.update({"attention_norm.weight": "input_layernorm.weight",
                  "ffn_norm.weight": "post_attention_layernorm.weight"})
    if not args.is_moe_layer(layer_id):
        return {**names, **{f"feed_forward.{t}.weight": f"mlp.{h}.weight" for t, h in _SWIGLU.items()}}
    names.update({"feed_forward.router.gate.weight": "mlp.gate.weight",
                  "feed_forward.router.expert_bias": "mlp.gate.e_score_correction_bias"})
    if args.shared_hidden_dim:
        names.update({f"feed_forward.shared_expert.{t}.weight": f"mlp.shared_experts.{h}.weight"
                      for t, h in _SWIGLU.items()})
    names.update({f"feed_forward.experts.{j}.{t}.weight": f"mlp.experts.{j}.{h}.weight"
                  for j in range(args.n_experts) for t, h in _SWIGLU.items()})
    return names


class DeepSeekV3Adapter(MoEAdapter):
    def names(self, args: DeepSeekV3Args) -> dict[str, str]:
        names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        if not args.tie_embeddings:
            names["output.weight"] = "lm_head.weight"
        for i in range(args.n_layers):
            names.update({f"layers.{i}.{t}": f"model.layers.{i}.{h}" for t, h in _block_names(args, i).items()})
        for k in range(args.mtp_layers):
            i = args.n_layers + k
            names.update({f"mtp.{k}.block.{t}": f"model.layers.{i}.{h}" for t, h in _block_names(args, i).items()})
            names.update({f"mtp.{k}.{t}.weight": f"model.layers.{i}.{h}.weight" for t, h in _MTP.items()})
            # Copies of the shared embedding and head (to_hf adds them under these names, from_hf drops them).
            names.update({f"mtp.{k}.{h}.weight": f"model.layers.{i}.{h}.weight" for h in _MTP_COPIES})
        return names

    def moe_prefixes(self, args: DeepSeekV3Args) -> list[str]:
        return super().moe_prefixes(args) + [f"mtp.{k}.block" for k in range(args.mtp_layers)]

    def _heads(self, name: str, args) -> None:
        return None  # rope_interleave: DeepSeek's checkpoints rotate channel pairs as titan does

    def to_hf(self, state, args, dtype=None, partial=False):
        # Copies, not views: safetensors refuses two names for one storage.
        copies = {f"mtp.{k}.{h}.weight": state[f"{t}.weight"].clone() for k in range(args.mtp_layers)
                  for h, t in _MTP_COPIES.items() if f"{t}.weight" in state}
        return super().to_hf({**state, **copies}, args, dtype, partial)

    def from_hf(self, tensors, args, where=""):
        state = super().from_hf(tensors, args, where)
        return {k: v for k, v in state.items() if not any(k.endswith(f".{h}.weight") for h in _MTP_COPIES)}

    def with_tensors(self, args: DeepSeekV3Args, names: set[str]) -> DeepSeekV3Args:
        """The MTP depths a folder holds are those whose layers are in it (transformers' save_pretrained writes
        num_nextn_predict_layers = 1 and no such layer)."""
        depths = 0
        while depths < args.mtp_layers and f"model.layers.{args.n_layers + depths}.eh_proj.weight" in names:
            depths += 1
        return replace(args, mtp_layers=depths)


def _hf_config(args: DeepSeekV3Args) -> dict:
    if args.score_func != "sigmoid" or (args.shared_hidden_dim and args.shared_hidden_dim % args.moe_hidden_dim):
        raise ConfigError(f"Hugging Face export: DeepseekV3ForCausalLM routes by sigmoid with shared experts of the "
                          f"experts' width; this model has score_func={args.score_func}, "
                          f"shared_hidden_dim={args.shared_hidden_dim}")
    return {"attention_bias": False, "first_k_dense_replace": args.n_dense_layers, "head_dim": args.qk_rope_head_dim,
            "kv_lora_rank": args.kv_lora_rank, "moe_intermediate_size": args.moe_hidden_dim, "n_group": args.n_groups,
            "n_routed_experts": args.n_experts, "n_shared_experts": args.shared_hidden_dim // args.moe_hidden_dim,
            "norm_topk_prob": args.norm_topk_prob, "num_experts_per_tok": args.top_k,
            "num_nextn_predict_layers": args.mtp_layers, "q_lora_rank": args.q_lora_rank or None,
            "qk_nope_head_dim": args.qk_nope_head_dim, "qk_rope_head_dim": args.qk_rope_head_dim,
            "rope_interleave": True, "rope_scaling": yarn_to_hf(args.rope_scaling) if args.rope_scaling else None,
            "routed_scaling_factor": args.route_scale, "scoring_func": "sigmoid", "topk_group": args.topk_groups,
            "topk_method": "noaux_tc", "v_head_dim": args.v_head_dim}


def _args_from_hf(config: dict, where: str) -> DeepSeekV3Args:
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant is not None:  # DeepSeek's own release: fp8 blocks with their scales (weight_scale_inv)
        raise ConfigError(f"{where}: quantization_config.quant_method={quant!r} is not supported (titan reads "
                          f"unquantised DeepSeek-V3 folders: dequantise the checkpoint to bf16 first)")
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("rope_interleave", True),
                      ("moe_layer_freq", 1)):
        if config.get(key, want) != want:
            raise ConfigError(f"{where}: {key}={config[key]!r} is not supported (titan's DeepSeek-V3 has {want!r})")
    sizes = decoder_sizes(config, where)
    scaling = rope_settings(config)[1]
    try:
        moe_hidden, n_experts = config["moe_intermediate_size"], config.get("n_routed_experts")
        n_experts = n_experts if n_experts is not None else config["num_local_experts"]
        return DeepSeekV3Args(
            **sizes, rope_scaling=None if scaling is None else yarn_from_hf(scaling, where),
            q_lora_rank=config.get("q_lora_rank") or 0, kv_lora_rank=config["kv_lora_rank"],
            qk_nope_head_dim=config["qk_nope_head_dim"], qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"], ffn_hidden_dim=config["intermediate_size"],
            n_dense_layers=config.get("first_k_dense_replace", 0), n_experts=n_experts,
            top_k=config["num_experts_per_tok"], moe_hidden_dim=moe_hidden,
            shared_hidden_dim=(config.get("n_shared_experts") or 0) * moe_hidden,
            norm_topk_prob=bool(config.get("norm_topk_prob", True)), n_groups=config.get("n_group") or 1,
            topk_groups=config.get("topk_group") or 1, route_scale=float(config.get("routed_scaling_factor", 1.0)),
            mtp_layers=config.get("num_nextn_predict_layers", 0))
    except KeyError as e:
        raise ConfigError(f"{where}: config.json has no {e.args[0]!r}") from None
    except ValueError as e:  # e.g. more experts per token than experts
        raise ConfigError(f"{where}: {e}") from None


HF = DeepSeekV3Adapter(model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM", config=_hf_config,
                       args=_args_from_hf, transformers_version="4.57.0", export_fields=("num_nextn_predict_layers",))
