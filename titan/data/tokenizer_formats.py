"""Tokenizer file formats, converted both ways between tiktoken rank files (titan's format, `base64(bytes) rank` per
line plus a JSON sidecar) and Hugging Face byte-level BPE (`tokenizer.json`, tokens written in GPT-2's byte ->
character table):

  tiktoken -> tokenizer.json   `tokenizer_json`, `write_tokenizer_json` (titan/hf.py exports a run's tokenizer with
                               it; transformers' TikTokenConverter derives the same merges)
  byte-level BPE -> tiktoken   `check_merge_order`, `write_tiktoken` (scripts/download_assets.py converts SmolLM2's
                               vocabulary with them)

Pure Python, no `tokenizers` or `transformers`. Reading either format is titan/data/tokenizer.py's; a vocabulary that
cannot be converted faithfully is a `ConfigError` naming the token or merge.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from titan.errors import ConfigError


def bytes_to_unicode() -> dict[int, str]:
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
    enc = bytes_to_unicode()
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


def write_tokenizer_json(tokenizer, folder: Path, max_seq_len: int) -> None:
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


def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`: a byte-level BPE token string -> its bytes, one character at a time."""
    return {c: b for b, c in bytes_to_unicode().items()}


def write_tiktoken(tokens: list[str], special_ids: list[int], folder: Path, bos_token: str, eos_token: str,
                   pattern: str, unk_token: str | None = None) -> Path:
    """`folder/tokenizer.model` (`base64(bytes) id` per ordinary token: the id is the tiktoken rank) and
    `tokenizer_tiktoken.json` (pattern, special tokens, bos/eos). Faithful when the merges were learnt in id order
    (see `check_merge_order`)."""
    decode = unicode_to_bytes()
    specials = {tokens[i]: i for i in special_ids}
    lines, seen, skip = [], {}, set(special_ids)
    for i, token in enumerate(tokens):
        if i in skip:
            continue
        try:
            raw = bytes(decode[c] for c in token)
        except KeyError:
            raise ConfigError(f"token {i} {token!r} is not a byte-level BPE string") from None
        if raw in seen:
            raise ConfigError(f"tokens {seen[raw]} and {i} are the same bytes {raw!r}")
        seen[raw] = i
        lines.append(f"{base64.b64encode(raw).decode()} {i}\n")
    for name in (bos_token, eos_token):
        if name not in specials:
            raise ConfigError(f"the vocabulary has no special token {name}")
    rank_file = folder / "tokenizer.model"
    rank_file.write_text("".join(lines))
    sidecar = {"pattern": pattern, "special_tokens": specials, "bos_token": bos_token, "eos_token": eos_token}
    if unk_token is not None:
        # Not read by titan yet: where a character's bytes have no token (SmolLM2 lacks 21 of the 256 bytes, e.g.
        # "\x04"), Hugging Face's tokenizer gives this token instead.
        sidecar["unk_token"] = unk_token
    (folder / "tokenizer_tiktoken.json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    return rank_file


def check_merge_order(tokens: list[str], merges: list[str]) -> None:
    """tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF BPE applies its merge list in
    order. They agree when merge k makes a distinct token and those tokens' ids grow with k, as in SmolLM2 (merge k
    makes token 252 + k); checked here, and compared token for token with HF `tokenizers` on 400 KB of text."""
    ids = {t: i for i, t in enumerate(tokens)}
    last = -1
    for k, merge in enumerate(merges):
        a, _, b = merge.partition(" ")
        i = ids.get(a + b)
        if i is None or i <= last:
            raise ConfigError(f"merge {k} {merge!r} does not make the next token in id order; the vocabulary cannot "
                             f"be written as tiktoken ranks faithfully")
        last = i
