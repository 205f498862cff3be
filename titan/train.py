"""Train a Llama model: `python -m titan.train --config FILE` (one process) or
`torchrun --nproc_per_node=N -m titan.train --config FILE` (N processes over one DeviceMesh).

`build` turns the config into a model, optimizer, data and metrics; `train` is the loop, one optimizer step per
iteration: get the step's micro-batches -> forward/backward each -> clip -> optimizer step -> LR step -> log ->
maybe validate. Read `docs/walkthrough.md` for one step followed through the code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from titan import config
from titan.config import Config, ConfigError
from titan.data.pretrain import IGNORE_INDEX, build_pretrain_dataloader, build_validation_dataloader
from titan.data.tokenizer import load_tokenizer
from titan.metrics import MetricsLogger, num_flops_per_token, peak_flops
from titan.models.llama import Transformer, count_params, model_args
from titan.optim import build_lr_scheduler, build_optimizer
from titan.parallel.mesh import ParallelDims, check_model_fits
from titan.parallel.parallelize import DTYPES, materialize, parallelize

logger = logging.getLogger("titan")

# ---------------------------------------------------------------------------------------------------------------
# Set-up


def init_distributed(deterministic: bool, seed: int) -> torch.device:
    """One process group for every launch (a single process gets a group of one), CUDA + NCCL when there is a GPU,
    else CPU + gloo."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this variable when it first starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(seed)
    return device


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


def loss_context(cfg: config.Parallelism, dims: ParallelDims):
    """Wraps loss and backward: with loss parallel, cross-entropy runs on vocab-sharded logits."""
    if dims.tp > 1 and cfg.enable_loss_parallel:
        return torch.distributed.tensor.parallel.loss_parallel
    return contextlib.nullcontext


@dataclass
class Run:
    """Everything the loop needs, built from the config."""

    cfg: Config
    device: torch.device
    dims: ParallelDims
    mesh: dict  # name -> DeviceMesh (see ParallelDims.build_mesh)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: object
    val_loader: object | None
    metrics: MetricsLogger
    grad_accum: int
    autocast: object  # () -> context for the forward pass
    loss_context: object  # () -> context for loss + backward
    loss_fn: object


def build(cfg: Config) -> Run:
    t = cfg.training
    device = init_distributed(t.deterministic, t.seed)
    dims = ParallelDims.from_config(cfg.parallelism, dist.get_world_size())
    grad_accum = gradient_accumulation_steps(t, dims.dp)

    tokenizer = load_tokenizer(cfg.model.tokenizer_path)
    args = model_args(cfg.model.flavor, vocab_size=tokenizer.vocab_size, max_seq_len=t.seq_len)
    check_model_fits(dims, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim, args.n_layers, args.tie_embeddings)
    mesh = dims.build_mesh(device.type)
    dp_rank = mesh["dp"].get_local_rank()

    # Built on the meta device, so even a 405B model costs nothing until it is sharded and materialised.
    with torch.device("meta"):
        model = Transformer(args)
    n_params, n_emb = count_params(model)
    parallelize(model, mesh, dims, cfg.parallelism, cfg.activation_checkpoint, cfg.compile, t)
    materialize(model, device, t.seed)
    model.train()

    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, t.steps)
    train_loader = build_pretrain_dataloader(t, tokenizer, dp_rank, dims.dp)
    val_loader = None
    if cfg.validation.enable:
        val_loader = build_validation_dataloader(cfg.validation, tokenizer, t.seq_len, dp_rank, dims.dp)

    flops = num_flops_per_token(n_params, n_emb, args.n_layers, args.n_heads, args.head_dim, t.seq_len)
    metrics = MetricsLogger(
        cfg.metrics, cfg.job.dump_folder, rank=dist.get_rank(), world_size=dims.world_size, device=device,
        flops_per_token=flops, peak_flops=peak_flops(device, DTYPES[t.mixed_precision_param]), total_steps=t.steps,
    )
    logger.info(f"model: llama3 {cfg.model.flavor}, {n_params:,} parameters ({n_emb:,} in the embedding), "
                f"vocab {args.vocab_size}, seq_len {t.seq_len}")
    logger.info(f"batch: {t.local_batch_size} sequences/rank x {dims.dp} dp ranks x {grad_accum} accumulation "
                f"steps = {t.local_batch_size * dims.dp * grad_accum} sequences/step")
    compile_loss = cfg.compile.enable and "loss" in cfg.compile.components
    return Run(cfg, device, dims, mesh, model, optimizer, scheduler, train_loader, val_loader, metrics, grad_accum,
               mixed_precision_context(t, dims, device), loss_context(cfg.parallelism, dims),
               torch.compile(cross_entropy_sum) if compile_loss else cross_entropy_sum)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed (not averaged) token loss: the caller divides by the global number of valid tokens."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    # Under loss parallel the result is a replicated DTensor; the loop works with plain tensors.
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def all_reduce_sum(x: torch.Tensor, mesh) -> torch.Tensor:
    dist.all_reduce(x, group=mesh.get_group())
    return x


def train(run: Run) -> None:
    cfg, model, device = run.cfg, run.model, run.device
    loss_mesh = run.mesh["dp_cp"]
    batches = iter(run.train_loader)
    tokens_per_step = cfg.training.local_batch_size * run.dims.dp * run.grad_accum * cfg.training.seq_len
    logger.info(f"training {cfg.training.steps} steps")

    for step in range(1, cfg.training.steps + 1):
        start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(run.grad_accum)]
        # Dividing each micro-batch's summed loss by the valid tokens of the whole global batch makes the gradient
        # independent of how the batch is split over ranks and micro-steps (and FSDP sums, it does not average).
        n_tokens = sum((b["label"] != IGNORE_INDEX).sum() for b in micro_batches).to(device)
        n_tokens = all_reduce_sum(n_tokens, loss_mesh)

        loss_sum = torch.zeros((), device=device)
        for batch in micro_batches:
            with run.loss_context():
                with run.autocast():
                    logits = model(batch["input"].to(device))
                loss = run.loss_fn(logits, batch["label"].to(device)) / n_tokens
                del logits  # free the largest activation before backward allocates gradients
                loss.backward()
            loss_sum += loss.detach()

        grad_norm = clip_grad_norm(model.parameters(), cfg.training.max_norm)
        lr = run.scheduler.get_last_lr()[0]  # the lr this step uses
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)

        loss_sum = all_reduce_sum(loss_sum, loss_mesh)
        run.metrics.step(step, loss=loss_sum, grad_norm=grad_norm, lr=lr, tokens=tokens_per_step,
                         step_time=time.perf_counter() - start)

        if run.val_loader is not None and (step % cfg.validation.freq == 0 or step == cfg.training.steps):
            run.metrics.validation(step, loss=evaluate(run))


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Total gradient norm over every rank's shards, clipped when max_norm > 0.

    Computed as the root of summed squares rather than with torch's norm kernels: on CPU those accumulate fp32
    sequentially (3.6e-5 relative error on a 262k-element gradient, torch 2.13), while `sum` uses cascade
    summation. On sharded (DTensor) grads each sum is a partial sum that `full_tensor()` adds up across ranks.
    """
    grads = [p.grad for p in params if p.grad is not None]
    squares = sum(g.float().square().sum() for g in grads)
    if isinstance(squares, DTensor):
        squares = squares.full_tensor()
    norm = squares.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm, foreach=True)
    return norm


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean token loss over `validation.steps` batches (or the whole split) on every data-parallel rank."""
    run.model.eval()
    loss_sum = torch.zeros((), device=run.device)
    n_tokens = torch.zeros((), device=run.device)
    for i, batch in enumerate(run.val_loader):
        if run.cfg.validation.steps != -1 and i >= run.cfg.validation.steps:
            break
        labels = batch["label"].to(run.device)
        with run.loss_context(), run.autocast():
            logits = run.model(batch["input"].to(run.device))
            loss_sum += run.loss_fn(logits, labels)
        n_tokens += (labels != IGNORE_INDEX).sum()
    run.model.train()
    totals = all_reduce_sum(torch.stack([loss_sum, n_tokens]), run.mesh["dp_cp"])
    return (totals[0] / totals[1]).item()


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(format="[titan %(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout, force=True)


def write_resolved_config(cfg: Config) -> None:
    text = config.to_toml(cfg)
    if dist.get_rank() == 0:
        folder = Path(cfg.job.dump_folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(text)
        logger.debug("resolved config:\n%s", text)


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    try:
        cfg = config.load(argv)
        if cfg.job.description:
            logger.info(cfg.job.description)
        run = build(cfg)
        write_resolved_config(cfg)
        train(run)
        run.metrics.close()
    except ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"titan: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
