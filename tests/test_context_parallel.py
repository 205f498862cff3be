"""Context-parallel attention against full causal SDPA: for random q/k/v (including grouped-query attention and a
sequence length that is not a power of two), the sharded output and the q/k/v gradients equal the unsharded ones
within 1e-5, for cp = 2 and 4 and both rotate methods; also values of another head size (MLA) both ways, and
gpt-oss's sliding window and sinks (allgather) against its single-device kernel."""

from __future__ import annotations

import pytest
import torch
from dist_utils import rel_error, spawn_gloo

REL = 1e-5


def _check_attention(rank: int, world_size: int, method: str, n_heads: int, n_kv_heads: int, v_dim: int = 8,
                     window: int | None = None, sinks: bool = False) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from titan.models.sinks import WindowSinkSDPA
    from titan.parallel.context_parallel import ContextParallelAttention, positions

    seq_len = 2 * world_size * 3  # 12 or 24: divisible by 2 x cp, not a power of two
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, n_heads, seq_len, 8, generator=g, requires_grad=True)
    k = torch.randn(2, n_kv_heads, seq_len, 8, generator=g, requires_grad=True)
    v = torch.randn(2, n_kv_heads, seq_len, v_dim, generator=g, requires_grad=True)
    w = torch.randn(2, n_heads, seq_len, v_dim, generator=g)  # a random upstream gradient
    s = torch.randn(n_heads, generator=g, requires_grad=True) if sinks else None
    rep = n_heads // n_kv_heads

    # The reference repeats the K/V heads; the kernel gets them grouped, as titan's Attention passes them on. With a
    # window or sinks: the single-device kernel of gpt-oss (titan/models/sinks.py).
    if window is not None or sinks:
        ref = WindowSinkSDPA(window)(q, k, v, sinks=s)
    else:
        ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1),
                                                               v.repeat_interleave(rep, dim=1), is_causal=True)
    (ref * w).sum().backward()

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    pos = positions(seq_len, world_size, rank)
    ql, kl, vl = (t.detach()[:, :, pos].clone().requires_grad_() for t in (q, k, v))
    sl = s.detach().clone().requires_grad_() if sinks else None
    out = ContextParallelAttention(mesh["cp"], method, window)(ql, kl, vl, sinks=sl)
    (out * w[:, :, pos]).sum().backward()

    assert rel_error(out, ref[:, :, pos]) < REL, "output"
    for name, got, full in (("q", ql, q), ("k", kl, k), ("v", vl, v)):
        assert rel_error(got.grad, full.grad[:, :, pos]) < REL, f"grad of {name} ({method}, cp={world_size})"
    if sinks:  # each rank's sinks get its queries' part of the gradient: together the whole
        import torch.distributed as dist

        dist.all_reduce(sl.grad)
        assert rel_error(sl.grad, s.grad) < REL, "grad of the sinks"


def _check_cases(rank: int, world_size: int, method: str, cases: list[tuple]) -> None:
    for case in cases:
        _check_attention(rank, world_size, method, *case)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("method", ["allgather", "ring"])
def test_cp_attention_matches_full_sdpa(cp, method):
    # GQA: 4 query heads share 2 K/V heads. In the same processes at cp = 2: MLA (DeepSeek-V3: values of 5 channels
    # against queries and keys of 8, every head its own K and V), and with allgather gpt-oss's 5-token window by the
    # true positions (across the load-balanced chunks) with a sink per head.
    cases = [(4, 2)]
    if cp == 2:
        cases += [(4, 4, 5)] + ([(4, 2, 8, 5, True)] if method == "allgather" else [])
    spawn_gloo(_check_cases, cp, method, cases)


def test_load_balanced_positions_cover_the_sequence_evenly():
    from titan.parallel.context_parallel import positions

    shards = [positions(16, 4, r) for r in range(4)]
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.arange(16))
    assert shards[0].tolist() == [0, 1, 14, 15] and shards[3].tolist() == [6, 7, 8, 9]
    # Causal work (keys each query attends to) is the same on every rank.
    assert len({int((s + 1).sum()) for s in shards}) == 1


def test_seq_len_not_divisible_names_the_key():
    from titan.errors import ConfigError
    from titan.parallel.context_parallel import check_seq_len

    with pytest.raises(ConfigError, match=r"training.seq_len=30 must be divisible by 2 x context_parallel_degree = 4"):
        check_seq_len(30, 2, 1)
    with pytest.raises(ConfigError, match=r"training.seq_len=36"):
        check_seq_len(36, 2, 2)
