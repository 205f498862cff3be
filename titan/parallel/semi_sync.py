"""Data parallelism across replica groups, and what it sends: every step (HSDP), or DiLoCo's outer step every H.

What it shards: nothing of its own. With `semi_sync.method = "diloco"` each replica group (the `dp_replicate` mesh
dimension) trains on its own data with its own FSDP/TP layout and no gradient reduction across replicas (FSDP shards
over dp_shard_cp only, titan/parallel/mesh.py). Every `sync_every` = H steps (and at the last step):
  pseudo-gradient  delta = outer weights - this replica's inner weights, all-reduced (mean) over dp_replicate
  outer step       SGD with Nesterov momentum on the outer weights (outer_lr, outer_momentum), then every replica's
                   inner weights <- the new outer weights; the inner optimizer keeps its state (as in DiLoCo)
With `fragments` = F > 1 (streaming DiLoCo) the parameters are cut into F contiguous fragments in model order, and
fragment f has its outer step at the steps where step % H == ((f + 1) H / F) % H: the same bytes per H steps, sent
in F smaller bursts. Only trainable parameters are synchronised (buffers, e.g. RoPE tables, are the same everywhere).

Collectives added (dp_replicate group): one all-reduce of the fragment's pseudo-gradient (in `comm_dtype`) per
outer step; nothing between. Memory added per rank: the outer weights and the outer momentum, each the size of this
rank's parameter shards in fp32 (DiLoCo's cost: two more copies of the model, which Adam's state already doubles).

`replica_bytes` (metrics line) counts what each rank sends over dp_replicate per step, averaged over the steps so
far: a ring all-reduce of P bytes sends 2 (R - 1) / R x P from each of the R ranks. For HSDP (method none,
dp_replicate > 1) the same count is made for FSDP's all-reduce of the gradient shards in the reduce dtype, so the two
compare like for like (counted, not timed).

A checkpoint holds the outer weights and momentum under `semi_sync` (the same on every replica), and, between outer
steps, each replica's own inner weights and optimizer state (titan/checkpoint/state.py: replica r > 0 saves them under
`replica<r>.`), so a resume continues bitwise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from titan.config import DTYPES, SemiSync

WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing's and compile's name parts


def trainable(model_parts: list[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    """(name as in the model's state dict, parameter) of every trainable parameter, in model order."""
    named = []
    for part in model_parts:
        for name, p in part.named_parameters():
            if p.requires_grad:
                for wrapper in WRAPPERS:
                    name = name.replace(wrapper, "")
                named.append((name, p))
    return named


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def ring_bytes(payload: int, replicas: int) -> int:
    """Bytes each rank sends in a ring all-reduce of `payload` bytes over `replicas` ranks."""
    return 2 * (replicas - 1) * payload // replicas


class Replicas:
    """No replicas (nothing to do) or HSDP: counts the gradient all-reduce FSDP makes over dp_replicate each step."""

    def __init__(self, model_parts: list[torch.nn.Module], replicas: int, reduce_dtype: torch.dtype):
        payload = sum(_local(p).numel() for _, p in trainable(model_parts)) * reduce_dtype.itemsize
        self.replicas, self.per_step = replicas, ring_bytes(payload, replicas)

    def start(self) -> None:
        pass

    def end_of_step(self, step: int) -> dict[str, float]:
        return {"replica_bytes": self.per_step} if self.replicas > 1 else {}


class DiLoCo(Replicas):
    """The outer weights and momentum, and the outer step (module docstring). Also a DCP `Stateful`."""

    def __init__(self, cfg: SemiSync, model_parts: list[torch.nn.Module], replicate_mesh: DeviceMesh,
                 total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        self.named = trainable(model_parts)
        self.replicas, self.group = replicate_mesh.size(), replicate_mesh.get_group()
        self.replica = replicate_mesh.get_local_rank()  # which replica group this rank trains in
        self.loaded = False  # whether a checkpoint brought the outer state back
        # Local shards, fp32 like the parameters; filled from the weights the run starts with in `start`.
        self.outer = [torch.zeros_like(_local(p)) for _, p in self.named]
        momentum = cfg.outer_momentum
        self.optimizer = torch.optim.SGD(self.outer, lr=cfg.outer_lr, momentum=momentum, nesterov=momentum > 0)
        if momentum > 0:  # made now, so a checkpoint has them from step 0 (the first step then takes buf = grad)
            for t in self.outer:
                self.optimizer.state[t]["momentum_buffer"] = torch.zeros_like(t)
        n, f = len(self.named), cfg.fragments
        bounds = [round(i * n / f) for i in range(f + 1)]
        self.fragments = [(bounds[i], bounds[i + 1]) for i in range(f)]
        self.offsets = [((i + 1) * cfg.sync_every // f) % cfg.sync_every for i in range(f)]
        self.sent, self.steps = 0, 0

    @torch.no_grad()
    def start(self) -> None:
        """A fresh run's outer weights are its initial weights (a resume's came from its checkpoint; one of a run
        without DiLoCo has none: they start from its weights too)."""
        if not self.loaded:
            for outer, (_, p) in zip(self.outer, self.named):
                outer.copy_(_local(p))

    def end_of_step(self, step: int) -> dict[str, float]:
        """The outer step of every fragment due at `step`; the metrics line's `replica_bytes`."""
        for i, (lo, hi) in enumerate(self.fragments):
            if step % self.cfg.sync_every == self.offsets[i] or step == self.total_steps:
                self.sent += self._outer_step(lo, hi)
        self.steps += 1
        return {"replica_bytes": self.sent / self.steps}

    @torch.no_grad()
    def _outer_step(self, lo: int, hi: int) -> int:
        """Average the fragment's pseudo-gradients over the replicas, step the outer weights, start the replicas
        again from them. Returns the bytes this rank sent."""
        inner, outer = [_local(p) for _, p in self.named[lo:hi]], self.outer[lo:hi]
        if not outer:
            return 0
        # One flat buffer, one all-reduce: the pseudo-gradient of a whole fragment.
        delta = torch.cat([(o - i).flatten() for o, i in zip(outer, inner)]).to(DTYPES[self.cfg.comm_dtype])
        dist.all_reduce(delta, group=self.group)
        mean = delta.float().div_(self.replicas)
        for o, g in zip(outer, mean.split([o.numel() for o in outer])):
            o.grad = g.view_as(o)
        self.optimizer.step()
        for o, i in zip(outer, inner):
            o.grad = None
            i.copy_(o)
        return ring_bytes(delta.numel() * delta.element_size(), self.replicas)

    # DCP `Stateful`: the outer weights and momentum as DTensors placed like their parameters, so that a resume at
    # another FSDP/TP layout reshards them like the model. `from_local` wraps the tensors (no copy): DCP loads into
    # them in place.

    def state_dict(self) -> dict:
        state = {}
        for (name, p), outer in zip(self.named, self.outer):
            state[f"outer.{name}"] = self._placed(outer, p)
            if "momentum_buffer" in self.optimizer.state[outer]:
                state[f"momentum.{name}"] = self._placed(self.optimizer.state[outer]["momentum_buffer"], p)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.loaded = True  # the tensors were loaded in place

    @staticmethod
    def _placed(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if not isinstance(p, DTensor):
            return t
        return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def build_replicas(cfg: SemiSync, model_parts: list[torch.nn.Module], mesh: dict[str, DeviceMesh],
                   total_steps: int, reduce_dtype: torch.dtype) -> Replicas:
    """DiLoCo for semi_sync.method = diloco, else the HSDP count (nothing for a single replica)."""
    if cfg.method == "diloco":
        return DiLoCo(cfg, model_parts, mesh["dp_replicate"], total_steps)
    return Replicas(model_parts, mesh["dp_replicate"].size(), reduce_dtype)
