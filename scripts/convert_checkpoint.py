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

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from titan import hf
from titan.config import DTYPES, Model
from titan.data.tokenizer import load_tokenizer, tokenizer_file
from titan.errors import ConfigError
from titan.models import FAMILIES, build_model, lora, model_args


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
    except Exception:  # noqa: BLE001 - not a checkpoint: the load below reports it, naming the path
        stored = {}
    adapters = {k.removeprefix("model."): v for k, v in stored.items() if lora.is_adapter(k)}
    if adapters:
        if "model.tok_embeddings.weight" not in stored:
            raise ConfigError(f"{path}: holds only LoRA adapters (lora.save_adapter_only); merge them with the base "
                              f"through scripts/generate.py --checkpoint, or save with checkpoint.last_save_in_hf")
        if lora_scale is None:
            raise ConfigError(f"{path}: holds LoRA adapters; pass --lora-scale (the run's lora.alpha / lora.rank) to "
                              f"merge them into the exported weights")
        state.update({k: torch.empty(v.size, dtype=torch.float32) for k, v in adapters.items()})
    try:
        dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConfigError(f"{path}: cannot read the model from this checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return lora.merge(state, lora_scale) if adapters else state


def to_hf(ns) -> None:
    tokenizer_path = str(tokenizer_file(ns.tokenizer or ""))
    tokenizer = load_tokenizer(ns.tokenizer or "")
    mtp = Model(name=ns.model, mtp_layers=ns.mtp_layers)  # multi-token prediction depths (deepseek_v3's) to export
    args = model_args(ns.model, ns.flavor, tokenizer_vocab=tokenizer.vocab_size, max_seq_len=ns.max_seq_len, mtp=mtp)
    state = dcp_model_state(Path(ns.src), args, ns.lora_scale)
    out = hf.save(state, args, ns.dst, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                  tokenizer_file=tokenizer_path, tokenizer=tokenizer, dtype=DTYPES[ns.dtype])
    print(f"wrote {out} (Hugging Face {FAMILIES[ns.model].hf.architecture}, {ns.dtype})")


def from_hf(ns) -> None:
    _, state = hf.load(ns.src)
    state = {k: v.to(DTYPES[ns.dtype]) for k, v in state.items()}
    dcp.save({"model": state}, checkpoint_id=ns.dst, no_dist=True)
    print(f"wrote {ns.dst} (titan DCP, model only)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-hf", help="DCP step folder -> Hugging Face folder")
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
        (to_hf if ns.command == "to-hf" else from_hf)(ns)
    except ConfigError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
