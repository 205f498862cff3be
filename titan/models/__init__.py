"""The model registry: `model.name` -> the family's flavors, model class and Hugging Face mapping, in one explicit
dict. The loop (titan/train.py), the parallel axes, checkpoints, Hugging Face import/export (titan/hf.py) and the
scripts find a model's pieces here or through its arguments (`args.family`), and never import a family directly.

A family is a short module (titan/models/llama.py, qwen3.py, qwen3_moe.py, deepseek_v3.py, gpt_oss.py) declaring
an args dataclass of the shared decoder (titan/models/layers.py), a flavors table and a `DecoderAdapter`;
docs/models.md shows how to add one. Nothing here knows about distribution: the parallel axes follow the model's
module names (titan/parallel/).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from torch import nn

from titan import config
from titan.errors import ConfigError
from titan.models import deepseek_v3, gpt_oss, llama, qwen3, qwen3_moe
from titan.models.hf_adapter import DecoderAdapter
from titan.models.layers import Transformer, TransformerArgs


@dataclass(frozen=True)
class ModelFamily:
    name: str  # model.name; also the `family` of its args class
    description: str  # for the start-up log line
    flavors: dict[str, TransformerArgs]  # model.flavor -> sizes
    model: type[nn.Module]  # model(args); built on the meta device by the caller
    hf: DecoderAdapter  # config.json `model_type`, tensor names and permutations, config.json both ways

    @property
    def moe(self) -> bool:
        """Whether its layers are Mixture-of-Experts (the [moe] section applies)."""
        return any(hasattr(a, "n_experts") for a in self.flavors.values())


FAMILIES: dict[str, ModelFamily] = {
    "llama3": ModelFamily("llama3", "Llama 3", llama.FLAVORS, Transformer, llama.HF),
    "qwen3": ModelFamily("qwen3", "Qwen3", qwen3.FLAVORS, Transformer, qwen3.HF),
    "qwen3_moe": ModelFamily("qwen3_moe", "Qwen3-MoE", qwen3_moe.FLAVORS, qwen3_moe.MoETransformer, qwen3_moe.HF),
    "deepseek_v3": ModelFamily("deepseek_v3", "DeepSeek-V3", deepseek_v3.FLAVORS, deepseek_v3.DeepSeekV3Transformer,
                               deepseek_v3.HF),
    "gpt_oss": ModelFamily("gpt_oss", "gpt-oss", gpt_oss.FLAVORS, gpt_oss.GptOssTransformer, gpt_oss.HF),
}


def family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError(f"model.name={name!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(args: TransformerArgs) -> ModelFamily:
    """The family a model's arguments belong to (every model keeps its args as `model.args`)."""
    return FAMILIES[args.family]


def model_args(name: str, flavor: str, *, tokenizer_vocab: int | None = None, moe: config.MoE | None = None,
               mtp: config.Model | None = None, **overrides) -> TransformerArgs:
    """The arguments of model.name's `flavor`, with the vocabulary set from the tokenizer (where the flavor takes it
    from there; else the tokenizer must fit in the flavor's), the [moe] section's settings (`moe`), the [model]
    section's multi-token prediction (`mtp`) and other fields replaced by `overrides`."""
    fam = family(name)
    if flavor not in fam.flavors:
        raise ConfigError(f"model.flavor={flavor!r} is not one of {', '.join(fam.flavors)} (model.name={name})")
    args = fam.flavors[flavor]
    if tokenizer_vocab is not None:
        if args.vocab_from_tokenizer:
            overrides = {"vocab_size": tokenizer_vocab, **overrides}
        elif tokenizer_vocab > args.vocab_size:
            raise ConfigError(f"model.tokenizer_path: the tokenizer has {tokenizer_vocab} tokens, more than the "
                              f"{args.vocab_size} rows of {name} {flavor}'s embedding")
    if moe is not None:
        overrides = {**moe_settings(args, moe, f"{name} {flavor}"), **overrides}
    if mtp is not None and mtp.mtp_layers:
        if not hasattr(args, "mtp_layers"):
            raise ConfigError(f"model.mtp_layers={mtp.mtp_layers}: {name} has no multi-token prediction module "
                              f"(deepseek_v3 has)")
        overrides = {"mtp_layers": mtp.mtp_layers, "mtp_loss_weight": mtp.mtp_loss_weight, **overrides}
    try:
        return replace(args, **overrides)
    except ValueError as e:  # e.g. moe.n_experts that DeepSeek-V3's expert groups cannot split
        raise ConfigError(f"{name} {flavor} with these [moe] / [model] settings: {e}") from None


def moe_settings(args: TransformerArgs, moe: config.MoE, what: str) -> dict:
    """The [moe] section as argument overrides of a Mixture-of-Experts flavor; on a dense one, any changed key is a
    ConfigError naming it."""
    changed = [f.name for f in fields(moe) if getattr(moe, f.name) != f.default]
    if not hasattr(args, "n_experts"):
        if changed:
            raise ConfigError(f"moe.{changed[0]} is set, but {what} is a dense model (the [moe] keys are for "
                              f"Mixture-of-Experts families: {', '.join(n for n, f in FAMILIES.items() if f.moe)})")
        return {}
    n_experts, top_k = moe.n_experts or args.n_experts, moe.top_k or args.top_k
    if top_k > n_experts:
        raise ConfigError(f"moe.top_k={top_k} is larger than the {n_experts} experts of {what}")
    return {"n_experts": n_experts, "top_k": top_k, "aux_loss_coef": moe.aux_loss_coef,
            "bias_update_rate": moe.bias_update_rate, "grouped_mm": moe.grouped_mm}


def build_model(args: TransformerArgs) -> nn.Module:
    """The family's model for `args` (on the current default device: call under `torch.device("meta")`)."""
    return family_of(args).model(args)
