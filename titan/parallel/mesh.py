"""Parallel degrees -> one named `DeviceMesh`, and the checks that tie degrees to the world size and the model.

Dimensions, outermost first: pp, dp_replicate, dp_shard, cp, tp (tp innermost so its collectives stay on the
fastest links). Flattened views the rest of titan uses:
  dp          = dp_replicate x dp_shard   -> which rank gets which data (the loader)
  dp_shard_cp = dp_shard x cp             -> what FSDP shards over (CP ranks hold the same weights)
  dp_cp       = dp_replicate x dp_shard x cp -> where token counts are reduced (ranks splitting the batch)
  pp_dp_cp    = pp x dp_cp                 -> where loss values are reduced (only last pipeline stages hold them)
  step_tokens, step_loss = dp_cp, pp_dp_cp -> where a training step's token count (its loss's divisor) and its loss
                are reduced; with replicas trained apart (semi_sync, DiLoCo: titan/parallel/semi_sync.py) they leave
                dp_replicate out, as `fsdp` does: each replica group is a trainer of its own between outer steps
Expert parallelism borrows ranks instead of adding a dimension: dp_shard_cp is cut into efsdp x ep (ep innermost,
so an expert group is made of neighbouring ranks), the same ranks seen two ways (DeviceMesh._unflatten):
  ep          -> which rank holds which experts, and where tokens travel to them (titan/parallel/expert_parallel.py)
  expert_fsdp = [dp_replicate x] efsdp     -> what FSDP shards the experts over (what ep leaves of dp_shard_cp)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan.config import Parallelism
from titan.errors import ConfigError

logger = logging.getLogger("titan")

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int
    ep: int = 1  # expert-parallel ranks, borrowed from dp_shard x cp


    @classmethod
    def from_config(cls, cfg: Parallelism, world_size: int) -> ParallelDims:
        """Resolve `data_parallel_shard_degree = -1` and check that the degrees multiply to the world size."""
        others = cfg.data_parallel_replicate_degree * cfg.context_parallel_degree * cfg.tensor_parallel_degree
        others *= cfg.pipeline_parallel_degree
        shard = cfg.data_parallel_shard_degree
        if shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"parallelism degrees other than data_parallel_shard_degree multiply to {others}, which does not "
                    f"divide the world size {world_size}"
                )
            shard = world_size // others
        if others * shard != world_size:
            raise ConfigError(
                f"parallelism degrees multiply to {others * shard} (pp={cfg.pipeline_parallel_degree} "
                f"dp_replicate={cfg.data_parallel_replicate_degree} dp_shard={shard} "
                f"cp={cfg.context_parallel_degree} tp={cfg.tensor_parallel_degree}) but the world size is "
                f"{world_size}; set parallelism.data_parallel_shard_degree = -1 to fill the rest"
            )
        ep = cfg.expert_parallel_degree
        if (shard * cfg.context_parallel_degree) % ep:
            raise ConfigError(f"parallelism.expert_parallel_degree={ep} does not divide the ranks it borrows: "
                              f"data_parallel_shard_degree x context_parallel_degree = {shard} x "
                              f"{cfg.context_parallel_degree}")
        return cls(cfg.pipeline_parallel_degree, cfg.data_parallel_replicate_degree, shard,
                   cfg.context_parallel_degree, cfg.tensor_parallel_degree, world_size, ep)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        # FSDP also covers pure replication (HSDP with one shard) so every data-parallel layout is one code path.
        return self.dp_shard * self.cp > 1 or self.dp_replicate > 1

    def describe(self) -> str:
        return (f"mesh: pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} cp={self.cp} "
                f"tp={self.tp} (world {self.world_size})"
                + (f"; experts: ep={self.ep} x efsdp={self.dp_shard * self.cp // self.ep} over dp_shard x cp"
                   + (f", replicated over dp_replicate={self.dp_replicate}" if self.dp_replicate > 1 else "")
                   if self.ep > 1 else ""))

    def build_mesh(self, device_type: str, replicas_apart: bool = False) -> dict[str, DeviceMesh]:
        """The named meshes: each of DIMS, the flattened dp / dp_shard_cp / dp_cp, `fsdp` (what FSDP shards
        over: dp_shard_cp, or dp_replicate x dp_shard for HSDP unless `replicas_apart`) and the step's meshes (see the
        module docstring). Flattened views are made once and kept here, since slicing them back out of the root mesh
        is deprecated."""
        root = init_device_mesh(device_type, tuple(getattr(self, d) for d in DIMS), mesh_dim_names=DIMS)
        meshes = {d: root[d] for d in DIMS}
        meshes["dp"] = root["dp_replicate", "dp_shard"]._flatten("dp")
        meshes["dp_shard_cp"] = root["dp_shard", "cp"]._flatten("dp_shard_cp")
        meshes["dp_cp"] = root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        meshes["pp_dp_cp"] = root["pp", "dp_replicate", "dp_shard", "cp"]._flatten("pp_dp_cp")
        if self.dp_replicate > 1 and self.cp > 1:
            raise ConfigError("parallelism.data_parallel_replicate_degree > 1 with context_parallel_degree > 1 is "
                              "not supported yet")
        hsdp = self.dp_replicate > 1 and not replicas_apart
        meshes["fsdp"] = root["dp_replicate", "dp_shard"] if hsdp else meshes["dp_shard_cp"]
        meshes["step_tokens"], meshes["step_loss"] = meshes["dp_cp"], meshes["pp_dp_cp"]
        if replicas_apart:
            meshes["step_tokens"] = meshes["dp_shard_cp"]
            meshes["step_loss"] = root["pp", "dp_shard", "cp"]._flatten("pp_dp_shard_cp")
        if self.ep > 1:
            meshes.update(self._expert_meshes(meshes["fsdp"]))
        logger.info(self.describe())
        return meshes

    def _expert_meshes(self, fsdp: DeviceMesh) -> dict[str, DeviceMesh]:
        """`ep` and `expert_fsdp`: FSDP's last dimension (dp_shard_cp, or dp_shard under HSDP) cut into efsdp x ep."""
        last = fsdp.mesh_dim_names[-1]
        split = fsdp._unflatten(last, (fsdp[last].size() // self.ep, self.ep), ("efsdp", "ep"))
        return {"ep": split["ep"], "expert_fsdp": split["dp_replicate", "efsdp"] if "dp_replicate" in
                fsdp.mesh_dim_names else split["efsdp"]}


def check_model_fits(dims: ParallelDims, args) -> None:
    """Reject degrees that cannot split this model (`TransformerArgs` of any family), naming the key."""
    for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                    ("the FFN hidden size", args.ffn_hidden_dim)):
        if n % dims.tp:
            raise ConfigError(f"parallelism.tensor_parallel_degree={dims.tp} does not divide {what}={n}")
    if dims.tp > 1 and args.tie_embeddings:
        raise ConfigError(
            f"parallelism.tensor_parallel_degree={dims.tp} is not supported for a model with tied embeddings "
            "(the embedding is split by rows, the output by columns)"
        )
    if dims.pp > args.n_layers:
        raise ConfigError(f"parallelism.pipeline_parallel_degree={dims.pp} exceeds the model's {args.n_layers} layers")
    n_experts = getattr(args, "n_experts", 0)  # Mixture-of-Experts families only
    if dims.ep > 1 and not n_experts:
        raise ConfigError(f"parallelism.expert_parallel_degree={dims.ep} needs a Mixture-of-Experts family "
                          f"(model.name = qwen3_moe); {type(args).__name__} has no experts")
    if n_experts % dims.ep:
        raise ConfigError(f"parallelism.expert_parallel_degree={dims.ep} does not divide the number of experts "
                          f"({n_experts})")
