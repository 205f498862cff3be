"""Kernel-level probes of scripts/gpu_check.py: which attention kernel each of titan's call patterns reaches, the
fused RMSNorm against its fp32 form, the MoE layer's grouped GEMM against its per-expert loop and its host syncs per
forward. Each probe returns (status, figures, note); figures are plain numbers and strings for the JSON report.

On CUDA the probes run at the shapes named in each docstring; with `small=True` (the CPU plumbing mode) at tiny ones,
where they check only that the machinery works.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from titan.models.attention import MaskBuilder, compare_kernels, document_mask, random_documents
from titan.models.layers import SDPA, RMSNorm, RMSNormFunction
from titan.models.moe import MoE
from titan.parallel.ring_attention import check_block_kernels
from titan.profiling import HostReads

ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_fused_attention_overrideable", "flex_attention", "_flash_attention_forward",
                 "_efficient_attention_forward")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)).split(".")[0])
        return func(*args, **(kwargs or {}))


def attention_kernel(fn) -> str:
    """The attention kernel `fn()` reaches: a fused one by its op name, "math" when SDPA decomposed into bmm and
    softmax (the slow path that materialises the scores)."""
    with _Ops() as ops:
        fn()
    fused = [n for n in ops.names if n in ATTENTION_OPS]
    if fused:
        return fused[0]
    return "math" if "bmm" in ops.names else "none seen"


def timed(fn, device: torch.device, reps: int = 5) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, wall clock on CPU), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return round(sorted(times)[len(times) // 2], 3)


class Syncs:
    """The host syncs seen so far: `len(syncs)`, `syncs.sites()`, `syncs.clear()`."""

    def __init__(self, records: list, is_sync, site):
        self._records, self._is_sync, self._site = records, is_sync, site

    def __len__(self) -> int:
        return sum(1 for r in self._records if self._is_sync(r))

    def sites(self) -> list[str]:
        return sorted({self._site(r) for r in self._records if self._is_sync(r)})

    def clear(self) -> None:
        self._records.clear()


@contextmanager
def host_syncs(device: torch.device):
    """Counts host syncs inside the block (a live `Syncs`): torch.cuda.set_sync_debug_mode's warnings on a GPU
    (every sync the driver sees, those inside kernels' C++ included), HostReads on CPU (what the GPU run would sync
    on, from Python's side)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield Syncs(caught, lambda w: "synchroniz" in str(w.message), lambda w: f"{w.filename}:{w.lineno}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
    else:
        with HostReads() as reads:
            yield Syncs(reads.reads, lambda r: True, lambda r: r[1])


def attention(device: torch.device, small: bool) -> dict[str, tuple[str, dict, str]]:
    """titan's attention at Llama 3 8B's attention shape (32 query heads of 128, 8 K/V heads, 8,192 tokens, bf16),
    forward + backward, per call pattern (issue 26's GPU rows): causal GQA with no mask (`SDPA`: flash or cuDNN, as
    torch picks) and with cuDNN forced; lognormal packed documents (mean 1,024 tokens) through titan's seam (a
    FlexAttention BlockMask on CUDA) and, for comparison, as the dense boolean mask SDPA took before the seam;
    context parallelism's all-gather pattern (this rank's half of the queries against all keys, offset causal mask);
    FlexAttention against the dense mask (titan/models/attention.py:compare_kernels: output and gradient
    differences, each one's peak memory); and the CP ring's per-block kernels against autograd
    (titan/parallel/ring_attention.py:check_block_kernels)."""
    seq, hq, hkv, d = (256, 4, 2, 16) if small else (8192, 32, 8, 128)
    dtype = torch.float32 if small and device.type == "cpu" else torch.bfloat16

    def qkv(n):
        return [torch.randn(1, h, n, d, device=device, dtype=dtype, requires_grad=True) for h in (hq, hkv, hkv)]

    mean_doc = 16.0 if small else 1024.0
    docs = random_documents(1, seq, mean_doc, torch.Generator().manual_seed(0)).to(device)
    seam_masks = MaskBuilder({0})(docs, None, dtype)  # what Transformer.forward builds once per batch
    dense_mask = document_mask(docs)[:, None]
    half = seq // 2
    cp_mask = (torch.arange(seq, device=device)[None, :] <= torch.arange(half, device=device)[:, None] + half)
    sdpa = SDPA()

    def cudnn_causal(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    cases = {
        "attention causal GQA": lambda q, k, v: sdpa(q, k, v),
        "attention cuDNN causal": cudnn_causal,
        "attention document mask": lambda q, k, v: sdpa(q, k, v, seam_masks),
        "attention dense document mask": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=dense_mask, enable_gqa=True),
        "attention CP all-gather": lambda q, k, v: F.scaled_dot_product_attention(
            q[:, :, :half], k, v, attn_mask=cp_mask, enable_gqa=True),
    }
    rows = {}
    for name, attend in cases.items():
        if name == "attention cuDNN causal" and device.type != "cuda":
            rows[name] = ("SKIP", {}, "cuDNN attention needs CUDA")
            continue
        try:
            fn = lambda attend=attend: _fwd_bwd(attend, *qkv(seq))  # noqa: E731
            kernel = attention_kernel(fn)
            figures = {"kernel": kernel, "fwd_bwd_ms": timed(fn, device, reps=1 if small else 3), "seq": seq,
                       "peak_bytes": peak_bytes(fn, device)}
            note = "the math fallback materialises the scores: slow and memory-hungry" if kernel == "math" else ""
            slow = kernel == "math" and device.type == "cuda" and name != "attention dense document mask"
            rows[name] = ("WARN" if slow else "PASS", figures, note)
        except Exception as e:  # noqa: BLE001 - a probe reports, the next one runs
            rows[name] = ("FAIL", {}, short_error(e))
    rows["attention flex (document mask)"] = _flex(device, small, seq, mean_doc, dtype)
    rows["attention CP ring blocks"] = _ring_blocks(device, small, dtype)
    return rows


def _fwd_bwd(attend, q, k, v):
    attend(q, k, v).float().sum().backward()


def peak_bytes(fn, device: torch.device) -> int | None:
    """Peak memory allocated while fn() runs, above what was allocated before (CUDA; None elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _flex(device, small, seq, mean_doc, dtype):
    """compare_kernels: titan's BlockMask through FlexAttention against SDPA with the dense mask. On CPU the
    forward alone (torch 2.13's FlexAttention has no CPU backward)."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    try:
        r = compare_kernels(device.type, seq_len=seq, n_heads=4 if small else 32, n_kv_heads=2 if small else 8,
                            head_dim=16 if small else 128, mean_doc_len=mean_doc, dtype=dtype)
        worst = max(v for k, v in r.items() if k.endswith("_rel_diff"))
        note = "" if device.type == "cuda" else "forward only: FlexAttention has no CPU backward (torch 2.13)"
        return ("PASS" if worst < tol else "FAIL"), {k: round(v, 6) if isinstance(v, float) else v
                                                      for k, v in r.items()}, note
    except Exception as e:  # noqa: BLE001
        return "FAIL", {}, short_error(e)


def _ring_blocks(device, small, dtype):
    """The ring's fused per-block kernels (forward with log-sum-exp, backward from the merged output) against
    autograd through SDPA, for every step shape."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    try:
        shape = dict(seq=48, heads=4, kv_heads=2, head_dim=8) if small else dict(seq=4096, heads=32, kv_heads=8,
                                                                                head_dim=128)
        worst = check_block_kernels(device.type, dtype, **shape)
        return ("PASS" if max(worst.values()) < tol else "FAIL"), {k: round(v, 6) for k, v in worst.items()}, ""
    except Exception as e:  # noqa: BLE001
        return "FAIL", {}, short_error(e)


def rms_norm(device: torch.device, small: bool) -> tuple[str, dict, str]:
    """titan's RMSNorm on a bf16 activation of 8,192 x 4,096 (one kernel on CUDA) against the fp32 closed form,
    forward + backward time."""
    n, dim = (16, 64) if small else (8192, 4096)
    norm = RMSNorm(dim, 1e-5).to(device)
    x = torch.randn(1, n, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        ref = RMSNormFunction.apply(x.float(), norm.weight.float(), 1e-5)
    out = norm.to(torch.bfloat16)(x).detach()
    diff = float((out.float() - ref).abs().max() / ref.abs().max())
    ms = timed(lambda: norm(x).float().sum().backward(), device)
    return ("PASS" if diff < 2 ** -7 else "FAIL"), {"out_dtype": str(out.dtype)[6:], "rel_diff_vs_fp32": round(
        diff, 6), "fwd_bwd_ms": ms}, ""


def moe_layer(device: torch.device, small: bool) -> tuple[str, dict, str]:
    """One MoE layer at Qwen3-30B-A3B's shapes (dim 2,048, 128 experts of 768, top-8, 4,096 tokens, bf16): grouped
    GEMM against the per-expert loop (output and expert-weight gradient), both timed, and the host syncs of one
    forward + backward with the grouped GEMM (0 expected on H100/H200; torch's fallback elsewhere copies offsets)."""
    dim, hidden, experts, k, tokens = (64, 32, 8, 2, 64) if small else (2048, 768, 128, 8, 4096)
    dtype = torch.float32 if small and device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    layer = MoE(dim, hidden, experts, k, aux_loss_coef=1e-3).to(device=device, dtype=dtype)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer.aux_loss_scale.fill_(1 / tokens)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype, requires_grad=True)

    def run(grouped: bool):
        layer.experts.grouped_mm = grouped
        layer.zero_grad()
        out = layer(x)
        out.float().square().sum().backward()
        return out.detach().float(), layer.experts.w1.grad.float().clone()

    (out_g, dw_g), (out_l, dw_l) = run(True), run(False)
    out_diff = float((out_g - out_l).norm() / out_l.norm())
    dw_diff = float((dw_g - dw_l).norm() / dw_l.norm())
    ms_loop = timed(lambda: run(False), device, reps=3)
    ms_grouped = timed(lambda: run(True), device, reps=3)
    with host_syncs(device) as syncs:
        run(True)
        n_syncs, sites = len(syncs), syncs.sites()[:3]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ok = out_diff < tol and dw_diff < tol and n_syncs == 0
    return ("PASS" if ok else "FAIL"), {"out_rel_diff": round(out_diff, 6), "dw1_rel_diff": round(dw_diff, 6),
                                        "grouped_ms": ms_grouped, "loop_ms": ms_loop, "syncs_fwd_bwd": n_syncs}, \
        (f"syncs at {sites}" if n_syncs else "")


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
