"""The dry run's memory estimate for Mixture-of-Experts models (titan/memory.py:moe_bytes, all_to_all_bytes; the
experts' shards under expert parallelism), held against a real single-process run as tests/test_dry_run.py holds the
dense model's: the saved activations of the debug MoE's shapes within the same 15 %, and their growth with top_k
both as measured and as the formula says; under EP the planner's shards from shapes equal the dry run's real ones,
and the all-to-all buffers appear.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from dist_utils import REPO
from test_dry_run import SHAPES, measure_activations
from test_scripts import load_script

from titan import config_io, dry_run, memory
from titan.build import build

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = [*SHAPES, "--model.name", "qwen3_moe", "--moe.grouped_mm", "false"]  # dim 256, 6 MoE layers, 16 experts
TINY_MOE = str(REPO / "tests" / "configs" / "tiny_moe.toml")


def test_moe_activations_match_a_real_run_and_grow_with_top_k(tmp_path):
    measured, estimated = {}, {}
    for k in (2, 4):
        argv = [*MOE, "--moe.top_k", str(k), "--job.dump_folder", str(tmp_path / str(k))]
        run = build(config_io.load(argv))
        try:
            measured[k] = measure_activations(run)[0]
        finally:
            run.close()
            dist.destroy_process_group()
        result = dry_run.run(config_io.load(argv), 1)
        estimated[k] = result.ranks[0].stages[0].saved
        assert abs(estimated[k] - measured[k]) <= 0.15 * measured[k], (k, estimated[k], measured[k])
    # Two more experts per token: per MoE layer and token, 2 x (the routed rows' dim-wide input, output and output
    # in token order, four expert-width SwiGLU tensors, two int64 sort indices, the int64 choice and fp32 weights).
    args, tokens = result.args, 2 * 64
    per_row = 3 * 4 * args.dim + 4 * 4 * args.moe_hidden_dim + 2 * 8 + 8 + 2 * 4
    assert estimated[4] - estimated[2] == args.n_layers * tokens * 2 * per_row
    growth = measured[4] - measured[2]
    assert abs((estimated[4] - estimated[2]) - growth) <= 0.15 * growth, (estimated, measured)


@pytest.mark.parametrize("world, ep", [(2, 2), (4, 4), (16, 2)])  # (16, 2): experts sharded by their hidden dim
def test_expert_parallel_estimate_shards_experts_and_adds_the_all_to_all(world, ep):
    plan = load_script("plan")
    argv = ["--config", TINY_MOE, "--training.global_batch_size", "-1"]
    no_ep = dry_run.run(config_io.load(argv), world).worst.estimate
    cfg = config_io.load([*argv, "--parallelism.expert_parallel_degree", str(ep)])
    result = dry_run.run(cfg, world)
    e = result.worst.estimate
    args = result.args
    # One MoE layer's dispatch: its R = tokens x top_k rows sent and received, fp32.
    assert e.all_to_all == 2 * 4 * 2 * 32 * args.top_k * args.dim and no_ep.all_to_all == 0
    assert any(line.startswith("  all-to-all buffers") for line in dry_run.report(result))
    assert e.params <= no_ep.params  # experts over ep x efsdp: as many shards as FSDP alone (less padding)
    assert e.fsdp_buffers < no_ep.fsdp_buffers  # a block gathers only its rank's experts
    layout = plan.Layout.of(cfg, world)
    global_batch = cfg.training.local_batch_size * result.dims.dp * result.grad_accum
    assert plan.estimate(cfg, plan.Model(args), layout, global_batch, result.device_bytes) == e.total
    assert memory.is_moe_layer(args, 0)
