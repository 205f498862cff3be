"""DeepSeek-V3 (titan/models/deepseek_v3.py, mla.py): official parameter counts against transformers' own build of the
same configs (meta device), Hugging Face folders both ways against transformers (logits within 1e-4 in fp32, the same
greedy tokens), MLA's pieces (the decoupled RoPE part, the YaRN softmax scale), group-limited sigmoid routing, and
multi-token prediction (its loss by hand, its extra checkpoint layer both ways). The tests that need transformers
skip without it; titan does not depend on it. Parallel layouts: tests/test_parallel.py,
tests/test_expert_parallel.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from dist_utils import max_rel_diff, rel_error

from titan import hf, models
from titan.errors import ConfigError
from titan.generation import generate
from titan.models.deepseek_v3 import DeepSeekV3Args
from titan.models.layers import YarnScaling, count_params, yarn_mscale
from titan.models.mla import softmax_scale
from titan.models.moe import Router, active_params, limit_to_groups
from titan.models.mtp import mtp_loss

TRANSFORMERS = "needs Hugging Face transformers (pip install transformers); titan itself does not"

# model.flavor -> its parameters (tied weights once; MTP not counted: off in the flavors, and transformers'
# DeepseekV3ForCausalLM builds no MTP module either).
OFFICIAL = {"671B": 671_026_404_352, "16B": 15_960_108_544}


# flavor -> (all parameters, active per token) as docs/config.md's table gives them (DeepSeek: 671B, 37B activated).
COUNTS = {"tiny": (780_608, 670_016), "debugmodel": (12_272_000, 5_390_720),
          "16B": (OFFICIAL["16B"], 2_914_774_528), "671B": (OFFICIAL["671B"], 37_552_282_624)}


@pytest.mark.parametrize("flavor", list(COUNTS))
def test_parameter_counts(flavor):
    with torch.device("meta"):
        model = models.build_model(models.model_args("deepseek_v3", flavor))
    assert (count_params(model)[0], active_params(model)) == COUNTS[flavor]
    assert model.mtp is None and models.model_args("deepseek_v3", flavor).mtp_layers == 0


def test_one_mtp_depth_of_671b_adds_11_6b_parameters():
    with torch.device("meta"):
        model = models.build_model(models.model_args("deepseek_v3", "671B", mtp_layers=1))
    assert count_params(model)[0] - OFFICIAL["671B"] == 11_610_067_968


@pytest.mark.parametrize("flavor", list(OFFICIAL))
def test_official_parameter_counts_equal_transformers(flavor):
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS)
    args = models.model_args("deepseek_v3", flavor)
    config = transformers.AutoConfig.for_model(**hf.hf_config(args, 0, 1, torch.bfloat16))
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    assert sum(p.numel() for p in theirs.parameters()) == OFFICIAL[flavor]


# ---------------------------------------------------------------------------------------------------------------
# Pieces


def test_mla_scale_and_decoupled_rope():
    """The softmax scale is 1/sqrt(qk head dim) times YaRN's mscale_all_dim temperature squared; RoPE turns only the
    rope part (qk_rope_head_dim channels), whose table has the YaRN amplitude."""
    args = models.model_args("deepseek_v3", "671B")
    assert math.isclose(softmax_scale(args), 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert args.rope_dim == 64 and args.head_dim == 192
    assert softmax_scale(replace(args, rope_scaling=None)) == 192 ** -0.5
    yarn = YarnScaling(factor=4.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707)
    assert yarn.amplitude() == 1.0 and YarnScaling(factor=4.0).amplitude() == yarn_mscale(4.0)
    model = _model(replace(models.model_args("deepseek_v3", "tiny", max_seq_len=32), rope_scaling=yarn))
    assert model.freqs_cis.shape == (32, 4)
    attention = model.layers["0"].attention
    x = torch.randn(1, 6, 64)
    with torch.no_grad():  # the nope part sees no position: moving a token only changes the rope channels' scores
        ref = attention(x, model.freqs_cis)
        attention.wkv_a.weight[-8:].zero_()  # k_rope = 0
        attention.wq_b.weight.view(4, 24, 32)[:, 16:].zero_()  # q_rope = 0
        a, b = attention(x, model.freqs_cis), attention(x, model.freqs_cis[3:])
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(ref, a)


def test_group_limited_sigmoid_routing():
    """Each token's experts come from its best `topk_groups` groups (a group's score: its two best experts'); the
    weights are the chosen sigmoid scores, renormalised, times the routed scaling factor."""
    torch.manual_seed(0)
    router = Router(16, 8, 2, "sigmoid", True, n_groups=4, topk_groups=2, route_scale=2.5)
    router.init_weights()
    with torch.no_grad():
        router.gate.weight.normal_()
        router.expert_bias.normal_(std=0.1)
    x = torch.randn(64, 16)
    weights, experts, _ = router(x)
    choice = torch.sigmoid(router.gate(x)) + router.expert_bias
    group_score = choice.view(64, 4, 2).sum(-1)  # two experts per group: its two best are all of it
    best_groups = group_score.topk(2, dim=-1).indices
    assert all(set((experts[t] // 2).tolist()) <= set(best_groups[t].tolist()) for t in range(64))
    masked = limit_to_groups(choice, 4, 2)
    assert torch.equal(experts, masked.topk(2, dim=-1).indices)
    scores = torch.sigmoid(router.gate(x)).gather(1, experts)
    assert torch.allclose(weights, 2.5 * scores / scores.sum(-1, keepdim=True))
    # Grouping changes the choice somewhere (else this test would not test it).
    assert not torch.equal(experts.sort(-1).values, choice.topk(2, dim=-1).indices.sort(-1).values)


def test_dense_first_layers_and_shared_expert():
    model = _model(models.model_args("deepseek_v3", "tiny", max_seq_len=32))
    from titan.models.layers import FeedForward
    from titan.models.moe import MoE

    assert type(model.layers["0"].feed_forward) is FeedForward
    assert all(isinstance(model.layers[str(i)].feed_forward, MoE) for i in (1, 2, 3))
    assert model.layers["1"].feed_forward.shared_expert.w1.weight.shape == (32, 64)


# ---------------------------------------------------------------------------------------------------------------
# Multi-token prediction


def _model(args: DeepSeekV3Args) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build_model(args)
    model.init_weights()
    model.init_buffers()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            if "router" in name:
                p.mul_(20)  # distinct scores: no near-ties in the top-k choice
    return model


def test_mtp_loss_by_hand():
    """Depth 1 at position t: the main model's normalised h_t and token t+1's embedding through the MTP block,
    predicting the label of t+1 (token t+2); the last position and labels outside the document count in nothing."""
    args = models.model_args("deepseek_v3", "tiny", max_seq_len=32, mtp_layers=2)
    model = _model(args).train()
    tokens = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([tokens[:, 1:], torch.randint(0, 4096, (2, 1))], dim=1)
    labels[0, 3] = -100
    docs = torch.tensor([[0] * 12, [0] * 7 + [1] * 5])
    with torch.no_grad():
        mask = models.layers.document_mask(docs)
        h = model.tok_embeddings(tokens)
        for layer in model.layers.values():
            h = layer(h, model.freqs_cis, mask)
        h = model.norm(h)
        expected = 0.0
        for k in (1, 2):
            depth = model.mtp[str(k - 1)]
            nxt = torch.cat([tokens[:, k:], tokens[:, :k]], dim=1)
            h = depth.norm(depth.block(depth.eh_proj(torch.cat([depth.enorm(model.tok_embeddings(nxt)),
                                                                 depth.hnorm(h)], -1)), model.freqs_cis, mask))
            logits = model.output(h)
            for b in range(2):
                for t in range(12 - k):
                    if docs[b, t + k] == docs[b, t] and labels[b, t + k] != -100:
                        expected += F.cross_entropy(logits[b, t], labels[b, t + k]).item()
        got = mtp_loss(model.mtp.values(), model.tok_embeddings, model.output, tokens, labels,
                       model.norm(_trunk(model, tokens, mask)), model.freqs_cis, mask, docs)
    assert abs(got.item() - expected) < 1e-4 * expected


def _trunk(model, tokens, mask):
    h = model.tok_embeddings(tokens)
    for layer in model.layers.values():
        h = layer(h, model.freqs_cis, mask)
    return h


def test_mtp_gradient_is_its_weighted_loss_and_zero_weight_changes_nothing():
    """The MTP loss reaches the model through the logits with the gradient scale the loop sets: with scale s the
    gradients are those of main + s * mtp (computed directly); with scale 0 those of the model without MTP."""
    args = models.model_args("deepseek_v3", "tiny", max_seq_len=32, mtp_layers=1)
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)

    def grads(model, scale, direct=False):
        model.zero_grad()
        model.mtp_loss_scale.fill_(scale)
        logits = model(tokens, labels=labels if not direct else None)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        if direct:
            loss = loss + scale * mtp_loss(model.mtp.values(), model.tok_embeddings, model.output, tokens, labels,
                                           model.norm(_trunk(model, tokens, None)), model.freqs_cis, None, None)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with_mtp = _model(args).train()
    got, want = grads(with_mtp, 0.3), grads(with_mtp, 0.3, direct=True)
    assert all(rel_error(got[n], want[n]) < 1e-5 for n in want if want[n].norm() > 0)
    assert with_mtp.mtp_loss_sum > 0
    without = _model(replace(args, mtp_layers=0)).train()
    without.load_state_dict({k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")})
    zero, plain = grads(with_mtp, 0.0), grads(without, 0.0)
    assert all(torch.equal(zero[n], plain[n]) for n in plain)
    assert all(zero[n].abs().sum() == 0 for n in zero if n.startswith("mtp."))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: DeepseekV3ForCausalLM both ways


def _hf_config(transformers, **overrides):
    return transformers.DeepseekV3Config(**{
        "vocab_size": 300, "hidden_size": 48, "intermediate_size": 80, "moe_intermediate_size": 24,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
        "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 16, "q_lora_rank": 24,
        "qk_rope_head_dim": 8, "v_head_dim": 12, "qk_nope_head_dim": 12, "n_group": 4, "topk_group": 2,
        "num_experts_per_tok": 2, "first_k_dense_replace": 1, "norm_topk_prob": True, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "rope_parameters": {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0, "rope_theta": 10000.0}, **overrides})


def _randomise_hf(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.normal_(std=1.0)  # HF initialises the router to zeros: give it distinct scores
            if "experts" in name:
                p.normal_(std=0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(std=0.05)
    return model.eval()


def _greedy_agree(ours, theirs, vocab):
    prompt = torch.randint(0, vocab, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    mine = generate(ours, [prompt], 8)[0]
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert mine == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_transformers_checkpoint_imports_into_titan(tmp_path, q_lora_rank):
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS)
    theirs = _randomise_hf(transformers.DeepseekV3ForCausalLM(_hf_config(transformers, q_lora_rank=q_lora_rank)))
    theirs.save_pretrained(str(tmp_path))
    args, state = hf.load(tmp_path)
    assert (args.family, args.q_lora_rank, args.n_dense_layers, args.n_groups, args.route_scale, args.mtp_layers) == \
        ("deepseek_v3", q_lora_rank or 0, 1, 4, 2.5, 0)  # config.json says 1 MTP layer, the folder holds none
    model = models.build_model(args)
    model.init_buffers()
    model.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs_logits = model.eval()(tokens), theirs(tokens).logits
    assert rel_error(ours, theirs_logits) < 1e-4
    _greedy_agree(model, theirs, 300)


def test_transformers_loads_the_export_and_mtp_round_trips(tmp_path):
    """titan -> transformers (logits, greedy tokens); an MTP depth goes out as the extra layer
    model.layers.{n_layers} (with its copies of the embedding and head, as DeepSeek's checkpoints) and comes back."""
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS)
    args = replace(models.model_args("deepseek_v3", "tiny", tokenizer_vocab=300, max_seq_len=64, mtp_layers=1),
                   rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                                            mscale_all_dim=1.0), norm_eps=1e-5)
    model = _model(args).eval()
    with torch.no_grad():
        for _, b in model.named_buffers():
            if b.dim() == 1 and b.shape[0] == 8:
                b.normal_(std=0.05)  # expert biases: exported as e_score_correction_bias
    folder = hf.save(model.state_dict(), args, tmp_path / "hf", bos_id=None, eos_id=2)
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_nextn_predict_layers"], config["first_k_dense_replace"], config["n_group"]) == (1, 1, 4)
    tensors = hf.read_safetensors(folder)
    assert torch.equal(tensors["model.layers.4.embed_tokens.weight"], model.tok_embeddings.weight)
    assert torch.equal(tensors["model.layers.4.eh_proj.weight"], model.mtp["0"].eh_proj.weight)
    back_args, state = hf.load(folder)
    assert back_args == replace(args, max_seq_len=back_args.max_seq_len)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(theirs(tokens).logits, model(tokens)) < 1e-4
    _greedy_agree(model, theirs, 300)


@pytest.mark.parametrize("change, needle", [
    ({"scoring_func": "softmax"}, "scoring_func='softmax' is not supported"),
    ({"rope_interleave": False}, "rope_interleave=False is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
    ({"num_experts_per_tok": 9}, "top_k=9 must be in 1 ... n_experts=8"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quant_method='fp8' is not supported"),
])
def test_unsupported_config_is_one_line(tmp_path, change, needle):
    args = models.model_args("deepseek_v3", "tiny", tokenizer_vocab=300, max_seq_len=32)
    folder = hf.save(_model(args).state_dict(), args, tmp_path, bos_id=None, eos_id=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError) as e:
        hf.load(folder)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# MTP in the loop


def test_mtp_in_the_loop(tmp_path):
    """Weight 0: the run (loss, grad norm, aux loss) is the run without MTP. Weight 0.3: `mtp_loss` is logged, the
    checkpoint holds the MTP depth, and a run resumed from step 2 continues exactly as the straight one."""
    import shutil

    from dist_utils import REPO, read_metrics

    from titan.train import main

    config = str(REPO / "tests" / "configs" / "tiny_deepseek_v3.toml")
    base = ["--config", config, "--moe.grouped_mm", "false", "--training.steps", "4", "--validation.enable", "false"]
    mtp = ["--model.mtp_layers", "1"]
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2"]
    assert main([*base, "--job.dump_folder", str(tmp_path / "plain")]) == 0
    assert main([*base, *mtp, "--model.mtp_loss_weight", "0", "--job.dump_folder", str(tmp_path / "zero")]) == 0
    assert main([*base, *mtp, *ckpt, "--job.dump_folder", str(tmp_path / "on")]) == 0
    (tmp_path / "resumed" / "checkpoint").mkdir(parents=True)
    shutil.copytree(tmp_path / "on" / "checkpoint" / "step-2", tmp_path / "resumed" / "checkpoint" / "step-2")
    assert main([*base, *mtp, *ckpt, "--job.dump_folder", str(tmp_path / "resumed")]) == 0
    plain, zero, on, resumed = (read_metrics(tmp_path / n) for n in ("plain", "zero", "on", "resumed"))
    for key in ("loss", "aux_loss"):
        assert [r[key] for r in zero] == [r[key] for r in plain], key
    # The norm's sum of squares holds the MTP depth's zero gradients as extra terms: its summation tree differs, the
    # last bit may too (titan/optim.py:local_sum_of_squares); the updates, hence the losses above, are the same.
    assert max_rel_diff([r["grad_norm"] for r in zero], [r["grad_norm"] for r in plain]) < 1e-6
    assert "mtp_loss" not in plain[0] and all(5 < r["mtp_loss"] < 10 for r in on + zero)
    assert [r["grad_norm"] for r in on] != [r["grad_norm"] for r in plain]  # the MTP loss reaches the model
    for key in ("loss", "grad_norm", "aux_loss", "mtp_loss"):
        assert [r[key] for r in resumed] == [r[key] for r in on[2:]], key
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(tmp_path / "on" / "checkpoint" / "step-2")).read_metadata().state_dict_metadata
    assert "model.mtp.0.eh_proj.weight" in stored and "model.mtp.0.block.feed_forward.router.expert_bias" in stored


@pytest.mark.parametrize("extra, needle", [
    (["--model.mtp_layers", "1", "--parallelism.pipeline_parallel_degree", "2"],
     "model.mtp_layers=1 with parallelism.pipeline_parallel_degree=2 is not supported"),
    (["--model.name", "qwen3_moe", "--model.mtp_layers", "1"], "model.mtp_layers=1: qwen3_moe has no multi-token"),
    (["--moe.n_experts", "6"], "deepseek_v3 tiny with these [moe] / [model] settings: n_experts=6 must split"),
])
def test_bad_config_is_one_line(capsys, extra, needle):
    from dist_utils import REPO

    from titan.train import main

    config = str(REPO / "tests" / "configs" / "tiny_deepseek_v3.toml")
    capsys.readouterr()
    assert main(["--check", "--world_size", "2", "--config", config, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"titan: error: {needle}"), err
