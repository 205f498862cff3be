"""Hugging Face export/import (titan/hf.py, titan/models/hf_adapter.py, scripts/convert_checkpoint.py) for every family.

The logits test is the one that matters: titan's model and an independent pure-torch implementation of HF's Llama
and Qwen3 (written here from transformers' modeling_llama.py / modeling_qwen3.py math: rotate_half RoPE with the llama3
rope_scaling, RMSNorm on each head of q and k for Qwen3, repeat_kv, RMSNorm in fp32, SwiGLU; it shares no code with
titan.models) reading only the exported safetensors files and config.json agree within 1e-5 in fp32. `transformers`
itself is not needed; where it is installed, it loads the exports and its own Qwen3 checkpoints import into titan.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from dist_utils import REPO, TINY, load_script, losses, rel_error

from titan import hf
from titan.data import tokenizer_formats
from titan.errors import ConfigError
from titan.models import build_model, family_of
from titan.models.llama import ModelArgs, RopeScaling, Transformer
from titan.models.qwen3 import Qwen3Args
from titan.train import main

QWEN3 = str(REPO / "tests" / "configs" / "tiny_qwen3.toml")
TRANSFORMERS = "needs Hugging Face transformers (pip install transformers); titan itself does not"

ARGS = {
    # GQA, llama3 frequency scaling with a short original context (so that every band of the scaling is used).
    "scaled_untied": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                               rope_theta=10000.0, max_seq_len=64, norm_eps=1e-6,
                               rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=32)),
    "tied": ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=257, multiple_of=16,
                      rope_theta=500000.0, max_seq_len=64, tie_embeddings=True),
    # Qwen3: QK-norm, head_dim != dim / n_heads (4 x 16 on dim 48), theta 1e6; and tied (2 x 64 on dim 64).
    "qwen3_head_dim": Qwen3Args(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden_dim=80,
                                vocab_size=300, max_seq_len=64),
    "qwen3_tied": Qwen3Args(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=64, ffn_hidden_dim=96,
                            vocab_size=257, max_seq_len=64, tie_embeddings=True),
}


def _model(args) -> Transformer:
    torch.manual_seed(0)
    model = build_model(args)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial norm weights, so a swapped norm would show
                p.add_(0.1 * torch.randn_like(p))
            if "wq" in name or "wk" in name or "q_norm" in name or "k_norm" in name:
                p.mul_(10)  # sharp attention, so that RoPE (and its layout) changes the logits
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
    w = hf.read_safetensors(folder)
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
        if cfg["model_type"] == "qwen3":  # RMSNorm over each head's channels, before RoPE
            q = _rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = _rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
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
    """Control: the reference fed titan's q/k rows (and q/k norm weights) as they are (no rotate-half permutation)."""
    w = hf.read_safetensors(folder)
    state = model.state_dict()
    for i in range(args.n_layers):
        for t, h in (("wq", "q_proj"), ("wk", "k_proj")) + ((("q_norm", "q_norm"), ("k_norm", "k_norm"))
                                                             if args.qk_norm else ()):
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
    # Below the shard size, one file (DCP's Hugging Face writer names it so) and its index.
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors*")) == [
        "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    for folder in ("one", "sharded"):
        got_args, got = hf.load(tmp_path / folder)
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state)
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta",
                      "rope_scaling", "tie_embeddings", "ffn_hidden_dim", "head_dim"):
            assert getattr(got_args, field) == getattr(args, field), field

    cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    adapter = family_of(args).hf
    assert cfg["architectures"] == [adapter.architecture] and cfg["model_type"] == adapter.model_type
    assert cfg["head_dim"] == args.head_dim and cfg["num_attention_heads"] == args.n_heads
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (7, 8)
    assert cfg["tie_word_embeddings"] == args.tie_embeddings
    assert ("lm_head.weight" in hf.read_safetensors(tmp_path / "one")) == (not args.tie_embeddings)
    assert cfg["intermediate_size"] == args.ffn_hidden_dim and cfg["rms_norm_eps"] == args.norm_eps
    if args.rope_scaling is None:
        assert cfg["rope_scaling"] is None
    else:
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    gen = json.loads((tmp_path / "one" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (7, 8)
    # Weights get the mode of the folder's other files (safetensors alone would make them 0600, owner-only).
    for folder in ("one", "sharded"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / folder).iterdir()}
        assert set(modes.values()) == {modes["config.json"]}, modes


def test_training_export_and_hf_initial_load(tmp_path):
    """last_save_in_hf writes step-N-hf; starting a run from it (initial_load_in_hf) trains exactly like starting
    from the same weights through DCP; convert_checkpoint.py's to-hf writes the same tensors."""
    base = ["--config", TINY, "--training.steps", "1"]
    first = tmp_path / "first"
    assert main([*base, "--job.dump_folder", str(first), "--checkpoint.enable", "--checkpoint.last_save_in_hf"]) == 0
    exported = first / "checkpoint" / "step-1-hf"
    assert {p.name for p in exported.iterdir()} >= {"model-00001-of-00001.safetensors", "model.safetensors.index.json",
                                                     "config.json", "generation_config.json",
                                                     "tokenizer.json", "tokenizer_config.json", "tokenizer.model"}

    # The model's own config outlives training on a shorter window (issue 29): a base with 8192 positions and a field
    # titan does not read, trained at seq_len 32, exports both as they were.
    _write_config(exported, max_position_embeddings=8192, custom_field="kept")
    assert main([*base, "--job.dump_folder", str(tmp_path / "from_hf"), "--checkpoint.initial_load_path",
                 str(exported), "--checkpoint.initial_load_in_hf", "--checkpoint.enable",
                 "--checkpoint.last_save_in_hf"]) == 0
    again = json.loads((tmp_path / "from_hf" / "checkpoint" / "step-1-hf" / "config.json").read_text())
    assert (again["max_position_embeddings"], again["custom_field"]) == (8192, "kept")
    assert "chat_template" not in json.loads((exported / "tokenizer_config.json").read_text())  # pre-training
    assert main([*base, "--job.dump_folder", str(tmp_path / "from_dcp"), "--checkpoint.initial_load_path",
                 str(first / "checkpoint" / "step-1")]) == 0
    assert losses(tmp_path / "from_hf") == losses(tmp_path / "from_dcp")
    assert losses(tmp_path / "from_hf") != losses(first)  # it did start from the trained weights

    out = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "to-hf", str(first / "checkpoint/step-1"),
                          str(tmp_path / "converted"), "--flavor", "tiny", "--max-seq-len", "32", "--dtype", "float32"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    a, b = hf.read_safetensors(exported), hf.read_safetensors(tmp_path / "converted")
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
    byte_chars = tokenizer_formats.bytes_to_unicode()
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
    tokenizer_formats.write_tokenizer_json(tokenizer, tmp_path, max_seq_len=256)
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


# ---------------------------------------------------------------------------------------------------------------
# Families: detection from config.json, and Qwen3 against transformers


def _write_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_model_type_picks_the_family_and_unsupported_ones_are_one_line(tmp_path):
    args = ARGS["qwen3_head_dim"]
    state = _model(args).state_dict()
    hf.save(state, args, tmp_path, bos_id=None, eos_id=2)
    got_args, _ = hf.load(tmp_path)
    assert type(got_args) is Qwen3Args and got_args == args
    llama = ARGS["scaled_untied"]
    with pytest.raises(ConfigError, match=r"config.json describes a qwen3 model \(Qwen3ForCausalLM\), the run builds "
                                          r"model.name=llama3"):
        hf.check_compatible(llama, got_args, "checkpoint.initial_load_path=x")
    # transformers >= 5 writes rope_parameters instead of rope_theta; both spellings read the same.
    cfg = json.loads((tmp_path / "config.json").read_text())
    _write_config(tmp_path, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg_v5 = {k: v for k, v in json.loads((tmp_path / "config.json").read_text()).items() if k != "rope_theta"}
    (tmp_path / "config.json").write_text(json.dumps(cfg_v5))
    assert hf.load(tmp_path)[0] == args
    for changes, expect in (({"model_type": "mistral"}, "model_type 'mistral' is not supported (titan reads "
                                                        "deepseek_v3, gpt_oss, llama, qwen3, qwen3_moe)"),
                            ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
                            ({"use_sliding_window": True}, "use_sliding_window=true"),
                            ({"attention_bias": True}, "attention_bias=True is not supported")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))
        with pytest.raises(ConfigError) as e:
            hf.load(tmp_path)
        assert expect in str(e.value) and "config.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["qwen3_head_dim", "qwen3_tied"])
def test_transformers_loads_the_qwen3_export(tmp_path, name):
    """titan -> transformers: the exported folder loads as Qwen3ForCausalLM and gives titan's logits."""
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS)
    args = ARGS[name]
    model = _model(args)
    folder = hf.save(model.state_dict(), args, tmp_path, bos_id=None, eos_id=2)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert type(theirs_model).__name__ == "Qwen3ForCausalLM"
    tokens = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), theirs_model(tokens).logits
    assert rel_error(theirs, ours) < 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_qwen3_checkpoint_imports_into_titan(tmp_path, tied):
    """transformers -> titan: a randomly initialised Qwen3ForCausalLM (head_dim 16 on 4 heads of dim 48) saved with
    save_pretrained imports through titan.hf.load and gives transformers' logits."""
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS)
    config = transformers.Qwen3Config(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    theirs_model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in theirs_model.named_parameters():
            if "norm" in name:  # non-trivial (and per-channel distinct) norm weights, so a wrong permutation shows
                p.add_(0.3 * torch.randn_like(p))
    theirs_model.save_pretrained(str(tmp_path))
    args, state = hf.load(tmp_path)
    assert (type(args), args.head_dim, args.n_heads, args.dim, args.tie_embeddings) == (Qwen3Args, 16, 4, 48, tied)
    model = build_model(args)
    model.load_state_dict(state)
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.eval()(tokens), theirs_model(tokens).logits
    assert rel_error(ours, theirs) < 1e-4


def test_qwen3_training_export_import_convert_and_generate(tmp_path, capsys, one_thread):
    """For Qwen3 as for Llama: last_save_in_hf writes a Qwen3ForCausalLM folder; a run started from it
    (initial_load_in_hf) trains exactly like one started from the same weights through DCP; convert_checkpoint.py
    to-hf --model qwen3 writes the same tensors; generate.py --hf continues a prompt from the folder as the model
    read back through DCP does."""
    base = ["--config", QWEN3, "--training.steps", "1", "--validation.enable", "false"]
    first = tmp_path / "first"
    assert main([*base, "--job.dump_folder", str(first), "--checkpoint.enable", "--checkpoint.last_save_in_hf"]) == 0
    exported = first / "checkpoint" / "step-1-hf"
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    # The model's own config outlives training on a shorter window (issue 29): a base with 8192 positions and a field
    # titan does not read, trained at seq_len 32, exports both as they were.
    _write_config(exported, max_position_embeddings=8192, custom_field="kept")
    assert main([*base, "--job.dump_folder", str(tmp_path / "from_hf"), "--checkpoint.initial_load_path",
                 str(exported), "--checkpoint.initial_load_in_hf", "--checkpoint.enable",
                 "--checkpoint.last_save_in_hf"]) == 0
    again = json.loads((tmp_path / "from_hf" / "checkpoint" / "step-1-hf" / "config.json").read_text())
    assert (again["max_position_embeddings"], again["custom_field"]) == (8192, "kept")
    assert "chat_template" not in json.loads((exported / "tokenizer_config.json").read_text())  # pre-training
    assert main([*base, "--job.dump_folder", str(tmp_path / "from_dcp"), "--checkpoint.initial_load_path",
                 str(first / "checkpoint" / "step-1")]) == 0
    assert losses(tmp_path / "from_hf") == losses(tmp_path / "from_dcp") != losses(first)
    # A Llama run cannot start from it: one line naming the path and both families.
    assert main(["--config", TINY, "--job.dump_folder", str(tmp_path / "llama"), "--checkpoint.initial_load_path",
                 str(exported), "--checkpoint.initial_load_in_hf"]) == 2

    convert = load_script("convert_checkpoint")
    assert convert.main(["to-hf", str(first / "checkpoint/step-1"), str(tmp_path / "converted"), "--model", "qwen3",
                         "--flavor", "tiny", "--max-seq-len", "32", "--dtype", "float32"]) == 0
    assert "Qwen3ForCausalLM" in capsys.readouterr().out
    a, b = hf.read_safetensors(exported), hf.read_safetensors(tmp_path / "converted")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Issue 31: the wrong family said only "CheckpointException ranks:dict_keys([0])", and converting into an
    # existing export deleted its model.safetensors. Both are one line now, and nothing is changed.
    before = {p.name: p.read_bytes() for p in (tmp_path / "converted").iterdir()}
    step = str(first / "checkpoint" / "step-1")
    for dst, model, expect in ((tmp_path / "as_llama", "llama3", "which --model llama3 does not make"),
                               (tmp_path / "converted", "qwen3", "convert into a new or empty folder")):
        assert convert.main(["to-hf", step, str(dst), "--model", model, "--flavor", "tiny"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
    assert {p.name: p.read_bytes() for p in (tmp_path / "converted").iterdir()} == before

    generate = load_script("generate")
    for source in (["--hf", str(exported)], ["--checkpoint", str(first / "checkpoint" / "step-1")]):
        assert generate.main([*source, "--prompt", "Emma Woodhouse", "--max_new_tokens", "8", "--max_seq_len",
                              "32"]) == 0
    from_hf, from_dcp = capsys.readouterr().out.splitlines()
    assert from_hf == from_dcp and from_hf.strip()
