"""Mixture-of-Experts, one process (titan/models/moe.py, titan/models/qwen3_moe.py): grouped experts against the
per-expert loop, routing with a hand-set router, dropless under total imbalance, the auxiliary loss against its
formula, the expert-bias update, official parameter counts, config errors, and a tiny MoE that learns. Expert
parallelism's layouts are tested against these single-process runs in tests/test_expert_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_utils import REPO, read_metrics

from titan import models
from titan.config import ConfigError
from titan.config import MoE as MoEConfig
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


def test_token_load_hook_sees_per_sequence_counts_and_its_result_is_used():
    m = _moe(n=4, k=2, aux_loss_coef=0.1)
    seen = []

    def hook(module, inputs, output):
        seen.append(output.clone())
        return output * 2  # stands in for a sum over two ranks holding the other half of each sequence

    m.load.register_forward_hook(hook)
    m(torch.randn(3, 5, 8))
    (counts,) = seen
    assert counts.shape == (3, 4) and counts.dtype == torch.int64 and (counts.sum(1) == 10).all()
    assert torch.equal(m.tokens_per_expert, 2 * counts.sum(0).float())


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
    aux = moe.take_aux_loss([m])
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
        loads.append(moe.end_of_step([m], update=True)[""])  # a bare MoE module's name is ""

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

    loads = moe.end_of_step([m], reduce, update=False)
    assert calls == [(1, 4)] and loads[""].sum() == 3 * 24
    assert m.tokens_per_expert.sum() == 0 and m.router.expert_bias.abs().sum() == 0
    m(torch.randn(2, 6, 8))
    moe.end_of_step([m], update=True)
    assert m.router.expert_bias.abs().sum() > 0


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


def test_cli_rejects_moe_keys_on_a_dense_family(tmp_path, capsys):
    assert main(["--config", str(REPO / "tests" / "configs" / "tiny.toml"), "--job.dump_folder", str(tmp_path),
                 "--moe.aux_loss_coef", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("titan: error: moe.aux_loss_coef"), err


def test_tiny_moe_learns(tmp_path):
    assert main(["--config", TINY_MOE, "--job.dump_folder", str(tmp_path)]) == 0
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert len(records) == 10
    first, last = records[0]["loss"], min(r["loss"] for r in records[-3:])
    assert last < first - 0.2, (first, last)
