"""Mixture-of-Experts, one process (titan/models/moe.py, titan/models/qwen3_moe.py): grouped experts against the
per-expert loop, routing with a hand-set router, dropless under total imbalance, the auxiliary loss against its
formula, the expert-bias update, official parameter counts, config errors, and a tiny MoE that learns. Expert
parallelism's layouts are tested against these single-process runs in tests/test_expert_parallel.py."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from dist_utils import REPO, read_metrics, rel_error

from titan import hf, models
from titan.config import MOE_FAMILIES
from titan.config import MoE as MoEConfig
from titan.errors import ConfigError
from titan.models import moe
from titan.models.moe import GroupedExperts, MoE, Router
from titan.train import main

TINY_MOE = str(REPO / "tests" / "configs" / "tiny_moe.toml")
pytestmark = pytest.mark.usefixtures("one_thread")


def _experts(dim=8, hidden=12, n=4, seed=0) -> GroupedExperts:
    torch.manual_seed(seed)
    e = GroupedExperts(dim, hidden, n)
    for w in (e.w1, e.w2, e.w3):
        torch.nn.init.normal_(w, std=0.3)
    return e


def _grads(e: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, grouped: bool):
    e.grouped_mm = grouped
    e.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = e(x, counts)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), x.grad, e.w1.grad.clone(), e.w2.grad.clone(), e.w3.grad.clone()


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [10, 0, 0, 0], [0, 0, 0, 0]])
def test_grouped_mm_equals_the_per_expert_loop(counts):
    e, counts = _experts(), torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 8)
    assert moe.grouped_mm_supported(x, e.w1, e.w2, e.w3)
    grouped, loop = _grads(e, x, counts, True), _grads(e, x, counts, False)
    for g, ref in zip(grouped, loop):
        assert torch.allclose(g, ref, atol=1e-6, rtol=0), (g - ref).abs().max()
    # The loop is the definition: expert j on its rows.
    rows = x.split(counts.tolist())
    want = torch.cat([F.linear(F.silu(F.linear(r, e.w1[j])) * F.linear(r, e.w3[j]), e.w2[j])
                      for j, r in enumerate(rows)])
    assert torch.allclose(grouped[0], want, atol=1e-6)
    if counts[1] == 0:  # an expert without tokens gets a zero gradient
        assert grouped[2][1].abs().max() == 0


def test_grouped_mm_falls_back_where_inputs_do_not_fit():
    e = _experts(dim=6, hidden=10)  # strides of 24 / 40 bytes: not multiples of 16
    x, counts = torch.randn(5, 6), torch.tensor([2, 3, 0, 0])
    assert not moe.grouped_mm_supported(x, e.w1, e.w2, e.w3)
    assert torch.allclose(e(x, counts), _grads(e, x, counts, False)[0], atol=1e-6)


def _router(scores_logits: torch.Tensor, top_k: int, **kw) -> Router:
    """A router whose gate is the identity on a `dim == n_experts` input: the logits are the input."""
    n = scores_logits.shape[-1]
    r = Router(n, n, top_k, **kw)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(n))
    return r


@pytest.mark.parametrize("score_func, norm", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_router_picks_the_top_k_with_the_right_weights(score_func, norm):
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, -1.0, 5.0, 4.0], [1.0, 1.5, -2.0, 0.5]])
    r = _router(logits, 2, score_func=score_func, norm_topk_prob=norm)
    weights, experts, _ = r(logits)
    assert experts.tolist() == [[0, 2], [2, 3], [1, 0]]
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    want = scores.gather(1, experts)
    want = want / want.sum(-1, keepdim=True) if norm else want
    assert torch.allclose(weights, want, atol=1e-7)
    # The bias moves the choice, not the weights: the weights stay the unbiased scores.
    r.expert_bias.copy_(torch.tensor([0.0, 10.0, 0.0, 0.0]))
    weights, experts, _ = r(logits)
    assert (experts[:, 0] == 1).all()
    picked = scores.gather(1, experts)
    assert torch.allclose(weights, picked / picked.sum(-1, keepdim=True) if norm else picked, atol=1e-7)


def _moe(dim=8, n=4, k=2, seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    m = MoE(dim, 12, n, k, **kw)
    m.init_weights(0.1)
    return m


def _dense(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every token through every expert, weighted by its router weights (zero for experts it did not choose)."""
    tokens = x.reshape(-1, x.shape[-1])
    weights, experts, _ = m.router(tokens)
    full = torch.zeros(tokens.shape[0], m.n_experts).scatter(1, experts, weights)
    e = m.experts
    outs = torch.stack([F.linear(F.silu(F.linear(tokens, e.w1[j])) * F.linear(tokens, e.w3[j]), e.w2[j])
                        for j in range(m.n_experts)], dim=1)
    return (outs * full.unsqueeze(-1)).sum(1).view_as(x)


@pytest.mark.parametrize("grouped", [True, False])
def test_moe_equals_the_dense_computation_and_counts_every_token(grouped):
    m = _moe(grouped_mm=grouped)
    x = torch.randn(3, 5, 8)
    assert torch.allclose(m(x), _dense(m, x), atol=1e-6)
    assert m.tokens_per_expert.sum() == 3 * 5 * 2  # each token once per choice


def test_dropless_when_every_token_chooses_the_same_experts():
    m = _moe(n=4, k=1)
    with torch.no_grad():
        m.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))  # all 40 tokens to expert 2
    x = torch.randn(4, 10, 8)
    out = m(x)
    assert m.tokens_per_expert.tolist() == [0, 0, 40, 0]
    e, tokens = m.experts, x.reshape(-1, 8)
    want = F.linear(F.silu(F.linear(tokens, e.w1[2])) * F.linear(tokens, e.w3[2]), e.w2[2])  # weight 1 (k=1)
    assert torch.allclose(out.reshape(-1, 8), want, atol=1e-6)


def test_token_load_hook_sees_per_sequence_counts_and_the_aux_loss_uses_its_result():
    m = _moe(n=4, k=2, aux_loss_coef=0.1)
    seen = []
    # Another rank holds 5 more tokens of each sequence, each routed to experts 0 and 1.
    other = torch.tensor([[5, 5, 0, 0]] * 3)

    def hook(module, inputs, output):
        seen.append(output.clone())
        return output + other  # what a sum over the two ranks gives

    m.load.register_forward_hook(hook)
    x = torch.randn(3, 5, 8)
    m(x)
    (counts,) = seen
    assert counts.shape == (3, 4) and counts.dtype == torch.int64 and (counts.sum(1) == 10).all()
    assert torch.equal(m.tokens_per_expert, counts.sum(0).float())  # its own tokens: end_of_step sums over ranks
    _, _, scores = m.router(x.reshape(-1, 8))
    f = (counts + other).float() * 4 / (2 * 10)  # E / (K * S) with S = 10 tokens per whole sequence
    want = 0.1 * (scores.view(3, 5, 4) * f.unsqueeze(1)).sum()  # this rank's tokens' share of the sum
    assert torch.allclose(m.aux_loss_sum, want.detach(), rtol=1e-6)


def _explicit_aux(m: MoE, x: torch.Tensor, coef: float) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, summed over sequences and multiplied by their length:
    coef * sum_b S * sum_i f_bi P_bi, f_bi = E / (K S) * (tokens of b choosing i), P_bi = mean score of i over b."""
    bs, seq, _ = x.shape
    _, experts, scores = m.router(x.reshape(-1, x.shape[-1]))
    counts = F.one_hot(experts, m.n_experts).sum(1).view(bs, seq, -1).sum(1).float()
    f = counts * m.n_experts / (m.top_k * seq)
    p = scores.view(bs, seq, -1).mean(1)
    return coef * seq * (f * p).sum()


def test_aux_loss_value_and_gradient_are_the_formulas():
    coef, scale = 0.05, 1 / 7
    m = _moe(n=4, k=2, aux_loss_coef=coef)
    x = torch.randn(3, 5, 8)
    moe.set_aux_loss_scale([m], scale)
    out = m(x)
    aux = moe.end_of_step([m], update=False)[1]
    explicit = _explicit_aux(m, x, coef)
    assert torch.allclose(aux, explicit.detach(), rtol=1e-6)
    # Balanced on average, the loss per sequence token is coef: the mean of f_i P_i sums to about 1.
    assert 0.5 * coef < aux / 15 < 2 * coef
    # Gradient of (anything on the output) + the injected aux == autograd of (that + scale * explicit formula).
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    injected = m.router.gate.weight.grad.clone()
    m.zero_grad()
    m.aux_loss_coef = 0.0  # the same forward without the injection
    ((m(x) * grad_out).sum() + scale * _explicit_aux(m, x, coef)).backward()
    assert torch.allclose(injected, m.router.gate.weight.grad, atol=1e-6, rtol=0)


def test_bias_update_moves_a_skewed_router_towards_balance():
    torch.manual_seed(0)
    m = _moe(dim=16, n=8, k=2, bias_update_rate=0.002)
    with torch.no_grad():  # a router that prefers the first experts strongly
        m.router.gate.weight.add_(torch.linspace(1.5, -1.5, 8).unsqueeze(1) * torch.ones(8, 16) / 16)
    x = torch.randn(4, 32, 16).abs()
    loads = []
    for _ in range(200):  # one forward and one bias update per "optimizer step"
        m(x)
        loads.append(moe.end_of_step([m], update=True)[0][""])  # a bare MoE module's name is ""

    def imbalance(load):
        return (load.max() / load.mean()).item()

    # Sign updates settle into a small oscillation around balance: judge single steps and the last 20 together.
    assert imbalance(loads[0]) == 4.0  # two experts take every token
    assert imbalance(torch.stack(loads[-20:]).sum(0)) < 1.25
    assert max(imbalance(load) for load in loads[-20:]) <= 1.5


def test_end_of_step_reduces_once_resets_and_skips_the_update_when_asked():
    m = _moe(n=4, k=2, bias_update_rate=0.1)
    m(torch.randn(2, 6, 8))
    calls = []

    def reduce(t):
        calls.append(t.shape)
        return t * 3

    loads, aux = moe.end_of_step([m], reduce, update=False)
    assert calls == [(1, 5)] and loads[""].sum() == 3 * 24 and aux == 0  # aux_loss_coef 0
    assert m.tokens_per_expert.sum() == 0 and m.router.expert_bias.abs().sum() == 0
    m(torch.randn(2, 6, 8))
    moe.end_of_step([m], update=True)
    assert m.router.expert_bias.abs().sum() > 0


def test_the_loop_finds_the_moe_layers_once(monkeypatch):
    """Hot path: after the first step, setting the loss scale and the end-of-step statistics walk no modules."""
    model = models.build_model(models.model_args("qwen3_moe", "tiny", tokenizer_vocab=64, max_seq_len=8))
    moe.set_aux_loss_scale([model], 0.5)
    moe.end_of_step([model])
    layers = [m for m in model.modules() if isinstance(m, MoE)]

    def walked(*args, **kwargs):
        raise AssertionError("named_modules walked again")

    monkeypatch.setattr(model, "named_modules", walked)
    moe.set_aux_loss_scale([model], 0.25)
    assert len(layers) == 4 and all(m.aux_loss_scale == 0.25 for m in layers)
    loads, aux = moe.end_of_step([model])
    # The family's rule names the MoE layers (no host read of the counts): all four, with no tokens routed yet.
    assert all(m.aux_loss_scale == 0 for m in layers) and aux == 0
    assert sorted(loads) == [f"layers.{i}" for i in range(4)] and all(v.sum() == 0 for v in loads.values())


@pytest.mark.parametrize("flavor, total, active", [
    # Qwen's model cards: 30.5B total / 3.3B activated, 29.9B non-embedding; 235B / 22B, 234B non-embedding.
    ("30B-A3B", 30_532_122_624, 3_353_032_704),
    ("235B-A22B", 235_093_634_560, 22_190_763_520),
])
def test_official_parameter_counts(flavor, total, active):
    args = models.model_args("qwen3_moe", flavor)
    with torch.device("meta"):
        model = models.build_model(args)
    n = sum(p.numel() for p in model.parameters())
    assert (n, moe.active_params(model)) == (total, active)
    emb = 2 * args.vocab_size * args.dim
    card = {"30B-A3B": (30.5e9, 3.3e9, 29.9e9), "235B-A22B": (235e9, 22e9, 234e9)}[flavor]
    for ours, theirs in zip((n, active, n - emb), card):  # the cards round to 2-3 digits (3.35B is "3.3B")
        assert abs(ours / theirs - 1) < 0.02, (ours, theirs)


def test_moe_settings_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"moe\.top_k=9 is larger than the 8 experts"):
        models.model_args("qwen3_moe", "tiny", moe=MoEConfig(top_k=9))
    with pytest.raises(ConfigError, match=r"moe\.bias_update_rate is set, but llama3 tiny is a dense model"):
        models.model_args("llama3", "tiny", moe=MoEConfig(bias_update_rate=0.01))
    assert models.model_args("llama3", "tiny", moe=MoEConfig()) == models.model_args("llama3", "tiny")
    args = models.model_args("qwen3_moe", "tiny", moe=MoEConfig(n_experts=4, top_k=1, aux_loss_coef=0.0))
    assert (args.n_experts, args.top_k, args.aux_loss_coef) == (4, 1, 0.0)


def test_config_knows_which_families_are_moe():
    assert set(MOE_FAMILIES) == {name for name, fam in models.FAMILIES.items() if fam.moe}


@pytest.mark.parametrize("argv, start", [
    (["--moe.aux_loss_coef", "0.1"], "moe.aux_loss_coef is set, but llama3 tiny is a dense model"),
    (["--model.name", "qwen3_moe", "--moe.top_k", "12"], "moe.top_k=12 is larger than the 8 experts"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, start):
    assert main(["--config", str(REPO / "tests" / "configs" / "tiny.toml"), "--job.dump_folder", str(tmp_path),
                 *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"titan: error: {start}"), err


def test_tiny_moe_learns_with_balancing_logged(tmp_path):
    assert main(["--config", TINY_MOE, "--job.dump_folder", str(tmp_path)]) == 0
    records = read_metrics(tmp_path)
    assert len(records) == 10
    first, last = records[0]["loss"], min(r["loss"] for r in records[-3:])
    assert last < first - 0.2, (first, last)
    for r in records:  # coefficient 0.01 on 4 layers of a loss that is about 1 per layer near balance
        assert 0.02 < r["aux_loss"] < 0.08 and r["moe_max_imbalance"] >= 1
        assert sorted(r["expert_load"]) == [f"layers.{i}" for i in range(4)]
        # 8 sequences x 32 tokens x top-2 per layer, counted once
        assert all(sum(layer["tokens"]) == 8 * 32 * 2 for layer in r["expert_load"].values())


def test_balancing_does_not_depend_on_the_micro_batch_split(tmp_path):
    """The aux loss (per sequence, normalised by the global item count) and the bias update (from the step's summed
    load) give the same steps for 4 micro-batches of 2 sequences as for one of 8."""
    runs = {}
    for n in (2, 8):
        folder = tmp_path / str(n)
        assert main(["--config", TINY_MOE, "--job.dump_folder", str(folder), "--training.steps", "4",
                     "--training.local_batch_size", str(n), "--validation.enable", "false",
                     "--moe.bias_update_rate", "0.01", "--moe.aux_loss_coef", "0.1"]) == 0
        runs[n] = read_metrics(folder)
    for key in ("loss", "grad_norm", "aux_loss", "moe_max_imbalance"):
        a, b = [r[key] for r in runs[2]], [r[key] for r in runs[8]]
        assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-5, (key, a, b)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: Qwen3MoeForCausalLM folders both ways

TRANSFORMERS = "needs Hugging Face transformers (pip install transformers); titan itself does not"


def _random_moe(vocab=300, **overrides):
    """The tiny flavor with a dense layer between MoE layers (mlp_only_layers), non-trivial norms, sharp routing."""
    args = models.model_args("qwen3_moe", "tiny", tokenizer_vocab=vocab, max_seq_len=64,
                             **{"mlp_only_layers": (1,), **overrides})
    torch.manual_seed(0)
    model = models.build_model(args)
    model.init_weights()
    model.init_buffers()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "router" in name:
                p.mul_(20)  # distinct scores: no near-ties in the top-k choice
    return args, model.eval()


def test_hf_names_split_and_join_the_experts(tmp_path):
    args, model = _random_moe()
    folder = hf.save(model.state_dict(), args, tmp_path, bos_id=None, eos_id=2)
    config = json.loads((folder / "config.json").read_text())
    assert (config["architectures"], config["num_experts"], config["num_experts_per_tok"], config["mlp_only_layers"],
            config["norm_topk_prob"], config["moe_intermediate_size"]) == (["Qwen3MoeForCausalLM"], 8, 2, [1], True,
                                                                            32)
    tensors = hf.read_safetensors(folder)
    assert tensors["model.layers.0.mlp.experts.7.down_proj.weight"].shape == (64, 32)
    assert torch.equal(tensors["model.layers.2.mlp.experts.3.gate_proj.weight"],
                       model.layers["2"].feed_forward.experts.w1[3])
    assert "model.layers.1.mlp.gate_proj.weight" in tensors and "model.layers.1.mlp.gate.weight" not in tensors
    assert not any("expert_bias" in k for k in tensors)
    back_args, state = hf.load(folder)
    assert back_args == replace(args, max_seq_len=back_args.max_seq_len, aux_loss_coef=back_args.aux_loss_coef)
    # Qwen3-MoE has no expert bias: titan's comes back at its initial value, zero (a model then loads strictly).
    ours = {k: torch.zeros_like(v) if "expert_bias" in k else v for k, v in model.state_dict().items()}
    assert state.keys() == ours.keys() and all(torch.equal(state[k], ours[k]) for k in ours)


def test_transformers_loads_the_qwen3_moe_export(tmp_path):
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS)
    args, model = _random_moe()
    folder = hf.save(model.state_dict(), args, tmp_path, bos_id=None, eos_id=2)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert type(theirs_model).__name__ == "Qwen3MoeForCausalLM"
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), theirs_model(tokens).logits
    assert rel_error(theirs, ours) < 1e-4


def test_transformers_qwen3_moe_checkpoint_imports_into_titan(tmp_path):
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS)
    config = transformers.Qwen3MoeConfig(
        vocab_size=300, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], max_position_embeddings=64)
    torch.manual_seed(0)
    theirs_model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in theirs_model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if "mlp.gate." in name or name.endswith("mlp.gate.weight"):
                p.normal_(std=1.0)  # HF initialises the router to zeros: give it distinct scores
            if "experts" in name:
                p.normal_(std=0.1)
    theirs_model.save_pretrained(str(tmp_path))
    args, state = hf.load(tmp_path)
    assert (args.family, args.n_experts, args.top_k, args.moe_hidden_dim, args.mlp_only_layers) == \
        ("qwen3_moe", 6, 2, 24, (1,))
    model = models.build_model(args)
    model.init_buffers()
    model.load_state_dict(state, strict=True)  # the expert biases the folder lacks come at zero
    assert all(torch.equal(state[f"layers.{i}.feed_forward.router.expert_bias"], torch.zeros(6)) for i in (0, 2))
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.eval()(tokens), theirs_model(tokens).logits
    assert rel_error(ours, theirs) < 1e-4


def test_hf_folder_with_other_experts_is_one_line_exit_2(tmp_path, capsys):
    args, model = _random_moe(vocab=4096, n_experts=4, mlp_only_layers=())
    folder = hf.save(model.state_dict(), args, tmp_path / "hf", bos_id=None, eos_id=2)
    argv = ["--config", TINY_MOE, "--job.dump_folder", str(tmp_path / "run"), "--training.steps", "1",
            "--checkpoint.initial_load_path", str(folder), "--checkpoint.initial_load_in_hf"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json has n_experts=4" in err[0] and "has 8" in err[0], err


@pytest.mark.parametrize("change, field", [({"norm_topk_prob": False}, "norm_topk_prob=False"),
                                           ({"num_experts_per_tok": 3}, "top_k=3"),
                                           ({"num_experts": 6}, "n_experts=6"),
                                           ({"num_experts_per_tok": 9}, "top_k=9 must be in 1 ... n_experts=8")])
def test_hf_folder_with_other_routing_is_refused(tmp_path, change, field):
    args, model = _random_moe()
    folder = hf.save(model.state_dict(), args, tmp_path, bos_id=None, eos_id=2)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConfigError, match=re.escape(field)) as e:
        hf.check_compatible(args, hf.load(folder)[0], "checkpoint.initial_load_path")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# In the loop: checkpoints and activation checkpointing

BALANCED = ["--training.steps", "4", "--validation.enable", "false", "--moe.bias_update_rate", "0.01",
            "--moe.aux_loss_coef", "0.1"]


def test_resume_restores_the_expert_bias_and_continues_identically(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["--config", TINY_MOE, "--job.dump_folder", str(straight), *BALANCED, "--checkpoint.enable",
                 "--checkpoint.interval", "2"]) == 0
    (resumed / "checkpoint").mkdir(parents=True)
    shutil.copytree(straight / "checkpoint" / "step-2", resumed / "checkpoint" / "step-2")
    assert main(["--config", TINY_MOE, "--job.dump_folder", str(resumed), *BALANCED, "--checkpoint.enable",
                 "--checkpoint.interval", "2"]) == 0
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [3, 4]
    for key in ("loss", "grad_norm", "aux_loss", "moe_max_imbalance"):
        assert [r[key] for r in a[2:]] == [r[key] for r in b], key
    # The bias moved (it is not zero) and is in the checkpoint, not only in memory.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import Metadata
    meta: Metadata = dcp.FileSystemReader(str(straight / "checkpoint" / "step-2")).read_metadata()
    assert any(k.endswith("feed_forward.router.expert_bias") for k in meta.state_dict_metadata)


def test_activation_checkpointing_counts_each_token_once(tmp_path):
    runs = {}
    for mode in ("none", "full"):
        assert main(["--config", TINY_MOE, "--job.dump_folder", str(tmp_path / mode), *BALANCED,
                     "--activation_checkpoint.mode", mode]) == 0
        runs[mode] = read_metrics(tmp_path / mode)
    for key in ("loss", "grad_norm", "aux_loss", "moe_max_imbalance"):
        a, b = [r[key] for r in runs["none"]], [r[key] for r in runs["full"]]
        assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-6, (key, a, b)
    assert runs["full"][0]["expert_load"] == runs["none"][0]["expert_load"]
