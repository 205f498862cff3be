"""The model registry (titan/models/__init__.py) and the Qwen3 family: config choices and the registry agree, flavors
and their vocabulary rule, official Qwen3 parameter counts, what QK-norm does to attention, and Qwen3's chat
template. The Qwen3 forward pass against an independent implementation of Hugging Face's is in tests/test_hf.py, its
parallel layouts in tests/test_parallel.py; Llama's model tests are tests/test_model.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from titan.config import Model
from titan.data.chat import chat_template
from titan.data.tokenizer import load_tokenizer
from titan.errors import ConfigError
from titan.models import FAMILIES, build_model, family, family_of, model_args
from titan.models.layers import count_params
from titan.models.qwen3 import FLAVORS, Qwen3Args
from titan.parallel.parallelize import materialize


def test_config_choices_are_the_registry():
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(Model)}["name"]
    assert set(choices) == set(FAMILIES)
    for name, fam in FAMILIES.items():
        assert fam.name == name and all(args.family == name for args in fam.flavors.values())
        assert family_of(next(iter(fam.flavors.values()))) is fam


def test_flavor_and_vocabulary_rules():
    with pytest.raises(ConfigError, match=r"model.flavor='7B' is not one of tiny, debugmodel, 0.6B, .* "
                                          r"\(model.name=qwen3\)"):
        model_args("qwen3", "7B")
    with pytest.raises(ConfigError, match="model.name='mistral' is not one of llama3, qwen3"):
        family("mistral")
    # Test flavors take the tokenizer's vocabulary; the official ones keep their checkpoints' 151,936 rows.
    assert model_args("qwen3", "tiny", tokenizer_vocab=4096, max_seq_len=32).vocab_size == 4096
    assert model_args("qwen3", "0.6B", tokenizer_vocab=151_669).vocab_size == 151_936
    assert model_args("llama3", "8B", tokenizer_vocab=128_256).vocab_size == 128_256
    with pytest.raises(ConfigError, match="model.tokenizer_path: the tokenizer has 200000 tokens, more than the "
                                          "151936 rows of qwen3 8B's embedding"):
        model_args("qwen3", "8B", tokenizer_vocab=200_000)


def qwen3_count(dim, hidden, layers, heads, tied, kv=8, head_dim=128, vocab=151_936) -> tuple[int, int]:
    """(total, non-embedding) parameters from a Qwen3 config.json's numbers, by hand: q/k/v/o projections, q/k norms
    of head_dim, SwiGLU, two norms per block, the final norm, and the embedding (twice when untied)."""
    block = 2 * dim * heads * head_dim + 2 * dim * kv * head_dim + 2 * head_dim + 3 * dim * hidden + 2 * dim
    embeddings = vocab * dim * (1 if tied else 2)
    return embeddings + layers * block + dim, layers * block + dim


# flavor -> (exact count, the published size and non-embedding size in billions, as the Qwen3 model cards round them)
OFFICIAL = {
    "0.6B": (596_049_920, 0.6, 0.44), "1.7B": (1_720_574_976, 1.7, 1.4), "4B": (4_022_468_096, 4.0, 3.6),
    "8B": (8_190_735_360, 8.2, 6.95), "14B": (14_768_307_200, 14.8, 13.2), "32B": (32_762_123_264, 32.8, 31.2),
}
CONFIG_JSON = {  # hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, tie_word_embeddings
    "0.6B": (1024, 3072, 28, 16, True), "1.7B": (2048, 6144, 28, 16, True), "4B": (2560, 9728, 36, 32, True),
    "8B": (4096, 12288, 36, 32, False), "14B": (5120, 17408, 40, 40, False), "32B": (5120, 25600, 64, 64, False),
}


@pytest.mark.parametrize("flavor", list(OFFICIAL))
def test_qwen3_official_parameter_counts(flavor):
    exact, total_b, non_embedding_b = OFFICIAL[flavor]
    total, non_embedding = qwen3_count(*CONFIG_JSON[flavor])
    assert total == exact
    digits = len(str(non_embedding_b).split(".")[1])
    assert (round(total / 1e9, 1), round(non_embedding / 1e9, digits)) == (total_b, non_embedding_b)
    with torch.device("meta"):
        model = build_model(model_args("qwen3", flavor))
    n, emb = count_params(model)  # tied embeddings counted once
    assert (n, emb) == (exact, 151_936 * CONFIG_JSON[flavor][0])
    assert model.layers["0"].attention.q_norm.weight.shape == (128,)


def _tiny(**overrides) -> torch.nn.Module:
    args = model_args("qwen3", "tiny", max_seq_len=16, **overrides)
    with torch.device("meta"):
        model = build_model(args)
    materialize(model, torch.device("cpu"), seed=0)
    return model.eval()


def test_qwen3_shapes_and_causality():
    model = _tiny()
    attn = model.layers["0"].attention
    # head_dim 32 x 4 heads = 128 channels of q on a 64-wide model; K/V: 2 heads.
    assert (attn.wq.weight.shape, attn.wk.weight.shape, attn.wo.weight.shape) == ((128, 64), (64, 64), (64, 128))
    tokens = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 9] += 1
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :9], b[:, :9]) and not torch.allclose(a[:, 9:], b[:, 9:])


def test_qk_norm_normalises_each_head_before_rope():
    """Scaling one query head's (or one K/V head's) projection rows changes nothing with QK-norm, since each head is
    RMS-normalised; without QK-norm the same scaling changes the logits. (norm_eps ~0, so that the eps inside the
    root does not count either.)"""
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    for qk_norm in (True, False):
        model = _tiny(qk_norm=qk_norm, norm_eps=1e-20)
        with torch.no_grad():
            before = model(tokens)
            for block in model.layers.values():
                block.attention.wq.weight[32:64] *= 30.0  # query head 1
                block.attention.wk.weight[:32] *= 30.0  # K/V head 0: scores of heads 0 and 1 x 30 (x 900)
            after = model(tokens)
        change = ((after - before).norm() / before.norm()).item()
        assert change < 1e-5 if qk_norm else change > 1e-2, change  # fp32 rounding only / a real change


# ---------------------------------------------------------------------------------------------------------------
# Qwen3's chat template: ChatML, and replies after the last user message open with a <think> block


@pytest.fixture(scope="module")
def chat_tok():
    return load_tokenizer("debug_chat")


def _render(tok, messages, **kw):
    ids, targets = chat_template(tok, "qwen3").render(messages, **kw)
    return tok.decode(ids), tok.decode([i for i, t in zip(ids, targets) if t])


def test_qwen3_chat_template(chat_tok):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "<think>\nThey greet.\n</think>\n\nHello!"},
                    {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Emma."}]
    text, learned = _render(chat_tok, conversation)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n"  # an earlier reply loses its reasoning
                    "<|im_start|>user\nName?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\nEmma.<|im_end|>\n")
    assert learned == "Hello!<|im_end|><think>\n\n</think>\n\nEmma.<|im_end|>"
    # Reasoning of the final reply is kept; the generation prompt has an empty block (thinking off).
    text, _ = _render(chat_tok, [{"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "<think>add</think>4"}])
    assert text.endswith("<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>\n")
    text, learned = _render(chat_tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert learned == ""
    # Plain ChatML has no think blocks.
    ids, _ = chat_template(chat_tok, "chatml").render(conversation[-2:])
    assert chat_tok.decode(ids) == "<|im_start|>user\nName?<|im_end|>\n<|im_start|>assistant\nEmma.<|im_end|>\n"


def test_auto_picks_qwen3_when_the_tokenizer_has_think_tokens(chat_tok):
    assert chat_template(chat_tok, "auto").name == "chatml"  # <|im_start|> but no <think>

    class WithThink:  # the same tokenizer with Qwen3's <think> added tokens
        special_tokens = {**chat_tok.special_tokens, "<think>": 5000, "</think>": 5001}
        encode, decode = chat_tok.encode, chat_tok.decode

    assert chat_template(WithThink(), "auto").name == "qwen3"


def test_qwen3_args_state_their_head_dim():
    args = Qwen3Args(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden_dim=64)
    assert (args.head_dim, args.ffn_hidden_dim, args.qk_norm, args.rope_theta, args.norm_eps) == (16, 64, True,
                                                                                                   1e6, 1e-6)
    with pytest.raises(ValueError, match="n_kv_heads"):
        Qwen3Args(n_heads=4, n_kv_heads=3)
    assert FLAVORS["8B"].tie_embeddings is False and FLAVORS["4B"].tie_embeddings is True
