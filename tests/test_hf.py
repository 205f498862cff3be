"""Hugging Face export/import (titan/hf.py, scripts/convert_checkpoint.py).

The logits test is the one that matters: titan's model and an independent pure-torch implementation of HF's Llama
(written here from transformers' modeling_llama.py math: rotate_half RoPE with the llama3 rope_scaling, repeat_kv,
RMSNorm in fp32, SwiGLU; it shares no code with titan.models) reading only the exported model.safetensors and
config.json agree within 1e-5 in fp32. `transformers` itself is not needed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dist_utils import REPO, TINY, losses, rel_error
from titan import hf
from titan.models.llama import ModelArgs, RopeScaling, Transformer
from titan.train import main

ARGS = {
    # GQA, llama3 frequency scaling with a short original context (so that every band of the scaling is used).
    "scaled_untied": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                               rope_theta=10000.0, max_seq_len=64, norm_eps=1e-6,
                               rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=32)),
    "tied": ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=257, multiple_of=16,
                      rope_theta=500000.0, max_seq_len=64, tie_embeddings=True),
}


def _model(args: ModelArgs) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial norm weights, so a swapped norm would show
                p.add_(0.1 * torch.randn_like(p))
            if "wq" in name or "wk" in name:  # sharp attention, so that RoPE (and its layout) changes the logits
                p.mul_(10)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The reference: HF LlamaForCausalLM's forward, from its config.json and safetensors only.


def _hf_inv_freq(cfg: dict) -> torch.Tensor:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    s = cfg.get("rope_scaling")
    if s is None:
        return inv_freq
    assert s["rope_type"] == "llama3"
    factor, low, high, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], \
        s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rms_norm(x, w, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return w * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def hf_reference_logits(folder, tokens: torch.Tensor) -> torch.Tensor:
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "model.safetensors"))
    n_h, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // n_h
    eps = cfg["rms_norm_eps"]
    bsz, seq = tokens.shape
    freqs = torch.outer(torch.arange(seq).float(), _hf_inv_freq(cfg))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    mask = torch.full((seq, seq), float("-inf")).triu(1)

    h = w["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(bsz, seq, n_h, d).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(bsz, seq, n_kv, d).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(bsz, seq, n_kv, d).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(n_h // n_kv, dim=1)  # repeat_kv
        v = v.repeat_interleave(n_h // n_kv, dim=1)
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(d) + mask, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(bsz, seq, n_h * d)
        h = h + out @ w[p + "self_attn.o_proj.weight"].T
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    h = _rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return h @ head.T


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ARGS))
def test_logits_match_hf_reference(tmp_path, name):
    args = ARGS[name]
    model = _model(args)
    hf.save(model.state_dict(), args, tmp_path, bos_id=1, eos_id=2)
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    ref = hf_reference_logits(tmp_path, tokens)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ref, ours, rtol=1e-5, atol=1e-5)
    # The permutation matters: without it the logits differ by far more than the tolerance.
    assert not torch.allclose(hf_reference_logits_unpermuted(tmp_path, tokens, args, model), ours, atol=1e-3)


def hf_reference_logits_unpermuted(folder, tokens, args, model):
    """Control: the reference fed titan's q/k rows as they are (no rotate-half permutation)."""
    w = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    for i in range(args.n_layers):
        for t, h in (("wq", "q_proj"), ("wk", "k_proj")):
            w[f"model.layers.{i}.self_attn.{h}.weight"] = state[f"layers.{i}.attention.{t}.weight"]
    other = folder / "unpermuted"
    other.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in w.items()}, str(other / "model.safetensors"))
    (other / "config.json").write_text((folder / "config.json").read_text())
    return hf_reference_logits(other, tokens)


@pytest.mark.parametrize("name", list(ARGS))
def test_export_import_roundtrip_and_config(tmp_path, name):
    args = ARGS[name]
    state = _model(args).state_dict()
    hf.save(state, args, tmp_path / "one", bos_id=7, eos_id=8)
    # A tiny shard size forces model-0000k-of-0000n.safetensors + index.
    hf.save(state, args, tmp_path / "sharded", bos_id=7, eos_id=8, shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    for folder in ("one", "sharded"):
        got_args, got = hf.load(tmp_path / folder)
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state)
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta",
                      "rope_scaling", "tie_embeddings", "ffn_hidden_dim", "head_dim"):
            assert getattr(got_args, field) == getattr(args, field), field

    cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (7, 8)
    assert cfg["tie_word_embeddings"] == args.tie_embeddings
    assert ("lm_head.weight" in load_file(str(tmp_path / "one" / "model.safetensors"))) == (not args.tie_embeddings)
    assert cfg["intermediate_size"] == args.ffn_hidden_dim and cfg["rms_norm_eps"] == args.norm_eps
    if args.rope_scaling is None:
        assert cfg["rope_scaling"] is None
    else:
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    gen = json.loads((tmp_path / "one" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (7, 8)


def test_training_export_and_hf_initial_load(tmp_path):
    """last_save_in_hf writes step-N-hf; starting a run from it (initial_load_in_hf) trains exactly like starting
    from the same weights through DCP; convert_checkpoint.py's to-hf writes the same tensors."""
    base = ["--config", TINY, "--training.steps", "1"]
    first = tmp_path / "first"
    assert main([*base, "--job.dump_folder", str(first), "--checkpoint.enable", "--checkpoint.last_save_in_hf"]) == 0
    exported = first / "checkpoint" / "step-1-hf"
    assert {p.name for p in exported.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json",
                                                     "tokenizer.json", "tokenizer_config.json", "tokenizer.model"}

    assert main([*base, "--job.dump_folder", str(tmp_path / "from_hf"), "--checkpoint.initial_load_path",
                 str(exported), "--checkpoint.initial_load_in_hf"]) == 0
    assert main([*base, "--job.dump_folder", str(tmp_path / "from_dcp"), "--checkpoint.initial_load_path",
                 str(first / "checkpoint" / "step-1")]) == 0
    assert losses(tmp_path / "from_hf") == losses(tmp_path / "from_dcp")
    assert losses(tmp_path / "from_hf") != losses(first)  # it did start from the trained weights

    out = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "to-hf", str(first / "checkpoint/step-1"),
                          str(tmp_path / "converted"), "--flavor", "tiny", "--max-seq-len", "32", "--dtype", "float32"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    a, b = load_file(str(exported / "model.safetensors")), load_file(str(tmp_path / "converted" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # from-hf: back to a model-only DCP folder, which starts a run exactly like the HF folder does.
    out = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "from-hf", str(exported),
                          str(tmp_path / "back" / "step-0")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert main([*base, "--job.dump_folder", str(tmp_path / "from_back"), "--checkpoint.initial_load_path",
                 str(tmp_path / "back" / "step-0")]) == 0
    assert losses(tmp_path / "from_back") == losses(tmp_path / "from_hf")


def _hf_bpe_encode(tok: dict, text: str) -> list[int]:
    """Encode as HF `tokenizers` does with this tokenizer.json: regex split, byte-level characters, then the
    lowest-ranked merge first (the algorithm, re-implemented here; the `tokenizers` package is not needed)."""
    import regex

    model, (split, _) = tok["model"], tok["pre_tokenizer"]["pretokenizers"]
    merge_rank = {tuple(m.split(" ")): i for i, m in enumerate(model["merges"])}
    byte_chars = hf._bytes_to_unicode()
    ids = []
    for piece in regex.findall(split["pattern"]["Regex"], text):
        word = [byte_chars[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(merge_rank.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
        ids += [model["vocab"][w] for w in word]
    return ids


def test_tokenizer_json_encodes_like_tiktoken(tmp_path):
    from titan.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("")
    hf.write_tokenizer(tokenizer, tmp_path, max_seq_len=256)
    tok = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tok["model"]["vocab"]) + len(tok["added_tokens"]) == tokenizer.vocab_size
    assert {t["content"]: t["id"] for t in tok["added_tokens"]} == tokenizer.special_tokens
    text = (REPO / "titan/assets/data/austen/validation.txt").read_text()[:3000]
    text += " naïve café — 1234567 tabs\tand\n\nnewlines  spaces, ünïcödé ✓ 日本語"
    assert _hf_bpe_encode(tok, text) == tokenizer.encode(text)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")


def test_transformers_loads_the_export(tmp_path):
    """The real consumer: Hugging Face transformers (not a titan dependency; skipped where it is not installed, e.g.
    CI) loads the exported folder as-is, its logits equal titan's, and its tokenizer encodes like titan's."""
    transformers = pytest.importorskip("transformers")
    from titan.data.tokenizer import load_tokenizer
    from titan.models.llama import RopeScaling, Transformer, model_args
    from titan.parallel.parallelize import materialize

    tok = load_tokenizer("")
    text = "It is a truth universally acknowledged, that a single man — 1234 ünïcödé"
    for extra in ({}, {"tie_embeddings": True}, {"rope_scaling": RopeScaling(original_max_position_embeddings=16)}):
        args = model_args("tiny", vocab_size=tok.vocab_size, max_seq_len=64, **extra)
        model = Transformer(args)
        materialize(model, torch.device("cpu"), 0)
        folder = hf.save(model.state_dict(), args, tmp_path / str(len(extra) and list(extra)[0]), bos_id=tok.bos_id,
                         eos_id=tok.eos_id, tokenizer=tok)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        ids = torch.tensor([tok.encode(text, bos=True)])
        with torch.no_grad():
            ours, theirs = model(ids), hf_model(ids).logits
        assert rel_error(theirs, ours) < 1e-5, extra
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
