"""Hugging Face checkpoints of every registered family: export titan weights as a `LlamaForCausalLM` /
`Qwen3ForCausalLM` / ... folder (safetensors + config.json + generation_config.json + tokenizer) and import such a
folder as initial weights, the family found from config.json's `model_type`. Pure torch + safetensors: no
`transformers` needed.

Owns the folders (files, shards, the tokenizer that goes along) and the dispatch to the family's `DecoderAdapter`
(titan/models/hf_adapter.py), which owns the tensor names, the RoPE permutation and the config.json fields.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from titan.config import ConfigError
from titan.data.tokenizer import HF_TOKENIZER_FILES, tokenizer_file
from titan.models import FAMILIES, family_of
from titan.models.layers import TransformerArgs
from titan.models.lora import is_adapter

SHARD_BYTES = 5 * 2**30  # above this, weights go to several files plus model.safetensors.index.json (HF's default)


# ---------------------------------------------------------------------------------------------------------------
# Tensors and config.json, through the family's adapter


def to_hf(state: dict[str, torch.Tensor], args: TransformerArgs,
          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """titan full state dict -> HF tensors (contiguous, in `dtype` if given)."""
    return family_of(args).hf.to_hf(state, args, dtype)


def from_hf(tensors: dict[str, torch.Tensor], args: TransformerArgs, where: str = "") -> dict[str, torch.Tensor]:
    """HF tensors -> titan full state dict; a missing tensor is a ConfigError naming it."""
    return family_of(args).hf.from_hf(tensors, args, where)


def hf_config(args: TransformerArgs, bos_id: int | None, eos_id: int, dtype: torch.dtype) -> dict:
    return family_of(args).hf.hf_config(args, bos_id, eos_id, dtype)


def args_from_hf_config(config: dict, where: str) -> TransformerArgs:
    """The model arguments of a config.json, by the family whose adapter reads its `model_type` (absent: llama, as
    in the oldest Llama conversions)."""
    model_type = config.get("model_type", "llama")
    readers = {fam.hf.model_type: fam for fam in FAMILIES.values()}
    if model_type not in readers:
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported (titan reads "
                          f"{', '.join(sorted(readers))})")
    return readers[model_type].hf.args(config, where)


def check_compatible(args: TransformerArgs, hf: TransformerArgs, where: str) -> None:
    """The model titan built must be of the HF checkpoint's family and have its shapes (the RoPE table length may
    differ)."""
    if args.family != hf.family:
        raise ConfigError(f"{where}: config.json describes a {hf.family} model ({family_of(hf).hf.architecture}), "
                          f"the run builds model.name={args.family}")
    for field in args.SHAPE_FIELDS:
        if getattr(args, field) != getattr(hf, field):
            raise ConfigError(f"{where}: config.json has {field}={getattr(hf, field)!r}, the model built from "
                              f"model.flavor has {getattr(args, field)!r}")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: tiktoken ranks -> a Hugging Face byte-level BPE tokenizer.json


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which HF byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token` using only merges ranked below `max_rank`: the two halves it was built from."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def tokenizer_json(ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int], bos_token: str) -> dict:
    """The tokenizer.json of a tiktoken encoding: same vocabulary ids, merges in rank order (what transformers'
    TikTokenConverter derives), the same pre-tokenizer split, BOS added by the post-processor as Llama 3 does.
    Pure Python: 0.04 s for the 4k-rank debug tokenizer."""
    enc = _bytes_to_unicode()
    text = {token: "".join(enc[b] for b in token) for token in ranks}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = _merge_parts(ranks, token, rank)
            if len(parts) == 2:
                merges.append(f"{text[parts[0]]} {text[parts[1]]}")
    bos = special_tokens[bos_token]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in sorted(special_tokens.items(),
                                                                                       key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos_token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos_token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos_token, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos_token: {"id": bos_token, "ids": [bos], "tokens": [bos_token]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text[t]: r for t, r in ranks.items()}, "merges": merges},
    }


def write_tokenizer(tokenizer, folder: Path, max_seq_len: int) -> None:
    """tokenizer.json + tokenizer_config.json for a titan Tokenizer (a tiktoken encoding)."""
    encoding = tokenizer.encoding
    bos_token = next(n for n, i in tokenizer.special_tokens.items() if i == tokenizer.bos_id)
    eos_token = next(n for n, i in tokenizer.special_tokens.items() if i == tokenizer.eos_id)
    # tiktoken keeps its ranks and pattern in private attributes (tiktoken 0.14); they are the tokenizer's data.
    data = tokenizer_json(encoding._mergeable_ranks, encoding._pat_str, tokenizer.special_tokens, bos_token)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    config = {"bos_token": bos_token, "eos_token": eos_token, "clean_up_tokenization_spaces": True,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": max_seq_len,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Folders


def save(state: dict[str, torch.Tensor], args: TransformerArgs, folder: str | Path, *, bos_id: int | None,
         eos_id: int, tokenizer_file: str | Path | None = None, tokenizer=None, dtype: torch.dtype = torch.float32,
         shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a full titan state dict as an HF folder of its family; returns the folder. With `tokenizer` also its
    Hugging Face files: a tiktoken one converted (tokenizer.json + tokenizer_config.json), an HF one (or a tiktoken
    tokenizer.model that came in an HF folder) copied from `tokenizer_file`'s folder; with a tiktoken
    `tokenizer_file` also a copy of it as tokenizer.model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapter = family_of(args).hf
    tensors = adapter.to_hf(state, args, dtype)
    _write_safetensors(tensors, folder, shard_bytes)
    (folder / "config.json").write_text(json.dumps(adapter.hf_config(args, bos_id, eos_id, dtype), indent=2) + "\n")
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id,
                  "transformers_version": adapter.transformers_version}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    source = None if tokenizer_file is None else Path(tokenizer_file)
    if source is not None and source.suffix != ".json":
        # A tiktoken rank file is what Meta ships as tokenizer.model; its sidecar (pattern, specials) goes along.
        shutil.copyfile(source, folder / "tokenizer.model")
        # In an HF folder the sidecar is tokenizer_tiktoken.json (tokenizer.json there is Hugging Face's own).
        for sidecar in (source.with_name(source.stem + "_tiktoken.json"), source.with_suffix(".json")):
            if sidecar.is_file() and _is_tiktoken_sidecar(sidecar):
                shutil.copyfile(sidecar, folder / "tokenizer_tiktoken.json")
                break
    if tokenizer is not None:
        hf_json = source if source is not None and source.suffix == ".json" else \
            source.parent / "tokenizer.json" if source is not None and source.name == "tokenizer.model" else None
        if hf_json is not None and hf_json.is_file():
            # The model's own Hugging Face tokenizer (a Qwen3 folder, or SmolLM2's from scripts/download_assets.py):
            # keep its files (pre-tokenizer, BOS rule, chat template) rather than a conversion.
            _copy_new(hf_json, folder / "tokenizer.json")
            for name in HF_TOKENIZER_FILES[1:]:
                if (hf_json.parent / name).is_file():
                    _copy_new(hf_json.parent / name, folder / name)
        else:
            write_tokenizer(tokenizer, folder, args.max_seq_len)
    return folder


def _copy_new(src: Path, dst: Path) -> None:
    if src.resolve() != dst.resolve():  # exporting into the tokenizer's own folder
        shutil.copyfile(src, dst)


def _is_tiktoken_sidecar(path: Path) -> bool:
    try:
        return "pattern" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, shard_bytes: int) -> None:
    metadata = {"format": "pt"}  # transformers checks for it
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= shard_bytes:
        save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
        return
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (one model.safetensors, or the shards its index names)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for f in files for k, v in load_file(str(folder / f)).items()}
        return load_file(str(folder / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - missing, truncated, bad JSON: all "not a readable HF folder"
        raise ConfigError(f"{folder}: cannot read the safetensors weights ({type(e).__name__}: {e})".replace("\n", " "))


def load(folder: str | Path) -> tuple[TransformerArgs, dict[str, torch.Tensor]]:
    """(model arguments from config.json, titan full state dict) of an HF folder of any registered family."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{folder / 'config.json'}: cannot read ({e})".replace("\n", " ")) from None
    args = args_from_hf_config(config, str(folder / "config.json"))
    return args, from_hf(read_safetensors(folder), args, str(folder))


def load_into(model_parts: list[torch.nn.Module], folder: str | Path) -> None:
    """Initial weights from an HF folder into a (possibly sharded) model: each rank reads the files and keeps its
    slice (checkpoint.initial_load_in_hf)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    hf_args, state = load(folder)
    check_compatible(model_parts[0].args, hf_args, f"checkpoint.initial_load_path={folder}")
    for part in model_parts:
        # Every name of the part except LoRA adapters (which keep their initial values): `load` has raised already
        # if the folder lacks one of the model's tensors, so non-strict loading skips nothing else.
        wanted = [k for k in part.state_dict() if not is_adapter(k)]
        set_model_state_dict(part, {k: state[k] for k in wanted if k in state},
                             options=StateDictOptions(full_state_dict=True, strict=False))


def exporter(args: TransformerArgs, tokenizer, tokenizer_path: str):
    """The callback the checkpointer uses for `last_save_in_hf`: (full state dict, folder, dtype) -> None."""
    def export(state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> None:
        save(state, args, folder, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
             tokenizer_file=tokenizer_file(tokenizer_path), tokenizer=tokenizer, dtype=dtype)

    return export
