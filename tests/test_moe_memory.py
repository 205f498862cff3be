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


def _measured_and_estimated(argv: list[str]) -> tuple[int, int]:
    run = build(config_io.load(argv))
    try:
        measured = measure_activations(run)[0]
    finally:
        run.close()
        dist.destroy_process_group()
    return measured, dry_run.run(config_io.load(argv), 1).ranks[0].stages[0].saved


def test_mla_and_mtp_activations_match_a_real_run(tmp_path):
    """DeepSeek-V3's debug shapes with one MTP depth (titan/memory_attention.py: MLA's latents and per-head K and V;
    the MTP depth's block, norms and log-softmax): within the same 15 %."""
    argv = [*SHAPES, "--model.name", "deepseek_v3", "--model.mtp_layers", "1", "--moe.grouped_mm", "false",
            "--job.dump_folder", str(tmp_path)]
    measured, estimated = _measured_and_estimated(argv)
    assert abs(estimated - measured) <= 0.15 * measured, (estimated, measured)


def test_sink_attention_activations_match_a_real_run_and_grow_with_the_square_of_the_sequence(tmp_path):
    """gpt-oss's dense sink/window path keeps fp32 scores of every head: the estimate within 15 % at two lengths,
    and its growth from 64 to 128 tokens (more than double: the scores are quadratic) within 15 % of the measured."""
    got = {}
    for seq in (64, 128):
        argv = [*SHAPES, "--model.name", "gpt_oss", "--moe.grouped_mm", "false", "--training.seq_len", str(seq),
                "--job.dump_folder", str(tmp_path / str(seq))]
        got[seq] = _measured_and_estimated(argv)
        assert abs(got[seq][1] - got[seq][0]) <= 0.15 * got[seq][0], (seq, got[seq])
    (m64, e64), (m128, e128) = got[64], got[128]
    assert e128 - e64 > e64 and abs((e128 - e64) - (m128 - m64)) <= 0.15 * (m128 - m64), got


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_planner_shards_equal_the_dry_run_for_mla_and_sinks(family):
    """The planner's shards from shapes (titan/memory_shards.py:shard_numel: MLA's per-head projections split by TP, its
    latents replicated; biases with their linears; gpt-oss's sinks by head) equal the dry run's real ones."""
    plan = load_script("plan")
    config = str(REPO / "tests" / "configs" / f"tiny_{family}.toml")
    cfg = config_io.load(["--config", config, "--training.global_batch_size", "-1",
                          "--parallelism.tensor_parallel_degree", "2", "--parallelism.expert_parallel_degree", "2"])
    result = dry_run.run(cfg, 4)
    e = result.worst.estimate
    layout = plan.Layout.of(cfg, 4)
    global_batch = cfg.training.local_batch_size * result.dims.dp * result.grad_accum
    assert plan.estimate(cfg, plan.Model(result.args), layout, global_batch, result.device_bytes) == e.total
