"""The Llama model against independent references: shapes and official sizes, causality, RoPE (closed form, Llama 3.1
scaling as in Meta's `apply_scaling`, rotation properties), GQA attention, the whole forward pass, and seeded init that
does not depend on which layers a process holds. fp32 on CPU, tiny shapes."""

import math

import pytest
import torch
import torch.nn.functional as F

from titan.models.llama import (
    FLAVORS,
    Attention,
    ModelArgs,
    RMSNorm,
    RopeScaling,
    Transformer,
    apply_rotary_emb,
    count_params,
    model_args,
    rope_frequencies,
)
from titan.parallel.parallelize import materialize

CPU = torch.device("cpu")
SEQ = 16


def tiny(**overrides) -> ModelArgs:
    return model_args("tiny", **{"max_seq_len": SEQ, **overrides})


def build(args: ModelArgs, seed: int = 0) -> Transformer:
    """Meta construction then `materialize`, as `titan.train` does."""
    with torch.device("meta"):
        model = Transformer(args)
    materialize(model, CPU, seed)
    return model


@pytest.fixture(scope="module")
def model():
    return build(tiny(), seed=0)


def tokens(batch=2, seq=SEQ, vocab=4096, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Shapes and official sizes


def test_output_shape(model):
    with torch.no_grad():
        assert model(tokens(3, 10)).shape == (3, 10, 4096)


@pytest.mark.parametrize("flavor, hidden", [("1B", 8192), ("3B", 8192), ("8B", 14336), ("70B", 28672),
                                            ("405B", 53248)])
def test_ffn_hidden_dim_of_official_flavors(flavor, hidden):
    assert FLAVORS[flavor].ffn_hidden_dim == hidden


@pytest.mark.parametrize("flavor, total", [("8B", 8_030_261_248), ("1B", 1_235_814_400)])
def test_official_parameter_counts(flavor, total):
    with torch.device("meta"):
        m = Transformer(FLAVORS[flavor])
    n, emb = count_params(m)
    assert n == total  # the published sizes (1B counts its tied embedding once)
    assert emb == 128256 * FLAVORS[flavor].dim


def test_model_args_reject_impossible_head_counts():
    with pytest.raises(ValueError, match="n_heads"):
        ModelArgs(dim=64, n_heads=5)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    assert ModelArgs(dim=64, n_heads=4).n_kv_heads == 4


# ---------------------------------------------------------------------------------------------------------------
# Causality


def test_causal(model):
    x = tokens(1, SEQ)
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, SEQ - 1):
            y = x.clone()
            y[0, t] = (y[0, t] + 1) % 4096
            changed = model(y)
            torch.testing.assert_close(changed[:, :t], base[:, :t], rtol=0, atol=1e-6)
            # The changed token's own position, and every later one, see the change.
            per_pos = (changed[0, t:] - base[0, t:]).abs().amax(dim=-1)
            assert (per_pos > 1e-4).all(), per_pos


# ---------------------------------------------------------------------------------------------------------------
# RoPE


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Meta's layout by hand: channels (2i, 2i+1) of x (batch, seq, heads, head_dim) rotated by angles[pos, i]."""
    a = angles[: x.shape[1]].view(1, x.shape[1], 1, -1).double()
    x0, x1 = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack([x0 * a.cos() - x1 * a.sin(), x0 * a.sin() + x1 * a.cos()], dim=-1)
    return out.flatten(-2).to(x.dtype)


def closed_form_angles(head_dim, theta, seq, freqs=None):
    if freqs is None:
        freqs = [theta ** (-2 * j / head_dim) for j in range(head_dim // 2)]
    return torch.tensor([[p * f for f in freqs] for p in range(seq)], dtype=torch.float64)


def test_rope_without_scaling_is_the_closed_form():
    args = ModelArgs(dim=64, n_heads=2, rope_theta=10000.0, max_seq_len=40)
    got = rope_frequencies(args)
    assert got.shape == (40, 16) and got.dtype == torch.complex64
    angles = closed_form_angles(32, 10000.0, 40)
    expected = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def meta_apply_scaling(freqs: list[float], s: RopeScaling) -> list[float]:
    """Meta's `apply_scaling` (llama-models, Llama 3.1), one frequency at a time, with the constants as parameters."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            new_freqs.append((1 - smooth) * freq / s.factor + smooth * freq)
    return new_freqs


@pytest.mark.parametrize("scaling", [
    RopeScaling(),  # Llama 3.1
    RopeScaling(factor=32.0),  # Llama 3.2
    RopeScaling(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=1024),
])
def test_rope_llama31_scaling(scaling):
    head_dim, theta = 128, 500000.0
    args = ModelArgs(dim=2 * head_dim, n_heads=2, rope_theta=theta, rope_scaling=scaling, max_seq_len=64)
    got = rope_frequencies(args)
    plain = [theta ** (-2 * j / head_dim) for j in range(head_dim // 2)]
    scaled = meta_apply_scaling(plain, scaling)
    angles = closed_form_angles(head_dim, theta, 64, scaled)
    torch.testing.assert_close(got, torch.polar(torch.ones_like(angles), angles).to(torch.complex64), rtol=0,
                               atol=2e-5)
    # The three bands, read back from the rotation per position (all angles at position 1 are < pi).
    freqs = got[1].angle().double()
    bands = {"high": 0, "low": 0, "mid": 0}
    ctx = scaling.original_max_position_embeddings
    for f, f0 in zip(freqs.tolist(), plain):
        wavelen = 2 * math.pi / f0
        if wavelen < ctx / scaling.high_freq_factor:
            bands["high"] += 1
            assert f == pytest.approx(f0, rel=1e-6)
        elif wavelen > ctx / scaling.low_freq_factor:
            bands["low"] += 1
            assert f == pytest.approx(f0 / scaling.factor, rel=1e-6)
        else:
            bands["mid"] += 1
            assert f0 / scaling.factor * (1 - 1e-6) <= f <= f0 * (1 + 1e-6)
    assert min(bands.values()) > 0, bands  # the head size spans all three bands


def test_apply_rotary_emb_matches_pairwise_rotation_and_keeps_norms():
    args = ModelArgs(dim=64, n_heads=4, max_seq_len=SEQ)
    freqs_cis = rope_frequencies(args)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, SEQ, 4, 16, generator=g), torch.randn(2, SEQ, 2, 16, generator=g)
    rq, rk = apply_rotary_emb(q, k, freqs_cis)
    assert rq.shape == q.shape and rk.shape == k.shape
    torch.testing.assert_close(rq, rotate_pairs(q, freqs_cis.angle()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rk, rotate_pairs(k, freqs_cis.angle()), rtol=1e-5, atol=1e-5)
    pair_norm = lambda x: x.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(rq), pair_norm(q), rtol=1e-5, atol=1e-6)
    # Position 0 is not rotated.
    torch.testing.assert_close(rq[:, 0], q[:, 0], rtol=0, atol=1e-7)


def test_rope_dot_product_depends_only_on_relative_position():
    args = ModelArgs(dim=64, n_heads=2, max_seq_len=64, rope_theta=10000.0)
    freqs_cis = rope_frequencies(args)
    g = torch.Generator().manual_seed(1)
    q1, k1 = torch.randn(32, generator=g), torch.randn(32, generator=g)
    # The same q and k vectors at every position.
    rq, rk = apply_rotary_emb(q1.expand(1, 64, 1, 32).contiguous(), k1.expand(1, 64, 1, 32).contiguous(), freqs_cis)
    rq, rk = rq[0, :, 0].double(), rk[0, :, 0].double()
    for m, n in ((3, 1), (10, 10), (2, 9), (20, 0)):
        for s in (1, 7, 30):
            assert (rq[m + s] @ rk[n + s]).item() == pytest.approx((rq[m] @ rk[n]).item(), abs=1e-4)
    # ... and it does depend on it.
    assert abs((rq[5] @ rk[1]).item() - (rq[5] @ rk[2]).item()) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Attention (GQA) and the whole forward pass against explicit references


def reference_attention(attn: Attention, x: torch.Tensor, freqs_cis: torch.Tensor, n_heads: int, n_kv: int):
    """softmax(Q K^T / sqrt(d) + causal mask) V, query head h reading K/V head h // (n_heads / n_kv), in float64."""
    bs, seq, _ = x.shape
    d = attn.head_dim
    x = x.double()
    q = (x @ attn.wq.weight.double().T).view(bs, seq, n_heads, d)
    k = (x @ attn.wk.weight.double().T).view(bs, seq, n_kv, d)
    v = (x @ attn.wv.weight.double().T).view(bs, seq, n_kv, d)
    angles = freqs_cis.angle()
    q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
    mask = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)
    heads = []
    for h in range(n_heads):
        kv = h // (n_heads // n_kv)
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(d) + mask
        heads.append(torch.softmax(scores, dim=-1) @ v[:, :, kv])
    out = torch.cat(heads, dim=-1)
    return (out @ attn.wo.weight.double().T).float()


def test_gqa_attention_matches_reference_and_repeated_kv_model():
    torch.manual_seed(0)
    args = ModelArgs(dim=48, n_heads=6, n_kv_heads=2, max_seq_len=SEQ, rope_theta=10000.0)
    attn = Attention(args)
    freqs_cis = rope_frequencies(args)
    x = torch.randn(2, SEQ, 48)
    with torch.no_grad():
        got = attn(x, freqs_cis)
        torch.testing.assert_close(got, reference_attention(attn, x, freqs_cis, 6, 2), rtol=0, atol=1e-5)

        # The same attention as plain multi-head with each K/V head's weights repeated for its query heads.
        full = Attention(ModelArgs(dim=48, n_heads=6, n_kv_heads=6, max_seq_len=SEQ, rope_theta=10000.0))
        full.wq.weight.copy_(attn.wq.weight)
        full.wo.weight.copy_(attn.wo.weight)
        for name in ("wk", "wv"):
            grouped = getattr(attn, name).weight.view(2, 8, 48)  # (kv head, head_dim, dim)
            getattr(full, name).weight.copy_(grouped.repeat_interleave(3, dim=0).reshape(48, 48))
        torch.testing.assert_close(full(x, freqs_cis), got, rtol=0, atol=1e-5)
        # Grouping matters: another head order gives another result.
        full.wk.weight.copy_(attn.wk.weight.view(2, 8, 48).repeat(3, 1, 1).reshape(48, 48))
        assert (full(x, freqs_cis) - got).abs().max() > 1e-3


def test_rmsnorm():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_forward_matches_reference(model):
    """Embedding -> blocks (pre-norm attention and SwiGLU, residuals) -> norm -> output, written out by hand."""
    args = model.args
    x = tokens(2, SEQ)

    def rms(h, w):
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w.double()

    with torch.no_grad():
        h = model.tok_embeddings.weight[x].double()
        for block in model.layers.values():
            a = reference_attention(block.attention, rms(h, block.attention_norm.weight).float(), model.freqs_cis,
                                    args.n_heads, args.n_kv_heads)
            h = h + a.double()
            ff = block.feed_forward
            n = rms(h, block.ffn_norm.weight)
            h = h + (F.silu(n @ ff.w1.weight.double().T) * (n @ ff.w3.weight.double().T)) @ ff.w2.weight.double().T
        expected = rms(h, model.norm.weight) @ model.output.weight.double().T
        torch.testing.assert_close(model(x), expected.float(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Initialisation


def test_seeded_init_is_deterministic(model):
    same = build(tiny(), seed=0)
    other = build(tiny(), seed=1)
    ref = model.state_dict()
    for name, value in same.state_dict().items():
        assert torch.equal(value, ref[name]), name
    for name, value in other.state_dict().items():
        if not name.endswith("norm.weight"):  # norms start at ones whatever the seed
            assert not torch.equal(value, ref[name]), name


def test_init_statistics(model):
    args = model.args
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert p.device == CPU
    assert model.tok_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.05)
    # Truncated at 3 sigma: the std is ~0.986 of dim**-0.5.
    assert model.output.weight.std().item() == pytest.approx(args.dim**-0.5, rel=0.1)
    assert model.output.weight.abs().max().item() <= 3 * args.dim**-0.5 + 1e-6
    stds = []
    for i, block in model.layers.items():
        expected = 0.02 / math.sqrt(2 * (int(i) + 1))  # depth init
        for w in (block.attention.wo, block.feed_forward.w2, block.feed_forward.w3):
            assert w.weight.std().item() == pytest.approx(expected, rel=0.15), (i, w)
        for w in (block.attention.wq, block.attention.wk, block.attention.wv, block.feed_forward.w1):
            assert w.weight.std().item() == pytest.approx(0.02, rel=0.15), (i, w)
        assert torch.equal(block.attention_norm.weight, torch.ones(args.dim))
        stds.append(block.attention.wo.weight.std().item())
    assert stds == sorted(stds, reverse=True) and stds[0] > 1.5 * stds[-1]
    assert torch.equal(model.norm.weight, torch.ones(args.dim))


def test_init_without_depth_scaling():
    m = build(tiny(depth_init=False), seed=0)
    expected = 0.02 / math.sqrt(2 * m.args.n_layers)
    for block in m.layers.values():
        assert block.attention.wo.weight.std().item() == pytest.approx(expected, rel=0.15)
        assert block.feed_forward.w2.weight.std().item() == pytest.approx(expected, rel=0.15)


def test_tied_embeddings_stay_tied_after_materialize():
    m = build(tiny(tie_embeddings=True), seed=0)
    assert m.output.weight is m.tok_embeddings.weight
    assert "output.weight" not in dict(m.named_parameters())  # one parameter, so one optimizer state
    w = m.tok_embeddings.weight
    # The shared matrix is scaled as an output projection, not as a unit-variance embedding.
    assert w.std().item() == pytest.approx(m.args.dim**-0.5, rel=0.1)
    assert torch.isfinite(w).all()
    with torch.no_grad():
        h = torch.randn(3, m.args.dim)
        torch.testing.assert_close(m.output(h), h @ w.T)
    assert count_params(m)[0] == count_params(build(tiny(), seed=0))[0] - w.numel()


def test_pipeline_pruned_models_get_the_full_models_weights(model):
    """Layout independence: a stage holding only some layers is initialised to the full model's values."""

    def stage(keep: list[str], first: bool, last: bool) -> Transformer:
        with torch.device("meta"):
            m = Transformer(tiny())
        for i in list(m.layers):
            if i not in keep:
                del m.layers[i]
        if not first:
            m.tok_embeddings = None
        if not last:
            m.norm = m.output = None
        materialize(m, CPU, seed=0)
        return m

    stages = [stage(["0"], True, False), stage(["1", "2"], False, False), stage(["3"], False, True)]
    full = model.state_dict()
    seen = set()
    for s in stages:
        for name, value in s.state_dict().items():
            assert torch.equal(value, full[name]), name
            seen.add(name)
    assert seen == set(full)
    x = tokens(2, SEQ)
    with torch.no_grad():
        h = x
        for s in stages:
            h = s(h)
        torch.testing.assert_close(h, model(x), rtol=0, atol=0)
