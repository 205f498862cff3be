#!/usr/bin/env python
"""Suggest parallel layouts for a config on N devices: those that fit in memory, fastest first, as flags to paste.

    python scripts/plan.py --config train_configs/llama3_8b.toml --world_size 8 --device_memory_gib 80 [--top 5]
        [--gpus_per_node 8 --peak_tflops 989 --mfu 0.5 --nvlink_gbps 360 --ib_gbps 45] [--section.key value ...]

It enumerates the layouts titan can run (tensor parallel within a node, pipeline degree and schedule, context
parallel, FSDP / HSDP over the rest, activation checkpointing, micro-batch size, FSDP's reshard policy under
pipelining) at a fixed global batch (training.global_batch_size, or with -1 the dry run's: `planned_global_batch`),
drops those titan's own checks reject (as the printed flags would be checked) or whose fullest rank does not fit
(titan.memory's estimate, the dry run's), and ranks the rest by a simple cost model (docs/planning.md): compute per
rank at `mfu` of the peak, stretched by the pipeline bubble, plus the communication each axis leaves exposed.
Parameter shards come from the shapes (`titan.memory_shards.state_from_shapes`, held equal to the dry run's real ones
by tests/test_dry_run.py); `--verify K` also dry-runs the first K suggestions."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.pipelining import PipelineStage

from titan import config, config_io, memory, memory_shards, models
from titan.build import build_model_args, gradient_accumulation_steps
from titan.dry_run import fake_process_group, tokenizer_or_vocab
from titan.dry_run import run as dry_run
from titan.errors import ConfigError
from titan.memory import GiB
from titan.metrics import num_flops_per_token
from titan.models.layers import TransformerArgs, count_params
from titan.models.moe import active_params
from titan.parallel.mesh import ParallelDims
from titan.parallel.parallelize import check_options
from titan.parallel.pipeline import build_schedule, stage_layers, stages_of_rank
from titan.parallel.pipeline import check as check_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flags.py, however this file is loaded
from flags import FILE, Parser  # noqa: E402

RECOMPUTE = {"none": 0.0, "selective": 0.05, "full": 1 / 3}  # extra compute: selective redoes elementwise ops only
MICRO_BATCHES = (1, 2, 4)
MAX_PP = 16  # Llama 3 405B's largest; deeper pipelines take long to enumerate and rarely pay
SCHEDULES = ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
ZERO_BUBBLE = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    peak_flops: float = 989e12  # H100 / H200 SXM, dense bf16
    mfu: float = 0.5  # fraction of the peak the matmuls reach
    nvlink: float = 360e9  # bytes/s per GPU within a node (typical NCCL bus bandwidth, NVLink 4)
    ib: float = 45e9  # bytes/s per GPU across nodes (400 Gb/s InfiniBand NDR per GPU)

    def link(self, span: int) -> float:
        """Bandwidth of a group of `span` consecutive ranks: NVLink if it stays inside a node."""
        return self.nvlink if span <= self.gpus_per_node else self.ib


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int
    ac: str
    local_batch: int  # sequences per micro-step (per pipeline step under PP)
    micro: int  # pipeline micro-batch (= local_batch without PP)
    schedule: str = "1F1B"
    reshard: str = "default"

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @classmethod
    def of(cls, cfg: config.Config, world: int) -> Layout:
        """The layout a config asks for on `world` ranks (default pipeline split, `op` selective checkpointing)."""
        p, dims = cfg.parallelism, ParallelDims.from_config(cfg.parallelism, world)
        micro = p.pipeline_parallel_microbatch_size if dims.pp > 1 else cfg.training.local_batch_size
        return cls(dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp, dims.cp, cfg.activation_checkpoint.mode,
                   cfg.training.local_batch_size, micro, p.pipeline_parallel_schedule, p.fsdp_reshard_after_forward)

    def apply(self, cfg: config.Config, global_batch: int) -> config.Config:
        """`cfg` with this layout, as its printed `flags` make it of a preset, and validated (config.validate) alike."""
        pipelined = {"pipeline_parallel_schedule": self.schedule, "pipeline_parallel_microbatch_size": self.micro} \
            if self.pp > 1 else {}  # without PP the config's stay, as with the printed flags
        p = dataclasses.replace(
            cfg.parallelism, data_parallel_replicate_degree=self.dp_replicate,
            data_parallel_shard_degree=self.dp_shard, tensor_parallel_degree=self.tp, **pipelined,
            pipeline_parallel_degree=self.pp, context_parallel_degree=self.cp, fsdp_reshard_after_forward=self.reshard,
            pipeline_parallel_layers_per_stage=None, pipeline_parallel_split_points=[])
        ac = dataclasses.replace(cfg.activation_checkpoint, mode=self.ac, selective_ac_option="op")
        t = dataclasses.replace(cfg.training, local_batch_size=self.local_batch, global_batch_size=global_batch)
        follows = "local_batch_size" in getattr(cfg.validation, "defaulted", ())  # training's by default: it follows
        v = dataclasses.replace(cfg.validation, local_batch_size=config.AUTO) if follows else cfg.validation
        applied = dataclasses.replace(cfg, parallelism=p, activation_checkpoint=ac, training=t, validation=v)
        config.validate(applied)
        return applied

    def flags(self, global_batch: int) -> str:
        out = [f"--parallelism.data_parallel_shard_degree {self.dp_shard}",
               f"--parallelism.data_parallel_replicate_degree {self.dp_replicate}",
               f"--parallelism.tensor_parallel_degree {self.tp}", f"--parallelism.context_parallel_degree {self.cp}",
               f"--parallelism.pipeline_parallel_degree {self.pp}"]
        if self.pp > 1:
            out += [f"--parallelism.pipeline_parallel_schedule {self.schedule}",
                    f"--parallelism.pipeline_parallel_microbatch_size {self.micro}"]
        out.append(f"--parallelism.fsdp_reshard_after_forward {self.reshard}")  # a preset may set another
        out += [f"--activation_checkpoint.mode {self.ac}", f"--training.local_batch_size {self.local_batch}",
                f"--training.global_batch_size {global_batch}"]
        return " ".join(out)


@dataclass
class Candidate:
    layout: Layout
    memory: int  # the fullest rank's estimated bytes
    step_time: float
    breakdown: dict[str, float]


# ---------------------------------------------------------------------------------------------------------------
# Enumeration


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def families(args: TransformerArgs, world: int, global_batch: int, hw: Hardware):
    """Every layout worth estimating, as a function (micro-batch, AC mode) -> Layout or None for each choice of
    degrees, schedule, reshard policy and pipeline micro-batches per step; titan's own checks reject more later."""
    for tp in divisors(world):
        if tp > hw.gpus_per_node:  # TP's per-block collectives across nodes: never worth it
            continue
        for pp in divisors(world // tp):
            if pp > min(args.n_layers, MAX_PP):
                continue
            for cp in divisors(world // (tp * pp)):
                dp = world // (tp * pp * cp)
                if global_batch % dp:
                    continue
                for dp_replicate in divisors(dp) if cp == 1 else [1]:
                    yield from _family(dp_replicate, dp // dp_replicate, tp, pp, cp, global_batch // dp)


def _family(dp_replicate: int, dp_shard: int, tp: int, pp: int, cp: int, per_rank: int):
    if pp == 1:
        yield lambda micro, ac: (Layout(dp_replicate, dp_shard, tp, pp, cp, ac, micro, micro)
                                 if per_rank % micro == 0 else None)
        return
    # pp, 2pp or 4pp micro-batches per pipeline step; gradient accumulation makes up the rest of the rank's batch.
    for n in (1, 2, 4):
        for schedule in SCHEDULES:
            for reshard in ("default", "always") if dp_replicate * dp_shard * cp > 1 else ("default",):
                def layout(micro, ac, n=n, schedule=schedule, reshard=reshard):
                    local = n * pp * micro
                    return (Layout(dp_replicate, dp_shard, tp, pp, cp, ac, local, micro, schedule, reshard)
                            if per_rank % local == 0 else None)
                yield layout


# ---------------------------------------------------------------------------------------------------------------
# Memory, from shapes


class Model:
    """The parameter shapes of one model, grouped as FSDP and the pipeline split them."""

    def __init__(self, args: TransformerArgs):
        with torch.device("meta"):
            model = models.build_model(args)
        self.args = args
        self.n_params, self.n_embedding = count_params(model)
        self.n_active = active_params(model)  # what FLOPs count: MoE experts a token does not reach are left out
        shapes = memory_shards.named_shapes(model)
        # Blocks come in kinds (dense or Mixture-of-Experts: DeepSeek-V3's first layers, mlp_only_layers): each
        # layer's shapes are those of the first block of its kind.
        kinds = {memory.is_moe_layer(args, i): i for i in reversed(range(args.n_layers))}
        self.block = {moe: [(n.replace(f"layers.{i}.", "layers.{}."), s) for n, s in shapes
                            if n.startswith(f"layers.{i}.")] for moe, i in kinds.items()}
        self.embedding = [(n, s) for n, s in shapes if n.startswith("tok_embeddings")]
        # The head's unit, and multi-token prediction depths (DeepSeek-V3), which follow the last block.
        self.head = [(n, s) for n, s in shapes if n.startswith(("norm", "output", "mtp."))]

    @functools.cache  # noqa: B019 (the planner's few Model objects live as long as the script)
    def stage_state(self, layers: tuple[int, ...], first: bool, last: bool, tp: int, fsdp: int, ep: int = 1
                    ) -> tuple[int, memory.Units]:
        """(parameter elements on the stage's rank 0, FSDP units) of a stage of blocks `layers`."""
        moe = [memory.is_moe_layer(self.args, i) for i in layers]
        shapes = [(n.format(i), s) for i, kind in zip(layers, moe) for n, s in self.block[kind]]
        shapes += (self.embedding if first else []) + (self.head if last else [])
        return memory_shards.state_from_shapes(shapes, tp, fsdp, self.args.tie_embeddings, ep)


def schedule_profiles(schedule: str, pp: int, n_micro: int) -> list:
    """Every pipeline rank's `titan.memory.schedule_profile` under `schedule`: titan's `build_schedule` over
    stand-in stages (the order depends only on the stage and micro-batch counts), so the schedule's own checks
    apply (ConfigError)."""
    profiles = _schedule_profiles(schedule, pp, n_micro)
    if isinstance(profiles, ConfigError):
        raise profiles
    return profiles


@functools.lru_cache(maxsize=None)
def _schedule_profiles(schedule: str, pp: int, n_micro: int) -> list | ConfigError:
    cfg = config.Parallelism(pipeline_parallel_degree=pp, pipeline_parallel_schedule=schedule)
    n_stages = len(stage_layers(2 * pp, pp, cfg))
    with fake_process_group(0, pp):
        with torch.device("meta"):
            stand_ins = [torch.nn.Linear(1, 1) for _ in stages_of_rank(0, pp, n_stages, schedule)]
        stages = [PipelineStage(m, s, n_stages, torch.device("cpu"))
                  for m, s in zip(stand_ins, stages_of_rank(0, pp, n_stages, schedule))]
        try:
            order = build_schedule(stages, cfg, n_micro, loss_fn=None).pipeline_order
        except ConfigError as e:
            return e  # cached like a result: the same schedule fails the same way
    return [memory.schedule_profile(order[r]) for r in range(pp)]


def estimate(cfg: config.Config, model: Model, layout: Layout, global_batch: int, device_bytes: int) -> int:
    """Bytes of the fullest rank, by titan.memory.estimate_rank from the shapes; ConfigError where titan rejects
    the layout."""
    args, c = model.args, layout.apply(cfg, global_batch)
    dims = ParallelDims.from_config(c.parallelism, layout.world)
    fsdp = layout.dp_shard * layout.cp if layout.dp_replicate == 1 else layout.dp_shard
    if layout.pp == 1:
        per_rank, orders = [[memory.Stage(0, list(range(args.n_layers)), True, True)]], None
    else:
        check_pipeline(c.parallelism, args.tie_embeddings, layout.local_batch, c.validation.enable)
        split = stage_layers(args.n_layers, layout.pp, c.parallelism)
        orders = schedule_profiles(layout.schedule, layout.pp, layout.local_batch // layout.micro)
        per_rank = [[memory.Stage(s, split[s], s == 0, s == len(split) - 1)
                     for s in stages_of_rank(r, layout.pp, len(split), layout.schedule)] for r in range(layout.pp)]
    worst = 0
    for r, stages in enumerate(per_rank):
        numel, units = 0, memory.Units(0, [], 0)
        for s in stages:
            n, u = model.stage_state(tuple(s.layers), s.first, s.last, layout.tp, fsdp, dims.ep)
            numel += n
            units = memory.Units(units.embedding + u.embedding, units.blocks + u.blocks, units.head + u.head)
        state = numel * memory.FP32
        est, _ = memory.estimate_rank(c, args, dims, stages, None if orders is None else orders[r], state, state,
                                      units, device_bytes)
        worst = max(worst, est.total)
    return worst


def check(cfg: config.Config, layout: Layout, global_batch: int, vocab: int) -> None:
    """titan's own checks of the config, degrees, batch sizes, model shapes and GPU options (ConfigError), as the
    dry run makes them before it builds (tests/test_dry_run.py dry-runs the suggestions of every preset)."""
    c = layout.apply(cfg, global_batch)
    dims = ParallelDims.from_config(c.parallelism, layout.world)
    gradient_accumulation_steps(c.training, dims.dp)
    build_model_args(c, dims, vocab)
    check_options(c.parallelism, c.compile, c.training, dims, "cuda")


# ---------------------------------------------------------------------------------------------------------------
# Cost model


def step_time(cfg: config.Config, model: Model, layout: Layout, global_batch: int, hw: Hardware
              ) -> tuple[float, dict[str, float]]:
    """Seconds per optimizer step and its parts (docs/planning.md, "The cost model"):
        compute = tokens x FLOPs per token x (1 + recompute) / world / (peak x mfu)
        bubble  = compute x (pp - 1) / (stages per rank x micro-batches), a third of it for zero-bubble schedules
        tp, cp, pp = the bytes each moves on the critical path / its link's bandwidth
        dp      = FSDP's all-gathers and reduce-scatters and HSDP's all-reduce, less what hides behind compute"""
    args, t = model.args, cfg.training
    dp, e = layout.dp_replicate * layout.dp_shard, config.DTYPES[t.mixed_precision_param].itemsize
    flops = num_flops_per_token(model.n_active, model.n_embedding, args.n_layers, args.n_heads, args.head_dim,
                                t.seq_len) * (1 + RECOMPUTE[layout.ac])
    compute = global_batch * t.seq_len * flops / layout.world / (hw.peak_flops * hw.mfu)
    parts = {"compute": compute}
    layers, tokens = args.n_layers / layout.pp, global_batch // dp * t.seq_len // layout.cp  # per rank, per step
    if layout.pp > 1:
        n_micro = layout.local_batch // layout.micro
        bubble = (layout.pp - 1) / ((1 if layout.schedule == "1F1B" else 2) * n_micro)
        parts["bubble"] = compute * bubble / (3 if layout.schedule in ZERO_BUBBLE else 1)
        # Activations forward and their gradients backward; neighbouring stages are world / pp ranks apart.
        parts["pp"] = 2 * tokens * args.dim * e / layout.tp / hw.link(2 * layout.world // layout.pp)
    if layout.tp > 1:
        # Per block 2 all-gathers + 2 reduce-scatters of the activations forward, as many backward, and the
        # forward's again when checkpointing recomputes it (selective: the all-gathers only).
        n = 8 + {"none": 0, "selective": 2, "full": 4}[layout.ac]
        parts["tp"] = n * layers * tokens * args.dim * e * (layout.tp - 1) / layout.tp / hw.link(layout.tp)
    if layout.cp > 1:
        # All-gather of K and V (repeated to every query head) forward, their reduce-scatter backward.
        width = args.n_heads * args.head_dim / layout.tp
        moved = 4 * layers * tokens * layout.cp * width * e * (layout.cp - 1) / layout.cp
        parts["cp"] = moved / hw.link(layout.tp * layout.cp)
    parts["dp"] = max(0.0, data_parallel_time(cfg, model, layout, global_batch, hw) - compute)
    return sum(parts.values()), parts


def data_parallel_time(cfg: config.Config, model: Model, layout: Layout, global_batch: int, hw: Hardware) -> float:
    """FSDP's traffic per step (weights gathered in forward and again in backward per micro-step, or once per step
    when pipelining keeps them; gradients reduce-scattered per micro-step, once per step under pipelining) and
    HSDP's gradient all-reduce across replicas."""
    t = cfg.training
    gathered, reduce = config.DTYPES[t.mixed_precision_param].itemsize, config.DTYPES[t.mixed_precision_reduce].itemsize
    weights = model.n_params / layout.pp / layout.tp  # what one rank's FSDP group shards
    shard = layout.dp_shard * layout.cp
    seconds = 0.0
    if shard > 1:
        if layout.pp == 1:
            steps = global_batch // (layout.dp_replicate * layout.dp_shard) // layout.local_batch
            moved = steps * (2 * gathered + reduce)
        elif layout.reshard == "always":
            moved = 2 * (layout.local_batch // layout.micro) * gathered + reduce
        else:
            moved = gathered + reduce
        seconds += weights * moved * (shard - 1) / shard / hw.link(layout.tp * shard)
    if layout.dp_replicate > 1:
        r = layout.dp_replicate
        seconds += 2 * weights / shard * reduce * (r - 1) / r / hw.ib
    return seconds


# ---------------------------------------------------------------------------------------------------------------


def plan(cfg: config.Config, world: int, device_gib: float, hw: Hardware = Hardware()) -> tuple[list[Candidate], int]:
    """(layouts that fit, fastest first; the global batch they share). A layout that does not fit stops its
    family's bigger micro-batches and its AC modes that keep more (full < selective < none)."""
    global_batch = planned_global_batch(cfg, world)
    vocab = tokenizer_or_vocab(cfg, [])[1]  # the dry run's: the tokenizer's, or the flavor's if it is missing
    model = Model(build_model_args(cfg, ParallelDims(1, 1, 1, 1, 1, 1), vocab))
    device_bytes = int(device_gib * GiB)
    fits = []
    for family in families(model.args, world, global_batch, hw):
        for micro in MICRO_BATCHES:
            fitted = None
            for ac in ("full", "selective", "none"):
                layout = family(micro, ac)
                if layout is None:
                    break
                try:
                    check(cfg, layout, global_batch, vocab)
                    used = estimate(cfg, model, layout, global_batch, device_bytes)
                except ConfigError:
                    break
                fitted = used <= device_bytes
                if not fitted:
                    break
                seconds, parts = step_time(cfg, model, layout, global_batch, hw)
                fits.append(Candidate(layout, used, seconds, parts))
            if fitted is False and ac == "full":
                break
    return sorted(fits, key=lambda c: (c.step_time, c.memory)), global_batch


def planned_global_batch(cfg: config.Config, world: int) -> int:
    """The global batch every layout is planned at: training.global_batch_size, or with -1 what the config's own
    degrees make of it on `world` ranks (local_batch_size x their data-parallel degree, as the dry run says), or,
    where those degrees do not fit `world`, local_batch_size x world."""
    t = cfg.training
    if t.global_batch_size != -1:
        return t.global_batch_size
    try:
        return t.local_batch_size * ParallelDims.from_config(cfg.parallelism, world).dp
    except ConfigError:
        return t.local_batch_size * world


def distinct(fits: list[Candidate]) -> list[Candidate]:
    """The fastest candidate of each combination of degrees (the rest differ only in schedule or batch split)."""
    seen, out = set(), []
    for c in fits:
        l = c.layout
        key = (l.pp, l.dp_replicate, l.dp_shard, l.cp, l.tp)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


# Each number flag's range: a bad value is one line naming it (world 0, NaN memory, zero bandwidth, 10**12 ranks).
RANGES = {"world_size": (1, 2**20), "device_memory_gib": (1e-3, 2**20), "top": (1, 1000), "verify": (0, 1000),
          "gpus_per_node": (1, 1024), "peak_tflops": (1e-3, 1e7), "mfu": (1e-3, 1.0), "nvlink_gbps": (1e-3, 1e7),
          "ib_gbps": (1e-3, 1e7)}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = Parser(prog="plan.py", description=__doc__.split("\n\n")[0], allow_abbrev=False, ranges=RANGES,
               paths={"config": FILE})
    p.add_argument("--config", required=True)
    p.add_argument("--world_size", type=int, required=True)
    p.add_argument("--device_memory_gib", type=float, default=80.0)
    p.add_argument("--top", type=int, default=5, help="suggestions to print (default 5)")
    p.add_argument("--verify", type=int, default=0, help="dry-run the first K suggestions with the real builder")
    d = Hardware()
    p.add_argument("--gpus_per_node", type=int, default=d.gpus_per_node)
    p.add_argument("--peak_tflops", type=float, default=d.peak_flops / 1e12, help="dense bf16 peak per device")
    p.add_argument("--mfu", type=float, default=d.mfu, help="fraction of the peak the matmuls reach")
    p.add_argument("--nvlink_gbps", type=float, default=d.nvlink / 1e9, help="GB/s per GPU inside a node")
    p.add_argument("--ib_gbps", type=float, default=d.ib / 1e9, help="GB/s per GPU across nodes")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns, overrides = parse_args(argv)
    hw = Hardware(ns.gpus_per_node, ns.peak_tflops * 1e12, ns.mfu, ns.nvlink_gbps * 1e9, ns.ib_gbps * 1e9)
    try:
        cfg = config_io.load(["--config", ns.config, *overrides])
        fits, global_batch = plan(cfg, ns.world_size, ns.device_memory_gib, hw)
    except ConfigError as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    tokens = global_batch * cfg.training.seq_len
    print(f"plan: {cfg.model.flavor} on {ns.world_size} x {ns.device_memory_gib:g} GiB, global batch {global_batch} "
          f"sequences of {cfg.training.seq_len} tokens; {len(fits)} layouts fit")
    if not fits:
        print("no layout fits: more devices, a shorter training.seq_len or a smaller global batch")
        return 1
    for i, c in enumerate(distinct(fits)[:ns.top], 1):
        l = c.layout
        mfu = 100 * hw.mfu * c.breakdown["compute"] / c.step_time / (1 + RECOMPUTE[l.ac])  # model FLOPs only
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in c.breakdown.items() if v > 0)
        pipeline = f" ({l.schedule}, {l.local_batch // l.micro} micro-batches of {l.micro})" if l.pp > 1 else ""
        print(f"\n{i}. pp={l.pp}{pipeline} dp_replicate={l.dp_replicate} dp_shard={l.dp_shard} cp={l.cp} tp={l.tp}, "
              f"AC {l.ac}: {c.memory / GiB:.1f} GiB on the fullest rank, {c.step_time:.2f} s/step ({parts}), "
              f"~{tokens / c.step_time / ns.world_size:,.0f} tokens/s/device, ~{mfu:.0f}% MFU")
        print(f"   {l.flags(global_batch)}")
        if i <= ns.verify:
            result = dry_run(l.apply(cfg, global_batch), ns.world_size, ns.device_memory_gib)
            print(f"   dry run: {result.worst.estimate.verdict(result.device_bytes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
