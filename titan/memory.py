"""The memory of one training rank, estimated: what `titan.dry_run` reports and `scripts/plan.py` ranks layouts by.

Owns the activation estimate (bytes one micro-batch leaves saved for backward, per transformer block and for the ends
of the model, per activation-checkpointing mode, after Korthikanti et al. 2022 but counted for titan's own Llama),
the pipeline's in-flight micro-batches (replayed from a schedule's action list), FSDP's gathered-weight and gradient
buffers, the per-shard state sizes of a layout (for the planner; a test holds them equal to the real shards the dry
run reads), and the total with its verdict. It builds no model and no process group. docs/planning.md derives every
formula and lists what the estimate leaves out.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, fields, replace

from titan import config, memory_attention
from titan.config import DTYPES
from titan.memory_attention import attention_bytes, latent_bytes, mask_bytes, qk_norm_bytes
from titan.models.layers import TransformerArgs
from titan.parallel.mesh import ParallelDims

GiB = 2**30
FP32 = 4


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a rank holds."""

    compute: int  # matmul outputs (bf16: 2, fp32: 4)
    residual: int  # the residual stream between blocks: compute under FSDP (weights cast), fp32 under autocast
    autocast: bool  # bf16 without FSDP: each linear saves a cast copy of its input and of its weight
    gathered: int  # FSDP's all-gathered weights (mixed_precision_param)
    reduce: int  # FSDP's gradient reduce-scatter (mixed_precision_reduce)
    state: int = FP32  # stored parameters, gradients and Adam moments (titan keeps them fp32)


def precision(training: config.Training, fsdp: bool) -> Precision:
    """What titan's mixed precision (train.mixed_precision_context, parallel.fsdp) makes of the config."""
    compute = DTYPES[training.mixed_precision_param].itemsize
    autocast = compute != FP32 and not fsdp
    return Precision(compute=compute, residual=FP32 if autocast else compute, autocast=autocast, gathered=compute,
                     reduce=DTYPES[training.mixed_precision_reduce].itemsize)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch on one rank, and how the layout splits its tokens."""

    rows: int  # sequences (a DPO pair is two)
    seq_len: int  # of a whole sequence
    tp: int = 1
    cp: int = 1
    cp_method: str = "allgather"
    loss_parallel: bool = True
    ep: int = 1
    masked: bool = False  # documents in a row, or sliding windows: attention masks (built once per micro-batch)
    windows: int = 1  # distinct windows of the layers, a mask each
    loss_chunk: int = 0  # tokens per chunk of the chunked loss (titan/objectives/token.py), 0 = whole logits

    @property
    def tokens(self) -> int:
        """Tokens this rank computes on inside attention and the FFN (the sequence is split by cp)."""
        return self.rows * self.seq_len // self.cp

    @property
    def tokens_between(self) -> int:
        """Tokens this rank holds between blocks, in the norms and residuals (sequence parallel splits them by tp)."""
        return self.tokens // self.tp


def _widths(args: TransformerArgs, tp: int) -> tuple[int, int, int, int]:
    """This rank's query width, K/V width, query heads and FFN width."""
    q, kv, _, _, heads = memory_attention.widths(args, tp)
    return q, kv, heads, args.ffn_hidden_dim // tp


def norm_bytes(args: TransformerArgs, m: MicroBatch, p: Precision, consumers: int) -> int:
    """RMSNorm saves the normalised value and 1/rms, both fp32 (titan/models/layers.py:RMSNormFunction; CUDA's
    fused F.rms_norm may keep otherwise); the linears after it save the weighted product (gathered to the whole
    sequence under TP), or under autocast one bf16 copy per linear."""
    t, h = m.tokens_between, args.dim
    product = consumers * p.compute if p.autocast else p.residual
    return FP32 * t * h + FP32 * t + product * m.tokens * h


def is_moe_layer(args: TransformerArgs, layer_id: int) -> bool:
    return getattr(args, "n_experts", 0) > 0 and args.is_moe_layer(layer_id)


def moe_bytes(args: TransformerArgs, m: MicroBatch, p: Precision) -> int:
    """A Mixture-of-Experts feed-forward (titan/models/moe.py:MoE) saves, for its T tokens and R = T * top_k routed
    rows: the router's fp32 scores [T, n_experts], the chosen experts (int64) and their fp32 weights before and after
    renormalisation [T, top_k]; two int64 sort indices [R]; the routed rows' input [R, dim]; each expert's SwiGLU on
    its rows (the dense FFN's four tensors, R rows of `moe_hidden_dim` in all; gpt-oss's clamped SwiGLU seven: the
    clamped gate and up, the sigmoid, up + 1, their products); the experts' output [R, dim] (which
    `index_copy_` keeps) and the same back in token order for the weighted sum; the balance loss's fp32 f per
    sequence; a shared expert as a dense FFN on the T tokens (its sigmoid gate's product too). Not tensor-sharded:
    under TP every rank routes the whole sequence. With routing balanced an expert-parallel rank computes R rows too,
    and what dispatch and combine leave saved has the same shapes."""
    t, e, k = m.tokens, p.compute, args.top_k
    rows = t * k
    router = FP32 * t * args.n_experts + 8 * t * k + FP32 * (2 * t * k + t) + FP32 * m.rows * args.n_experts
    glu = 7 if hasattr(args, "swiglu_limit") else 4
    routed = 2 * 8 * rows + 3 * e * rows * args.dim + glu * e * rows * args.moe_hidden_dim
    shared = 4 * e * t * args.shared_hidden_dim + (e * t * (args.dim + 1) if args.shared_gate else 0)
    return router + routed + (shared if args.shared_hidden_dim else 0)


def all_to_all_bytes(args: TransformerArgs, m: MicroBatch, p: Precision, layer_ids: list[int]) -> int:
    """Expert parallelism's transient: one MoE layer's dispatch (or combine) send and receive buffers of R rows, the
    balanced share (a rank that receives more rows than it sends holds more)."""
    if m.ep == 1 or not any(is_moe_layer(args, i) for i in layer_ids):
        return 0
    return 2 * p.compute * m.tokens * args.top_k * args.dim


def block_bytes(args: TransformerArgs, m: MicroBatch, p: Precision, mode: str, moe: bool = False) -> int:
    """Bytes one transformer block saves for backward: `none` everything, `full` only its input (it recomputes the
    rest), `op` (selective) its input and the outputs of its matmuls, attention and TP reduce-scatters. `moe`: its
    feed-forward is a Mixture of Experts (`moe_bytes`)."""
    t, ts, h, e = m.tokens, m.tokens_between, args.dim, p.compute
    q_width, _, heads, ffn = _widths(args, m.tp)
    block_input = p.residual * ts * h
    if mode == "full":
        return block_input
    if mode == "op":
        # wq wk wv, wo and w2 (before the reduce-scatter: the whole width), w1 w3; attention's output and lse. An MoE
        # layer's matmuls: the router's, and w1 w3 w2 of the routed rows.
        ffn_out = e * t * (args.n_experts + args.top_k * (2 * args.moe_hidden_dim + h)) if moe else \
            e * t * (h + 2 * ffn)
        matmuls = e * t * memory_attention.matmul_outputs(args, m.tp) + ffn_out
        sdpa = 0 if m.cp > 1 and m.cp_method == "ring" else e * t * q_width + FP32 * t * heads
        scatters = 2 * e * ts * h if m.tp > 1 else 0
        return block_input + matmuls + sdpa + scatters
    # SwiGLU saves w1's and w3's outputs, silu(w1 x), the product w2 reads.
    ffn_bytes = moe_bytes(args, m, p) if moe else 4 * e * t * ffn
    return (norm_bytes(args, m, p, memory_attention.inputs(args)) + qk_norm_bytes(args, m, p)
            + latent_bytes(args, m, p) + attention_bytes(args, m, p) + norm_bytes(args, m, p, 2) + ffn_bytes)


def block_modes(layer_ids: list[int], ac: config.ActivationCheckpoint) -> list[str]:
    """The mode each block runs under (titan.parallel.activation_checkpoint.apply_ac)."""
    if ac.mode == "none":
        return ["none"] * len(layer_ids)
    if ac.mode == "full":
        return ["full"] * len(layer_ids)
    if ac.selective_ac_option == "op":
        return ["op"] * len(layer_ids)
    every = int(ac.selective_ac_option)
    return ["full" if i % every == 0 else "none" for i in layer_ids]


def linear_weights(args: TransformerArgs, tp: int, moe: bool = False) -> int:
    """Elements of one block's linear weights on a TP rank (what autocast copies): an MoE layer's router, every
    routed expert (the per-expert loop casts each; the grouped matmul takes fp32 inputs on CPU, GPUs the loop under
    autocast) and its shared expert."""
    ffn = args.ffn_hidden_dim // tp
    ffn_weights = args.n_experts * (1 + 3 * args.moe_hidden_dim) + 3 * args.shared_hidden_dim if moe else 3 * ffn
    return memory_attention.weights(args, tp) + args.dim * ffn_weights


def local_vocab(args: TransformerArgs, m: MicroBatch) -> int:
    """Logit columns on this rank: split by TP under loss parallel, else gathered whole."""
    return args.vocab_size // m.tp if m.tp > 1 and m.loss_parallel else args.vocab_size


def logit_bytes(args: TransformerArgs, m: MicroBatch, p: Precision) -> int:
    """The logits and their fp32 copy, or, chunked, one chunk's logits, fp32 copy and log-softmax: the chunk's
    forward keeps nothing of them, its recomputation in backward holds them all at once."""
    copy = FP32 if p.compute != FP32 else 0
    if not m.loss_chunk:
        return (p.compute + copy) * m.tokens * local_vocab(args, m)
    return (p.compute + copy + FP32) * min(m.loss_chunk, m.tokens) * local_vocab(args, m)


@dataclass(frozen=True)
class StageActivations:
    """One micro-batch through one stage (or the whole model): saved bytes and the transients around them."""

    saved: int  # held from its forward until its backward
    logits: int  # the logits and their fp32 copy (or one chunk's), alive around the loss (last stage)
    recompute: int  # a checkpointed block's activations, rebuilt during its backward
    all_to_all: int = 0  # expert parallelism's dispatch/combine buffers of one MoE layer


def stage_activations(args: TransformerArgs, m: MicroBatch, p: Precision, ac: config.ActivationCheckpoint,
                      layer_ids: list[int], first: bool, last: bool) -> StageActivations:
    """The blocks `layer_ids`, plus the embedding's token ids on the first stage, the final norm and the log-softmax
    the loss saves on the last, and what a pipeline stage keeps of its input and output on the others."""
    # Blocks of a mode (and kind: MoE or dense) are alike: compute each once.
    modes = collections.Counter(zip(block_modes(layer_ids, ac), (is_moe_layer(args, i) for i in layer_ids)))
    per_block = {mode: block_bytes(args, m, p, *mode) for mode in modes}
    saved = sum(n * per_block[mode] for mode, n in modes.items())
    if p.autocast:
        saved += sum(n * p.compute * linear_weights(args, m.tp, moe) for (_, moe), n in modes.items())
    between = p.residual * m.tokens_between * args.dim
    logits, saved = 0, saved + mask_bytes(m)
    if first:
        saved += 8 * m.tokens  # int64 token ids
    else:
        saved += between  # the stage's input, which the schedule keeps for its gradient
    if last:
        vocab = local_vocab(args, m)
        saved += norm_bytes(args, m, p, 1) + p.compute * vocab * args.dim * p.autocast
        saved += 0 if m.loss_chunk else FP32 * m.tokens * vocab  # log-softmax, for backward
        logits = logit_bytes(args, m, p)
        # Multi-token prediction, per depth: its block (never checkpointed), three norms, eh_proj's input and its own
        # log-softmax over the vocabulary (its loss never chunks: titan/build.py:loss_chunk_tokens).
        if getattr(args, "mtp_layers", 0):
            saved += args.mtp_layers * (block_bytes(args, m, p, "none", True) + 3 * norm_bytes(args, m, p, 1)
                                        + 2 * p.compute * m.tokens * args.dim + FP32 * m.tokens * vocab)
    else:
        saved += between  # the stage's output, kept by the schedule until its gradient comes back
    rebuilt = max((block_bytes(args, m, p, "none", moe) - per_block[mode, moe] for mode, moe in modes), default=0)
    return StageActivations(saved, logits, rebuilt, all_to_all_bytes(args, m, p, layer_ids))


def schedule_profile(actions) -> tuple[tuple[int, ...], set[tuple[int, ...]]]:
    """Replay a pipeline rank's schedule (`schedule.pipeline_order[rank]`): a forward of stage s holds one more
    micro-batch of s's activations; its full backward (B), or the weight half of a split one (W, after I), frees
    it. Returns (the rank's stages, every distinct vector of micro-batches held per stage along the way)."""
    flat = list(_flat(actions))
    stages = tuple(sorted({a.stage_index for a in flat}))
    held, seen = dict.fromkeys(stages, 0), set()
    for action in flat:
        kind = action.computation_type.value
        if kind == "F":
            held[action.stage_index] += 1
        elif kind in ("B", "W"):
            held[action.stage_index] -= 1
        seen.add(tuple(held[s] for s in stages))
    return stages, seen


def peak_in_flight(profile: tuple[tuple[int, ...], set[tuple[int, ...]]], stage_bytes: dict[int, int]
                   ) -> tuple[int, float]:
    """(peak bytes, micro-batches then held in whole-rank units) of a `schedule_profile` weighted by each stage's
    bytes per micro-batch."""
    stages, seen = profile
    weights = [stage_bytes[s] for s in stages]
    peak = max(seen, key=lambda held: sum(n * w for n, w in zip(held, weights)))
    return sum(n * w for n, w in zip(peak, weights)), sum(peak) / len(stages)


def _flat(actions):
    for action in actions:
        if action is None:
            continue
        if action.sub_actions:
            yield from _flat(action.sub_actions)
        else:
            yield action


# ---------------------------------------------------------------------------------------------------------------
# FSDP


@dataclass(frozen=True)
class Units:
    """FSDP's units on a rank (titan.parallel.fsdp), as element counts before FSDP's sharding (TP-local)."""

    embedding: int  # 0 when absent or tied (then it is part of the root)
    blocks: list[int]
    head: int  # final norm + output (+ the tied embedding)


def fsdp_buffers(units: Units, p: Precision, reshard: str, pipeline: bool) -> int:
    """Gathered weights and gradient buffers at the step's peak (the start of backward): units that keep their
    gathered weights after forward (blocks under `never` or pipelining, the head unless `always`), the
    all-gathers in flight (the unit computing and the one prefetched), and one unit's unsharded gradient with its
    reduce-scatter input."""
    reshard_blocks = {"default": not pipeline, "always": True, "never": False}[reshard]
    body = [u for u in [units.embedding, *units.blocks] if u]
    kept = (0 if reshard_blocks else sum(body)) + (units.head if reshard != "always" else 0)
    resharded = sorted((body if reshard_blocks else []) + ([units.head] if reshard == "always" else []))
    in_flight = sum(resharded[-2:])
    largest = max([*body, units.head], default=0)
    return p.gathered * (kept + in_flight) + (p.gathered + p.reduce) * largest


# ---------------------------------------------------------------------------------------------------------------
# The total


def reserve_bytes(device_bytes: int) -> int:
    """What a device loses outside the estimate: the CUDA context and NCCL's buffers (about 1 GiB) and the caching
    allocator's fragmentation (about 5 %)."""
    return GiB + device_bytes // 20


@dataclass(frozen=True)
class Estimate:
    """One rank's memory at the peak of a step, in bytes."""

    params: int
    grads: int
    optimizer: int
    activations: int  # saved for backward by the micro-batches in flight
    logits: int
    recompute: int
    fsdp_buffers: int
    reserve: int
    all_to_all: int = 0  # expert parallelism's dispatch/combine buffers (transient)
    in_flight: float = 1.0  # micro-batches whose activations are held together (pipelining)
    validation: int = 0  # the peak while validating (after the step: no gradients, nothing saved), 0 = none

    LABELS = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer state",
              "activations": "activations", "logits": "logits (transient)", "recompute": "recomputed block",
              "fsdp_buffers": "FSDP buffers", "all_to_all": "all-to-all buffers", "reserve": "reserve"}

    def parts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("in_flight", "validation")}

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def dominant(self) -> str:
        parts = {k: v for k, v in self.parts().items() if k != "reserve"}
        return self.LABELS[max(parts, key=parts.get)]

    @property
    def peak(self) -> int:
        """The step's total, or validation's when that is higher."""
        return max(self.total, self.validation)

    def fits(self, device_bytes: int) -> bool:
        return self.peak <= device_bytes

    def verdict(self, device_bytes: int) -> str:
        spare = (device_bytes - self.peak) / GiB
        if spare >= 0:
            return f"fits with {spare:.1f} GiB to spare"
        if self.validation > self.total:
            return f"does not fit by {-spare:.1f} GiB while validating (validation.local_batch_size, seq_len)"
        return f"does not fit by {-spare:.1f} GiB; the largest part is {self.dominant()}"


def optimizer_bytes(trainable_bytes: int, cfg: config.Config) -> int:
    """Adam and AdamW keep two moments shaped like each trainable local shard (step counters, scalars, left out), in
    bf16 half the fp32 parameters' bytes; Muon's matrices keep one, counted as two (an upper bound); SGD none. DiLoCo
    adds its outer weights and momentum, each a copy of the trainable shards (titan/parallel/semi_sync.py)."""
    o, s = cfg.optimizer, cfg.semi_sync
    moments = 0 if o.name == "SGD" else 2 * trainable_bytes // (1 + (o.state_dtype != "float32"))
    return moments + (trainable_bytes * (1 + (s.outer_momentum > 0)) if s.method == "diloco" else 0)


def attention_is_masked(cfg: config.Config, args: TransformerArgs) -> bool:
    """Whether attention needs more than causality: documents in a row (document masking, packed SFT) or windows."""
    t = cfg.training
    return t.document_masking or (t.recipe == "sft" and cfg.sft.packing) or any(args.layer_windows)


def _rows(cfg: config.Config, dims: ParallelDims, validation: bool = False) -> int:
    """Sequences in one forward pass: a pipeline micro-batch's, or the local batch's (DPO rows come in pairs)."""
    t = cfg.training
    rows = cfg.parallelism.pipeline_parallel_microbatch_size if dims.pp > 1 else \
        cfg.validation.local_batch_size if validation else t.local_batch_size
    return rows * (2 if t.recipe == "dpo" else 1)


def loss_chunk_tokens(cfg: config.Config, dims: ParallelDims) -> int:
    """The chunk size HeadLoss gets (titan/build.py), 0 for whole logits: training.loss_chunk_tokens where a micro-batch
    (training's or validation's) has more tokens on a rank, and the chunks can be fused, or
    training.loss_chunk_recompute allows recomputed ones. Fused: the token loss (pre-training, SFT) on an output
    projection that stays an OutputHead (no LoRA or float8 on it) and whole (no TP or PP) — output_head.fusable
    decides that on the built model. GRPO, KTO and multi-token prediction (its loss runs in the model) never chunk."""
    t, v, lora, f8 = cfg.training, cfg.validation, cfg.lora, cfg.float8
    if t.recipe in ("grpo", "kto") or cfg.model.mtp_layers:
        return 0
    head_replaced = (lora.enable and "output" in lora.target_modules) or (
        f8.enable and not any(f in "output" for f in f8.filter_fqns))
    fused = t.recipe in ("pretrain", "sft") and dims.tp == 1 and dims.pp == 1 and not head_replaced
    tokens = max(_rows(cfg, dims) * t.seq_len, v.local_batch_size * v.seq_len if v.enable else 0)
    chunked = tokens // dims.cp > t.loss_chunk_tokens and (fused or t.loss_chunk_recompute)
    return t.loss_chunk_tokens if chunked else 0


def micro_batch(cfg: config.Config, dims: ParallelDims, args: TransformerArgs, validation: bool = False
                ) -> MicroBatch:
    """What one forward pass holds (its rows: _rows); with `validation`, validation's."""
    t, p, v = cfg.training, cfg.parallelism, cfg.validation
    masked = attention_is_masked(cfg, args)
    return MicroBatch(_rows(cfg, dims, validation), v.seq_len if validation else t.seq_len, dims.tp, dims.cp,
                      p.context_parallel_rotate_method, p.enable_loss_parallel, dims.ep, masked,
                      len({args.window(i) for i in range(args.n_layers)}), loss_chunk_tokens(cfg, dims))


def validation_bytes(args: TransformerArgs, m: MicroBatch, p: Precision) -> int:
    """Validation's forward holds no activations for backward: one block's at a time (at most what it would save),
    the residual stream around it, the masks, and the loss's logits (one chunk's when chunked)."""
    moe = any(is_moe_layer(args, i) for i in range(args.n_layers))
    return (block_bytes(args, m, p, "none", moe) + 2 * p.residual * m.tokens_between * args.dim + mask_bytes(m)
            + logit_bytes(args, m, p))


@dataclass(frozen=True)
class Stage:
    """A model part a rank holds: pipeline stage `index` (0 without pipelining) with blocks `layers`."""

    index: int
    layers: list[int]
    first: bool  # holds the embedding
    last: bool  # holds the final norm and output (and computes the loss)


def estimate_rank(cfg: config.Config, args: TransformerArgs, dims: ParallelDims, stages: list[Stage], profile,
                  param_bytes: int, trainable_bytes: int, units: Units, device_bytes: int
                  ) -> tuple[Estimate, list[StageActivations]]:
    """One rank's estimate from what it holds: its stages, its schedule's `schedule_profile` (None without
    pipelining), its local parameter bytes (all, and trainable) and its FSDP units. The dry run passes the real
    shards' figures, the planner those from shapes; the activations of one micro-batch per stage come back too."""
    prec = precision(cfg.training, dims.fsdp_enabled)
    m = micro_batch(cfg, dims, args)
    acts = [stage_activations(args, m, prec, cfg.activation_checkpoint, s.layers, s.first, s.last) for s in stages]
    if profile is None:
        saved, in_flight = acts[0].saved, 1.0
    else:
        saved, in_flight = peak_in_flight(profile, {s.index: a.saved for s, a in zip(stages, acts)})
    buffers = fsdp_buffers(units, prec, cfg.parallelism.fsdp_reshard_after_forward, dims.pp > 1) \
        if dims.fsdp_enabled else 0
    grads = trainable_bytes
    if dims.tp > 1 and not dims.fsdp_enabled and not cfg.lora.enable and any(s.first for s in stages):
        # torch 2.13: without FSDP, the gradient of the vocabulary-split embedding comes out replicated over tp
        # (the whole table on every TP rank; FSDP's reduce-scatter re-shards it when there is one).
        grads += prec.state * args.vocab_size * args.dim * (dims.tp - 1) // dims.tp
    estimate = Estimate(params=param_bytes, grads=grads,
                        optimizer=optimizer_bytes(trainable_bytes, cfg), activations=saved,
                        logits=max(a.logits for a in acts), recompute=max(a.recompute for a in acts),
                        fsdp_buffers=buffers, reserve=reserve_bytes(device_bytes),
                        all_to_all=max(a.all_to_all for a in acts), in_flight=in_flight)
    if cfg.validation.enable and any(s.last for s in stages):  # the last stage holds the logits
        val = validation_bytes(args, micro_batch(cfg, dims, args, validation=True), prec)
        estimate = replace(estimate, validation=param_bytes + estimate.optimizer + buffers + estimate.reserve + val)
    return estimate, acts
