"""Train a model of any registered family (titan/models/__init__.py): `python -m titan.train --config FILE` (one
process) or `torchrun --nproc_per_node=N -m titan.train --config FILE` (N processes over one DeviceMesh). `build`
turns the config into a model, optimizer, data and metrics; `train` is the loop, one optimizer step per iteration:
get the step's micro-batches -> forward/backward each -> clip -> optimizer step (unless the step is skipped) -> LR
step -> log -> maybe validate -> maybe save. Read `docs/walkthrough.md` for one step followed through the code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from titan import config, config_io, hf, models, recipes
from titan.checkpoint import Checkpointer
from titan.config import DTYPES, Config
from titan.data.pretrain import tokens_per_source
from titan.data.tokenizer import load_tokenizer
from titan.errors import ConfigError
from titan.guard import StepGuard
from titan.lifecycle import (
    EXIT_INTERRUPTED,
    RunFailed,
    RunLock,
    StopRequests,
    claim_dump_folder,
    exit_with,
    tie_to_launcher,
)
from titan.metrics import MetricsLogger, StepTimer, num_flops_per_token, peak_flops, setup_logging
from titan.models import lora, moe
from titan.models.layers import Transformer, TransformerArgs, count_params
from titan.optim import build_lr_scheduler, build_optimizer, clip_grad_norm, honour_new_settings
from titan.parallel import float8
from titan.parallel.context_parallel import check_seq_len, shard_batch, shard_rope
from titan.parallel.mesh import ParallelDims, check_model_fits
from titan.parallel.parallelize import materialize, parallelize
from titan.parallel.pipeline import Pipeline
from titan.parallel.process_group import all_reduce_sum, init_distributed, set_train_timeout, timeout_hint
from titan.parallel.qlora import quantize_bases
from titan.parallel.tensor_parallel import loss_parallel_context
from titan.profiling import Profiler
from titan.recipes import DPOLoss, TokenLoss, build_dataloaders, build_objective, cross_entropy_sum, recipe_detail

logger = logging.getLogger("titan")

# ---------------------------------------------------------------------------------------------------------------
# Set-up


def gradient_accumulation_steps(cfg: config.Training, dp: int) -> int:
    per_micro_step = cfg.local_batch_size * dp
    if cfg.global_batch_size == -1:
        return 1
    if cfg.global_batch_size % per_micro_step:
        raise ConfigError(
            f"training.global_batch_size={cfg.global_batch_size} is not divisible by training.local_batch_size "
            f"x data-parallel degree = {cfg.local_batch_size} x {dp}"
        )
    return cfg.global_batch_size // per_micro_step


def mixed_precision_context(cfg: config.Training, dims: ParallelDims, device: torch.device):
    """bf16 autocast for runs without FSDP; under FSDP its MixedPrecisionPolicy casts the parameters instead."""
    if cfg.mixed_precision_param == "float32" or dims.fsdp_enabled:
        return contextlib.nullcontext
    dtype = DTYPES[cfg.mixed_precision_param]
    return lambda: torch.autocast(device.type, dtype=dtype)


@dataclass
class Run:
    """Everything the loop needs, built from the config."""

    cfg: Config
    device: torch.device
    dims: ParallelDims
    mesh: dict[str, DeviceMesh]  # name -> DeviceMesh (see ParallelDims.build_mesh)
    model_parts: list[torch.nn.Module]  # the whole model, or this rank's pipeline stages
    pipeline: Pipeline | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: Iterable[dict[str, torch.Tensor]]
    val_loader: Iterable[dict[str, torch.Tensor]] | None
    metrics: MetricsLogger
    grad_accum: int
    autocast: Callable[[], contextlib.AbstractContextManager]  # context for the forward pass
    loss_context: Callable[[], contextlib.AbstractContextManager]  # context for loss + backward
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # summed token loss; the last pipeline stage's
    objective: TokenLoss | DPOLoss  # (model, batch) -> summed loss, and count(batch); see titan/recipes.py
    timer: StepTimer = field(default_factory=StepTimer)  # scripts/benchmark.py swaps in a CUDA-syncing one
    checkpointer: Checkpointer | None = None
    lock: RunLock = field(default_factory=RunLock)  # job.dump_folder's one-writer lock (held by rank 0)

    def close(self) -> None:
        """Wait for a background save, close the metrics files, release the lock (in this order)."""
        try:
            self.checkpointer.close()
            self.metrics.close()
        finally:
            self.lock.release()


@dataclass
class ModelParts:
    """The model as this rank holds it: the whole model, or its pipeline stages, with every parallel axis applied."""

    parts: list[torch.nn.Module]
    pipeline: Pipeline | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    build_part: Callable[..., Transformer]  # (meta-device model or stage, adapters=...) -> the same, parallelised
    n_params: int  # of the whole model, tied weights once
    n_embedding: int
    n_active: int  # parameters one token uses (less the experts it is not routed to)

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in parameters(self.parts) if p.requires_grad]  # all, or LoRA's adapters


def build(cfg: Config) -> Run:
    """Every rank: the process group, then job.dump_folder's lock (before anything is written), then the run."""
    device = init_distributed(cfg.training.deterministic, cfg.training.seed, cfg.comm.init_timeout_seconds)
    lock = claim_dump_folder(cfg.job.dump_folder)
    try:
        run = build_run(cfg, device)
    except BaseException:
        lock.release()
        raise
    run.lock = lock
    return run


def build_run(cfg: Config, device: torch.device) -> Run:
    """Config -> a `Run`: the mesh, the model (meta device, parallel axes, then real weights),
    optimizer, data, checkpoint (resumed or initial weights), objective and metrics. `titan.dry_run` goes through
    the same checks and the same `build_model` without the weights."""
    t = cfg.training
    dims = ParallelDims.from_config(cfg.parallelism, dist.get_world_size())
    grad_accum = gradient_accumulation_steps(t, dims.dp)
    tokenizer = load_tokenizer(cfg.model.tokenizer_path)
    args = build_model_args(cfg, dims, tokenizer.vocab_size)
    mesh = dims.build_mesh(device.type)
    model = build_model(cfg, args, mesh, dims, device)
    optimizer = build_optimizer(model.trainable, cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, t.steps)
    train_loader, val_loader = build_dataloaders(t, cfg.sft, cfg.validation, tokenizer, mesh["dp"].get_local_rank(),
                                                 dims.dp)
    checkpointer = build_checkpointer(cfg, args, tokenizer, model.parts, optimizer, scheduler, train_loader)
    checkpointer.load()  # resume (the loop continues at checkpointer.step + 1) or initial weights
    if checkpointer.resumed:
        honour_new_settings(cfg, checkpointer, optimizer, scheduler)
    if cfg.lora.quantize_base != "none":  # the base weights are final now: quantize them (QLoRA)
        quantize_bases(model.parts, cfg.lora, DTYPES[t.mixed_precision_param])
    autocast = mixed_precision_context(t, dims, device)
    objective = build_objective(t, cfg.dpo, cfg.lora, cfg.checkpoint, model, args, autocast)
    metrics = build_metrics(cfg, args, model, dims, device, append=checkpointer.step > 0)
    log_summary(cfg, args, model, dims, grad_accum)
    return Run(cfg=cfg, device=device, dims=dims, mesh=mesh, model_parts=model.parts, pipeline=model.pipeline,
               optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, val_loader=val_loader,
               metrics=metrics, grad_accum=grad_accum, autocast=autocast,
               loss_context=loss_parallel_context(cfg.parallelism, dims), loss_fn=model.loss_fn, objective=objective,
               checkpointer=checkpointer)


def build_model_args(cfg: Config, dims: ParallelDims, vocab_size: int) -> TransformerArgs:
    """The family's flavor with the tokenizer's vocabulary, checked against the parallel degrees."""
    args = models.model_args(cfg.model.name, cfg.model.flavor, tokenizer_vocab=vocab_size, moe=cfg.moe,
                             max_seq_len=cfg.training.seq_len)
    check_model_fits(dims, args)
    check_seq_len(cfg.training.seq_len, dims.cp, dims.tp)
    return args


def build_model(cfg: Config, args: TransformerArgs, mesh: dict[str, DeviceMesh], dims: ParallelDims,
                device: torch.device, weights: bool = True) -> ModelParts:
    """This rank's model parts with every parallel axis applied; with `weights=False` (the dry run) they stay on the
    meta device: every layout check runs and every local shard has its real shape, but nothing is allocated."""
    t = cfg.training
    # Built on the meta device, so even a 405B model costs nothing until it is sharded and materialised.
    with torch.device("meta"):
        model = models.build_model(args)
    (n_params, n_emb), n_active = count_params(model), moe.active_params(model)
    compile_loss = cfg.compile.enable and "loss" in cfg.compile.components
    loss_fn = torch.compile(cross_entropy_sum) if compile_loss else cross_entropy_sum

    def build_part(part: torch.nn.Module, adapters: bool = cfg.lora.enable) -> torch.nn.Module:
        """The same for a whole model and for a pipeline stage: LoRA adapters, parallel axes, then real weights."""
        if adapters:
            lora.apply_lora(part, cfg.lora)
        parallelize(part, mesh, dims, cfg.parallelism, cfg.activation_checkpoint, cfg.compile, t, cfg.float8)
        if weights:
            materialize(part, device, t.seed, cfg.lora if adapters else None)
            if dims.cp > 1:
                shard_rope(part, mesh["cp"])
        return part.train()

    if dims.pp > 1:
        pipeline = Pipeline(model, mesh["pp"], cfg.parallelism, t.local_batch_size, loss_fn, build_part, device,
                            validation=cfg.validation.enable)
        logger.info(pipeline.description)
        parts = pipeline.parts
    else:
        pipeline, parts = None, [build_part(model)]
    return ModelParts(parts, pipeline, loss_fn, build_part, n_params, n_emb, n_active)


def build_checkpointer(cfg: Config, args: TransformerArgs, tokenizer, model_parts: list[torch.nn.Module], optimizer,
                       scheduler, train_loader) -> Checkpointer:
    export = hf.exporter(args, tokenizer, cfg.model.tokenizer_path)
    if cfg.lora.enable:  # Hugging Face gets a plain model: adapters merged into the weights
        export = lora.merging(export, cfg.lora.alpha / cfg.lora.rank)
    # QLoRA checkpoints hold the adapters only: the base is checkpoint.initial_load_path's, quantized again.
    adapters_only = cfg.lora.enable and (cfg.lora.save_adapter_only or cfg.lora.quantize_base != "none")
    return Checkpointer(cfg.checkpoint, cfg.job.dump_folder, model_parts, optimizer, scheduler, train_loader,
                        cfg.training.steps, export, adapters_only=adapters_only, tokenizer=tokenizer,
                        run_config=config_io.to_toml(cfg))


def build_metrics(cfg: Config, args: TransformerArgs, model: ModelParts, dims: ParallelDims, device: torch.device,
                  append: bool) -> MetricsLogger:
    """`append`: a resumed run continues its metrics.jsonl."""
    t = cfg.training
    flops = num_flops_per_token(model.n_active, model.n_embedding, args.n_layers, args.n_heads, args.head_dim,
                                t.seq_len)
    return MetricsLogger(
        cfg.metrics, cfg.job.dump_folder, rank=dist.get_rank(), world_size=dims.world_size, device=device,
        flops_per_token=flops, total_steps=t.steps, extra_header=float8.metrics_header(cfg.float8),
        peak_flops=peak_flops(device, float8.mfu_dtype(cfg.float8, DTYPES[t.mixed_precision_param])), append=append,
    )


def log_summary(cfg: Config, args: TransformerArgs, model: ModelParts, dims: ParallelDims, grad_accum: int) -> None:
    """The model, adapter and batch lines every run prints at start (the dry run too)."""
    t = cfg.training
    logger.info(f"model: {cfg.model.name} {cfg.model.flavor}, {model.n_params:,} parameters ({model.n_embedding:,} "
                f"in the embedding), vocab {args.vocab_size}, seq_len {t.seq_len}; recipe {t.recipe}"
                + recipe_detail(t, cfg.dpo))
    if cfg.lora.enable:
        n_local = sum(p.numel() for p in model.trainable)
        logger.info(f"lora: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {', '.join(lora.adapted(model.parts))}; "
                    f"training {n_local:,} adapter parameters on this rank, the rest frozen; all weights take "
                    f"{weight_bytes(model.parts) / 2**20:,.2f} MiB on this rank")
    logger.info(f"batch: {t.local_batch_size} sequences/rank x {dims.dp} dp ranks x {grad_accum} accumulation "
                f"steps = {t.local_batch_size * dims.dp * grad_accum} sequences/step")


def weight_bytes(model_parts: list[torch.nn.Module]) -> int:
    """Bytes of this rank's parameters (its shards under FSDP; NF4 weights at their packed size)."""
    return sum(lora.nbytes(p.to_local() if isinstance(p, DTensor) else p) for p in parameters(model_parts))


def parameters(model_parts: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for part in model_parts for p in part.parameters()]


# ---------------------------------------------------------------------------------------------------------------
# The loop


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a batch to the GPU from pinned memory, so the copy does not make the host wait for the GPU to drain."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def forward_backward(run: Run, batch: dict[str, torch.Tensor], n_items: torch.Tensor) -> torch.Tensor:
    """One micro-batch: forward, loss = the objective's summed loss / n_items, backward; returns the detached loss
    (under pipeline parallelism the schedule does this for its micro-batches; the loss is 0 off the last stage)."""
    with run.loss_context():
        if run.pipeline is not None:
            with run.autocast():  # only bf16 without FSDP autocasts; here it also spans the schedule's backward
                return run.pipeline.step(batch["input"], batch["label"], n_items)
        loss = run.objective(run.model_parts[0], batch) / n_items  # logits are freed inside: only the loss is kept
        loss.backward()
    return loss.detach()


def forward_loss(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed loss of one batch, forward only (0 off the last pipeline stage)."""
    with run.loss_context():
        if run.pipeline is not None:
            with run.autocast():
                return run.pipeline.forward_loss(batch["input"], batch["label"])
        return run.objective(run.model_parts[0], batch)


def train(run: Run) -> None:
    """The loop inside the profiler's context (a no-op unless [profiling] asks) and the stop-signal handlers."""
    first_step = run.checkpointer.step + 1  # 1, or the step after a resumed checkpoint
    with Profiler(run.cfg.profiling, run.cfg.job.dump_folder, dist.get_rank(), run.device, first_step) as prof, \
            StopRequests(run.dims.world_size) as stop:
        train_steps(run, prof, stop, first_step)


def train_steps(run: Run, profiler: Profiler, stop: StopRequests, first_step: int) -> None:
    cfg, device, timer = run.cfg, run.device, run.timer
    guard = StepGuard(cfg.training, skipped_before=run.checkpointer.train_state.skipped_steps)
    token_mesh = run.mesh["dp_cp"]  # where the batch is split
    loss_mesh = run.mesh["pp_dp_cp"]  # where loss values live (only the last pipeline stage has them)
    batches = iter(run.train_loader)
    tokens_per_step = (cfg.training.local_batch_size * run.dims.dp * run.grad_accum * cfg.training.seq_len
                       * run.objective.rows_per_sample)  # DPO: two sequences (chosen, rejected) per sample
    logger.info(f"training {cfg.training.steps} steps")

    timer.start()
    for step in range(first_step, cfg.training.steps + 1):
        with timer("data"):
            # Each context-parallel rank keeps its load-balanced part of every sequence.
            micro_batches = [to_device(shard_batch(next(batches), run.mesh["cp"]), device)
                             for _ in range(run.grad_accum)]
        # Dividing each micro-batch's summed loss by the items (valid tokens, or DPO pairs) of the whole global
        # batch makes the gradient independent of how the batch is split over ranks and micro-steps (and FSDP sums,
        # it does not average).
        n_items, n_tokens = recipes.step_counts(run.objective, micro_batches, token_mesh)
        moe.set_aux_loss_scale(run.model_parts, 1 / n_tokens)  # MoE balance loss: a mean over the routed tokens

        loss_sum = torch.zeros((), device=device)
        with timer("forward_backward"):
            for batch in micro_batches:
                loss_sum += forward_backward(run, batch, n_items)

        with timer("optimizer"):
            grad_norm = clip_grad_norm(parameters(run.model_parts), cfg.training.max_norm, run.mesh["pp"])
            loss_sum = all_reduce_sum(loss_sum, loss_mesh)  # before the update: every rank judges the same loss
            lr = run.scheduler.get_last_lr()[0]  # the lr this step uses
            loss, grad_norm, skipped = guard.check(step, loss_sum, grad_norm)  # non-finite or a spike: no update
            optimizer_step(run, update=not skipped)
            loads, aux = moe.end_of_step(run.model_parts, lambda t: all_reduce_sum(t, loss_mesh), not skipped)

        step_time, regions = timer.lap()  # since the previous lap, less validation
        run.metrics.step(step, loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens_per_step, step_time=step_time,
                         data_time=regions["data"], force=skipped, **guard.metrics(),
                         **run.objective.metrics(token_mesh), **moe.step_metrics(loads, aux, n_tokens),
                         **tokens_per_source(run.train_loader, cfg.training.seq_len))
        profiler.step()
        if step == first_step:  # start-up and compilation are over: a hang now fails after the shorter timeout
            set_train_timeout(run.mesh, cfg.comm.train_timeout_seconds)
        if guard.stuck:  # max_consecutive_skips in a row: nothing of this state is saved
            raise guard.failure(run.checkpointer.newest_text())

        if run.val_loader is not None and (step % cfg.validation.freq == 0 or step == cfg.training.steps):
            with timer("validation", in_step=False):
                run.metrics.validation(step, loss=evaluate(run))
        signal_name = stop.poll()  # SIGTERM, SIGUSR1 or SIGINT on any rank: save this step and stop
        with timer("checkpoint"):  # at checkpoint.interval, the last step and on a signal (async: only the staging)
            run.checkpointer.end_of_step(step, tokens_per_step, guard.total, updated=not skipped,
                                         force=signal_name is not None)
        if signal_name:
            logger.info(f"received {signal_name}: stopped after step {step}")
            break


def optimizer_step(run: Run, update: bool) -> None:
    """The update (unless the step is skipped: then its gradients are just dropped), then the lr schedule's step,
    which advances either way so that the lr stays a function of the step number."""
    if update:
        run.optimizer.step()
        float8.precompute_scales(run.model_parts, run.cfg.float8)  # no-op unless float8 FSDP all-gather asks
        run.scheduler.step()
    else:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" if step 1 is skipped: intended
            warnings.simplefilter("ignore", UserWarning)
            run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss per item (token) over `validation.steps` batches (or the whole split) on every data-parallel rank."""
    for part in run.model_parts:
        part.eval()
    loss_sum = torch.zeros((), device=run.device)
    n_items = torch.zeros((), device=run.device)
    for i, batch in enumerate(run.val_loader):
        if run.cfg.validation.steps != -1 and i >= run.cfg.validation.steps:
            break
        batch = to_device(shard_batch(batch, run.mesh["cp"]), run.device)
        loss_sum += forward_loss(run, batch)
        n_items += run.objective.count(batch)
    for part in run.model_parts:
        part.train()
    loss_sum = all_reduce_sum(loss_sum, run.mesh["pp_dp_cp"])
    n_items = all_reduce_sum(n_items, run.mesh["dp_cp"])
    return (loss_sum / n_items).item()


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def write_resolved_config(cfg: Config) -> None:
    text = config_io.to_toml(cfg)
    if dist.get_rank() == 0:
        folder = Path(cfg.job.dump_folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(text)
        logger.debug("resolved config:\n%s", text)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    tie_to_launcher()
    run = None
    try:
        cfg, flags = config_io.load_run(argv)
        if cfg.job.description:
            logger.info(cfg.job.description)
        if flags.dry_run or flags.check_only:
            from titan import dry_run  # imports this module

            return dry_run.main(cfg, flags) if flags.dry_run else dry_run.check(cfg, flags.world_size)
        run = build(cfg)
        write_resolved_config(cfg)
        if cfg.checkpoint.create_seed_checkpoint:
            run.checkpointer.save_seed()  # step-0 weights for later runs to start from; no training
        else:
            train(run)
        run.close()  # waits for a background save to be written
    except (ConfigError, RunFailed) as e:  # one line, no traceback
        if run is not None:
            with contextlib.suppress(ConfigError, RunFailed):
                run.close()  # a background save of an earlier, good step still completes
        return exit_with(f"titan: error: {e}", e.code if isinstance(e, RunFailed) else 2)
    except KeyboardInterrupt:  # a second Ctrl-C
        return exit_with("titan: interrupted", EXIT_INTERRUPTED)
    except RuntimeError as e:  # DistBackendError too
        hint = timeout_hint(e)
        if hint:
            logger.error(f"rank {os.environ.get('RANK', 0)}: {hint}")
        raise
    finally:
        if run is not None:
            run.lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
