"""Tokenizers from local files only (never the network, never a cache): tiktoken BPE encodings (the default, and the
format of the shipped tokenizers), and any Hugging Face `tokenizer.json` through the optional `tokenizers` package.

A rank file (`base64(token) rank` per line) is described by a sidecar `<name>.json` next to it (pattern, special
tokens, bos/eos); a Llama 3 `tokenizer.model` needs none and is recognised by its 128,000 ranks. A `tokenizer.json`
takes its BOS/EOS/pad from the `tokenizer_config.json` (or `special_tokens_map.json`) beside it. Both kinds offer the
same interface (`encode`, `decode`, `bos_id`, `eos_id`, `pad_id`, `vocab_size`, `special_tokens`, `source`,
`identity`, `name`). This module does not know about datasets or chat templates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from pathlib import Path

import tiktoken

from titan.errors import ConfigError

_SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
DEBUG_TOKENIZER = _SHIPPED / "debug.tiktoken"
# Names model.tokenizer_path accepts for the shipped tokenizers (from any working directory).
SHIPPED_TOKENIZERS = {"debug": DEBUG_TOKENIZER, "debug_chat": _SHIPPED / "debug_chat.tiktoken"}

# Llama 3's pre-tokenizer split (GPT-4 style, digits in groups of up to 3).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RANKS = 128_000


def llama3_special_tokens() -> dict[str, int]:
    """The 256 Llama 3 special tokens, ids 128000..128255 (named ones first, then the remaining reserved ones)."""
    names = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(names))]
    return {name: LLAMA3_NUM_RANKS + i for i, name in enumerate(names)}


class Tokenizer:
    """A tiktoken encoding plus the ids a trainer needs; `encode` never turns text into special tokens."""

    def __init__(self, encoding: tiktoken.Encoding, special_tokens: dict[str, int], bos_token: str, eos_token: str,
                 missing_bytes: bytes = b"", unk_token: str | None = None):
        self.encoding = encoding
        self.special_tokens = dict(special_tokens)
        self.bos_id = self.special_tokens[bos_token]
        self.eos_id = self.special_tokens[eos_token]
        self.pad_id = self.eos_id  # tiktoken sidecars name no pad token; padding is never a target anyway
        self.unk_id = self.special_tokens[unk_token] if unk_token else None
        self.vocab_size = encoding.max_token_value + 1
        # Byte values with no token of their own (SmolLM2 lacks 21): tiktoken panics on text containing them.
        self._missing = re.compile(b"[" + re.escape(missing_bytes) + b"]") if missing_bytes else None
        self.source: tuple | None = None  # set by load_tokenizer: the files it was read from
        # set by load_tokenizer: sha256 of what makes the ids (`content_identity`) -- what prepared data and
        # checkpoints record, so a run notices another tokenizer even when its vocabulary size is the same (a path
        # can move, the vocabulary cannot), while a re-indented or annotated file is still the same tokenizer
        self.identity: str = ""
        self.file_identity: str = ""  # sha256 of the files' bytes: what titan recorded before; still accepted
        self.name: str = ""  # for messages: the rank file's path

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # encode_ordinary: "<|eot_id|>" inside user text stays plain text, so data cannot inject control tokens.
        if self._missing is not None and self._missing.search(text.encode("utf-8", "surrogatepass")):
            ids = self._encode_around_missing(text)
        else:
            ids = self.encoding.encode_ordinary(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def _encode_around_missing(self, text: str) -> list[int]:
        """Characters whose bytes the vocabulary cannot spell become the unknown token (dropped if there is none),
        as Hugging Face's BPE does; the text between them is encoded normally."""
        ids, start = [], 0
        for i, char in enumerate(text):
            if self._missing.search(char.encode("utf-8", "surrogatepass")):
                ids += self.encoding.encode_ordinary(text[start:i])
                ids += [] if self.unk_id is None else [self.unk_id]
                start = i + 1
        return ids + self.encoding.encode_ordinary(text[start:])

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # accepts tensors and arrays too
        return self.encoding.decode(ids)


def _fail(path, what: str) -> ConfigError:
    return ConfigError(f"model.tokenizer_path={str(path)!r}: {what}".replace("\n", " "))


def _read_ranks(path: Path) -> dict[bytes, int]:
    # Parsed here rather than by tiktoken.load.load_tiktoken_bpe, which copies the file into a cache directory.
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _fail(path, f"cannot read tokenizer file ({e.strerror or e})") from None
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise _fail(path, f"line {lineno} is not 'base64-token rank'; not a tiktoken rank file") from None
    if not ranks:
        raise _fail(path, "tokenizer file holds no ranks")
    return ranks


def _sidecar_path(path: Path) -> Path:
    """`<name>.json` next to the rank file; in a Hugging Face folder, where tokenizer.json is taken, the rank file
    `tokenizer.model` is described by `tokenizer_tiktoken.json` (what titan.hf writes)."""
    tiktoken_side = path.with_name(path.stem + "_tiktoken.json")
    return tiktoken_side if tiktoken_side.is_file() else path.with_suffix(".json")


def _read_sidecar(path: Path) -> dict | None:
    """The JSON describing the rank file, or None. A Hugging Face tokenizer.json (it has a "model" key) is not ours."""
    side = _sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"cannot read sidecar {side}: {e}") from None
    if isinstance(meta, dict) and "model" in meta and "pattern" not in meta:
        return None
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("pattern"), str)
        and isinstance(meta.get("special_tokens"), dict)
        and all(isinstance(k, str) and type(v) is int for k, v in meta["special_tokens"].items())
        and meta.get("bos_token") in meta["special_tokens"]
        and meta.get("eos_token") in meta["special_tokens"]
        and meta.get("unk_token", next(iter(meta["special_tokens"]))) in meta["special_tokens"]
    )
    if not ok:
        raise _fail(
            path,
            f"sidecar {side} must be {{\"pattern\": str, \"special_tokens\": {{name: id}}, \"bos_token\": name, "
            f"\"eos_token\": name}} with bos/eos among the special tokens",
        )
    return meta


def tokenizer_file(path: str = "") -> Path:
    """The file model.tokenizer_path names: a shipped tokenizer's name ("" = "debug"), a file, or in a folder its
    tokenizer.model (tiktoken) or, failing that, its tokenizer.json (Hugging Face)."""
    file = SHIPPED_TOKENIZERS.get(path or "debug", Path(path))
    if file.is_dir():
        tiktoken_file, hf_file = file / "tokenizer.model", file / "tokenizer.json"
        return hf_file if hf_file.is_file() and not tiktoken_file.is_file() else tiktoken_file
    return file


def load_tokenizer(path: str = "") -> Tokenizer | HFTokenizer:
    """The tokenizer at `path` (model.tokenizer_path); "" = the shipped 4096-token debug tokenizer, "debug_chat" the
    same with ChatML and Llama 3 chat tokens. A folder (e.g. a Hugging Face model folder) means its
    `tokenizer.model` if it has one, else its `tokenizer.json`; a `.json` file is a Hugging Face tokenizer.json."""
    path = tokenizer_file(path)
    if not path.is_file():
        raise _fail(path, "no such tokenizer file (a folder needs tokenizer.model or tokenizer.json)")
    if path.suffix == ".json":
        return HFTokenizer(path)
    ranks = _read_ranks(path)
    meta = _read_sidecar(path)
    if meta is None:
        if len(ranks) != LLAMA3_NUM_RANKS:
            raise _fail(
                path,
                f"{len(ranks)} ranks and no sidecar {_sidecar_path(path).name}; only a Llama 3 tokenizer.model "
                f"({LLAMA3_NUM_RANKS} ranks) is recognised without one",
            )
        meta = {"pattern": LLAMA3_PATTERN, "special_tokens": llama3_special_tokens(),
                "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    specials = meta["special_tokens"]
    clash = set(specials.values()) & set(ranks.values())
    if clash:
        raise _fail(path, f"special token ids {sorted(clash)[:5]} are also ordinary token ranks")
    try:
        encoding = tiktoken.Encoding(
            name=path.stem, pat_str=meta["pattern"], mergeable_ranks=ranks, special_tokens=specials
        )
    except ValueError as e:  # e.g. a pattern the regex engine rejects
        raise _fail(path, f"cannot build the encoding: {e}") from None
    missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
    tokenizer = Tokenizer(encoding, specials, meta["bos_token"], meta["eos_token"], missing, meta.get("unk_token"))
    content = {"kind": "tiktoken", "pattern": meta["pattern"], "special_tokens": specials,
               "bos": meta["bos_token"], "eos": meta["eos_token"], "unk": meta.get("unk_token"),
               "ranks": hashlib.sha256(b"".join(base64.b64encode(t) + b" %d\n" % r
                                                for t, r in sorted(ranks.items(), key=lambda x: x[1]))).hexdigest()}
    _identify(tokenizer, path, [f for f in (path, _sidecar_path(path)) if f.is_file()], content)
    return tokenizer


def _identify(tokenizer, path: Path, files: list[Path], content: dict) -> None:
    # Identifies these files as they are now: lets data loaders reuse a token stream within one process.
    tokenizer.source = tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    tokenizer.identity = content_identity(content)
    tokenizer.file_identity = files_sha256(files)
    tokenizer.name = str(path)


def content_identity(content: dict) -> str:
    """sha256 of what decides the ids text becomes -- the vocabulary, merges or ranks, the split pattern or
    pre-tokenizer and normaliser, the special tokens and the bos/eos ids -- as canonical JSON: the same tokenizer
    whatever its files' formatting, key order or extra fields (a chat_template added to a sidecar, say)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def files_sha256(files: list[Path]) -> str:
    """sha256 over the files' contents, each prefixed by its length (so moving bytes between files changes it)."""
    digest = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class HFTokenizer:
    """A Hugging Face tokenizer.json run by the `tokenizers` library, with `Tokenizer`'s interface. `special_tokens`
    lists every added token (name -> id). `encode` never turns text into a *special* added token (as tiktoken's
    encode_ordinary: data cannot inject control tokens); added tokens not marked special (e.g. Qwen3's <think>) are
    matched in text, exactly as `tokenizers` does."""

    def __init__(self, path: Path):
        try:
            import tokenizers
        except ImportError:
            raise _fail(path, 'a Hugging Face tokenizer.json needs the tokenizers package: pip install -e ".[hf]"') \
                from None
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions for bad JSON and bad models
            raise _fail(path, f"cannot read the Hugging Face tokenizer ({e})") from None
        self._tok.encode_special_tokens = True
        self.special_tokens = {t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items())}
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        names = _hf_special_token_names(path)
        if names.get("eos_token") is None:
            raise _fail(path, f"no eos_token in {path.parent / 'tokenizer_config.json'} or special_tokens_map.json")
        self.bos_id = self._id(path, names, "bos_token")  # None for tokenizers without one (Qwen)
        self.eos_id = self._id(path, names, "eos_token")
        pad = self._id(path, names, "pad_token")
        self.pad_id = self.eos_id if pad is None else pad
        self.unk_id = self._id(path, names, "unk_token")
        self.source, self.identity, self.file_identity, self.name = None, "", "", ""
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(path, f"cannot read the Hugging Face tokenizer ({e})") from None
        content = {"kind": "tokenizers", **{k: spec.get(k) for k in ("model", "added_tokens", "normalizer",
                                                                      "pre_tokenizer")},
                   "ids": [self.bos_id, self.eos_id, self.pad_id, self.unk_id]}
        _identify(self, path, [path.parent / f for f in HF_TOKENIZER_FILES if (path.parent / f).is_file()], content)

    def _id(self, path: Path, names: dict, key: str) -> int | None:
        name = names.get(key)
        if name is None:
            return None
        token_id = self._tok.token_to_id(name)
        if token_id is None:
            raise _fail(path, f"{key} {name!r} (tokenizer_config.json) is not a token of tokenizer.json")
        return token_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._tok.decode(ids, skip_special_tokens=False)


def _hf_special_token_names(path: Path) -> dict:
    """bos/eos/pad/unk token names from tokenizer_config.json, else special_tokens_map.json (each may hold a name or
    an {"content": name, ...} object)."""
    names = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        f = path.parent / file
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(path, f"cannot read {f}: {e}") from None
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if key in data:
                value = data[key]
                names[key] = value.get("content") if isinstance(value, dict) else value
    return names
