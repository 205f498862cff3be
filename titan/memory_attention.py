"""What a block's attention saves for backward, per kind of attention, for the memory estimate (titan/memory.py, which
owns the rest: norms, feed-forward, pipelines, FSDP, the total): grouped-query attention through SDPA (Llama, Qwen3,
Qwen3-MoE), multi-head latent attention (DeepSeek-V3: titan/models/mla.py, its latents and per-head K and V), and
the dense sink/window path of gpt-oss (titan/models/sinks.py, whose fp32 scores grow with the sequence squared).

The functions take the model's arguments and, duck-typed, titan/memory.py's `MicroBatch` (tokens, rows, seq_len, tp,
cp, cp_method) and `Precision` (compute, autocast). docs/planning.md derives each formula.
"""

from __future__ import annotations

FP32 = 4


def is_mla(args) -> bool:
    return hasattr(args, "kv_lora_rank")


def has_sinks(args) -> bool:
    return hasattr(args, "sliding_window")  # gpt-oss: every layer has sinks, and takes the dense path


def widths(args, tp: int) -> tuple[int, int, int, int, int]:
    """This rank's (query width, key width, value width, output width, query heads): for grouped-query attention
    K and V have the K/V heads' width and the output the query's; for MLA every head has its own keys (q's width)
    and values of v_head_dim."""
    heads = args.n_heads // tp
    if is_mla(args):
        q = heads * args.head_dim
        return q, q, heads * args.v_head_dim, heads * args.v_head_dim, heads
    q, kv = heads * args.head_dim, args.n_kv_heads * args.head_dim // tp
    return q, kv, kv, q, heads


def inputs(args) -> int:
    """The linears that read the block's normalised input (each saves a copy of it under autocast)."""
    return 2 if is_mla(args) else 3


def qk_norm_bytes(args, m, p) -> int:
    """QK-norm (Qwen3) is an RMSNorm over each head of q and of k: it saves their normalised values and 1/rms per
    head and token, in fp32."""
    if not getattr(args, "qk_norm", False):
        return 0
    q, kv, _, _, heads = widths(args, m.tp)
    return FP32 * m.tokens * (q + kv) + FP32 * m.tokens * (heads + kv // args.head_dim)


def latent_bytes(args, m, p) -> int:
    """MLA's latents: each latent RMSNorm (q's when q_lora_rank > 0, kv's) saves its normalised value and 1/rms in
    fp32 and the projection after it its weighted output; RoPE saves its fp32 input, q's rope part per head and the
    one shared key's."""
    if not is_mla(args):
        return 0
    t, e, ranks = m.tokens, p.compute, [args.kv_lora_rank] + ([args.q_lora_rank] if args.q_lora_rank else [])
    norms = sum(FP32 * t * r + FP32 * t + e * t * r for r in ranks)
    return norms + FP32 * t * args.qk_rope_head_dim * (args.n_heads // m.tp + 1)


def attention_bytes(args, m, p) -> int:
    """The attention kernel's saves. SDPA (flash/efficient kernels: no score matrix) keeps q after RoPE, K and V
    with their own heads (enable_gqa), the output and the log-sum-exp; context parallelism changes what it attends
    to. The sink/window path keeps q, K and V repeated to every query head in fp32, the fp32 probabilities
    [rows, heads, queries, keys + 1] and the boolean mask."""
    t, e = m.tokens, p.compute
    q, k, v, out, heads = widths(args, m.tp)
    lse = FP32 * t * heads
    if has_sinks(args):  # (under context parallelism: this rank's queries against every key, allgather)
        probs = FP32 * t * heads * (m.seq_len + 1) + (t // m.rows) * m.seq_len
        return FP32 * t * (q + q + out) + probs + e * t * out  # q, K, V (query heads), probs + mask; wo's input
    if m.cp == 1:
        return e * t * (q + k + v + out) + lse
    if m.cp_method == "ring":
        # RingAttention (titan/parallel/ring_attention.py) saves q, k and v with their own heads (MLA's v zero-padded
        # to k's head size, and the output as wide), its output and lse; wo saves the output re-laid.
        ring_v, ring_out = (k, q) if is_mla(args) else (v, out)
        return e * t * (q + k + ring_v + ring_out) + e * t * out + lse
    # allgather: K and V of the whole sequence (the mask is the batch's, `mask_bytes`).
    return e * t * (q + out) + e * t * m.cp * (k + v) + lse


def mask_bytes(m) -> int:
    """The micro-batch's attention masks, built once for all layers (titan/models/attention.py) and held until its
    backward: on a GPU, FlexAttention BlockMasks of int32 tile counts and indices (by key tile and by query tile,
    partial and full) for rows x query tiles x key tiles, one per distinct window (CP's allgather needs one even
    for plain causal attention: its keys come in rank order). The CPU's dense masks are not modelled."""
    gathered = m.cp > 1 and m.cp_method == "allgather"
    if not (m.masked or gathered):
        return 0
    tiles = -(-m.seq_len // m.cp // 128) * -(-m.seq_len // (1 if gathered else m.cp) // 128)
    return 16 * m.windows * (m.rows if m.masked else 1) * tiles


def matmul_outputs(args, tp: int) -> int:
    """Elements per token of the attention's linear outputs before wo (what op-level selective checkpointing keeps
    of them), and wo's: for MLA the latents, q, K-nope and V."""
    q, k, v, out, _ = widths(args, tp)
    if not is_mla(args):
        return q + k + v + args.dim
    heads = args.n_heads // tp
    latents = args.kv_lora_rank + args.qk_rope_head_dim + args.q_lora_rank
    return latents + q + heads * (args.qk_nope_head_dim + args.v_head_dim) + args.dim


def weights(args, tp: int) -> int:
    """Elements of the attention's linear weights on a TP rank (what autocast copies)."""
    q, k, v, out, heads = widths(args, tp)
    if not is_mla(args):
        return args.dim * (q + k + v + out)
    d, kl, r = args.dim, args.kv_lora_rank, args.qk_rope_head_dim
    queries = d * args.q_lora_rank + args.q_lora_rank * q if args.q_lora_rank else d * q
    return queries + d * (kl + r) + kl * heads * (args.qk_nope_head_dim + args.v_head_dim) + out * d
