"""Layer-level tensor parallelism: one transformer block (and the embedding/output ends) under the TP plan of
titan.parallel.tensor_parallel, on 2 gloo ranks, against the same unsharded modules: forward output and every
parameter's gradient agree within fp32 rounding, for Llama and for Qwen3 (whose per-head q/k norm weights stay whole
on each rank while the heads are split, and get the gradient summed over both ranks' heads)."""

from __future__ import annotations

import contextlib

import torch
from dist_utils import rel_error, spawn_gloo

REL = 1e-5  # ||got - ref|| / ||ref|| per tensor: scale-free, so tiny gradients are held to the same standard


def _assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = rel_error(got, ref)
    assert ref.norm() > 0 and err < REL, f"{what}: relative error {err:.2e}"


def _check_tp(rank: int, world_size: int, loss_parallel: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    for family in ("llama3", "qwen3"):
        _check_family(mesh, family, loss_parallel)


def _check_family(mesh, family: str, loss_parallel: bool) -> None:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_ctx

    from titan.models import build_model, model_args
    from titan.parallel.parallelize import materialize
    from titan.parallel.tensor_parallel import apply_tp

    args = model_args(family, "tiny", n_layers=2, vocab_size=256, max_seq_len=16)
    ref = build_model(args)
    materialize(ref, torch.device("cpu"), seed=3)
    with torch.device("meta"):
        tp_model = build_model(args)
    apply_tp(tp_model, mesh["tp"], loss_parallel=loss_parallel, async_tp=False)
    materialize(tp_model, torch.device("cpu"), seed=3)

    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    ref_logits = ref(inputs)
    torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), labels.flatten()).backward()
    ctx = loss_parallel_ctx() if loss_parallel else contextlib.nullcontext()
    with ctx:
        logits = tp_model(inputs)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()

    full_logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    _assert_close(full_logits, ref_logits, "logits")
    ref_params = dict(ref.named_parameters())
    sharded = 0
    for name, p in tp_model.named_parameters():
        assert isinstance(p, DTensor), f"{name} is not a DTensor under TP"
        sharded += any(pl.is_shard() for pl in p.placements)
        torch.testing.assert_close(p.full_tensor(), ref_params[name], atol=0, rtol=0, msg=name)
        _assert_close(p.grad.full_tensor(), ref_params[name].grad, f"grad of {name}")
    # q/k/v/o and w1/w2/w3 of each block, the embedding and the output are split; only the norms are replicated
    # (Qwen3's q/k norms among them).
    assert sharded == 7 * args.n_layers + 2
    assert (tp_model.layers["0"].attention.q_norm is not None) == (family == "qwen3")


def test_tp_block_forward_and_grads_match_unsharded():
    spawn_gloo(_check_tp, 2, True)


def test_tp_without_loss_parallel_matches_unsharded():
    spawn_gloo(_check_tp, 2, False)
