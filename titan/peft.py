"""LoRA adapters as PEFT folders, both ways: `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained(base, folder)` loads onto the Hugging Face base model, and such a folder (made by
titan or by PEFT) loaded into titan's `LoRALinear` adapters. No `peft` needed: the format is a config file and
safetensors.

Names: titan's `layers.0.attention.wq.lora_a` / `.lora_b` are PEFT's
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` / `lora_B.weight`; the module path is the family's
Hugging Face name of the adapted weight (titan/models/hf_adapter.py), so every registered family maps the same way,
and PEFT's `target_modules` are those modules' last names (q_proj, ..., down_proj, lm_head). RoPE: Hugging Face's
q/k projections hold each head's rows in rotate-half order; B (out x rank) has the projection's output rows, so its
rows are permuted like the weight's, and A (rank x in) is unchanged. The scale is alpha / rank in both (no rsLoRA).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from titan.config import LoRA
from titan.errors import ConfigError
from titan.models import family_of
from titan.models.hf_adapter import _permute, from_rotate_half, to_rotate_half
from titan.models.lora import LoRALinear, is_adapter

logger = logging.getLogger("titan")

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps the *ForCausalLM model: its modules are under this prefix
SUFFIXES = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def _module_names(args) -> dict[str, str]:
    """titan linear path -> Hugging Face module path, for every weight the family maps (`layers.0.attention.wq` ->
    `model.layers.0.self_attn.q_proj`)."""
    return {t.removesuffix(".weight"): h.removesuffix(".weight")
            for t, h in family_of(args).hf.names(args).items() if t.endswith(".weight")}


def _heads(args, titan_module: str) -> int | None:
    return family_of(args).hf._heads(titan_module + ".weight", args)


def to_peft(state: dict[str, torch.Tensor], args) -> dict[str, torch.Tensor]:
    """The adapters of a titan state dict (other entries are ignored) as PEFT's tensors (contiguous copies)."""
    modules, out = _module_names(args), {}
    for key, value in state.items():
        if not is_adapter(key):
            continue
        module, which = key.rsplit(".", 1)
        if module not in modules:
            raise ConfigError(f"lora: {module} has no Hugging Face name in the {args.family} family's mapping")
        heads = _heads(args, module)
        if which == "lora_b" and heads is not None:
            value = _permute(value, heads, to_rotate_half)
        out[f"{PREFIX}{modules[module]}.{SUFFIXES[which]}"] = value.detach().cpu().contiguous().clone()
    return out


def from_peft(tensors: dict[str, torch.Tensor], args, where: str) -> dict[str, torch.Tensor]:
    """PEFT's tensors -> titan adapter names; a tensor of a module titan does not have is a ConfigError naming it."""
    back = {h: t for t, h in _module_names(args).items()}
    out = {}
    for key, value in tensors.items():
        if ".base_layer." in key:  # PEFT saves a targeted lm_head's base weight too ("embedding layers"): the base's
            continue
        name = key.removeprefix(PREFIX)
        module, _, suffix = name.rpartition(".lora_")
        which = {"A.weight": "lora_a", "B.weight": "lora_b"}.get(suffix)
        module = module.removesuffix(".default")  # adapters saved under their adapter name
        if which is None or module not in back:
            raise ConfigError(f"{where}: {key} is not a LoRA tensor of a module this {args.family} model has")
        heads = _heads(args, back[module])
        if which == "lora_b" and heads is not None:
            value = _permute(value, heads, from_rotate_half)
        out[f"{back[module]}.{which}"] = value
    return out


def adapter_config(cfg: LoRA, args, targets: list[str], base: str) -> dict:
    """adapter_config.json: PEFT's LoRA settings (rank, alpha, dropout, target modules by their Hugging Face names,
    the base model's path)."""
    modules = _module_names(args)
    names = sorted({modules[m].rsplit(".", 1)[-1] for m in modules if m.rsplit(".", 1)[-1] in targets})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base or None,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": names,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def save(state: dict[str, torch.Tensor], args, cfg: LoRA, folder: str | Path, base: str = "") -> Path:
    """Write the adapters of a full titan state dict as a PEFT folder; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({k.rsplit(".", 2)[-2] for k in state if is_adapter(k)})
    config = adapter_config(cfg, args, targets, base)
    save_file(to_peft(state, args), str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read(folder: str | Path, args, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, titan-named adapter tensors) of a PEFT folder; anything titan cannot load exactly is a
    ConfigError naming `key` and the setting."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {folder} is not a readable PEFT adapter folder ({e})".replace("\n", " ")) from None
    for setting, want in (("peft_type", "LORA"), ("use_rslora", False), ("use_dora", False), ("bias", "none"),
                          ("fan_in_fan_out", False)):
        if config.get(setting, want) != want:
            raise ConfigError(f"{key}: {folder / CONFIG}: {setting}={config.get(setting)!r} is not supported (titan "
                              f"loads plain LoRA: {setting}={want!r})")
    for setting in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if config.get(setting):
            raise ConfigError(f"{key}: {folder / CONFIG}: {setting} is not supported")
    return config, from_peft(tensors, args, f"{key}: {folder / WEIGHTS}")


def load_into(parts: list[torch.nn.Module], folder: str | Path, key: str) -> None:
    """A PEFT adapter folder into the (possibly sharded) model's LoRA adapters; its rank and alpha must be those of
    the run (lora.rank, lora.alpha), and it must cover every adapter the run has."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    layers = [m for part in parts for m in part.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ConfigError(f"{key}: {folder} is a LoRA adapter; set lora.enable = true to train it")
    config, state = read(folder, parts[0].args, key)
    rank, scale = layers[0].rank, layers[0].scale
    if config.get("r") != rank or abs(config.get("lora_alpha", 0) / rank - scale) > 1e-12:
        raise ConfigError(f"{key}: {folder / CONFIG} has r={config.get('r')}, lora_alpha={config.get('lora_alpha')}; "
                          f"the run has lora.rank={rank}, lora.alpha={scale * rank:g}")
    for part in parts:
        wanted = [k for k in part.state_dict() if is_adapter(k)]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ConfigError(f"{key}: {folder / WEIGHTS} has no adapter for {missing[0]} (lora.target_modules asks "
                              f"for it; {len(missing)} missing)")
        set_model_state_dict(part, {k: state[k] for k in wanted},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    logger.info(f"lora: adapters from {folder} (PEFT format)")


def load_with_base(parts: list[torch.nn.Module], folder: Path, key: str) -> None:
    """checkpoint.initial_load_path naming a PEFT adapter folder: the base model its config names (a local Hugging
    Face folder), then the adapters."""
    from titan import hf

    try:
        base = json.loads((folder / CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {folder / CONFIG} ({e})".replace("\n", " ")) from None
    if not base or not (Path(base) / "config.json").is_file():
        raise ConfigError(f"{key}: {folder / CONFIG} names base_model_name_or_path={base!r}, not a local Hugging "
                          f"Face folder; set checkpoint.initial_load_path to the base model's folder "
                          f"(initial_load_in_hf = true) and lora.init_from = {folder}")
    hf.load_into(parts, base)
    load_into(parts, folder, key)


# ---------------------------------------------------------------------------------------------------------------
# From a run: every checkpoint save and the Hugging Face export


def gather(parts: list[torch.nn.Module], group=None) -> dict[str, torch.Tensor] | None:
    """The full adapter tensors of the model on global rank 0 (None elsewhere). Only the adapters are gathered (a
    few MiB), each as one tensor; under pipeline parallelism every rank sends its stages' adapters to rank 0."""
    from torch.distributed.tensor import DTensor

    from titan.parallel.process_group import gather_objects

    mine = {}
    for part in parts:
        for name, p in part.named_parameters():
            if is_adapter(name):  # the plain name, without activation checkpointing's or compile's wrappers
                name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
                mine[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
    staged = sum(len(p.layers) for p in parts) != parts[0].args.n_layers
    if staged:
        merged = {k: v for d in gather_objects(mine, group) for k, v in d.items()}
        return merged if dist.get_rank() == 0 else None
    return mine if dist.get_rank() == 0 else None


def exporter(args, cfg: LoRA, base: str):
    """(model parts, folder) -> None, every rank: the adapters as a PEFT folder (rank 0 writes)."""
    warned = []

    def export(parts: list[torch.nn.Module], folder: Path, group=None) -> None:
        state = gather(parts, group)
        if state is None:
            return
        try:
            save(state, args, cfg, folder, base)
        except ConfigError as e:  # a family whose adapted modules Hugging Face cannot name: the DCP save still counts
            if not warned:
                logger.warning(f"{e}: checkpoints hold no PEFT adapter folder")
                warned.append(True)

    return export
