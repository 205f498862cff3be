"""The attention seam (titan/models/attention.py) against dense references, on CPU.

- The FlexAttention BlockMask that the CUDA path uses, built from document boundaries and windows, has the same
  full tiles as PyTorch's own `create_block_mask` (which evaluates the mask densely) and no fewer partial ones, and
  building it allocates nothing of size seq^2: its tensors are batch x (seq/128)^2.
- FlexAttention's forward with that mask equals SDPA with the dense boolean mask (fp32, 1e-6); the backward needs a
  GPU (`compare_kernels`, for scripts/gpu_check).
- On CPU the masks are built once per batch, one per distinct window, and every layer gets the same object.
- Sliding windows: a model with alternating window/full layers (with and without documents) matches a reference
  that hands every layer an explicit, hand-written mask, forward and gradients within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_utils import rel_error
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from titan.models import attention
from titan.models.attention import BLOCK, MaskBuilder, Visibility, compare_kernels, random_documents
from titan.models.layers import alternating_windows
from titan.models.llama import Transformer, model_args


def _docs(batch, seq_len, mean, seed=0):
    return random_documents(batch, seq_len, mean, torch.Generator().manual_seed(seed))


CASES = {  # name -> (seq_len, mean document length or None, window)
    "documents": (640, 90.0, 0),
    "documents_ragged_tail": (700, 150.0, 0),
    "window": (600, None, 100),
    "documents_and_window": (768, 200.0, 130),
    "long_documents": (512, 2000.0, 0),
}


@pytest.mark.parametrize("case", CASES)
def test_block_mask_agrees_with_pytorchs_dense_construction(case):
    seq_len, mean, window = CASES[case]
    docs = None if mean is None else _docs(2, seq_len, mean)
    vis = Visibility.self_attention(seq_len, docs, window, "cpu")
    ours = vis.block_mask()
    theirs = create_block_mask(vis.mask_mod(), 1 if docs is None else 2, 1, seq_len, seq_len, device="cpu")

    def tiles(bm, full):
        counts, idx = (bm.full_kv_num_blocks, bm.full_kv_indices) if full else (bm.kv_num_blocks, bm.kv_indices)
        n = idx.shape[-1]
        dense = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool)
        cols = torch.where(torch.arange(n) < counts[..., None], idx.long(), n)
        return dense.scatter_(-1, cols, True)[..., :n]

    assert torch.equal(tiles(ours, True), tiles(theirs, True))  # full tiles skip the mask: exact
    ours_partial, theirs_partial = tiles(ours, False), tiles(theirs, False)
    assert torch.equal(ours_partial | theirs_partial, ours_partial)  # a superset: never drops a visible key
    if not (mean and window):  # documents alone or a window alone: tile bounds are exact, so equal
        assert torch.equal(ours_partial, theirs_partial)
    assert torch.equal(ours.to_dense(), ours.to_dense()) and ours.seq_lengths == (seq_len, seq_len)


@pytest.mark.parametrize("case", CASES)
def test_flex_forward_equals_dense_mask(case, one_thread):
    seq_len, mean, window = CASES[case]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, seq_len, 16, generator=g)
    k, v = torch.randn(2, 2, seq_len, 16, generator=g), torch.randn(2, 2, seq_len, 16, generator=g)
    docs = None if mean is None else _docs(2, seq_len, mean, seed=2)
    vis = Visibility.self_attention(seq_len, docs, window, "cpu")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=vis.dense(), enable_gqa=True)
    got = attention.flex(q, k, v, vis.block_mask())
    assert rel_error(got, ref) < 1e-6


class _Allocations(TorchDispatchMode):
    """The largest number of elements any op returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_block_mask_allocates_nothing_of_size_seq_squared():
    """The CUDA path's mask object, built here on CPU by the same code: at seq 8192 (batch 2, documents and a
    window) no op returns more than batch x seq elements, and what the BlockMask keeps is batch x (seq/128)^2."""
    seq_len, batch = 8192, 2
    docs = _docs(batch, seq_len, 700.0)
    with _Allocations() as seen:
        mask = Visibility.self_attention(seq_len, docs, 1024, "cpu").block_mask()
    tiles = (seq_len // BLOCK) ** 2
    assert seen.largest <= batch * seq_len < seq_len**2 // 1000, seen.largest
    kept = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices, mask.q_num_blocks,
            mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices]
    assert max(t.numel() for t in kept) == batch * tiles
    assert 0 < mask.sparsity() < 100  # the window and the documents skip most tiles


def _model(windows=(), seed=0, seq_len=48):
    torch.manual_seed(seed)
    model = Transformer(model_args("tiny", vocab_size=128, max_seq_len=seq_len, layer_windows=windows))
    model.init_weights()
    return model


def test_masks_are_built_once_per_batch_and_shared_by_every_layer(monkeypatch, one_thread):
    """Counted, not assumed: with documents and two distinct windows (alternating layers), one forward builds two
    dense masks, all four layers receive the same AttentionMasks object, and what their SDPA saves for backward is
    those two tensors (built in the scores' dtype, so no layer converts and keeps a copy of its own)."""
    model = _model(alternating_windows(4, 8))
    builds, seen = [], []
    dense = Visibility.dense
    monkeypatch.setattr(Visibility, "dense", lambda self: builds.append(self.window) or dense(self))
    for layer in model.layers.values():
        layer.attention.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["mask"]),
                                                  with_kwargs=True)
    tokens = torch.randint(0, 128, (2, 48))
    saved = []  # what autograd keeps: each layer's SDPA saves the mask it was given, the same two tensors
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(tokens, _docs(2, 48, 10.0))
    assert sorted(builds) == [0, 8] and len(seen) == 4 and all(m is seen[0] for m in seen)
    assert {w: tuple(m.shape) for w, m in seen[0].by_window.items()} == {0: (2, 1, 48, 48), 8: (2, 1, 48, 48)}
    masks = {t.untyped_storage().data_ptr() for t in saved if t.shape == (2, 1, 48, 48)}
    assert masks == {m.untyped_storage().data_ptr() for m in seen[0].by_window.values()}  # 2 masks, not 4
    builds.clear()
    model(tokens, _docs(2, 48, 10.0, seed=1))  # the next batch: built again, once
    assert sorted(builds) == [0, 8]


def _explicit_mask(seq_len, window, docs):
    """The reference, written out: key j is visible to query i iff j <= i, i - j < window (if any), same document."""
    i, j = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    mask = (j <= i) & ((i - j < window) if window else True)
    if docs is not None:
        mask = mask & (docs[:, :, None] == docs[:, None, :])
    return mask.expand(docs.shape[0] if docs is not None else 1, seq_len, seq_len)[:, None]


class _ExplicitSDPA(torch.nn.Module):
    def __init__(self, window, docs):
        super().__init__()
        self.window, self.docs = window, docs

    def forward(self, q, k, v, masks=None, window=0):
        assert window == self.window
        mask = _explicit_mask(q.shape[2], self.window, self.docs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("documents", [False, True])
def test_alternating_windows_match_an_explicit_mask_reference(documents, one_thread):
    seq_len, window = 48, 6
    windows = alternating_windows(4, window)
    assert windows == (6, 0, 6, 0)
    docs = _docs(2, seq_len, 12.0) if documents else None
    tokens = torch.randint(0, 128, (2, seq_len), generator=torch.Generator().manual_seed(3))
    model, ref = _model(windows), _model(windows)
    for i, layer in ref.layers.items():
        layer.attention.sdpa = _ExplicitSDPA(windows[int(i)], docs)
    out, expected = model(tokens, docs), ref(tokens, docs)
    assert rel_error(out, expected) < 1e-5
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        assert rel_error(p.grad, r.grad) < 1e-5, name
    # The windows matter: the same weights with every layer full give other logits.
    full = _model()
    full.load_state_dict(model.state_dict())
    assert rel_error(full(tokens, docs), expected) > 1e-3
    # The CUDA path's FlexAttention (forward only on CPU) gives the same logits.
    model.mask_builder = MaskBuilder({window, 0}, flex=True)
    with torch.no_grad():
        if documents:
            assert rel_error(model(tokens, docs), expected) < 1e-5
        else:  # window-only masks are built where the layer runs: by device, so ask for flex there
            flexible = attention.uses_flex
            try:
                attention.uses_flex = lambda device: True
                assert rel_error(model(tokens), expected) < 1e-5
            finally:
                attention.uses_flex = flexible


def test_bad_layer_windows_are_refused():
    with pytest.raises(ValueError, match="layer_windows"):
        model_args("tiny", vocab_size=128, layer_windows=(4, 0))


def test_compare_kernels_runs_the_forward_on_cpu(one_thread):
    """The GPU check's function: on CPU it compares the forward (flex has no CPU backward)."""
    result = compare_kernels("cpu", seq_len=384, n_heads=4, n_kv_heads=2, head_dim=16, mean_doc_len=60.0,
                             dtype=torch.float32)
    assert result["out_rel_diff"] < 1e-6 and 0 < result["sparsity"] < 100 and "dq_rel_diff" not in result
