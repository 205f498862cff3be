"""Llama 3 (3, 3.1, 3.2): the shared decoder of titan/models/layers.py with Meta's sizing rule for the SwiGLU width,
Llama 3.1 RoPE frequency scaling, a table of flavors, and its Hugging Face mapping (`LlamaForCausalLM`).

The family's entry in the registry is in titan/models/__init__.py. The layer classes are re-exported here, so
`titan.models.llama.Transformer` is the model Llama flavors build.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from titan.errors import ConfigError
from titan.models.hf_adapter import DecoderAdapter, decoder_sizes, rope_settings
from titan.models.layers import (  # noqa: F401 - re-exported: the Llama model is the shared decoder
    SDPA,
    Attention,
    FeedForward,
    RMSNorm,
    RopeScaling,
    Transformer,
    TransformerArgs,
    TransformerBlock,
    apply_rotary_emb,
    count_params,
    document_mask,
    rope_frequencies,
)


@dataclass
class ModelArgs(TransformerArgs):
    family: ClassVar[str] = "llama3"

    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Llama's rule: 2/3 of 4*dim (SwiGLU has three matrices), scaled, rounded up to multiple_of.
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


_LLAMA32_SCALING = RopeScaling(factor=32.0)

FLAVORS: dict[str, ModelArgs] = {
    # Tiny shapes for tests and the CPU default run; the vocabulary is set from the tokenizer.
    "tiny": ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=64),
    "debugmodel": ModelArgs(dim=256, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=4096),
    # Hugging Face's SmolLM2-135M(-Instruct): a real pretrained Llama for CPU fine-tuning (scripts/download_assets.py).
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
                              rope_theta=100000.0, tie_embeddings=True),
    # Official Llama 3.x shapes.
    "1B": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
                    rope_scaling=_LLAMA32_SCALING, tie_embeddings=True),
    "3B": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256,
                    rope_scaling=_LLAMA32_SCALING, tie_embeddings=True),
    "8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                    rope_scaling=RopeScaling()),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                     rope_scaling=RopeScaling()),
    "405B": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2, multiple_of=4096,
                      rope_scaling=RopeScaling()),
}


def model_args(flavor: str, **overrides) -> ModelArgs:
    """A copy of a flavor's arguments with some fields replaced (e.g. vocab_size from the tokenizer)."""
    return replace(FLAVORS[flavor], **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: LlamaForCausalLM


def _hf_config(args: ModelArgs) -> dict:
    s = args.rope_scaling
    return {
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rope_scaling": None if s is None else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        },
    }


def _args_from_hf(config: dict, where: str) -> ModelArgs:
    """The shapes of a Llama config.json; multiple_of / ffn_dim_multiplier are chosen to give its hidden size."""
    sizes = decoder_sizes(config, where)
    s = rope_settings(config)[1]
    scaling = None
    if s is not None:
        if s.get("rope_type", s.get("type")) != "llama3":
            raise ConfigError(f"{where}: rope_scaling type {s.get('rope_type', s.get('type'))!r} is not llama3")
        scaling = RopeScaling(float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"]),
                              int(s["original_max_position_embeddings"]))
    try:
        hidden = config["intermediate_size"]
    except KeyError:
        raise ConfigError(f"{where}: config.json has no 'intermediate_size'") from None
    # titan derives the SwiGLU width from (multiple_of, ffn_dim_multiplier); rounding up to a multiple of `hidden`
    # itself gives exactly `hidden` whenever the unrounded width is in (0, hidden].
    unrounded = int(8 * sizes["dim"] / 3)
    args = ModelArgs(**sizes, multiple_of=hidden, rope_scaling=scaling,
                     ffn_dim_multiplier=None if unrounded <= hidden else hidden / unrounded)
    if args.ffn_hidden_dim != hidden or config.get("head_dim", args.head_dim) != args.head_dim:
        raise ConfigError(f"{where}: intermediate_size={hidden} / head_dim={config.get('head_dim')} cannot be "
                          f"expressed as a titan Llama")
    return args


HF = DecoderAdapter(model_type="llama", architecture="LlamaForCausalLM", config=_hf_config, args=_args_from_hf,
                    transformers_version="4.46.0")
