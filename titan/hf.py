"""Hugging Face Llama checkpoints: export titan weights as a `LlamaForCausalLM` folder (safetensors + config.json +
generation_config.json + tokenizer) and import such a folder as initial weights. Pure torch + safetensors: no
`transformers` needed.

Owns the name mapping and the q/k row permutation. titan (like Meta's reference code) applies RoPE to consecutive
channel pairs (2i, 2i+1) of each head; Hugging Face's `rotate_half` pairs channel i with i + head_dim/2. Exporting
permutes each head's wq/wk output rows from [x0, y0, x1, y1, ...] to [x0, x1, ..., y0, y1, ...] (exactly what
transformers' convert_llama_weights_to_hf.py does); importing undoes it. Both models then compute the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from titan.config import ConfigError
from titan.models.llama import ModelArgs, RopeScaling
from titan.models.lora import is_adapter

SHARD_BYTES = 5 * 2**30  # above this, weights go to several files plus model.safetensors.index.json (HF's default)
TRANSFORMERS_VERSION = "4.46.0"  # the schema written; older and newer transformers read it too


# ---------------------------------------------------------------------------------------------------------------
# Names and the RoPE permutation


def _layer_names(i: int) -> dict[str, str]:
    t, h = f"layers.{i}.", f"model.layers.{i}."
    return {
        t + "attention.wq.weight": h + "self_attn.q_proj.weight",
        t + "attention.wk.weight": h + "self_attn.k_proj.weight",
        t + "attention.wv.weight": h + "self_attn.v_proj.weight",
        t + "attention.wo.weight": h + "self_attn.o_proj.weight",
        t + "feed_forward.w1.weight": h + "mlp.gate_proj.weight",
        t + "feed_forward.w3.weight": h + "mlp.up_proj.weight",
        t + "feed_forward.w2.weight": h + "mlp.down_proj.weight",
        t + "attention_norm.weight": h + "input_layernorm.weight",
        t + "ffn_norm.weight": h + "post_attention_layernorm.weight",
    }


def name_map(args: ModelArgs) -> dict[str, str]:
    """titan name -> HF name (without lm_head when the embeddings are tied: HF then has no such tensor)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(args.n_layers):
        names.update(_layer_names(i))
    if not args.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection, per head, from interleaved pairs to halves (titan -> HF)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `to_rotate_half` (HF -> titan)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads(name: str, args: ModelArgs) -> int | None:
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf(state: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """titan full state dict -> HF tensors (contiguous, in `dtype` if given)."""
    out = {}
    for name, hf_name in name_map(args).items():
        if name not in state:
            raise KeyError(f"state dict has no {name!r}")
        w = state[name]
        heads = _heads(name, args)
        if heads is not None:
            w = to_rotate_half(w, heads)
        out[hf_name] = (w if dtype is None else w.to(dtype)).contiguous()
    return out


def from_hf(tensors: dict[str, torch.Tensor], args: ModelArgs, where: str = "") -> dict[str, torch.Tensor]:
    """HF tensors -> titan full state dict; a missing tensor is a ConfigError naming it."""
    state = {}
    for name, hf_name in name_map(args).items():
        if hf_name not in tensors:
            raise ConfigError(f"{where}: no tensor {hf_name!r} (does config.json match?)")
        w = tensors[hf_name]
        heads = _heads(name, args)
        state[name] = from_rotate_half(w, heads) if heads is not None else w
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


# ---------------------------------------------------------------------------------------------------------------
# config.json


def hf_config(args: ModelArgs, bos_id: int, eos_id: int, dtype: torch.dtype) -> dict:
    """config.json for transformers' LlamaForCausalLM (the fields its LlamaConfig reads)."""
    s = args.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "mlp_bias": False,
        "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": args.norm_eps,
        "rope_scaling": None if s is None else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        },
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }


def args_from_hf_config(config: dict, where: str) -> ModelArgs:
    """ModelArgs from an HF Llama config.json (the shapes; multiple_of / ffn_dim_multiplier are replaced by an
    explicit hidden size check)."""
    try:
        if config.get("model_type", "llama") != "llama":
            raise ConfigError(f"{where}: model_type {config['model_type']!r} is not llama")
        s = config.get("rope_scaling")
        scaling = None
        if s is not None:
            if s.get("rope_type", s.get("type")) != "llama3":
                raise ConfigError(f"{where}: rope_scaling type {s.get('rope_type', s.get('type'))!r} is not llama3")
            scaling = RopeScaling(float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"]),
                                  int(s["original_max_position_embeddings"]))
        dim, hidden = config["hidden_size"], config["intermediate_size"]
        # titan derives the SwiGLU width from (multiple_of, ffn_dim_multiplier); rounding up to a multiple of
        # `hidden` itself gives exactly `hidden` whenever the unrounded width is in (0, hidden].
        unrounded = int(8 * dim / 3)
        args = ModelArgs(
            dim=dim, n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"), vocab_size=config["vocab_size"], multiple_of=hidden,
            ffn_dim_multiplier=None if unrounded <= hidden else hidden / unrounded,
            norm_eps=config["rms_norm_eps"], rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=scaling, max_seq_len=config.get("max_position_embeddings", 8192),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
        if args.ffn_hidden_dim != hidden or config.get("head_dim", args.head_dim) != args.head_dim:
            raise ConfigError(f"{where}: intermediate_size={hidden} / head_dim={config.get('head_dim')} cannot be "
                              f"expressed as a titan Llama")
        return args
    except KeyError as e:
        raise ConfigError(f"{where}: config.json has no {e.args[0]!r}") from None


def check_compatible(args: ModelArgs, hf: ModelArgs, where: str) -> None:
    """The model titan built must have the shapes of the HF checkpoint (RoPE table length may differ)."""
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "tie_embeddings",
                  "rope_theta", "norm_eps", "rope_scaling"):
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


def save(state: dict[str, torch.Tensor], args: ModelArgs, folder: str | Path, *, bos_id: int, eos_id: int,
         tokenizer_file: str | Path | None = None, tokenizer=None, dtype: torch.dtype = torch.float32,
         shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a full titan state dict as an HF Llama folder; returns the folder. With `tokenizer` (a titan
    Tokenizer) also tokenizer.json + tokenizer_config.json; with `tokenizer_file` a copy of the tiktoken file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_hf(state, args, dtype)
    _write_safetensors(tensors, folder, shard_bytes)
    (folder / "config.json").write_text(json.dumps(hf_config(args, bos_id, eos_id, dtype), indent=2) + "\n")
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "transformers_version": TRANSFORMERS_VERSION}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_file is not None:
        tokenizer_file = Path(tokenizer_file)
        # A tiktoken rank file is what Meta ships as tokenizer.model; its sidecar (pattern, specials) goes along.
        shutil.copyfile(tokenizer_file, folder / "tokenizer.model")
        # In an HF folder the sidecar is tokenizer_tiktoken.json (tokenizer.json there is Hugging Face's own).
        for sidecar in (tokenizer_file.with_name(tokenizer_file.stem + "_tiktoken.json"),
                        tokenizer_file.with_suffix(".json")):
            if sidecar.is_file() and _is_tiktoken_sidecar(sidecar):
                shutil.copyfile(sidecar, folder / "tokenizer_tiktoken.json")
                break
    if tokenizer is not None:
        source = Path(tokenizer_file).parent if tokenizer_file is not None else None
        hf_files = ("tokenizer.json", "tokenizer_config.json")
        if source is not None and Path(tokenizer_file).name == "tokenizer.model" and source.resolve() != \
                folder.resolve() and all((source / f).is_file() for f in hf_files):
            # The tokenizer came from an HF folder (e.g. scripts/download_assets.py smollm2): keep that model's own
            # tokenizer.json / tokenizer_config.json (its pre-tokenizer, BOS rule and chat template).
            for f in hf_files:
                shutil.copyfile(source / f, folder / f)
        else:
            write_tokenizer(tokenizer, folder, args.max_seq_len)
    return folder


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


def load(folder: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs from config.json, titan full state dict) of an HF Llama folder."""
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


def exporter(args: ModelArgs, tokenizer, tokenizer_path: str):
    """The callback the checkpointer uses for `last_save_in_hf`: (full state dict, folder, dtype) -> None."""
    from titan.data.tokenizer import tokenizer_file

    def export(state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> None:
        save(state, args, folder, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
             tokenizer_file=tokenizer_file(tokenizer_path), tokenizer=tokenizer, dtype=dtype)

    return export
