"""Pipeline parallelism: split the model into stages, place them on the `pp` ranks, and push micro-batches through
them with a `torch.distributed.pipelining` schedule.

What it shards: transformer blocks. Each stage is a deep copy of the (meta-device) model pruned to a contiguous run
of blocks; the first stage also keeps the embedding, the last the final norm and output (and computes the loss).
Collectives added: point-to-point send/recv of activations between neighbouring stages in forward, and of their
gradients in backward, once per micro-batch. Single-stage schedules (GPipe, 1F1B) put one stage on each pp rank;
multi-stage ones put several: looped (stage s on rank s % pp) or V-shaped (rank r holds stages r and 2pp-1-r), which
shrinks the pipeline bubble.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from titan.config import Parallelism
from titan.errors import ConfigError
from titan.models.layers import Transformer
from titan.parallel.expert_parallel import keep_statistics_out_of

_CANDIDATES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
               "DualPipeV")
_V_SHAPED = ("ZBVZeroBubble", "DualPipeV")


def schedule_names() -> list[str]:
    """The schedules this PyTorch offers, of those titan knows how to place stages for."""
    names = []
    for name in _CANDIDATES:
        try:
            get_schedule_class(name)
        except ValueError:
            continue
        names.append(name)
    return names


def _schedule_class(name: str):
    valid = schedule_names()
    if name not in valid:
        raise ConfigError(f"parallelism.pipeline_parallel_schedule={name!r} is not one of {', '.join(valid)}")
    return get_schedule_class(name)


def stage_layers(n_layers: int, pp: int, cfg: Parallelism) -> list[list[int]]:
    """Block indices of every stage, in pipeline order."""
    single = issubclass(_schedule_class(cfg.pipeline_parallel_schedule), PipelineScheduleSingle)
    if cfg.pipeline_parallel_split_points:
        names = [f"layers.{i}" for i in range(n_layers)]
        for point in cfg.pipeline_parallel_split_points:
            if point not in names[1:]:
                raise ConfigError(f"parallelism.pipeline_parallel_split_points: {point!r} is not one of "
                                  f"layers.1 .. layers.{n_layers - 1}")
        bounds = [0, *sorted(names.index(p) for p in cfg.pipeline_parallel_split_points), n_layers]
        stages = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
        key = "parallelism.pipeline_parallel_split_points"
    elif cfg.pipeline_parallel_layers_per_stage is not None:
        per = cfg.pipeline_parallel_layers_per_stage
        if per <= 0 or n_layers % per:
            raise ConfigError(f"parallelism.pipeline_parallel_layers_per_stage={per} does not divide the model's "
                              f"{n_layers} layers")
        stages = [list(range(i, i + per)) for i in range(0, n_layers, per)]
        key = "parallelism.pipeline_parallel_layers_per_stage"
    else:
        num = pp * (1 if single else 2)
        if num > n_layers:
            raise ConfigError(f"parallelism.pipeline_parallel_degree={pp} needs {num} stages for "
                              f"{cfg.pipeline_parallel_schedule} but the model has only {n_layers} layers")
        # Even split; earlier stages take the remainder (the last one also runs the output projection and loss).
        base, extra = divmod(n_layers, num)
        sizes = [base + (i < extra) for i in range(num)]
        starts = [sum(sizes[:i]) for i in range(num)]
        return [list(range(s, s + n)) for s, n in zip(starts, sizes)]
    if any(not s for s in stages):
        raise ConfigError(f"{key} leaves a stage without layers")
    if len(stages) % pp or (single and len(stages) != pp) or (not single and len(stages) < 2 * pp):
        want = f"{pp}" if single else f"a multiple of {pp}, at least {2 * pp},"
        raise ConfigError(f"{key} gives {len(stages)} stages; {cfg.pipeline_parallel_schedule} on "
                          f"pipeline_parallel_degree={pp} needs {want} stages")
    return stages


def stages_of_rank(pp_rank: int, pp: int, num_stages: int, schedule: str) -> list[int]:
    if schedule in _V_SHAPED:
        return [pp_rank, num_stages - 1 - pp_rank]
    return list(range(pp_rank, num_stages, pp))


def prune(model: Transformer, layers: list[int], first: bool, last: bool) -> Transformer:
    """A stage: a deep copy (on meta, so free) keeping only `layers` and, at the ends, the embedding or the head."""
    stage = copy.deepcopy(model)
    for name in list(stage.layers):
        if int(name) not in layers:
            del stage.layers[name]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm, stage.output = None, None
    return stage


def check(cfg: Parallelism, tied_embeddings: bool, local_batch_size: int, validation: bool) -> None:
    """What pipelining cannot do with this config (the schedule's own checks come with `build_schedule`)."""
    if validation and cfg.pipeline_parallel_schedule in _V_SHAPED:
        # torch 2.13: schedule.eval() of the V-shaped schedules asserts in backward bookkeeping.
        raise ConfigError(f"validation.enable is not supported with parallelism.pipeline_parallel_schedule="
                          f"{cfg.pipeline_parallel_schedule} (its eval() fails in this PyTorch); pick another "
                          "schedule or disable validation")
    if tied_embeddings:
        raise ConfigError("parallelism.pipeline_parallel_degree > 1 is not supported with tied embeddings "
                          "(the embedding and the output live on different stages)")
    micro = cfg.pipeline_parallel_microbatch_size
    if micro <= 0 or local_batch_size % micro:
        raise ConfigError(f"parallelism.pipeline_parallel_microbatch_size={micro} does not divide "
                          f"training.local_batch_size={local_batch_size}")


def build_schedule(stages: list[PipelineStage], cfg: Parallelism, n_microbatches: int, loss_fn):
    """The schedule running this rank's `stages`; what it rejects (too few micro-batches) becomes a ConfigError."""
    cls = _schedule_class(cfg.pipeline_parallel_schedule)
    try:
        # scale_grads=False: the loss is already divided by the global token count.
        return cls(stages[0] if issubclass(cls, PipelineScheduleSingle) else stages, n_microbatches,
                   loss_fn=loss_fn, scale_grads=False)
    except ValueError as e:
        raise ConfigError(f"parallelism.pipeline_parallel_schedule={cfg.pipeline_parallel_schedule} with "
                          f"{n_microbatches} micro-batches (training.local_batch_size / "
                          f"pipeline_parallel_microbatch_size) on {stages[0].num_stages} stages: {e}") from None


class Pipeline:
    """The stages this rank holds and the schedule that runs them; `step`/`forward_loss` stand in for the
    model's forward (+ backward) on one batch."""

    def __init__(self, model: Transformer, pp_mesh: DeviceMesh, cfg: Parallelism, local_batch_size: int,
                 loss_fn, build_stage, device: torch.device, validation: bool = False):
        check(cfg, model.args.tie_embeddings, local_batch_size, validation)
        pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
        layers = stage_layers(model.args.n_layers, pp, cfg)
        num_stages = len(layers)
        self.stage_ids = stages_of_rank(pp_rank, pp, num_stages, cfg.pipeline_parallel_schedule)
        self.has_first, self.has_last = 0 in self.stage_ids, num_stages - 1 in self.stage_ids
        self.parts = [build_stage(prune(model, layers[s], s == 0, s == num_stages - 1)) for s in self.stage_ids]
        stages = [PipelineStage(part, s, num_stages, device, group=pp_mesh.get_group())
                  for part, s in zip(self.parts, self.stage_ids)]
        for stage in stages:
            keep_statistics_out_of(stage)  # MoE routing counts of its shape-inference forward
        micro = cfg.pipeline_parallel_microbatch_size
        n_microbatches = local_batch_size // micro
        self.loss_fn, self.divisor = loss_fn, 1.0
        self.schedule = build_schedule(stages, cfg, n_microbatches, self._loss)
        self.description = (f"pipeline: {cfg.pipeline_parallel_schedule}, {num_stages} stages "
                            f"{[f'{l[0]}-{l[-1]}' for l in layers]}, {n_microbatches} micro-batches of {micro}; "
                            f"this rank holds stages {self.stage_ids}")

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, target) / self.divisor

    def _run(self, fn, inputs: torch.Tensor, labels: torch.Tensor, divisor, model_inputs: dict, **kw) -> torch.Tensor:
        self.divisor, losses = divisor, []
        args = (inputs,) if self.has_first else ()
        # Document ids and positions go to every stage (as keyword inputs, cut into micro-batches like the tokens):
        # each stage builds its own attention masks and RoPE rows from them.
        fn(*args, target=labels if self.has_last else None, losses=losses, **kw, **model_inputs)
        # Only the last stage sees the loss; elsewhere contribute zero to the sum over pp ranks.
        return torch.stack(losses).sum() if self.has_last else torch.zeros((), device=inputs.device)

    def step(self, inputs: torch.Tensor, labels: torch.Tensor, n_items: torch.Tensor,
             model_inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Forward and backward of all micro-batches; returns sum(token losses) / n_items (0 off the last stage).
        `model_inputs`: the model's keyword inputs besides the tokens (document ids, positions)."""
        return self._run(self.schedule.step, inputs, labels, n_items, model_inputs or {},
                         return_outputs=False).detach()

    @torch.no_grad()
    def forward_loss(self, inputs: torch.Tensor, labels: torch.Tensor,
                     model_inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Forward only; returns the summed token loss (0 off the last stage)."""
        return self._run(self.schedule.eval, inputs, labels, 1.0, model_inputs or {})
