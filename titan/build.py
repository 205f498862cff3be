"""Config -> `Run`: everything the training loop (titan/train.py) needs, built in one order on every rank — the
process group and the run folder's lock, the mesh, the model (meta device, parallel axes, then real weights), the
optimizer and schedule, the data, the checkpointer (resumed, or the initial weights), the objective and the metrics.

This is the one place that splits the config into its sections: each component gets only its own. `titan.dry_run`
goes through the same checks and the same `build_model`, without the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from titan import config_io, hf, models, peft, rewards
from titan.checkpoint.save import Checkpointer
from titan.checkpoint.state import base_identity, load_initial_weights
from titan.config import DPO, DTYPES, Checkpoint, Config, LoRA, Training
from titan.data.chat import chat_template
from titan.data.chat_template import template_source
from titan.data.loaders import build_dataloaders
from titan.data.tokenizer import load_tokenizer
from titan.errors import ConfigError
from titan.evaluation import InLoop
from titan.lifecycle import RunLock, claim_dump_folder
from titan.memory import attention_is_masked, loss_chunk_tokens
from titan.metrics import MetricsLogger, StepTimer, num_flops_per_token, peak_flops
from titan.models import lora, moe, output_head
from titan.models.layers import Transformer, TransformerArgs, count_params
from titan.objectives import DPOLoss, GRPOLoss, HeadLoss, KTOLoss, Objective, TokenLoss, cross_entropy_sum, reference
from titan.optim import build_lr_scheduler, build_optimizer, reapply_hyperparameters
from titan.parallel import float8
from titan.parallel.context_parallel import check_masking, check_seq_len
from titan.parallel.mesh import ParallelDims, check_model_fits
from titan.parallel.parallelize import materialize, parallelize
from titan.parallel.pipeline import Pipeline
from titan.parallel.process_group import init_distributed, set_timeouts
from titan.parallel.qlora import quantize_bases
from titan.parallel.semi_sync import Replicas, build_replicas
from titan.parallel.tensor_parallel import loss_parallel_context
from titan.rollout import Rollouts, Sampler

logger = logging.getLogger("titan")


# ---------------------------------------------------------------------------------------------------------------
# The run


def gradient_accumulation_steps(cfg: Training, dp: int) -> int:
    per_micro_step = cfg.local_batch_size * dp
    if cfg.global_batch_size == -1:
        return 1
    if cfg.global_batch_size % per_micro_step:
        raise ConfigError(
            f"training.global_batch_size={cfg.global_batch_size} is not divisible by training.local_batch_size "
            f"x data-parallel degree = {cfg.local_batch_size} x {dp}"
        )
    return cfg.global_batch_size // per_micro_step


def mixed_precision_context(cfg: Training, dims: ParallelDims, device: torch.device):
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
    objective: Objective  # (model, batch) -> summed loss, and count(batch); see titan/objectives/
    rollouts: Rollouts | None = None  # GRPO: train_loader itself, sampling each rollout from the policy
    timer: StepTimer = field(default_factory=StepTimer)  # scripts/benchmark.py swaps in a CUDA-syncing one
    checkpointer: Checkpointer | None = None
    replicas: Replicas | None = None  # across dp_replicate: DiLoCo's outer step, or the count of HSDP's traffic
    lock: RunLock = field(default_factory=RunLock)  # job.dump_folder's one-writer lock (held by rank 0)
    downstream: Callable[[], dict[str, float]] | None = None  # validation.lm_eval_tasks' scores (titan/evaluation.py)

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

    @property
    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for part in self.parts for n, p in part.named_parameters() if p.requires_grad]


def build(cfg: Config) -> Run:
    """Every rank: the process group, then job.dump_folder's lock (before anything is written), then the run."""
    device = init_distributed(cfg.training.deterministic, cfg.training.seed, cfg.comm.init_timeout_seconds,
                              cpu_collectives=cfg.training.enable_cpu_offload)
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
    mesh = dims.build_mesh(device.type, replicas_apart=cfg.semi_sync.method != "none")
    set_timeouts(cfg.comm.init_timeout_seconds)  # the mesh's groups too
    model = build_model(cfg, args, mesh, dims, device)
    optimizer = build_optimizer(model.named_trainable, cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, t.steps)
    train_loader, val_loader = build_dataloaders(t, cfg.sft, cfg.validation, tokenizer, mesh["dp"].get_local_rank(),
                                                 dims.dp, cfg.grpo, cfg.checkpoint.allow_tokenizer_change)
    autocast, loss_context = mixed_precision_context(t, dims, device), loss_parallel_context(cfg.parallelism, dims)
    rollouts = None
    if t.recipe == "grpo":  # the prompts become rollouts: completions sampled from the policy, scored
        train_loader = rollouts = build_rollouts(cfg, args, tokenizer, train_loader, model, mesh, grad_accum, device,
                                                 autocast, loss_context)
    replicas = build_replicas(cfg.semi_sync, model.parts, mesh, t.steps, DTYPES[t.mixed_precision_reduce])
    checkpointer = build_checkpointer(cfg, args, tokenizer, model.parts, optimizer, scheduler, train_loader, replicas)
    checkpointer.load()  # resume (the loop continues at checkpointer.step + 1) or initial weights
    if cfg.lora.init_from and not checkpointer.resumed:  # adapters from a PEFT folder (titan's or PEFT's)
        peft.load_into(model.parts, cfg.lora.init_from, "lora.init_from")
    replicas.start()  # DiLoCo: the outer weights from the weights the run starts with, unless resumed
    if checkpointer.resumed:
        honour_new_settings(cfg, checkpointer, optimizer, scheduler)
    if cfg.lora.quantize_base != "none":  # the base weights are final now: quantize them (QLoRA)
        quantize_bases(model.parts, cfg.lora, DTYPES[t.mixed_precision_param])
    objective = build_objective(cfg, model, args, autocast, loss_context, rollouts)
    if precomputed_reference(t, cfg.dpo):  # one pass of the reference over the data; none while training
        reference.precompute(train_loader.dataset, reference_model(model, args, cfg.lora, cfg.checkpoint),
                             batch_size=t.local_batch_size, dp_rank=mesh["dp"].get_local_rank(), dp_size=dims.dp,
                             device=device, autocast=autocast, loss_context=loss_context,
                             dump_folder=cfg.job.dump_folder, reference_source=reference_weights(cfg))
    metrics = build_metrics(cfg, args, model, dims, device, append=checkpointer.step > 0)
    v = cfg.validation
    downstream = InLoop(model.parts[0], tokenizer, v.lm_eval_tasks, v.lm_eval_include, v.lm_eval_limit, device) \
        if v.lm_eval_tasks else None
    log_summary(cfg, args, model, dims, grad_accum)
    return Run(cfg=cfg, device=device, dims=dims, mesh=mesh, model_parts=model.parts, pipeline=model.pipeline,
               optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, val_loader=val_loader,
               metrics=metrics, grad_accum=grad_accum, autocast=autocast, loss_context=loss_context,
               loss_fn=model.loss_fn, objective=objective, rollouts=rollouts, checkpointer=checkpointer,
               downstream=downstream, replicas=replicas)


def honour_new_settings(cfg: Config, checkpointer, optimizer, scheduler) -> None:
    """A resumed run trains with its own config (config.toml stays the truth): the optimizer's hyper-parameters and
    the schedule come from it, not from the restored optimizer and scheduler state; the differences are logged."""
    reapply_hyperparameters(optimizer, scheduler, cfg.optimizer)
    changed = [c for c in config_io.changes(checkpointer.resumed_config, cfg)
               if not c.startswith("checkpoint.load_step")]
    if changed:
        logger.info(f"checkpoint: changed on resume: {', '.join(changed)}")
    if checkpointer.step >= cfg.training.steps:
        logger.info(f"checkpoint: step {checkpointer.step} >= training.steps={cfg.training.steps}: nothing to train")


# ---------------------------------------------------------------------------------------------------------------
# The model


def build_model_args(cfg: Config, dims: ParallelDims, vocab_size: int) -> TransformerArgs:
    """The family's flavor with the tokenizer's vocabulary, checked against the parallel degrees."""
    v = cfg.validation
    longest = max(cfg.training.seq_len, v.seq_len if v.enable else 0)  # the RoPE table covers both
    args = models.model_args(cfg.model.name, cfg.model.flavor, tokenizer_vocab=vocab_size, moe=cfg.moe,
                             mtp=cfg.model, max_seq_len=longest)
    check_model_fits(dims, args)
    check_seq_len(cfg.training.seq_len, dims.cp, dims.tp)
    if v.enable:
        check_seq_len(v.seq_len, dims.cp, dims.tp, key="validation.seq_len")
    return args


def build_model(cfg: Config, args: TransformerArgs, mesh: dict[str, DeviceMesh], dims: ParallelDims,
                device: torch.device, weights: bool = True) -> ModelParts:
    """This rank's model parts with every parallel axis applied; with `weights=False` (the dry run) they stay on the
    meta device: every layout check runs and every local shard has its real shape, but nothing is allocated."""
    t = cfg.training
    check_masking(dims.cp, cfg.parallelism.context_parallel_rotate_method, attention_is_masked(cfg, args),
                  device.type)
    # Built on the meta device, so even a 405B model costs nothing until it is sharded and materialised.
    with torch.device("meta"):
        model = models.build_model(args)
    (n_params, n_emb), n_active = count_params(model), moe.active_params(model)
    compile_loss = cfg.compile.enable and "loss" in cfg.compile.components
    loss_fn = HeadLoss(loss=torch.compile(cross_entropy_sum) if compile_loss else cross_entropy_sum)

    def build_part(part: torch.nn.Module, adapters: bool = cfg.lora.enable) -> torch.nn.Module:
        """The same for a whole model and for a pipeline stage: LoRA adapters, parallel axes, then real weights."""
        if adapters:
            lora.apply_lora(part, cfg.lora)
        parallelize(part, mesh, dims, cfg.parallelism, cfg.activation_checkpoint, cfg.compile, t, cfg.float8)
        if weights:
            materialize(part, device, t.seed, cfg.lora if adapters else None, cpu_offload=t.enable_cpu_offload)
        return part.train()

    if dims.pp > 1:
        pipeline = Pipeline(model, mesh["pp"], cfg.parallelism, t.local_batch_size, loss_fn, build_part, device,
                            validation=cfg.validation.enable)
        logger.info(pipeline.description)
        parts = pipeline.parts
    else:
        pipeline, parts = None, [build_part(model)]
    if loss_chunk_tokens(cfg, dims):  # the part with the output projection leaves it to the (chunked) loss
        for part in parts:
            if part.output is not None:
                loss_fn.head, loss_fn.chunk_tokens, part.output_hidden = part.output, t.loss_chunk_tokens, True
        loss_fn.reentrant, loss_fn.fused = dims.pp == 1, output_head.fusable(loss_fn.head, dims.tp > 1 or dims.pp > 1)
    return ModelParts(parts, pipeline, loss_fn, build_part, n_params, n_emb, n_active)


# ---------------------------------------------------------------------------------------------------------------
# Checkpointer, metrics and the start-up lines


def build_checkpointer(cfg: Config, args: TransformerArgs, tokenizer, model_parts: list[torch.nn.Module], optimizer,
                       scheduler, train_loader, replicas: Replicas | None = None) -> Checkpointer:
    template = None if cfg.training.recipe == "pretrain" else template_source(chat_template(tokenizer,
                                                                                           cfg.sft.chat_template))
    export = hf.exporter(args, tokenizer, cfg.model.tokenizer_path, base_model_folder(cfg.checkpoint), template)
    if cfg.lora.enable:  # Hugging Face gets a plain model: adapters merged into the weights
        export = lora.merging(export, cfg.lora.alpha / cfg.lora.rank)
    # QLoRA checkpoints hold the adapters only: the base is checkpoint.initial_load_path's, quantized again.
    adapters_only = cfg.lora.enable and (cfg.lora.save_adapter_only or cfg.lora.quantize_base != "none")
    base = ("", "")
    if adapters_only and cfg.checkpoint.enable:  # pinned in train_state: a resume on another base is refused
        q = cfg.lora
        quantized = "" if q.quantize_base == "none" else f"{q.quantize_base} (scaler block {q.nf4_scaler_block_size})"
        base = base_identity(cfg.checkpoint.initial_load_path,
                             f"{cfg.model.name} {cfg.model.flavor} with training.seed {cfg.training.seed}", quantized)
    return Checkpointer(cfg.checkpoint, cfg.job.dump_folder, model_parts, optimizer, scheduler, train_loader,
                        cfg.training.steps, export, adapters_only=adapters_only, tokenizer=tokenizer,
                        run_config=config_io.to_toml(cfg), adapter_export=adapter_exporter(cfg, args),
                        semi_sync=replicas, base=base)


def base_model_folder(c: Checkpoint) -> str:
    """The Hugging Face folder the run's weights come from: checkpoint.initial_load_path with initial_load_in_hf, or
    the base model a PEFT adapter folder there names; "" if none."""
    if c.initial_load_path and peft.is_adapter_folder(c.initial_load_path):
        return json.loads((Path(c.initial_load_path) / peft.CONFIG).read_text()).get("base_model_name_or_path") or ""
    return c.initial_load_path if c.initial_load_in_hf else ""


def adapter_exporter(cfg: Config, args: TransformerArgs):
    """LoRA runs: every save (and the Hugging Face export) also writes the adapters as a PEFT folder, naming the base
    model's Hugging Face folder when the run started from one."""
    if not cfg.lora.enable:
        return None
    base = base_model_folder(cfg.checkpoint)
    return peft.exporter(args, cfg.lora, str(Path(base).resolve()) if base else "")


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
        run_config=dataclasses.asdict(cfg) if cfg.metrics.wandb or cfg.metrics.mlflow else None,
    )


def log_summary(cfg: Config, args: TransformerArgs, model: ModelParts, dims: ParallelDims, grad_accum: int) -> None:
    """The model, adapter and batch lines every run prints at start (the dry run too)."""
    t = cfg.training
    logger.info(f"model: {cfg.model.name} {cfg.model.flavor}, {model.n_params:,} parameters ({model.n_embedding:,} "
                f"in the embedding), vocab {args.vocab_size}, seq_len {t.seq_len}; recipe {t.recipe}"
                + recipe_detail(cfg))
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
# The recipe: its objective and its data


def build_objective(cfg: Config, model: ModelParts, args: TransformerArgs, autocast, loss_context,
                    rollouts: Rollouts | None) -> Objective:
    """The recipe's objective over this rank's model (the frozen reference model, if its loss needs one, built
    here: DPO but SimPO and ORPO, KTO, and GRPO with grpo.beta > 0)."""
    recipe = cfg.training.recipe

    def reference():
        return reference_model(model, args, cfg.lora, cfg.checkpoint)

    if recipe == "dpo":
        return DPOLoss(cfg.dpo, reference() if needs_reference(cfg) else None, autocast, model.loss_fn)
    if recipe == "grpo":
        return GRPOLoss(cfg.grpo, reference() if needs_reference(cfg) else None, autocast, rollouts)
    if recipe == "kto":
        return KTOLoss(cfg.kto, model.parts[0], reference(), autocast, loss_context)
    return TokenLoss(model.loss_fn, autocast, labels_to_model=getattr(args, "mtp_layers", 0) > 0)


def reference_weights(cfg: Config) -> str:
    """What DPO's reference weights are made of (the fingerprint of precomputed reference log-probabilities)."""
    c = cfg.checkpoint
    return repr((cfg.model, c.initial_load_path, c.initial_load_in_hf, cfg.lora, cfg.training.seed,
                 cfg.training.mixed_precision_param))


def precomputed_reference(training: Training, dpo: DPO) -> bool:
    return training.recipe == "dpo" and dpo.precompute_reference and dpo.loss not in DPOLoss.REFERENCE_FREE


def needs_reference(cfg: Config) -> bool:
    """Whether the recipe's loss compares the policy with a frozen reference model while it trains (DPO with
    dpo.precompute_reference uses one only before: titan/objectives/reference.py)."""
    recipe, d = cfg.training.recipe, cfg.dpo
    return recipe == "kto" or (recipe == "grpo" and cfg.grpo.beta > 0) or \
        (recipe == "dpo" and d.loss not in DPOLoss.REFERENCE_FREE and not d.precompute_reference)


def recipe_detail(cfg: Config) -> str:
    """What the start-up line adds after the recipe's name."""
    recipe, g = cfg.training.recipe, cfg.grpo
    if recipe == "dpo":
        free = cfg.dpo.loss in DPOLoss.REFERENCE_FREE
        against = "no reference model" if free else "against precomputed reference log-probabilities" \
            if cfg.dpo.precompute_reference else "against a frozen reference"
        return f" with loss {cfg.dpo.loss} ({against})"
    if recipe == "grpo":
        return (f" with loss {g.loss_type}, {g.num_generations} completions per prompt, "
                f"{'a KL penalty to a frozen reference' if g.beta else 'no reference model'}; rewards "
                + ", ".join(g.reward_functions))
    if recipe == "kto":
        return " against a frozen reference"
    return ""


def frozen_reference(model: ModelParts, args: TransformerArgs) -> Transformer:
    """DPO's reference without LoRA: a second model, built and sharded like the policy, frozen (weights still to
    load)."""
    with torch.device("meta"):
        frozen = models.build_model(args)
    frozen = model.build_part(frozen, adapters=False).eval().requires_grad_(False)
    frozen.output_hidden = model.parts[0].output_hidden  # chunked like the policy
    return frozen


def reference_model(model: ModelParts, args: TransformerArgs, lora_cfg: LoRA, checkpoint: Checkpoint):
    """batch -> the frozen reference's log p(batch["label"]) per position (rows, seq; 0 unlabelled) for DPO, KTO and
    GRPO's KL: the policy with LoRA's adapters off, else a second model holding the initial weights."""
    policy, head_loss = model.parts[0], model.loss_fn
    if lora_cfg.enable:
        def reference(batch):
            with lora.disabled(model.parts):  # the head's adapters too, when the loss runs the head
                return head_loss.token_logps(policy(batch["input"]), batch["label"])
        return reference
    frozen = frozen_reference(model, args)
    load_initial_weights([frozen], checkpoint)  # the policy's starting point (seeded init if none is set)
    frozen_loss = HeadLoss(frozen.output if head_loss.head is not None else None, head_loss.chunk_tokens)
    return lambda batch: frozen_loss.token_logps(frozen(batch["input"]), batch["label"])

def build_rollouts(cfg: Config, args: TransformerArgs, tokenizer, prompts, model: ModelParts, mesh, grad_accum: int,
                   device: torch.device, autocast, loss_context) -> Rollouts:
    """GRPO's data source: the prompts, the reward functions, and the single-device copy of the policy that
    generates (in the training's parameter dtype; its decoding step compiled with the model on CUDA: on a CPU the
    compilation costs more than it saves)."""
    functions = rewards.load_reward_functions(cfg.grpo.reward_functions, cfg.grpo.reward_weights)
    sampler = Sampler(args, cfg.lora, device, DTYPES[cfg.training.mixed_precision_param])
    prompt_list, template = prompts
    compiled = cfg.compile.enable and "model" in cfg.compile.components and device.type == "cuda"
    return Rollouts(cfg.grpo, cfg.training, prompt_list, template, tokenizer, model.parts[0], sampler, functions,
                    mesh["dp"], grad_accum, autocast, loss_context, compiled)
