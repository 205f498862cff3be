"""`python -m titan.train --config X.toml --dry_run [--world_size N] [--device_memory_gib M]`: check a config for
an N-rank job and estimate every rank's memory, in one CPU process, before any GPU is rented.

One process plays the ranks that differ (the first rank of every pipeline stage group) one after another, each under
PyTorch's fake process group (collectives do nothing, so any rank of any world can be played): it builds the mesh and
the model through `titan.build`'s own functions, with every parallel axis applied but the weights left on the meta
device, so every check a real run makes is made by the same code, every local shard has its real shape, and nothing
is allocated (a 405B model on 128 ranks takes seconds). Parameter, gradient and optimizer bytes are read off those
shards; activations, transients and buffers come from `titan.memory`'s estimate. Missing files (tokenizer, data,
initial weights) are reported and the run goes on. This module owns the simulation and the report, not the formulae.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from titan import memory, models
from titan.build import (
    ModelParts,
    build_model,
    build_model_args,
    frozen_reference,
    gradient_accumulation_steps,
    log_summary,
    needs_reference,
)
from titan.checkpoint.save import Checkpointer
from titan.config import DTYPES, Config, Parallelism
from titan.config_io import RunFlags
from titan.data.loaders import build_dataloaders
from titan.data.tokenizer import load_tokenizer, tokenizer_file
from titan.errors import ConfigError
from titan.memory import Estimate, GiB, Stage, StageActivations, Units
from titan.models.layers import TransformerArgs
from titan.optim import build_lr_scheduler, build_optimizer
from titan.parallel.context_parallel import check_masking
from titan.parallel.mesh import ParallelDims
from titan.parallel.parallelize import check_options

logger = logging.getLogger("titan")

DEFAULT_DEVICE_MEMORY_GIB = 80.0  # an H100 (an H200 has 141)


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int):
    """Be `rank` of a `world_size`-rank job whose collectives do nothing (PyTorch's "fake" backend)."""
    # The import registers the backend; torchtitan's COMM_MODE=fake_backend uses the same module.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ConfigError("--dry_run simulates the job in one process: run it with python -m titan.train, "
                          "not under torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def smallest_world(p: Parallelism) -> int:
    """The world size the explicit degrees need (data_parallel_shard_degree = -1 counting as the least that
    expert_parallel_degree can borrow from with cp)."""
    cp, ep = p.context_parallel_degree, p.expert_parallel_degree
    shard = p.data_parallel_shard_degree if p.data_parallel_shard_degree > 0 else ep // math.gcd(ep, cp)
    return (p.data_parallel_replicate_degree * shard * p.context_parallel_degree * p.tensor_parallel_degree
            * p.pipeline_parallel_degree)


@dataclass
class RankReport:
    """What one simulated rank holds."""

    rank: int
    role: str  # e.g. "stages [0] (embedding)"
    estimate: Estimate
    stages: list[StageActivations]  # one micro-batch through each part the rank holds


@dataclass
class DryRun:
    dims: ParallelDims
    args: TransformerArgs
    grad_accum: int
    ranks: list[RankReport]
    notes: list[str]
    device_bytes: int

    @property
    def worst(self) -> RankReport:
        return max(self.ranks, key=lambda r: r.estimate.total)

    @property
    def fits(self) -> bool:
        return self.worst.estimate.fits(self.device_bytes)


def run(cfg: Config, world_size: int | None = None, device_memory_gib: float | None = None) -> DryRun:
    """Check `cfg` for a `world_size`-rank job and estimate each distinct rank's memory (see the module docstring)."""
    notes: list[str] = []
    world = world_size or smallest_world(cfg.parallelism)
    device_bytes = int((device_memory_gib or DEFAULT_DEVICE_MEMORY_GIB) * GiB)
    # The same checks, in the same order, as titan.build.build.
    dims = ParallelDims.from_config(cfg.parallelism, world)
    grad_accum = gradient_accumulation_steps(cfg.training, dims.dp)
    tokenizer, vocab = tokenizer_or_vocab(cfg, notes)
    args = build_model_args(cfg, dims, vocab)
    check_masking(dims.cp, cfg.parallelism.context_parallel_rotate_method, memory.attention_is_masked(cfg, args),
                  "cuda")
    cfg = _as_gpu_job(cfg, dims, notes)
    data = tokenizer if tokenizer is not None and _data_present(cfg, notes) else None
    _note_initial_weights(cfg, notes)
    ranks = [_simulate(cfg, args, dims, rank, device_bytes, data if i == 0 else None, log=i == 0)
             for i, rank in enumerate(pipeline_ranks(dims))]
    return DryRun(dims, args, grad_accum, ranks, notes, device_bytes)


def pipeline_ranks(dims: ParallelDims) -> list[int]:
    """One rank per pipeline position (the others differ only by data or a TP/CP slice of the same shapes; FSDP's
    rank 0 holds the largest shard)."""
    per_stage_group = dims.world_size // dims.pp
    return [k * per_stage_group for k in range(dims.pp)]


def tokenizer_or_vocab(cfg: Config, notes: list[str]) -> tuple[object | None, int]:
    """(the tokenizer, its vocabulary size), or (None, the flavor's vocabulary) with a note when the file is
    missing; a tokenizer that is there but broken fails as in a real run."""
    path = cfg.model.tokenizer_path
    if tokenizer_file(path).exists():
        tokenizer = load_tokenizer(path)
        return tokenizer, tokenizer.vocab_size
    flavors = models.family(cfg.model.name).flavors
    vocab = flavors[cfg.model.flavor].vocab_size if cfg.model.flavor in flavors else 0  # else build_model_args fails
    notes.append(f"model.tokenizer_path {path} does not exist: using the {cfg.model.flavor} flavor's vocabulary "
                 f"({vocab} tokens); the data is not checked")
    return None, vocab


def _data_present(cfg: Config, notes: list[str]) -> bool:
    paths = [("training.dataset_path", cfg.training.dataset_path)]
    if cfg.validation.enable:
        paths.append(("validation.dataset_path", cfg.validation.dataset_path))
    missing = [f"{key} {path}" for key, path in paths if path and not Path(path).exists()]
    for what in missing:
        notes.append(f"{what} does not exist: the data is not checked")
    return not missing


def _as_gpu_job(cfg: Config, dims: ParallelDims, notes: list[str]) -> Config:
    """The job runs on GPUs, the simulation on a CPU mesh: the GPU-only options are checked for a GPU, then left
    out of the build (they change where memory lives or how comms overlap, not the shards)."""
    check_options(cfg.parallelism, cfg.compile, cfg.training, dims, "cuda")
    if cfg.training.enable_cpu_offload:
        notes.append("training.enable_cpu_offload: parameters, gradients and optimizer state live in host memory; "
                     "the figures below still count them on the device")
    if cfg.parallelism.enable_async_tensor_parallel:
        notes.append("parallelism.enable_async_tensor_parallel: not simulated (CUDA symmetric memory)")
    return dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, enable_cpu_offload=False),
        parallelism=dataclasses.replace(cfg.parallelism, enable_async_tensor_parallel=False))


def _note_initial_weights(cfg: Config, notes: list[str]) -> None:
    path = cfg.checkpoint.initial_load_path
    if path:
        exists = "exists" if Path(path).exists() else "does not exist"
        notes.append(f"checkpoint.initial_load_path {path} {exists}; a dry run does not read weights")


# ---------------------------------------------------------------------------------------------------------------
# One rank


@contextlib.contextmanager
def _quiet(quiet: bool):
    """The first simulated rank logs the mesh and pipeline lines a real run prints; the others keep quiet."""
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _simulate(cfg: Config, args: TransformerArgs, dims: ParallelDims, rank: int, device_bytes: int, tokenizer,
              log: bool) -> RankReport:
    """Build `rank`'s parts as titan.build.build does, up to the weights; `tokenizer`: also build its data."""
    with fake_process_group(rank, dims.world_size), _quiet(not log):
        mesh = dims.build_mesh("cpu", replicas_apart=cfg.semi_sync.method != "none")
        model = build_model(cfg, args, mesh, dims, torch.device("cpu"), weights=False)
        optimizer = build_optimizer(model.named_trainable, cfg.optimizer)  # its settings checked on meta tensors too
        scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.training.steps)
        if tokenizer is not None:
            build_dataloaders(cfg.training, cfg.sft, cfg.validation, tokenizer, mesh["dp"].get_local_rank(), dims.dp,
                              cfg.grpo, cfg.checkpoint.allow_tokenizer_change)
        # The checkpointer's layout checks; disabled, so that it makes no process group of its own.
        Checkpointer(dataclasses.replace(cfg.checkpoint, enable=False, async_mode="disabled"), cfg.job.dump_folder,
                     model.parts, optimizer, scheduler, None, cfg.training.steps)
        held = list(model.parts)
        if needs_reference(cfg) and not cfg.lora.enable:
            held.append(frozen_reference(model, args))
        params, trainable = local_state(held)
        if cfg.training.recipe == "grpo":  # titan/rollout.py's whole, unsharded copy of the policy that generates
            with torch.device("meta"):
                params += sum(p.numel() for p in models.build_model(args).parameters()) * \
                    DTYPES[cfg.training.mixed_precision_param].itemsize
        stage_ids = model.pipeline.stage_ids if model.pipeline is not None else [0]
        stages = [Stage(i, [int(n) for n in part.layers], part.tok_embeddings is not None, part.output is not None)
                  for i, part in zip(stage_ids, model.parts)]
        profile = None if model.pipeline is None else \
            memory.schedule_profile(model.pipeline.schedule.pipeline_order[mesh["pp"].get_local_rank()])
        estimate, activations = memory.estimate_rank(cfg, args, dims, stages, profile, params, trainable,
                                                     fsdp_units(held), device_bytes)
        if log:
            log_summary(cfg, args, model, dims, gradient_accumulation_steps(cfg.training, dims.dp))
        return RankReport(rank, _role(model), estimate, activations)


def _role(model: ModelParts) -> str:
    parts = model.parts
    ends = [name for name, present in (("embedding", parts[0].tok_embeddings is not None),
                                       ("output", parts[-1].output is not None)) if present]
    if model.pipeline is None:
        return "whole model"
    return f"stages {model.pipeline.stage_ids}" + (f" ({', '.join(ends)})" if ends else "")


def local_numel(p: torch.Tensor) -> int:
    return (p.to_local() if isinstance(p, DTensor) else p).numel()


def local_state(held: list[torch.nn.Module]) -> tuple[int, int]:
    """(parameter bytes, trainable-parameter bytes) of the local shards, tied parameters once."""
    unique = {id(p): p for module in held for p in module.parameters()}.values()
    params = sum(local_numel(p) * p.element_size() for p in unique)
    trainable = sum(local_numel(p) * p.element_size() for p in unique if p.requires_grad)
    return params, trainable


def _tp_local_numel(p: torch.Tensor) -> int:
    """Elements of `p` before FSDP's sharding: the whole tensor, or its TP slice, or an expert-parallel rank's
    experts (what FSDP all-gathers)."""
    if not isinstance(p, DTensor):
        return p.numel()
    numel = p.numel()
    for name, placement in zip(p.device_mesh.mesh_dim_names or (), p.placements):
        if name in ("tp", "ep") and isinstance(placement, Shard):
            numel //= p.device_mesh.size(p.device_mesh.mesh_dim_names.index(name))
    return numel


def fsdp_units(parts: list[torch.nn.Module]) -> Units:
    """titan.parallel.fsdp's units on this rank: embedding, blocks, head (norm + output, with a tied table)."""
    embedding, blocks, head = 0, [], 0
    for part in parts:
        tied = part.args.tie_embeddings
        if part.tok_embeddings is not None:
            n = sum(_tp_local_numel(p) for p in part.tok_embeddings.parameters())
            embedding, head = (embedding, head + n) if tied else (embedding + n, head)
        depths = list((getattr(part, "mtp", None) or {}).values())  # multi-token prediction: units like blocks
        blocks += [sum(_tp_local_numel(p) for p in block.parameters()) for block in [*part.layers.values(), *depths]]
        for module in (part.norm, None if tied else part.output):
            if module is not None:
                head += sum(_tp_local_numel(p) for p in module.parameters())
    return Units(embedding, blocks, head)


# ---------------------------------------------------------------------------------------------------------------
# The report


def report(result: DryRun) -> list[str]:
    """The lines `--dry_run` prints after the model line: one column per pipeline position worth showing."""
    lines = [f"note: {n}" for n in result.notes]
    shown = _shown(result)
    used = result.worst.estimate.total - result.worst.estimate.reserve
    unit, scale = ("GiB", GiB) if used >= GiB else ("MiB", 2**20)
    width = max(14, *(len(r.role) + 2 for r in shown))
    row = lambda label, cells: f"  {label:<24}" + "".join(f"{c:>{width}}" for c in cells)  # noqa: E731
    lines.append(row(f"memory per rank ({unit})", [f"rank {r.rank}" for r in shown]))
    lines.append(row("", [r.role for r in shown]))
    for key, label in Estimate.LABELS.items():
        if key == "all_to_all" and result.dims.ep == 1:
            continue
        lines.append(row(label, [f"{getattr(r.estimate, key) / scale:.2f}" for r in shown]))
    lines.append(row("total", [f"{r.estimate.total / scale:.2f}" for r in shown]))
    if any(r.estimate.validation for r in shown):  # after the step: no gradients, nothing saved for backward
        lines.append(row("while validating", [f"{r.estimate.validation / scale:.2f}" if r.estimate.validation
                                              else "-" for r in shown]))
    if result.dims.pp > 1:
        lines.append(row("micro-batches held", [f"{r.estimate.in_flight:.1f}" for r in shown]))
    worst = result.worst
    lines.append(f"verdict: {worst.estimate.verdict(result.device_bytes)} on a {result.device_bytes / GiB:g} GiB "
                 f"device" + (f" (rank {worst.rank} is the fullest)" if len(result.ranks) > 1 else ""))
    return lines


def _shown(result: DryRun) -> list[RankReport]:
    """First stage, last stage and the fullest rank: the pipeline positions worth a column."""
    ranks = result.ranks
    keep = {ranks[0].rank, ranks[-1].rank, result.worst.rank}
    return [r for r in ranks if r.rank in keep]


_ALLOCATION = re.compile(r"(?:tried to allocate|Tried to allocate) ([\d.]+) ?(bytes|[KMGT]iB)")


def allocation_failure(cfg: Config, error: BaseException) -> str | None:
    """One line for a failed allocation (CPU "can't allocate memory", CUDA out of memory), naming the key whose value
    sized it: of the tensors a key's value makes (the RoPE table and the logits of training.seq_len, a LoRA adapter
    of lora.rank, a layer's experts of moe.n_experts, the weights of model.flavor), the one nearest in size to the
    request. None if `error` is not an allocation failure."""
    text = str(error)
    if not (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in text):
        return None
    match = _ALLOCATION.search(text)
    unit = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    wanted = float(match[1]) * unit[match[2]] if match else 0.0
    t = cfg.training
    try:
        args = models.model_args(cfg.model.name, cfg.model.flavor, moe=cfg.moe, max_seq_len=t.seq_len)
    except (ConfigError, ValueError, KeyError):
        return f"out of memory ({text.splitlines()[-1][:160]}); check the sizes in [model] and [training]"
    with torch.device("meta"):
        n_params = sum(p.numel() for p in models.build_model(args).parameters())
    suspects = {f"training.seq_len={t.seq_len} (its RoPE table)": t.seq_len * args.head_dim // 2 * 8,
                f"training.seq_len={t.seq_len} (a batch's logits)": t.local_batch_size * t.seq_len * args.vocab_size
                * 4, f"model.flavor={cfg.model.flavor} ({n_params:,} parameters)": n_params * 4}
    if cfg.lora.enable:
        suspects[f"lora.rank={cfg.lora.rank} (an adapter)"] = cfg.lora.rank * args.dim * 4
    if getattr(args, "n_experts", 0):
        suspects[f"moe.n_experts={args.n_experts} (a layer's experts)"] = \
            args.n_experts * 3 * args.dim * args.moe_hidden_dim * 4
    key, size = min(suspects.items(), key=lambda kv: abs(math.log2(max(kv[1], 1) / max(wanted, 1))))
    return (f"out of memory: cannot allocate {wanted / GiB:,.1f} GiB; {key} takes about {size / GiB:,.1f} GiB; "
            f"lower it (python -m titan.train --dry_run estimates a config's memory)")


def check(cfg: Config, world_size: int | None = None) -> int:
    """`--check`: the checks `titan.build.build_run` makes before it builds anything, for a `world_size`-rank job,
    in this one process (no process group): scripts/run_train.sh runs it before torchrun starts the workers, so that
    bad input is one line and exit code 2 rather than one line per rank and torchrun's traceback."""
    dims = ParallelDims.from_config(cfg.parallelism, world_size or smallest_world(cfg.parallelism))
    gradient_accumulation_steps(cfg.training, dims.dp)
    build_model_args(cfg, dims, load_tokenizer(cfg.model.tokenizer_path).vocab_size)
    check_options(cfg.parallelism, cfg.compile, cfg.training, dims, "cuda" if torch.cuda.is_available() else "cpu")
    return 0


def main(cfg: Config, flags: RunFlags) -> int:
    world = flags.world_size or smallest_world(cfg.parallelism)
    logger.info(f"dry run: {world} ranks simulated in this process (fake process group, meta tensors: nothing is "
                "allocated); memory per rank as estimated in docs/planning.md")
    result = run(cfg, world, flags.device_memory_gib)
    for line in report(result):
        logger.info(line)
    return 0
