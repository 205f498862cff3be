"""Context-parallel attention against the whole sequence's SDPA: for random q/k/v (grouped-query attention, a
sequence length that is not a power of two), plain causal, with packed documents, with a sliding window and with
both, the sharded output and the q/k/v gradients equal the unsharded ones within 1e-5, for cp = 2 and 4 and both
rotate methods (and the allgather method's FlexAttention forward, the CUDA path, too); also values of another head
size (MLA) both ways, and gpt-oss's sliding window and sinks (allgather) against its single-device kernel."""

from __future__ import annotations

import pytest
import torch
from dist_utils import rel_error, spawn_gloo

REL = 1e-5


def _check_heads(rank: int, world_size: int, method: str, n_heads: int, n_kv_heads: int, v_dim: int = 8,
                 window: int = 0, sinks: bool = False) -> None:
    """MLA's narrower values (v_dim), and gpt-oss's window with sinks, against the single-device kernels."""
    from torch.distributed.device_mesh import init_device_mesh

    from titan.models.sinks import WindowSinkSDPA
    from titan.parallel.context_parallel import ContextParallelAttention, ContextParallelMaskBuilder, positions

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
    if window or sinks:
        ref = WindowSinkSDPA()(q, k, v, None, window, sinks=s)
    else:
        ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1),
                                                               v.repeat_interleave(rep, dim=1), is_causal=True)
    (ref * w).sum().backward()

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    pos = positions(seq_len, world_size, rank)
    ql, kl, vl = (t.detach()[:, :, pos].clone().requires_grad_() for t in (q, k, v))
    sl = s.detach().clone().requires_grad_() if sinks else None
    masks = ContextParallelMaskBuilder(world_size, rank, method, {window}, flex_masks=False)(None, pos.expand(2, -1))
    out = ContextParallelAttention(mesh["cp"], method)(ql, kl, vl, masks, window, sinks=sl)
    (out * w[:, :, pos]).sum().backward()

    assert rel_error(out, ref[:, :, pos]) < REL, "output"
    for name, got, full in (("q", ql, q), ("k", kl, k), ("v", vl, v)):
        assert rel_error(got.grad, full.grad[:, :, pos]) < REL, f"grad of {name} ({method}, cp={world_size})"
    if sinks:  # each rank's sinks get its queries' part of the gradient: together the whole
        import torch.distributed as dist

        dist.all_reduce(sl.grad)
        assert rel_error(sl.grad, s.grad) < REL, "grad of the sinks"


def _check_cases(rank: int, world_size: int, method: str, cases: list[tuple]) -> None:
    _check_attention(rank, world_size, method, 4, 2)  # GQA: 4 query heads share 2 K/V heads
    for case in cases:
        _check_heads(rank, world_size, method, *case)


MASKINGS = {"causal": (None, 0), "documents": (5.0, 0), "window": (None, 7), "documents_window": (6.0, 5)}


def _check_attention(rank: int, world_size: int, method: str, n_heads: int, n_kv_heads: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from titan.models.attention import Visibility, random_documents
    from titan.parallel.context_parallel import ContextParallelAttention, ContextParallelMaskBuilder, positions

    seq_len = 2 * world_size * 6  # 24 or 48: divisible by 2 x cp, not a power of two
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    pos = positions(seq_len, world_size, rank)
    for masking, (mean, window) in MASKINGS.items():
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, n_heads, seq_len, 8, generator=g, requires_grad=True)
        k = torch.randn(2, n_kv_heads, seq_len, 8, generator=g, requires_grad=True)
        v = torch.randn(2, n_kv_heads, seq_len, 8, generator=g, requires_grad=True)
        w = torch.randn(2, n_heads, seq_len, 8, generator=g)  # a random upstream gradient
        docs = None if mean is None else random_documents(2, seq_len, mean, g)
        # The reference: the whole sequence with the dense mask (documents and window written out).
        mask = Visibility.self_attention(seq_len, docs, window, "cpu").dense()
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        (ref * w).sum().backward()

        ql, kl, vl = (t.detach()[:, :, pos].clone().requires_grad_() for t in (q, k, v))
        masks = ContextParallelMaskBuilder(world_size, rank, method, {window})(docs, pos.expand(2, -1))
        out = ContextParallelAttention(mesh["cp"], method)(ql, kl, vl, masks, window)
        (out * w[:, :, pos]).sum().backward()
        where = f"{masking}, {method}, cp={world_size}"
        assert rel_error(out, ref[:, :, pos]) < REL, f"output ({where})"
        for name, got, full in (("q", ql, q), ("k", kl, k), ("v", vl, v)):
            assert rel_error(got.grad, full.grad[:, :, pos]) < REL, f"grad of {name} ({where})"
        if method == "allgather" and masking == "documents_window":  # CUDA's path (FlexAttention), forward only
            flex = ContextParallelMaskBuilder(world_size, rank, method, {window}, flex_masks=True)
            out = ContextParallelAttention(mesh["cp"], method)(ql.detach(), kl.detach(), vl.detach(),
                                                               flex(docs, pos.expand(2, -1)), window)
            assert rel_error(out, ref[:, :, pos]) < REL, f"flex output ({where})"


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("method", ["allgather", "ring"])
def test_cp_attention_matches_full_sdpa(cp, method):
    """Causal, documents, a sliding window, and both: output and q/k/v gradients within 1e-5. In the same processes
    at cp = 2: MLA (DeepSeek-V3: values of 5 channels against queries and keys of 8, every head its own K and V), and
    with allgather gpt-oss's 5-token window by the true positions (across the load-balanced chunks) with a sink per
    head."""
    cases = [(4, 4, 5)] + ([(4, 2, 8, 5, True)] if method == "allgather" else []) if cp == 2 else []
    spawn_gloo(_check_cases, cp, method, cases)


def test_ring_block_kernels_match_autograd(one_thread):
    """The fused per-block kernels (forward with log-sum-exp, backward from the merged output) against autograd
    through SDPA for every step shape; scripts/gpu_check runs the same function on CUDA (flash / efficient)."""
    from titan.parallel.ring_attention import check_block_kernels

    worst = check_block_kernels("cpu", torch.float32, seq=48, heads=4, kv_heads=2, head_dim=8)
    assert max(worst.values()) < 1e-5, worst


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


def test_masked_ring_on_cuda_is_refused_in_one_line():
    """The one combination that cannot work: the ring's per-block masks are dense (CPU only), so masked attention
    (documents, packing, windows) under the ring on CUDA is refused naming the key; the dry run checks as on CUDA."""
    from dist_utils import REPO

    from titan import config_io, dry_run
    from titan.errors import ConfigError
    from titan.parallel.context_parallel import check_masking

    with pytest.raises(ConfigError, match=r"^parallelism.context_parallel_rotate_method=ring with document masking"):
        check_masking(2, "ring", True, "cuda")
    for allowed in ((2, "ring", True, "cpu"), (2, "allgather", True, "cuda"), (2, "ring", False, "cuda"),
                    (1, "ring", True, "cuda")):
        check_masking(*allowed)
    argv = ["--config", str(REPO / "tests" / "configs" / "tiny.toml"), "--parallelism.context_parallel_degree", "2",
            "--parallelism.context_parallel_rotate_method", "ring", "--training.document_masking"]
    with pytest.raises(ConfigError, match="on CUDA use allgather"):
        dry_run.run(config_io.load(argv), 2)
    dry_run.run(config_io.load([*argv[:-2], "allgather", argv[-1]]), 2)  # allgather: FlexAttention block masks
