"""gpt-oss (titan/models/gpt_oss.py, sinks.py): official parameter counts against transformers' own build of the same
configs (meta device), Hugging Face folders both ways against transformers (logits within 1e-4 in fp32, the same
greedy tokens), the sliding window and the sinks by what they do, the clamped SwiGLU, and the released MXFP4 expert
weights dequantised on import (against transformers' own dequantisation). The tests that need transformers skip
without it. Parallel layouts: tests/test_parallel.py, tests/test_expert_parallel.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from dist_utils import rel_error
from safetensors.torch import save_file

from titan import hf, models
from titan.errors import ConfigError
from titan.generation import generate
from titan.models.gpt_oss import FULL, SLIDING, dequantize_mxfp4
from titan.models.layers import count_params
from titan.models.moe import active_params, clamped_swiglu
from titan.models.sinks import sink_attention, window_mask

TRANSFORMERS = "needs Hugging Face transformers (pip install transformers); titan itself does not"

OFFICIAL = {"20B": 20_914_757_184, "120B": 116_829_156_672}


# flavor -> (all parameters, active per token) as docs/config.md's table gives them (OpenAI's cards: 21B / 3.6B and
# 117B / 5.1B active, the latter without the embedding's 0.58B).
COUNTS = {"tiny": (777_584, 627_056), "debugmodel": (12_795_792, 4_495_248),
          "20B": (OFFICIAL["20B"], 4_187_440_704), "120B": (OFFICIAL["120B"], 5_711_982_912)}


@pytest.mark.parametrize("flavor", list(COUNTS))
def test_parameter_counts(flavor):
    with torch.device("meta"):
        model = models.build_model(models.model_args("gpt_oss", flavor))
    assert (count_params(model)[0], active_params(model)) == COUNTS[flavor]
    window = models.model_args("gpt_oss", flavor).sliding_window
    assert [model.layers[str(i)].attention.window for i in range(4)] == [window, 0, window, 0]


def test_sink_scores_take_4_gib_per_sequence_and_layer_at_4096_tokens():
    """The dense path's fp32 probabilities of the 20B flavor's 64 heads (docs/models.md, the GPU presets)."""
    from titan.config import Training
    from titan.memory import MicroBatch, precision
    from titan.memory_attention import attention_bytes

    args = models.model_args("gpt_oss", "20B")
    saved = attention_bytes(args, MicroBatch(rows=1, seq_len=4096), precision(Training(), fsdp=True))
    assert 4.0 <= 4 * 64 * 4096 * 4097 / 2**30 < 4.01 and saved > 4 * 2**30


@pytest.mark.parametrize("flavor", list(OFFICIAL))
def test_official_parameter_counts_equal_transformers(flavor):
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS)
    args = models.model_args("gpt_oss", flavor)
    config = transformers.AutoConfig.for_model(**hf.hf_config(args, None, 200002, torch.bfloat16))
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    assert type(theirs).__name__ == "GptOssForCausalLM"
    assert sum(p.numel() for p in theirs.parameters()) == OFFICIAL[flavor]


# ---------------------------------------------------------------------------------------------------------------
# Pieces


def _model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build_model(args)
    model.init_weights()
    model.init_buffers()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            if "router" in name:
                p.normal_(std=1.0)  # distinct scores: no near-ties in the top-k choice
            if "sinks" in name or name.endswith((".b1", ".b2", ".b3", ".bias")):
                p.normal_(std=0.3)
    return model.eval()


def test_sliding_layers_see_only_the_window():
    """Changing token 0 changes the outputs of a sliding layer only up to position window - 1 (it drops out of every
    later query's window), and those of a full layer everywhere."""
    model = _model(models.model_args("gpt_oss", "tiny", max_seq_len=32))
    x = torch.randn(1, 20, 64)
    changed = x.clone()
    changed[0, 0] += 1.0
    for layer, last_seen in (("0", 7), ("1", 19)):
        attention = model.layers[layer].attention
        with torch.no_grad():
            diff = (attention(x, model.freqs_cis) - attention(changed, model.freqs_cis)).abs().amax(-1)[0]
        assert (diff[: last_seen + 1] > 0).all() and (diff[last_seen + 1:] == 0).all(), (layer, diff)
    assert window_mask(torch.arange(4), torch.arange(4), 2).tolist() == [
        [True, False, False, False], [True, True, False, False], [False, True, True, False], [False, False, True, True]]


def test_sinks_take_attention_mass():
    """A sink at -inf is plain softmax attention (SDPA); a very large sink takes all the mass (output 0); in between
    the output is plain attention scaled by sigmoid(log-sum-exp - sink)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    allowed = window_mask(torch.arange(6), torch.arange(6), None)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(sink_attention(q, k, v, allowed, torch.full((4,), -1e9)), plain, atol=1e-6)
    assert sink_attention(q, k, v, allowed, torch.full((4,), 1e9)).abs().max() == 0
    sinks = torch.randn(4)
    kr = k.repeat_interleave(2, dim=1)
    lse = ((q @ kr.transpose(-1, -2)) / 8 ** 0.5).masked_fill(~allowed, float("-inf")).logsumexp(-1, keepdim=True)
    expected = plain * torch.sigmoid(lse - sinks.view(1, 4, 1, 1))
    assert torch.allclose(sink_attention(q, k, v, allowed, sinks), expected, atol=1e-6)


def test_clamped_swiglu():
    gate, up = torch.tensor([-10.0, 0.0, 3.0, 10.0]), torch.tensor([-10.0, 1.0, 2.0, 10.0])
    out = clamped_swiglu(gate, up, alpha=1.702, limit=7.0)
    g, u = torch.tensor([-10.0, 0.0, 3.0, 7.0]), torch.tensor([-7.0, 1.0, 2.0, 7.0])
    assert torch.allclose(out, (u + 1) * g * torch.sigmoid(1.702 * g))


def test_biased_experts_grouped_and_loop_agree():
    """The grouped matmul (each row gets its expert's biases) and the per-expert loop give the same rows and
    gradients."""
    from titan.models.moe import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(16, 8, 4, grouped_mm=True, bias=True, glu=clamped_swiglu)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x, counts = torch.randn(10, 16, requires_grad=True), torch.tensor([3, 0, 5, 2])
    grouped = experts(x, counts)
    (g1,) = torch.autograd.grad(grouped.square().sum(), x)
    experts.grouped_mm = False
    loop = experts(x, counts)
    (g2,) = torch.autograd.grad(loop.square().sum(), x)
    assert rel_error(grouped, loop) < 1e-6 and rel_error(g1, g2) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: GptOssForCausalLM both ways


def _hf_config(transformers, **overrides):
    return transformers.GptOssConfig(**{
        "vocab_size": 300, "hidden_size": 48, "intermediate_size": 24, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 6,
        "num_experts_per_tok": 2, "sliding_window": 6, "max_position_embeddings": 256, "rope_parameters": {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
            "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0}, **overrides})


def _greedy_agree(ours, theirs, vocab):
    prompt = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    mine = generate(ours, [prompt], 8)[0]
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert mine == out[0, len(prompt):].tolist()


def test_transformers_checkpoint_imports_into_titan(tmp_path):
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS)
    torch.manual_seed(0)
    theirs = transformers.GptOssForCausalLM(_hf_config(transformers)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if "router" in name:
                p.normal_(std=1.0)
            if "experts" in name:
                p.normal_(std=0.1)
            if "sinks" in name or name.endswith("bias"):
                p.normal_(std=0.3)
    theirs.save_pretrained(str(tmp_path))
    args, state = hf.load(tmp_path)
    assert (args.family, args.n_experts, args.sliding_window, args.layer_types, args.rope_scaling.truncate) == \
        ("gpt_oss", 6, 6, None, False)
    model = models.build_model(args)
    model.init_buffers()
    model.load_state_dict(state, strict=True)  # the routers' expert biases (titan's own) come at zero
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(model.eval()(tokens), theirs(tokens).logits) < 1e-4
    _greedy_agree(model, theirs, 300)


def test_transformers_loads_the_export(tmp_path):
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS)
    args = models.model_args("gpt_oss", "tiny", tokenizer_vocab=300, max_seq_len=64)
    model = _model(replace(args, layer_types=(SLIDING, SLIDING, FULL, SLIDING)))
    folder = hf.save(model.state_dict(), model.args, tmp_path, bos_id=None, eos_id=2)
    config = json.loads((folder / "config.json").read_text())
    assert config["layer_types"] == [SLIDING, SLIDING, FULL, SLIDING] and config["attention_bias"] is True
    back_args, state = hf.load(folder)
    assert back_args == replace(model.args, max_seq_len=back_args.max_seq_len)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert type(theirs).__name__ == "GptOssForCausalLM"
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(theirs(tokens).logits, model(tokens)) < 1e-4
    _greedy_agree(model, theirs, 300)


def _quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An [E, in, out] weight whose values are fp4 codes times a power of two per 32 inputs, as (blocks, scales) in
    OpenAI's layout: [E, out, in/32, 16] uint8 and [E, out, in/32] uint8 (exponent + 127)."""
    e, n_in, n_out = w.shape
    codes = torch.randint(0, 16, (e, n_out, n_in // 32, 32), generator=torch.Generator().manual_seed(0))
    scales = torch.randint(120, 130, (e, n_out, n_in // 32), generator=torch.Generator().manual_seed(1))
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, scales.to(torch.uint8)


def test_mxfp4_experts_are_dequantised_on_import(tmp_path):
    """A folder as OpenAI released it (experts as MXFP4 *_blocks / *_scales, quantization_config mxfp4) imports with
    the experts dequantised exactly (transformers' own dequantisation agrees where installed)."""
    args = models.model_args("gpt_oss", "tiny", tokenizer_vocab=300, max_seq_len=32)
    args = replace(args, dim=64, moe_hidden_dim=32)
    model = _model(args)
    folder = hf.save(model.state_dict(), args, tmp_path, bos_id=None, eos_id=2)
    tensors = hf.read_safetensors(folder)
    packed = {}
    for name in [k for k in tensors if k.endswith(("gate_up_proj", "down_proj"))]:
        blocks, scales = _quantize_mxfp4(tensors.pop(name))
        packed[name] = dequantize_mxfp4(blocks, scales)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))
    _, state = hf.load(folder)
    w = packed["model.layers.1.mlp.experts.gate_up_proj"]  # [E, dim, 2 x hidden], gate and up interleaved
    assert torch.equal(state["layers.1.feed_forward.experts.w1"], w[..., 0::2].transpose(1, 2))
    assert torch.equal(state["layers.1.feed_forward.experts.w2"],
                       packed["model.layers.1.mlp.experts.down_proj"].transpose(1, 2))
    assert state["layers.1.feed_forward.experts.w1"].abs().max() > 0
    try:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    except ImportError:
        return
    blocks, scales = tensors["model.layers.0.mlp.experts.down_proj_blocks"], \
        tensors["model.layers.0.mlp.experts.down_proj_scales"]
    assert torch.equal(dequantize_mxfp4(blocks, scales), convert_moe_packed_tensors(blocks, scales,
                                                                                    dtype=torch.float32))


@pytest.mark.parametrize("change, needle", [
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quant_method='bitsandbytes' is not supported"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling type 'longrope'"),
    ({"layer_types": ["sliding_attention"]}, "layer_types must name"),
])
def test_unsupported_config_is_one_line(tmp_path, change, needle):
    args = models.model_args("gpt_oss", "tiny", tokenizer_vocab=300, max_seq_len=32)
    folder = hf.save(_model(args).state_dict(), args, tmp_path, bos_id=None, eos_id=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError) as e:
        hf.load(folder)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_lora_keeps_the_attention_biases():
    """LoRA on gpt-oss's biased projections keeps each bias (frozen, with its weight): a fresh adapter leaves the
    logits as they were."""
    from titan.config import LoRA
    from titan.models import lora

    model = _model(models.model_args("gpt_oss", "tiny", max_seq_len=32))
    tokens = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        lora.apply_lora(model, LoRA(enable=True, rank=4))
        lora.init_adapters(model)
        after = model(tokens)
    wq = model.layers["0"].attention.wq
    assert isinstance(wq, lora.LoRALinear) and wq.bias is not None and not wq.bias.requires_grad
    assert torch.equal(before, after)


def test_an_export_from_a_released_folder_states_no_quantization(tmp_path):
    """A run that started from OpenAI's MXFP4 folder keeps that folder's config.json on export (titan/hf.py), but
    its weights go out dequantised: quantization_config stays behind."""
    args = models.model_args("gpt_oss", "tiny", tokenizer_vocab=300, max_seq_len=32)
    base = {**hf.hf_config(args, None, 2, torch.bfloat16), "quantization_config": {"quant_method": "mxfp4"},
            "max_position_embeddings": 131072}
    folder = hf.save(_model(args).state_dict(), args, tmp_path, bos_id=None, eos_id=2, base_config=base)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["max_position_embeddings"] == 131072
