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
import math
from dataclasses import dataclass, fields

import torch

from titan import config, memory_attention
from titan.config import DTYPES
from titan.memory_attention import attention_bytes, latent_bytes, qk_norm_bytes
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


@dataclass(frozen=True)
class StageActivations:
    """One micro-batch through one stage (or the whole model): saved bytes and the transients around them."""

    saved: int  # held from its forward until its backward
    logits: int  # the logits and their fp32 copy, alive around the loss (last stage)
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
    logits = 0
    if first:
        saved += 8 * m.tokens  # int64 token ids
    else:
        saved += between  # the stage's input, which the schedule keeps for its gradient
    if last:
        vocab = local_vocab(args, m)
        saved += norm_bytes(args, m, p, 1) + FP32 * m.tokens * vocab
        saved += p.compute * vocab * args.dim if p.autocast else 0
        logits = (p.compute + (FP32 if p.compute != FP32 else 0)) * m.tokens * vocab
        # Multi-token prediction, per depth: its block (never checkpointed), three norms, eh_proj's input and its own
        # log-softmax over the vocabulary.
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

    LABELS = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer state",
              "activations": "activations", "logits": "logits (transient)", "recompute": "recomputed block",
              "fsdp_buffers": "FSDP buffers", "all_to_all": "all-to-all buffers", "reserve": "reserve"}

    def parts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "in_flight"}

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def dominant(self) -> str:
        parts = {k: v for k, v in self.parts().items() if k != "reserve"}
        return self.LABELS[max(parts, key=parts.get)]

    def fits(self, device_bytes: int) -> bool:
        return self.total <= device_bytes

    def verdict(self, device_bytes: int) -> str:
        spare = (device_bytes - self.total) / GiB
        if spare >= 0:
            return f"fits with {spare:.1f} GiB to spare"
        return f"does not fit by {-spare:.1f} GiB; the largest part is {self.dominant()}"


def optimizer_bytes(trainable_bytes: int, cfg: config.Config) -> int:
    """Adam and AdamW keep two moments shaped like each trainable local shard (step counters, scalars, left out), in
    bf16 half the fp32 parameters' bytes; Muon's matrices keep one, counted as two (an upper bound); SGD none. DiLoCo
    adds its outer weights and momentum, each a copy of the trainable shards (titan/parallel/semi_sync.py)."""
    o, s = cfg.optimizer, cfg.semi_sync
    moments = 0 if o.name == "SGD" else 2 * trainable_bytes // (1 + (o.state_dtype != "float32"))
    return moments + (trainable_bytes * (1 + (s.outer_momentum > 0)) if s.method == "diloco" else 0)


def micro_batch(cfg: config.Config, dims: ParallelDims) -> MicroBatch:
    """What one forward pass holds: a pipeline micro-batch, or the whole local batch (DPO rows come in pairs)."""
    t, p = cfg.training, cfg.parallelism
    rows = p.pipeline_parallel_microbatch_size if dims.pp > 1 else t.local_batch_size
    rows *= 2 if t.recipe == "dpo" else 1
    return MicroBatch(rows, t.seq_len, dims.tp, dims.cp, p.context_parallel_rotate_method, p.enable_loss_parallel,
                      dims.ep)


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
    m = micro_batch(cfg, dims)
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
    return estimate, acts


# ---------------------------------------------------------------------------------------------------------------
# Per-shard sizes from shapes (the planner's; tests hold them equal to the dry run's real shards)

# Which dimension tensor parallelism splits (titan.parallel.tensor_parallel): column-wise linears and the embedding
# rows split dim 0, row-wise linears dim 1; the norms are replicated.
# MLA's per-head projections (wq_b, wkv_b) split like wq; its latents (wq_a, wkv_a and their norms) are replicated.
# A bias splits with a column-wise linear's rows and is replicated on a row-wise one; gpt-oss's sinks split by head.
_TP_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "tok_embeddings": 0, "output": 0,
           "wq_b": 0, "wkv_b": 0, "attention.sinks": 0}


def shard_numel(shape: tuple[int, ...], name: str, tp: int, fsdp: int, ep: int = 1) -> tuple[int, int]:
    """(elements of a parameter's shard on rank 0, elements before FSDP's sharding): split by TP where the plan
    splits it, then FSDP's dim-0 chunk (rank 0's is the largest, rounded up, as DTensor's and FSDP's). Routed
    experts (stacked by expert) are split by expert over `ep` instead, then by FSDP over the fsdp / ep ranks left
    (`expert_fsdp`): by expert, or by the hidden dimension where a rank holds fewer experts (titan/parallel/fsdp.py)."""
    shape = list(shape)
    leaf = name.split(".")[-2] if name.endswith((".weight", ".bias")) else ".".join(name.split(".")[-2:])
    if name.endswith(".bias") and _TP_DIM.get(leaf) == 1 or ".shared_expert." in name:
        leaf = None  # a row-wise linear's bias is added once, whole; an MoE layer's shared expert is not TP-split
    if ep > 1 and ".experts." in name:
        shape[0] //= ep
        fsdp, dim = fsdp // ep, 0 if shape[0] >= fsdp // ep else 1
        tp_local = math.prod(shape)
        shape[dim] = -(-shape[dim] // fsdp)
        return math.prod(shape), tp_local
    if tp > 1 and leaf in _TP_DIM:
        shape[_TP_DIM[leaf]] = -(-shape[_TP_DIM[leaf]] // tp)
    tp_local = math.prod(shape)
    if fsdp > 1:
        shape[0] = -(-shape[0] // fsdp)
    return math.prod(shape), tp_local


def state_from_shapes(named_shapes: list[tuple[str, tuple[int, ...]]], tp: int, fsdp: int,
                      tied: bool = False, ep: int = 1) -> tuple[int, Units]:
    """(parameter elements on rank 0, FSDP units) of a stage's (or the whole model's) parameters, by name; FSDP
    shards over `fsdp` ranks (1: no FSDP), routed experts over `ep` x the rest. A tied embedding belongs to the
    head's unit (the root); a block's experts count in its unit (gathered while it computes)."""
    total, embedding, blocks, head = 0, 0, {}, 0
    for name, shape in named_shapes:
        local, tp_local = shard_numel(shape, name, tp, fsdp, ep)
        total += local
        if name.startswith("tok_embeddings") and not tied:
            embedding += tp_local
        elif name.startswith(("layers.", "mtp.")):  # a block, or a multi-token prediction depth: a unit each
            block = ".".join(name.split(".")[:2])
            blocks[block] = blocks.get(block, 0) + tp_local
        else:
            head += tp_local
    return total, Units(embedding, list(blocks.values()), head)


def named_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, global shape) of each parameter, tied ones once."""
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]
