"""Hugging Face checkpoints of every registered family: export titan weights as a `LlamaForCausalLM` /
`Qwen3ForCausalLM` / ... folder (safetensors + config.json + generation_config.json + tokenizer) and import such a
folder as initial weights, the family found from config.json's `model_type`. The weights are written by DCP's
`HuggingFaceStorageWriter` (as torchtitan exports), in one process or from every pipeline stage alike, and read with
safetensors: no `transformers` needed.

Owns the folders (files, shards, the tokenizer that goes along) and the dispatch to the family's `DecoderAdapter`
(titan/models/hf_adapter.py), which owns the tensor names, the RoPE permutation and the config.json fields.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from titan.data.tokenizer import HF_TOKENIZER_FILES, tokenizer_file
from titan.data.tokenizer_formats import write_tokenizer_json
from titan.errors import ConfigError
from titan.models import FAMILIES, family_of
from titan.models.layers import TransformerArgs
from titan.models.lora import is_adapter

SHARD_BYTES = 5 * 2**30  # weights are split into files of at most this size (HF's default), one file in most cases


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
# Folders


def save(state: dict[str, torch.Tensor], args: TransformerArgs, folder: str | Path, *, bos_id: int | None,
         eos_id: int, tokenizer_file: str | Path | None = None, tokenizer=None, dtype: torch.dtype = torch.float32,
         shard_bytes: int = SHARD_BYTES, process_group=None, base_config: dict | None = None,
         chat_template: str | None = None) -> Path:
    """Write a full titan state dict as an HF folder of its family; returns the folder. With `tokenizer` also its
    Hugging Face files: a tiktoken one converted (tokenizer.json + tokenizer_config.json), an HF one (or a tiktoken
    tokenizer.model that came in an HF folder) copied from `tokenizer_file`'s folder; with a tiktoken
    `tokenizer_file` also a copy of it as tokenizer.model.

    The weights go to model-0000k-of-0000n.safetensors + model.safetensors.index.json (`write_weights`). With a
    `process_group`, every rank of it calls this with the full tensors it holds (under pipeline parallelism, its
    stages'); rank 0 writes the other files.

    `base_config`: the config.json of the Hugging Face model the run started from; every field of it is kept (its
    max_position_embeddings, RoPE scaling, ids, anything titan does not read), only the dtype is the export's: training
    on a shorter window does not shrink the model. `chat_template`: the Jinja template training rendered
    conversations with, written as tokenizer_config.json's chat_template (the model is then served as trained)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapter = family_of(args).hf
    tensors = adapter.to_hf(state, args, dtype, partial=process_group is not None)
    write_weights(tensors, set(adapter.names(args).values()), folder, shard_bytes, process_group)
    if process_group is not None and dist.get_rank(process_group) != 0:
        return folder
    config = adapter.hf_config(args, bos_id, eos_id, dtype)
    if base_config:
        kept = {k: v for k, v in base_config.items() if k not in ("torch_dtype", "dtype", *adapter.export_fields)}
        config = dict(sorted({**config, **kept, "torch_dtype": config["torch_dtype"]}.items()))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
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
            write_tokenizer_json(tokenizer, folder, args.max_seq_len)
    if chat_template is not None and (folder / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer_config["chat_template"] = chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        (folder / "chat_template.jinja").unlink(missing_ok=True)  # it would win over tokenizer_config.json's
    return folder


def _copy_new(src: Path, dst: Path) -> None:
    if src.resolve() != dst.resolve():  # exporting into the tokenizer's own folder
        shutil.copyfile(src, dst)


def _is_tiktoken_sidecar(path: Path) -> bool:
    try:
        return "pattern" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def write_weights(tensors: dict[str, torch.Tensor], names: set[str], folder: Path, shard_bytes: int = SHARD_BYTES,
                  process_group=None) -> None:
    """The HF tensors through DCP's Hugging Face writer: model-0000k-of-0000n.safetensors (files 0666 less the
    umask, like the folder's others) + model.safetensors.index.json. In one process the files hold at most
    `shard_bytes` each. With a process group, each rank writes the tensors it holds (a tensor several ranks hold,
    once) and they are consolidated into one file. Either way the names written must be the model's `names` (under
    pipeline parallelism a missing stage would otherwise go unnoticed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    distributed = process_group is not None
    files = dict.fromkeys(names, 1) if distributed else _file_numbers(tensors, shard_bytes)
    writer = HuggingFaceStorageWriter(str(folder), fqn_to_index_mapping=files, save_distributed=distributed,
                                      enable_consolidation=distributed)
    with warnings.catch_warnings():  # one process (even rank 0 of a job, alone): "assuming ... a single process"
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, storage_writer=writer, process_group=process_group, no_dist=not distributed)
    if distributed:
        if dist.get_rank(process_group) != 0:
            return
        shutil.rmtree(folder / "sharded", ignore_errors=True)  # each rank's file, before consolidation
    # transformers reads a model.safetensors before the index: one left from an earlier export would shadow these.
    (folder / "model.safetensors").unlink(missing_ok=True)
    written = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    if written != names:
        raise RuntimeError(f"Hugging Face export to {folder}: {len(names - written)} tensors missing, e.g. "
                           f"{sorted(names - written)[:1]}")


def _file_numbers(tensors: dict[str, torch.Tensor], shard_bytes: int) -> dict[str, int]:
    """Tensor name -> file number (from 1), in order; a new file where the next tensor would pass `shard_bytes`."""
    files, file, size = {}, 1, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            file, size = file + 1, 0
        files[name] = file
        size += nbytes
    return files


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (the files its model.safetensors.index.json names, or one model.safetensors)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for f in files for k, v in load_file(str(folder / f)).items()}
        return load_file(str(folder / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - missing, truncated, bad JSON: all "not a readable HF folder"
        raise ConfigError(f"{folder}: cannot read the safetensors weights ({type(e).__name__}: {e})"
                          .replace("\n", " ")) from e


def load(folder: str | Path) -> tuple[TransformerArgs, dict[str, torch.Tensor]]:
    """(model arguments from config.json, titan full state dict) of an HF folder of any registered family."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{folder / 'config.json'}: cannot read ({e})".replace("\n", " ")) from None
    args = args_from_hf_config(config, str(folder / "config.json"))
    tensors = read_safetensors(folder)
    args = family_of(args).hf.with_tensors(args, set(tensors))
    return args, from_hf(tensors, args, str(folder))


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


def base_config(folder: str | Path | None) -> dict | None:
    """The config.json of the Hugging Face folder a run started from (None: it started from no such folder)."""
    if not folder:
        return None
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def exporter(args: TransformerArgs, tokenizer, tokenizer_path: str, base: str | Path | None = None,
             chat_template: str | None = None):
    """The callback the checkpointer uses for `last_save_in_hf`: (full state dict, folder, dtype, process_group=None)
    -> None (with a process group: called on every rank with its part, see `save`). `base`: the Hugging Face folder
    the run started from, whose config.json the export keeps; `chat_template`: the template training used."""
    imported = base_config(base)

    def export(state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype, process_group=None) -> None:
        save(state, args, folder, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
             tokenizer_file=tokenizer_file(tokenizer_path), tokenizer=tokenizer, dtype=dtype,
             process_group=process_group, base_config=imported, chat_template=chat_template)

    return export
