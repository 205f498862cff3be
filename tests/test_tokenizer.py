"""Tokenizer: the shipped debug tokenizer, sidecar-described rank files, the Llama 3 scheme, Hugging Face tokenizer.json
files (against the `tokenizers` library itself), and error messages."""

import base64
import json
import sys

import pytest
import torch

from titan.data import tokenizer_formats
from titan.data.documents import DATASETS
from titan.data.tokenizer import DEBUG_TOKENIZER, LLAMA3_PATTERN, load_tokenizer
from titan.errors import ConfigError

UNICODE = "naïve café — Ελληνικά, 東京, emoji 😀👍🏽, tab\there\r\nline\u2028sep, zero\u200bwidth, ß→SS"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_debug_tokenizer_ids(tok):
    assert tok.vocab_size == 4096
    assert (tok.bos_id, tok.eos_id) == (4094, 4095)
    assert tok.special_tokens == {"<|begin_of_text|>": 4094, "<|end_of_text|>": 4095}
    assert load_tokenizer(str(DEBUG_TOKENIZER)).encode("Emma Woodhouse") == tok.encode("Emma Woodhouse")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_round_trip_austen(tok, split):
    text = DATASETS["austen"][split].read_text()[:20_000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < 4094  # ordinary text never yields special ids
    assert len(ids) < len(text.encode()) / 2.5  # merges are used, not just raw bytes


def test_round_trip_unicode(tok):
    ids = tok.encode(UNICODE)
    assert tok.decode(ids) == UNICODE
    assert tok.decode(torch.tensor(ids)) == UNICODE  # tensors are accepted


def test_bos_eos_placement(tok):
    body = tok.encode("It is a truth universally acknowledged")
    assert tok.encode("It is a truth universally acknowledged", bos=True) == [4094] + body
    assert tok.encode("It is a truth universally acknowledged", eos=True) == body + [4095]
    assert tok.encode("It is a truth universally acknowledged", bos=True, eos=True) == [4094] + body + [4095]
    assert tok.encode("", bos=True, eos=True) == [4094, 4095]


def test_special_token_text_is_plain_text(tok):
    text = "before <|end_of_text|> and <|begin_of_text|> after"
    ids = tok.encode(text)
    assert 4094 not in ids and 4095 not in ids
    assert tok.decode(ids) == text
    assert tok.decode([4094, 4095]) == "<|begin_of_text|><|end_of_text|>"


def test_digits_split_in_groups_of_three(tok):
    # Llama 3's pattern cuts numbers into chunks of at most 3 digits; no token may straddle a chunk boundary.
    pieces = [tok.decode([i]) for i in tok.encode("123456789")]
    ends = {sum(len(p) for p in pieces[: k + 1]) for k in range(len(pieces))}
    assert {3, 6, 9} <= ends


def _write_ranks(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))


def _debug_tokens():
    lines = DEBUG_TOKENIZER.read_text().split()
    return [base64.b64decode(t) for t in lines[0::2]]


def test_sidecar_describes_specials(tmp_path, tok):
    # A ChatML-like sidecar with a gap in the ids: vocab_size is the highest id + 1, not the count.
    _write_ranks(tmp_path / "chat.tiktoken", _debug_tokens())
    specials = {"<|im_start|>": 4094, "<|im_end|>": 4095, "<|pad|>": 4100}
    meta = {"pattern": LLAMA3_PATTERN, "special_tokens": specials, "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>"}
    (tmp_path / "chat.json").write_text(json.dumps(meta))
    chat = load_tokenizer(str(tmp_path / "chat.tiktoken"))
    assert (chat.bos_id, chat.eos_id, chat.vocab_size) == (4094, 4095, 4101)
    assert chat.special_tokens == specials
    assert chat.encode("Hello <|im_end|>") == tok.encode("Hello <|im_end|>")


def test_bytes_without_a_token_become_the_unknown_token(tmp_path, tok):
    # SmolLM2's vocabulary has no token for 21 byte values; tiktoken panics on text containing one. titan encodes
    # such a character as the sidecar's unk_token (as Hugging Face's BPE does) and everything around it normally.
    _write_ranks(tmp_path / "holes.tiktoken", [t for t in _debug_tokens() if b"\x04" not in t])
    meta = {"pattern": LLAMA3_PATTERN, "special_tokens": {"<|unk|>": 4094, "<|end|>": 4095},
            "bos_token": "<|end|>", "eos_token": "<|end|>", "unk_token": "<|unk|>"}
    (tmp_path / "holes.json").write_text(json.dumps(meta))
    holes = load_tokenizer(str(tmp_path / "holes.tiktoken"))
    ids = holes.encode("Emma\x04Woodhouse \x04")
    assert ids.count(4094) == 2 and ids[-1] == 4094
    first = ids.index(4094)
    assert holes.decode(ids[:first]) == "Emma"
    assert holes.decode(ids).replace("<|unk|>", "\x04") == "Emma\x04Woodhouse \x04"
    del meta["unk_token"]
    (tmp_path / "holes.json").write_text(json.dumps(meta))
    assert load_tokenizer(str(tmp_path / "holes.tiktoken")).decode(
        load_tokenizer(str(tmp_path / "holes.tiktoken")).encode("a\x04b")) == "ab"


def test_shipped_names_and_model_folders(tmp_path, tok):
    assert load_tokenizer("debug").encode("Emma") == tok.encode("Emma")
    chat = load_tokenizer("debug_chat")
    assert chat.vocab_size == 4096 and {"<|im_start|>", "<|eot_id|>"} <= set(chat.special_tokens)
    # A model folder holds tokenizer.model, described by tokenizer_tiktoken.json (tokenizer.json is Hugging Face's).
    _write_ranks(tmp_path / "tokenizer.model", _debug_tokens())
    (tmp_path / "tokenizer_tiktoken.json").write_text(json.dumps(
        {"pattern": LLAMA3_PATTERN, "special_tokens": {"<s>": 4094, "</s>": 4095}, "bos_token": "<s>",
         "eos_token": "</s>"}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    assert load_tokenizer(str(tmp_path)).bos_id == 4094


def test_llama3_scheme_from_rank_count(tmp_path):
    gpt2 = _debug_tokens()
    filler = [b"\x00filler" + str(i).encode() for i in range(128_000 - len(gpt2))]
    path = tmp_path / "tokenizer.model"
    _write_ranks(path, gpt2 + filler)
    # A Hugging Face tokenizer.json beside it is not a sidecar and must not stop the Llama 3 recognition.
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    llama = load_tokenizer(str(path))
    assert (llama.bos_id, llama.eos_id, llama.vocab_size) == (128000, 128001, 128256)
    s = llama.special_tokens
    assert len(s) == 256 and sorted(s.values()) == list(range(128000, 128256))
    assert s["<|reserved_special_token_0|>"] == 128002 and s["<|reserved_special_token_1|>"] == 128003
    assert s["<|finetune_right_pad_id|>"] == 128004 and s["<|reserved_special_token_2|>"] == 128005
    assert (s["<|start_header_id|>"], s["<|end_header_id|>"], s["<|eom_id|>"]) == (128006, 128007, 128008)
    assert (s["<|eot_id|>"], s["<|python_tag|>"]) == (128009, 128010)
    assert s["<|reserved_special_token_3|>"] == 128011 and s["<|reserved_special_token_247|>"] == 128255
    text = "Mr. Darcy <|eot_id|> 2024"
    ids = llama.encode(text, bos=True, eos=True)
    assert ids[0] == 128000 and ids[-1] == 128001 and 128009 not in ids
    assert llama.decode(ids[1:-1]) == text
    assert llama.decode([128009]) == "<|eot_id|>"


def _error(path) -> str:
    with pytest.raises(ConfigError) as e:
        load_tokenizer(str(path))
    msg = str(e.value)
    assert "model.tokenizer_path" in msg and str(path) in msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    assert "no such" in _error(tmp_path / "nope.model")


def test_folder_is_not_a_file(tmp_path):
    assert "no such" in _error(tmp_path)


@pytest.mark.parametrize(
    "content, expect",
    [
        (b"hello world\nthis is not a rank file\n", "line 1"),
        (b"IQ== 0\nIg== one\n", "line 2"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR binary junk", "line 1"),
        (b"", "no ranks"),
        (b"IQ== 0\nIg== 1\n", "2 ranks and no sidecar"),  # valid ranks, but neither sidecar nor Llama 3 size
    ],
)
def test_garbled_rank_file(tmp_path, content, expect):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    assert expect in _error(path)


@pytest.mark.parametrize(
    "sidecar, expect",
    [
        ("{not json", "cannot read sidecar"),
        (json.dumps({"pattern": LLAMA3_PATTERN, "special_tokens": {"<|a|>": 4094}, "bos_token": "<|a|>",
                     "eos_token": "<|missing|>"}), "must be"),
        (json.dumps({"pattern": "(", "special_tokens": {"<|a|>": 4094}, "bos_token": "<|a|>",
                     "eos_token": "<|a|>"}), "cannot build"),
        (json.dumps({"pattern": LLAMA3_PATTERN, "special_tokens": {"<|a|>": 17}, "bos_token": "<|a|>",
                     "eos_token": "<|a|>"}), "also ordinary token ranks"),
    ],
)
def test_bad_sidecar(tmp_path, sidecar, expect):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(DEBUG_TOKENIZER.read_bytes())
    (tmp_path / "bad.json").write_text(sidecar)
    assert expect in _error(path)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (the `tokenizers` package; the tests that run it skip without it)

NEEDS_TOKENIZERS = 'needs the tokenizers package (pip install -e ".[hf]")'
EDGE_CASES = ["", " ", "\n\n", "😀👍🏽🇫🇷 emoji", "mixed: English, Ελληνικά, русский, 日本語, 한국어, العربية, हिन्दी",
              UNICODE, "  leading and trailing spaces  ", "digits 1234567890 and tabs\t\t"]


@pytest.fixture(scope="module")
def hf_debug(tmp_path_factory):
    """The shipped debug tokenizer as tokenizer.json + tokenizer_config.json (what titan.hf exports)."""
    pytest.importorskip("tokenizers", reason=NEEDS_TOKENIZERS)
    folder = tmp_path_factory.mktemp("hf_debug")
    tokenizer_formats.write_tokenizer_json(load_tokenizer(), folder, max_seq_len=256)
    return folder


@pytest.fixture(scope="module")
def hf_trained(tmp_path_factory):
    """A byte-level BPE trained by `tokenizers` on Austen, laid out like Qwen3's: ChatML special tokens, <think> and
    </think> as added tokens that are not special, no BOS, EOS <|im_end|>, pad <|endoftext|>."""
    tk = pytest.importorskip("tokenizers", reason=NEEDS_TOKENIZERS)
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=1000, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                     show_progress=False)
    tok.train_from_iterator([DATASETS["austen"]["train"].read_text()[:200_000]], trainer=trainer)
    tok.add_tokens([tk.AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    folder = tmp_path_factory.mktemp("hf_trained")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"}}))  # tokenizer_config.json wins
    return folder


@pytest.mark.parametrize("which", ["hf_debug", "hf_trained"])
def test_tokenizer_json_round_trips_as_the_library_does(request, which):
    tokenizers = pytest.importorskip("tokenizers", reason=NEEDS_TOKENIZERS)

    folder = request.getfixturevalue(which)
    ours = load_tokenizer(str(folder))  # a folder with tokenizer.json and no tokenizer.model
    lib = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = [DATASETS["austen"][split].read_text()[:20_000] for split in ("train", "validation")] + EDGE_CASES
    for text in texts:
        ids = ours.encode(text)
        assert ids == lib.encode(text, add_special_tokens=False).ids, text[:40]
        assert ours.decode(ids) == lib.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(torch.tensor(ours.encode("Emma"))) == "Emma"
    assert ours.vocab_size == max(lib.get_vocab(with_added_tokens=True).values()) + 1
    assert ours.identity and ours.name == str(folder / "tokenizer.json") and ours.source


def test_tokenizer_json_special_tokens_come_from_the_config(hf_trained):
    import tokenizers

    tok, lib = load_tokenizer(str(hf_trained)), tokenizers.Tokenizer.from_file(str(hf_trained / "tokenizer.json"))
    sp = tok.special_tokens
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"} == set(sp)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, sp["<|im_end|>"], sp["<|endoftext|>"])
    assert tok.encode("Emma", bos=True, eos=True) == tok.encode("Emma") + [sp["<|im_end|>"]]  # no BOS to add
    # A special token written in the text stays text (the library itself would turn it into the control token);
    # added tokens that are not special match in text, as the library does.
    assert sp["<|im_end|>"] in lib.encode("a <|im_end|> b", add_special_tokens=False).ids
    assert sp["<|im_end|>"] not in tok.encode("a <|im_end|> b") and tok.decode(tok.encode("a <|im_end|> b")) == \
        "a <|im_end|> b"
    assert sp["<think>"] in tok.encode("<think>\n\n</think>\n\n")


def test_tokenizer_json_matches_tiktoken_and_a_run_trains_from_it(hf_debug, tmp_path, tok, one_thread):
    """The converted debug tokenizer encodes Austen exactly as the tiktoken one, so a run from the tokenizer.json
    folder trains exactly like the default run (same token stream, same losses)."""
    from dist_utils import TINY, losses

    from titan.train import main

    hf_tok = load_tokenizer(str(hf_debug / "tokenizer.json"))
    text = DATASETS["austen"]["validation"].read_text()
    assert hf_tok.encode(text, bos=True, eos=True) == tok.encode(text, bos=True, eos=True)
    assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    base = ["--config", TINY, "--training.steps", "2", "--validation.enable", "false",  # 120 kB: quick to tokenize
            "--training.dataset_path", str(DATASETS["austen"]["validation"])]
    assert main([*base, "--job.dump_folder", str(tmp_path / "tiktoken")]) == 0
    assert main([*base, "--job.dump_folder", str(tmp_path / "hf"), "--model.tokenizer_path", str(hf_debug)]) == 0
    assert losses(tmp_path / "hf") == losses(tmp_path / "tiktoken") and len(losses(tmp_path / "hf")) == 2


def test_tokenizer_json_without_the_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    assert 'pip install -e ".[hf]"' in _error(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("config, expect", [
    ({"bos_token": None}, "no eos_token"),
    ({"eos_token": "<|nope|>"}, "eos_token '<|nope|>' (tokenizer_config.json) is not a token"),
    ("{broken", "cannot read"),
])
def test_bad_tokenizer_config(hf_trained, tmp_path, config, expect):
    import shutil

    shutil.copyfile(hf_trained / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    assert expect in _error(tmp_path / "tokenizer.json")


def test_tokenizer_formats_round_trip(tmp_path):
    """tiktoken -> tokenizer.json -> (byte-level BPE tokens and merges) -> tiktoken gives back the same encoding:
    both directions of titan/data/tokenizer_formats.py, no `tokenizers` needed. A vocabulary whose merges are not in
    id order is refused with a ConfigError naming the merge."""
    original = load_tokenizer("")
    tok = tokenizer_formats.tokenizer_json(original.encoding._mergeable_ranks, original.encoding._pat_str,
                                           original.special_tokens, "<|begin_of_text|>")
    tokens = [None] * original.vocab_size
    for token, i in [*tok["model"]["vocab"].items(), *((a["content"], a["id"]) for a in tok["added_tokens"])]:
        tokens[i] = token
    tokenizer_formats.check_merge_order(tokens, tok["model"]["merges"])
    bos, eos = (next(n for n, i in original.special_tokens.items() if i == t)
                for t in (original.bos_id, original.eos_id))
    rank_file = tokenizer_formats.write_tiktoken(tokens, sorted(original.special_tokens.values()), tmp_path, bos, eos,
                                                 original.encoding._pat_str)
    again = load_tokenizer(str(rank_file))
    text = (DEBUG_TOKENIZER.parent.parent / "data" / "austen" / "validation.txt").read_text()[:2000] + " naïve ✓ 日本語"
    assert again.encode(text) == original.encode(text) and again.special_tokens == original.special_tokens
    assert (again.bos_id, again.eos_id) == (original.bos_id, original.eos_id)
    with pytest.raises(ConfigError, match="merge 1 "):
        tokenizer_formats.check_merge_order(tokens, list(reversed(tok["model"]["merges"][:2])))

