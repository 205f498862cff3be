"""Train a model of any registered family (titan/models/__init__.py): `python -m titan.train --config FILE` (one
process) or `torchrun --nproc_per_node=N -m titan.train --config FILE` (N processes over one DeviceMesh).

This file is the loop, `evaluate` and `main`. `titan.build.build` turns the config into a `Run` (model, optimizer,
data, checkpointer, objective, metrics); `train` then makes one optimizer step per iteration: get the step's
micro-batches -> forward/backward each -> clip -> optimizer step (unless the step is skipped) -> LR step -> log ->
maybe validate -> maybe save. Read `docs/walkthrough.md` for one step followed through the code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from titan import config_io, dry_run, objectives
from titan.build import Run, build, parameters
from titan.config import Config
from titan.data.pretrain import tokens_per_source
from titan.errors import ConfigError
from titan.guard import StepGuard
from titan.lifecycle import EXIT_INTERRUPTED, RunFailed, StopRequests, exit_with, tie_to_launcher
from titan.metrics import setup_logging
from titan.models import moe, mtp
from titan.optim import clip_grad_norm
from titan.parallel import float8
from titan.parallel.context_parallel import shard_batch
from titan.parallel.process_group import all_reduce_sum, set_train_timeout, timeout_hint
from titan.profiling import Profiler

logger = logging.getLogger("titan")


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
                return run.pipeline.step(batch["input"], batch["label"], n_items, objectives.model_inputs(batch))
        loss = run.objective(run.model_parts[0], batch) / n_items  # logits are freed inside: only the loss is kept
        loss.backward()
    return loss.detach()


def forward_loss(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed loss of one batch, forward only (0 off the last pipeline stage)."""
    with run.loss_context():
        if run.pipeline is not None:
            with run.autocast():
                return run.pipeline.forward_loss(batch["input"], batch["label"], objectives.model_inputs(batch))
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
    token_mesh = run.mesh["step_tokens"]  # where the batch is split (each replica group's own under DiLoCo)
    loss_mesh = run.mesh["step_loss"]  # where loss values live (only the last pipeline stage has them)
    batches = iter(run.train_loader)
    tokens_per_step = (cfg.training.local_batch_size * run.dims.dp * run.grad_accum * cfg.training.seq_len
                       * run.objective.rows_per_sample)  # DPO: two sequences (chosen, rejected) per sample
    logger.info(f"training {cfg.training.steps} steps")

    timer.start()
    for step in range(first_step, cfg.training.steps + 1):
        if run.rollouts is not None:  # GRPO: sample completions from the policy, score them (titan/rollout.py)
            with timer("rollout"):
                run.rollouts.prepare(step)
        with timer("data"):
            # Each context-parallel rank keeps its load-balanced part of every sequence.
            micro_batches = [to_device(shard_batch(next(batches), run.mesh["cp"]), device)
                             for _ in range(run.grad_accum)]
        # Summed losses over the global batch's items (tokens, pairs): a gradient independent of the split (FSDP sums).
        n_items, n_tokens = objectives.step_counts(run.objective, micro_batches, token_mesh)
        moe.set_aux_loss_scale(run.model_parts, 1 / n_tokens)  # MoE balance loss: a mean over the routed tokens
        mtp.set_loss_scale(run.model_parts, n_items)  # multi-token prediction (if on): its weight / depths / items

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
            replica_traffic = run.replicas.end_of_step(step)  # DiLoCo: the outer step every semi_sync.sync_every
            loads, aux = moe.end_of_step(run.model_parts, lambda t: all_reduce_sum(t, loss_mesh), not skipped)

        step_time, regions = timer.lap()  # since the previous lap, less validation
        run.metrics.step(step, loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens_per_step, step_time=step_time,
                         data_time=regions["data"], force=skipped, **guard.metrics(),
                         **run.objective.metrics(token_mesh), **moe.step_metrics(loads, aux, n_tokens),
                         **mtp.step_metrics(run.model_parts, lambda t: all_reduce_sum(t, loss_mesh), n_items),
                         **tokens_per_source(run.train_loader, cfg.training.seq_len), **replica_traffic)
        profiler.step()
        if step == first_step:  # start-up and compilation are over: a hang now fails after the shorter timeout
            set_train_timeout(run.mesh, cfg.comm.train_timeout_seconds)
        if guard.stuck or (skipped and step == cfg.training.steps):  # nothing of this state is saved, and saves
            raise guard.failure(run.checkpointer.set_aside_unconfirmed())  # no finite step confirmed move aside

        if run.val_loader is not None and (step % cfg.validation.freq == 0 or step == cfg.training.steps):
            with timer("validation", in_step=False):
                run.metrics.validation(step, loss=evaluate(run), **(run.downstream() if run.downstream else {}))
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
    run = cfg = None
    try:
        cfg, flags = config_io.load_run(argv)
        if cfg.job.description:
            logger.info(cfg.job.description)
        if flags.dry_run or flags.check_only:
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
    except RuntimeError as e:  # DistBackendError and torch.OutOfMemoryError too
        too_big = dry_run.allocation_failure(cfg, e) if cfg is not None else None
        if too_big:  # one line naming the key that sized it, not a traceback
            return exit_with(f"titan: error: {too_big}", 2)
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
