"""Qwen3 (dense): the shared decoder of titan/models/layers.py with RMSNorm on each head of q and k (QK-norm), a
head size stated apart from dim / n_heads, RoPE theta 1e6 without scaling, no attention bias, and tied embeddings on
the small sizes; a table of flavors with the official shapes, and its Hugging Face mapping (`Qwen3ForCausalLM`).

The family's entry in the registry is in titan/models/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from titan.errors import ConfigError
from titan.models.hf_adapter import DecoderAdapter, decoder_sizes, rope_settings
from titan.models.layers import TransformerArgs


@dataclass
class Qwen3Args(TransformerArgs):
    family: ClassVar[str] = "qwen3"

    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    qk_norm: bool = True
    head_dim: int = 128
    ffn_hidden_dim: int = 12288


# Official shapes from the config.json files of Qwen/Qwen3-{0.6B,...,32B}: vocabulary 151,936 (the checkpoints'
# embedding rows; the tokenizer has 151,669 tokens), head_dim 128, 8 K/V heads.
_OFFICIAL = {"vocab_size": 151936, "head_dim": 128, "n_kv_heads": 8, "vocab_from_tokenizer": False}

FLAVORS: dict[str, Qwen3Args] = {
    # Tiny shapes for tests and the CPU preset; the vocabulary is set from the tokenizer. head_dim * n_heads != dim
    # on purpose, as in the official 0.6B and 4B. Untied, so that tensor and pipeline parallelism apply.
    "tiny": Qwen3Args(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden_dim=128, vocab_size=4096),
    "debugmodel": Qwen3Args(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64, ffn_hidden_dim=768,
                            vocab_size=4096),
    "0.6B": Qwen3Args(dim=1024, n_layers=28, n_heads=16, ffn_hidden_dim=3072, tie_embeddings=True, **_OFFICIAL),
    "1.7B": Qwen3Args(dim=2048, n_layers=28, n_heads=16, ffn_hidden_dim=6144, tie_embeddings=True, **_OFFICIAL),
    "4B": Qwen3Args(dim=2560, n_layers=36, n_heads=32, ffn_hidden_dim=9728, tie_embeddings=True, **_OFFICIAL),
    "8B": Qwen3Args(dim=4096, n_layers=36, n_heads=32, ffn_hidden_dim=12288, **_OFFICIAL),
    "14B": Qwen3Args(dim=5120, n_layers=40, n_heads=40, ffn_hidden_dim=17408, **_OFFICIAL),
    "32B": Qwen3Args(dim=5120, n_layers=64, n_heads=64, ffn_hidden_dim=25600, **_OFFICIAL),
}


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: Qwen3ForCausalLM


def _hf_config(args: Qwen3Args) -> dict:
    return {"max_window_layers": args.n_layers, "rope_scaling": None, "sliding_window": None,
            "use_sliding_window": False}


def _args_from_hf(config: dict, where: str, cls: type[Qwen3Args] = Qwen3Args, **extra) -> Qwen3Args:
    """`cls` and `extra`: a family built on Qwen3's (qwen3_moe) adds its own fields."""
    sizes = decoder_sizes(config, where)
    scaling = rope_settings(config)[1]
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        raise ConfigError(f"{where}: rope_scaling type {kind!r} is not supported for {cls.family} (titan's Qwen3 uses "
                          f"plain RoPE, as the official checkpoints do)")
    if config.get("use_sliding_window", False):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported (titan attends over the whole "
                          f"sequence)")
    try:
        return cls(**sizes, head_dim=config.get("head_dim") or sizes["dim"] // sizes["n_heads"],
                   ffn_hidden_dim=config["intermediate_size"], **extra)
    except KeyError as e:
        raise ConfigError(f"{where}: config.json has no {e.args[0]!r}") from None


HF = DecoderAdapter(model_type="qwen3", architecture="Qwen3ForCausalLM", config=_hf_config, args=_args_from_hf,
                    transformers_version="4.51.0")
