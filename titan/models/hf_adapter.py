"""How a family's weights and sizes map to a Hugging Face checkpoint, both ways: the tensor names, the RoPE
permutation of each head's channels, and config.json. Pure torch and dicts: reading and writing folders
(safetensors, config.json, tokenizer files) is titan/hf.py's, and `transformers` is never needed.

RoPE layout: titan (like Meta's reference code) rotates consecutive channel pairs (2i, 2i+1) of each head; Hugging
Face's `rotate_half` pairs channel i with i + head_dim/2. Exporting permutes each head's wq/wk output rows from
[x0, y0, x1, y1, ...] to [x0, x1, ..., y0, y1, ...] (exactly what transformers' convert_llama_weights_to_hf.py
does), and a per-head q/k norm weight (Qwen3) the same way, since it scales those same channels; importing undoes it.
Both models then compute the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from titan.errors import ConfigError
from titan.models.layers import YarnScaling


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection, per head, from interleaved pairs to halves (titan -> HF)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `to_rotate_half` (HF -> titan)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _permute(w: torch.Tensor, heads: int, fn) -> torch.Tensor:
    return fn(w.view(-1, 1), heads).view(-1) if w.dim() == 1 else fn(w, heads)


# titan name -> Hugging Face name inside one block (`layers.{i}.` -> `model.layers.{i}.`): Llama's names, which
# Qwen2/3, Mistral and most other decoders share.
BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
QK_NORM_NAMES = {"attention.q_norm.weight": "self_attn.q_norm.weight",
                 "attention.k_norm.weight": "self_attn.k_norm.weight"}


@dataclass(frozen=True)
class DecoderAdapter:
    """A Hugging Face decoder-only architecture with Llama's tensor names. The family supplies what differs: its
    `model_type` and architecture class, its own config.json fields (`config`: args -> dict, merged over the ones all
    such decoders share) and the way back (`args`: (config.json, where) -> args, a ConfigError naming any field the
    family cannot express). A family with other tensors (e.g. per-expert weights) subclasses and extends `names`,
    `to_hf` and `from_hf`."""

    model_type: str
    architecture: str
    config: Callable[[Any], dict]
    args: Callable[[dict, str], Any]
    transformers_version: str  # the oldest transformers that knows this model_type; written into config.json
    # config.json fields an export states itself, never kept from the folder a run started from (titan/hf.py:save):
    # what describes the weights as written (gpt-oss's quantization_config, DeepSeek-V3's MTP depths)
    export_fields: tuple[str, ...] = ()

    def names(self, args) -> dict[str, str]:
        """titan name -> HF name (without lm_head when the embeddings are tied: HF then has no such tensor)."""
        block = {**BLOCK_NAMES, **(QK_NORM_NAMES if args.qk_norm else {})}
        names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        for i in range(args.n_layers):
            names.update({f"layers.{i}.{t}": f"model.layers.{i}.{h}" for t, h in block.items()})
        if not args.tie_embeddings:
            names["output.weight"] = "lm_head.weight"
        return names

    @staticmethod
    def _heads(name: str, args) -> int | None:
        """How many heads' channels to permute in this tensor (None: it is not permuted)."""
        if name.endswith("attention.wq.weight"):
            return args.n_heads
        if name.endswith("attention.wk.weight"):
            return args.n_kv_heads
        if name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
            return 1  # one head_dim vector, shared by all heads
        return None

    def to_hf(self, state: dict[str, torch.Tensor], args, dtype: torch.dtype | None = None,
              partial: bool = False) -> dict[str, torch.Tensor]:
        """titan full state dict -> HF tensors (contiguous, in `dtype` if given); `partial`: the state holds some
        of the model's tensors (a pipeline stage's), and only those are converted."""
        out = {}
        for name, hf_name in self.names(args).items():
            if name not in state:
                if partial:
                    continue
                raise KeyError(f"state dict has no {name!r}")
            w = state[name]
            heads = self._heads(name, args)
            if heads is not None:
                w = _permute(w, heads, to_rotate_half)
            out[hf_name] = (w if dtype is None else w.to(dtype)).contiguous()
        return out

    def from_hf(self, tensors: dict[str, torch.Tensor], args, where: str = "") -> dict[str, torch.Tensor]:
        """HF tensors -> titan full state dict; a missing tensor is a ConfigError naming it. titan's own buffers that
        Hugging Face does not have (`defaults`) come at their initial values."""
        state = self.defaults(args)
        for name, hf_name in self.names(args).items():
            if hf_name not in tensors:
                raise ConfigError(f"{where}: no tensor {hf_name!r} (does config.json match?)")
            w = tensors[hf_name]
            heads = self._heads(name, args)
            state[name] = _permute(w, heads, from_rotate_half) if heads is not None else w
        if args.tie_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        return state

    def defaults(self, args) -> dict[str, torch.Tensor]:
        """titan-only persistent buffers at the values a fresh model starts with (none in a dense decoder; the MoE
        adapters add their routers' expert bias where the checkpoint has none), so that a model loads strictly."""
        return {}

    def with_tensors(self, args, names: set[str]):
        """The arguments of config.json once the folder's tensor names are known (a family whose optional modules
        config.json does not reliably state, e.g. DeepSeek-V3's MTP depths, counts them here)."""
        return args

    def hf_config(self, args, bos_id: int | None, eos_id: int, dtype: torch.dtype) -> dict:
        """config.json: the fields every such decoder's config class reads, then the family's own."""
        common = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "head_dim": args.head_dim,
            "hidden_act": "silu",
            "hidden_size": args.dim,
            "initializer_range": 0.02,
            "intermediate_size": args.ffn_hidden_dim,
            "max_position_embeddings": args.max_seq_len,
            "num_attention_heads": args.n_heads,
            "num_hidden_layers": args.n_layers,
            "num_key_value_heads": args.n_kv_heads,
            "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta,
            "tie_word_embeddings": args.tie_embeddings,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "transformers_version": self.transformers_version,
            "use_cache": True,
            "vocab_size": args.vocab_size,
        }
        return dict(sorted({**common, **self.config(args)}.items()))


def decoder_sizes(config: dict, where: str) -> dict:
    """The TransformerArgs fields every such config.json states (a missing one is a ConfigError naming it), after
    refusing what no titan family computes (biases, another activation)."""
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, want) != want:
            raise ConfigError(f"{where}: {key}={config[key]!r} is not supported (titan's decoders use {want!r})")
    try:
        return {
            "dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"],
            "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "vocab_size": config["vocab_size"], "norm_eps": float(config["rms_norm_eps"]),
            "rope_theta": float(rope_settings(config)[0]),
            "max_seq_len": config.get("max_position_embeddings", 8192),
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        }
    except KeyError as e:
        raise ConfigError(f"{where}: config.json has no {e.args[0]!r}") from None


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling or None) from either spelling: `rope_theta` + `rope_scaling` (transformers 4) or
    `rope_parameters` (what transformers >= 5 writes)."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or params
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def yarn_from_hf(s: dict, where: str) -> YarnScaling:
    """A rope_scaling / rope_parameters dict of type "yarn" (any other type: a ConfigError naming it)."""
    kind = s.get("rope_type", s.get("type"))
    if kind != "yarn":
        raise ConfigError(f"{where}: rope_scaling type {kind!r} is not supported here (titan reads yarn)")
    try:
        return YarnScaling(
            factor=float(s["factor"]), original_max_position_embeddings=int(s["original_max_position_embeddings"]),
            beta_fast=float(s.get("beta_fast") or 32.0), beta_slow=float(s.get("beta_slow") or 1.0),
            mscale=float(s.get("mscale") or 0.0), mscale_all_dim=float(s.get("mscale_all_dim") or 0.0),
            truncate=bool(s.get("truncate", True)),
            attention_factor=None if s.get("attention_factor") is None else float(s["attention_factor"]))
    except KeyError as e:
        raise ConfigError(f"{where}: rope_scaling has no {e.args[0]!r}") from None


def yarn_to_hf(s: YarnScaling) -> dict:
    out = {"rope_type": "yarn", "factor": s.factor, "original_max_position_embeddings":
           s.original_max_position_embeddings, "beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
           "truncate": s.truncate}
    out.update({k: getattr(s, k) for k in ("mscale", "mscale_all_dim") if getattr(s, k)})
    if s.attention_factor is not None:
        out["attention_factor"] = s.attention_factor
    return out
