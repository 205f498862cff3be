"""The decoder every family is built from, for a single device: RMSNorm, RoPE (with Llama 3.1 or YaRN frequency
scaling), grouped-query attention (optionally with a per-head RMSNorm on q and k, biases, a head size independent of
dim / n_heads, and a sliding window per layer) through the kernels of titan/models/attention.py, SwiGLU feed-forward,
the transformer block and the stack, with optional tied embeddings.

A family (titan/models/llama.py, qwen3.py) is a flavors table of `TransformerArgs`; it does not fork these layers.
For generation (titan/generation.py) the stack takes a `KVCache`: each attention layer writes its keys and values
into it and attends over what it holds, so a new token costs one token's compute.
Nothing here knows about processes or meshes: tensor, pipeline and context parallelism, FSDP, activation
checkpointing and compile are applied from outside by `titan.parallel`, which finds its way by these module names.
Layers live in a `ModuleDict` keyed by their index so that pipeline stages can drop layers and keep the names (and
checkpoints) of the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from titan.models.attention import AttentionMasks, MaskBuilder, attend, document_mask  # noqa: F401 - re-exported
from titan.models.kv_cache import KVCache, LayerCache  # noqa: F401 - re-exported
from titan.models.output_head import OutputHead


@dataclass
class RopeScaling:
    """Llama 3.1 long-context frequency scaling (applied to the RoPE frequencies, not to positions)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class YarnScaling:
    """YaRN (Peng et al., 2023) long-context scaling, as DeepSeek-V3 and gpt-oss use it: each RoPE frequency is
    interpolated by `factor` (slow ones), kept (fast ones: more than `beta_fast` turns over the original context) or
    blended in between; the rotations' amplitude becomes `attention_factor()` (q and k both scaled, so the scores by
    its square). `mscale` / `mscale_all_dim` are DeepSeek's refinements of that factor, and `mscale_all_dim` also
    scales MLA's softmax (titan/models/mla.py). Hugging Face's rope_parameters of type "yarn", field for field."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0 = not given
    mscale_all_dim: float = 0.0
    truncate: bool = True  # round the blending band's ends to whole channel pairs
    attention_factor: float | None = None  # explicit amplitude; None = derived from factor and the mscales

    def amplitude(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 * mscale * ln(factor) + 1 (1 without scaling)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class TransformerArgs:
    """The sizes the shared decoder reads. A family's args dataclass derives from it, names its family and provides
    `head_dim` and `ffn_hidden_dim`, as fields or as properties (Llama derives them from dim, Qwen3 states them)."""

    family: ClassVar[str] = ""  # the registry key (model.name) of the family these arguments belong to
    # What a Hugging Face checkpoint must agree on with the model built from model.flavor (titan/hf.py).
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "ffn_hidden_dim", "tie_embeddings",
        "qk_norm", "rope_theta", "norm_eps", "rope_scaling")

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (no grouping)
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | YarnScaling | None = None
    max_seq_len: int = 8192  # length of the RoPE table; set from training.seq_len
    tie_embeddings: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    depth_init: bool = True  # output-projection init std shrinks with the layer's depth (torchtitan's default)
    # True: the vocabulary is the tokenizer's (set at build). False: the flavor's, which a pretrained checkpoint's
    # embedding has (Qwen3 pads 151,669 tokens to 151,936 rows); the tokenizer must fit in it.
    vocab_from_tokenizer: bool = True
    attention_bias: bool = False  # biases on wq, wk, wv and wo (gpt-oss)

    @property
    def rope_dim(self) -> int:
        """Channels of each head that RoPE rotates: all of them (MLA rotates a part of its own, titan/models/mla.py)."""
        return self.head_dim
    # Sliding-window attention: one entry per layer, the tokens a query looks back over (itself included), 0 = the
    # whole causal past; empty = every layer full. A family with windows (e.g. alternating local/global layers) sets
    # it from its own fields, for instance with `alternating_windows`.
    layer_windows: tuple[int, ...] = ()

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        self.layer_windows = tuple(self.layer_windows)
        if self.layer_windows and (len(self.layer_windows) != self.n_layers or min(self.layer_windows) < 0):
            raise ValueError(f"layer_windows needs one window >= 0 per layer ({self.n_layers}), got "
                             f"{self.layer_windows}")

    def window(self, layer_id: int) -> int:
        """The sliding window of layer `layer_id` (0 = full causal attention)."""
        return self.layer_windows[layer_id] if self.layer_windows else 0


def alternating_windows(n_layers: int, window: int, every: int = 2) -> tuple[int, ...]:
    """Windowed layers with a full-attention layer every `every`-th (layers every-1, 2*every-1, ... are full), as
    Gemma 2 (every=2) and similar families interleave them."""
    return tuple(0 if (i + 1) % every == 0 else window for i in range(n_layers))


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_frequencies(args: TransformerArgs, device=None) -> torch.Tensor:
    """Complex rotations a * e^{i * pos * freq}, shape (max_seq_len, rope_dim // 2); the amplitude a is 1 except
    under YaRN."""
    dim, s, amplitude = args.rope_dim, args.rope_scaling, 1.0
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64)[: dim // 2] / dim))
    if isinstance(s, YarnScaling):
        freqs, amplitude = _yarn_frequencies(freqs, s, dim, args.rope_theta), s.amplitude()
    elif s is not None:
        freqs = _scale_frequencies(freqs, s)
    pos = torch.arange(args.max_seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(pos, freqs).float()
    return torch.polar(torch.full_like(angles, amplitude), angles)


def _scale_frequencies(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.1: wavelengths longer than the original context are slowed by `factor`, short ones kept, and the band
    # in between interpolated smoothly.
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    mid = (1 - smooth) * freqs / s.factor + smooth * freqs
    return torch.where(wavelen < high_freq_wavelen, freqs,
                       torch.where(wavelen > low_freq_wavelen, freqs / s.factor, mid))


def _yarn_frequencies(freqs: torch.Tensor, s: YarnScaling, dim: int, theta: float) -> torch.Tensor:
    # Pair i turns (original context / wavelength_i) times over the original context. Pairs turning more than
    # beta_fast times keep their frequency, fewer than beta_slow are interpolated (divided by factor), and a linear
    # ramp over the pair index blends the two in between.
    def pair_index(turns: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(s.beta_fast), pair_index(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=freqs.dtype, device=freqs.device) - low) / (high - low)).clamp(0, 1)
    return freqs / s.factor * ramp + freqs * (1 - ramp)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (batch, seq, heads, head_dim) q and k; consecutive pairs of channels form one complex number
    (Meta's layout; Hugging Face's rotate-half layout differs by a permutation of each head's channels, see
    titan/models/hf_adapter.py). `freqs_cis` is the table (positions 0, 1, ...) or, for packed sequences, one row per
    token (batch, seq, ...)."""
    seqlen = xq.shape[1]
    if freqs_cis.dim() == 2:
        freqs = freqs_cis[:seqlen].view(1, seqlen, 1, -1)
    else:
        freqs = freqs_cis[:, :seqlen].unsqueeze(2)
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


# ---------------------------------------------------------------------------------------------------------------
# Layers


FUSED_RMS_NORM = {"cuda"}  # device types whose F.rms_norm is one kernel with its own backward (torch 2.13)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type in FUSED_RMS_NORM:
            # One fused kernel in x's own dtype: it accumulates in fp32 inside and has its own backward. An fp32 copy
            # of a bf16 input would move ~5x the bytes per norm and be what backward keeps (only a GPU shows it).
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps).type_as(x)
        # Elsewhere F.rms_norm is six ops that autograd differentiates one by one, which `RMSNormFunction` avoids:
        # computed in fp32 and rounded once to x's dtype.
        return RMSNormFunction.apply(x.float(), self.weight.float(), self.eps).type_as(x)

    def init_weights(self):
        nn.init.ones_(self.weight)


class RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * w over the last dimension: the forward is F.rms_norm's op for op (bit-identical); the
    backward is its closed form, dx = (g*w - x_hat * mean(g*w * x_hat)) / rms(x) and dw = sum(g * x_hat), with
    x_hat = x / rms(x). Autograd through F.rms_norm's decomposition (CPU, torch 2.13) runs about 20 ops and keeps
    x, x^2 and x_hat; this runs 8 and keeps x_hat and 1/rms: 11 % fewer aten ops and 8 % fewer bytes saved for the
    debug model's step (scripts/benchmark_model.py), gradients equal to within 5e-7 relative."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_hat, rstd, weight = ctx.saved_tensors
        grad_w = grad * weight
        grad_x = (grad_w - x_hat * (grad_w * x_hat).mean(-1, keepdim=True)) * rstd
        # A sum over every leading dimension (not a flatten first): under sequence parallelism grad is a DTensor
        # sharded along the sequence, and the sum then leaves the weight's gradient Partial, as autograd would.
        grad_weight = (grad * x_hat).sum(dim=tuple(range(grad.dim() - 1))) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


class SDPA(nn.Module):
    """Causal attention over (batch, heads, seq, head_dim), q with a multiple of k's and v's heads (grouped-query
    attention: each K/V head serves that many consecutive query heads), within a sliding `window` if > 0 and within
    each document when the batch's `masks` say so (titan/models/attention.py picks the kernel). A module of its own so
    that context parallelism can replace it from outside without touching `Attention`."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: AttentionMasks | None = None,
                window: int = 0) -> torch.Tensor:
        return attend(q, k, v, masks, window)


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs, layer_id: int = 0):
        super().__init__()
        self.head_dim, bias = args.head_dim, args.attention_bias
        self.window = args.window(layer_id)
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=bias)
        # QK-norm: one weight of head_dim shared by all heads, so that it is whole on every tensor-parallel rank.
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.sdpa = SDPA()

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: AttentionMasks | torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        # -1 instead of the head count: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = self.attend(q, k, v, mask, cache)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               cache: LayerCache | None) -> torch.Tensor:
        """The kernel over (batch, heads, seq, head_dim): a family with its own kernel inputs (gpt-oss's sinks)
        overrides this, not the projections around it."""
        window = self.window
        if cache is not None:  # generation: attend over every key written so far (the dense mask says which)
            k, v = cache.update(k, v)
            mask, window = cache.owner.windowed(mask, window), 0
        return self.sdpa(q, k, v, mask, window)

    def init_weights(self, init_std: float):
        for w in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(w.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)
        for w in (self.wq, self.wk, self.wv, self.wo):
            if w.bias is not None:
                nn.init.zeros_(w.bias)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float):
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for w in (self.w2, self.w3):
            nn.init.trunc_normal_(w.weight, mean=0.0, std=init_std)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: TransformerArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = self.build_attention(layer_id, args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = self.build_feed_forward(layer_id, args)
        depth = layer_id + 1 if args.depth_init else args.n_layers
        self.init_std = 0.02 / (2 * depth) ** 0.5

    def build_attention(self, layer_id: int, args: TransformerArgs) -> nn.Module:
        """Grouped-query attention; a family with another attention (MLA, sliding windows) overrides this. The module
        takes (x, freqs_cis, mask=None) and keeps its kernel as `.sdpa` (context parallelism swaps it)."""
        return Attention(args, layer_id)

    def build_feed_forward(self, layer_id: int, args: TransformerArgs) -> nn.Module:
        """The dense SwiGLU; a family with another feed-forward (e.g. Mixture-of-Experts) overrides this."""
        return FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: AttentionMasks | torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        # mask by keyword: tensor parallel's input preparation of `attention` covers the positional inputs only.
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask=mask, cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self):
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(self.init_std)
        self.feed_forward.init_weights(self.init_std)


class Transformer(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, vocab). Pipeline stages set some of tok_embeddings, norm and
    output to None; then the stage takes or returns hidden states instead (as the whole model does, after its final
    norm, with `output_hidden`)."""

    block_class: ClassVar[type[nn.Module]] = TransformerBlock  # a family with another block subclasses and sets it

    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): self.block_class(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = OutputHead(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not persistent: derived from args, so checkpoints hold only learned weights.
        self.register_buffer("freqs_cis", rope_frequencies(args), persistent=False)
        # Builds each batch's attention masks once for all layers; context parallelism swaps in its own.
        self.mask_builder = MaskBuilder({args.window(i) for i in range(args.n_layers)})
        # True: forward stops after the final norm and the loss applies `output` in chunks (titan/objectives/token.py)
        self.output_hidden = False

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """`document_ids` (batch, seq): for packed sequences, which document each token belongs to; every document
        then attends only within itself. `positions` (batch, seq): each token's RoPE position (default 0, 1, ...),
        e.g. restarting at 0 with every document, as if it were alone. `cache` (generation): the tokens are
        written to the cache's columns `cache.slots` and attend to the columns `cache.mask` allows."""
        freqs_cis = self.freqs_cis if positions is None else self.freqs_cis[positions]
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        mask = cache.mask if cache is not None else self.batch_masks(h, document_ids, positions)
        for name, layer in self.layers.items():
            if cache is None:  # the training call stays as it was (wrappers see the same arguments)
                h = layer(h, freqs_cis, mask)
            else:
                h = layer(h, freqs_cis, mask, cache=cache.layer(name))
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None and not self.output_hidden else h

    def batch_masks(self, h: torch.Tensor, document_ids: torch.Tensor | None,
                    positions: torch.Tensor | None) -> AttentionMasks | None:
        """The batch's attention masks, built once for every layer, in the dtype of the scores (the compute dtype)."""
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        return self.mask_builder(document_ids, positions, dtype)

    def to_empty(self, *, device, recurse: bool = True):
        # Leaving the meta device, nn.Module gives each module its own new Parameter (torch 2.13: no in-place set_data
        # from meta), which would untie the output from the embedding; DTensor parameters are swapped and stay tied.
        super().to_empty(device=device, recurse=recurse)
        if self.args.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight
        return self

    def init_buffers(self, device: torch.device | None = None):
        self.freqs_cis = rope_frequencies(self.args, device=device)

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (on whatever device the parameters are; meta parameters are skipped)."""
        out_std = self.args.dim**-0.5
        if self.tok_embeddings is not None:
            if self.args.tie_embeddings:  # the shared matrix is also the output projection: use its scale
                nn.init.trunc_normal_(self.tok_embeddings.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
            else:
                nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.init_weights()
        if self.output is not None and not self.args.tie_embeddings:
            nn.init.trunc_normal_(self.output.weight, mean=0.0, std=out_std, a=-3 * out_std, b=3 * out_std)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, embedding parameters), counting tied weights once."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.tok_embeddings.weight.numel() if getattr(model, "tok_embeddings", None) is not None else 0
    return total, emb
