"""Convert between titan's DCP checkpoints and Hugging Face folders of any registered family (one process, CPU; no
transformers needed).

  python scripts/convert_checkpoint.py to-hf   outputs/x/checkpoint/step-100 outputs/x/hf --flavor debugmodel
  python scripts/convert_checkpoint.py to-hf   outputs/q/checkpoint/step-100 outputs/q/hf --model qwen3 --flavor 0.6B
  python scripts/convert_checkpoint.py from-hf path/to/Qwen3-0.6B outputs/seed/checkpoint/step-0

`to-hf` reads only the model weights of a step folder (full or model-only) and writes
model-00001-of-00001.safetensors + its index (more files above 5 GiB), config.json, generation_config.json and the
tokenizer. `from-hf` writes a model-only DCP checkpoint that `checkpoint.initial_load_path` or a resume (as a seed
step-0) can start from; the family comes from config.json.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from titan import hf
from titan.checkpoint.state import one_line
from titan.config import DTYPES, Model
from titan.data.tokenizer import load_tokenizer, tokenizer_file
from titan.errors import ConfigError
from titan.models import FAMILIES, build_model, lora, model_args

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flags.py, however this file is loaded
from flags import Parser  # noqa: E402


def dcp_model_state(path: Path, args, lora_scale: float | None = None) -> dict[str, torch.Tensor]:
    """The `model` entries of a DCP checkpoint as full tensors, without a process group; LoRA adapters, if the
    checkpoint holds any, merged into their weights with `lora_scale` (the run's lora.alpha / lora.rank)."""
    with torch.device("meta"):
        model = build_model(args)
    state = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        state.pop("output.weight")  # DCP stores a tied tensor once, under the embedding's name
    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - missing file, unpickling garbage, ...: all mean "not a checkpoint"
        raise ConfigError(f"{path}: is not a readable DCP checkpoint ({one_line(e)})") from None
    adapters = {k.removeprefix("model."): v for k, v in stored.items() if lora.is_adapter(k)}
    if adapters and "model.tok_embeddings.weight" not in stored:
        raise ConfigError(f"{path}: holds only LoRA adapters (lora.save_adapter_only); merge them with the base "
                          f"through scripts/generate.py --checkpoint, or save with checkpoint.last_save_in_hf")
    check_family(path, state, stored, args)
    if adapters:
        if lora_scale is None:
            raise ConfigError(f"{path}: holds LoRA adapters; pass --lora-scale (the run's lora.alpha / lora.rank) to "
                              f"merge them into the exported weights")
        state.update({k: torch.empty(v.size, dtype=torch.float32) for k, v in adapters.items()})
    try:
        dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConfigError(f"{path}: cannot read the model from this checkpoint ({one_line(e)})") from None
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return lora.merge(state, lora_scale) if adapters else state


def check_family(path: Path, state: dict, stored: dict, args) -> None:
    """The checkpoint holds the tensors --model and --flavor make, with their shapes: else one line naming the first
    that differs (DCP itself said only "CheckpointException ranks:dict_keys([0])")."""
    if not any(k.startswith("model.") for k in stored):
        raise ConfigError(f"{path}: holds no model state (keys: {', '.join(sorted(stored)[:3])}...)")
    extra = sorted(k.removeprefix("model.") for k in stored if k.startswith("model.") and not lora.is_adapter(k)
                   and k.removeprefix("model.") not in state and k != "model.output.weight")
    if extra:
        raise ConfigError(f"{path}: holds {extra[0]} (and {len(extra) - 1} more tensors), which --model "
                          f"{args.family} does not make: pass the run's --model and --flavor")
    missing = [k for k in state if f"model.{k}" not in stored]
    if missing:
        raise ConfigError(f"{path}: has no {missing[0]} (and {len(missing) - 1} more tensors) that --model "
                          f"{args.family} makes: pass the run's --model and --flavor")
    for k, v in state.items():
        shape = tuple(getattr(stored[f"model.{k}"], "size", v.shape))
        if shape != tuple(v.shape):
            raise ConfigError(f"{path}: {k} has shape {list(shape)}, --model {args.family} with this --flavor "
                              f"makes {list(v.shape)}: pass the run's --model, --flavor and --tokenizer")


def fresh_folder(dst: str) -> Path:
    """The output must be new or empty: converting into an existing export would replace (or, for an HF folder
    whose weights hf.save finds stale, delete) what is there."""
    out = Path(dst)
    if not dst.strip():
        raise ConfigError("dst: needs a folder path (got an empty string)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = "is a file" if not out.is_dir() else f"holds {', '.join(sorted(p.name for p in out.iterdir())[:3])}"
        raise ConfigError(f"dst: {out} {held}; convert into a new or empty folder (nothing was changed)")
    return out


def to_hf(ns) -> None:
    fresh_folder(ns.dst)
    tokenizer_path = str(tokenizer_file(ns.tokenizer or ""))
    tokenizer = load_tokenizer(ns.tokenizer or "")
    mtp = Model(name=ns.model, mtp_layers=ns.mtp_layers)  # multi-token prediction depths (deepseek_v3's) to export
    args = model_args(ns.model, ns.flavor, tokenizer_vocab=tokenizer.vocab_size, max_seq_len=ns.max_seq_len, mtp=mtp)
    state = dcp_model_state(Path(ns.src), args, ns.lora_scale)
    out = hf.save(state, args, ns.dst, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                  tokenizer_file=tokenizer_path, tokenizer=tokenizer, dtype=DTYPES[ns.dtype])
    print(f"wrote {out} (Hugging Face {FAMILIES[ns.model].hf.architecture}, {ns.dtype})")


def from_hf(ns) -> None:
    fresh_folder(ns.dst)
    _, state = hf.load(ns.src)
    state = {k: v.to(DTYPES[ns.dtype]) for k, v in state.items()}
    dcp.save({"model": state}, checkpoint_id=ns.dst, no_dist=True)
    print(f"wrote {ns.dst} (titan DCP, model only)")


def check_flags(ns) -> None:
    if ns.command == "to-hf":
        if not 1 <= ns.max_seq_len <= 2**24:
            raise ConfigError(f"--max-seq-len must be in [1, {2**24}] (got {ns.max_seq_len})")
        if ns.lora_scale is not None and not (math.isfinite(ns.lora_scale) and 0 < ns.lora_scale <= 1e6):
            raise ConfigError(f"--lora-scale must be a finite number in (0, 1e6] (got {ns.lora_scale})")
    if not ns.src.strip() or not Path(ns.src).is_dir():
        raise ConfigError(f"src: {ns.src!r} is not a folder")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-hf", help="DCP step folder -> Hugging Face folder (a new or empty folder)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--model", default="llama3", choices=sorted(FAMILIES), help="the run's model.name")
    p.add_argument("--flavor", required=True, help="the run's model.flavor (one of the family's flavors)")
    p.add_argument("--tokenizer", default="", help="the run's model.tokenizer_path; default: the shipped debug "
                   "tokenizer")
    p.add_argument("--max-seq-len", type=int, default=8192, help="max_position_embeddings in config.json")
    p.add_argument("--mtp-layers", type=int, default=0, help="the run's model.mtp_layers (deepseek_v3): its "
                   "multi-token prediction depths go out as the checkpoint's extra layers")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--lora-scale", type=float, default=None,
                   help="for a checkpoint with LoRA adapters: the run's lora.alpha / lora.rank (merged into W)")
    p = sub.add_parser("from-hf", help="Hugging Face folder -> model-only DCP folder")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ns = parser.parse_args(argv)
    try:
        check_flags(ns)
        (to_hf if ns.command == "to-hf" else from_hf)(ns)
    except ConfigError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
