"""Every parallel layout trains exactly like one process: for 10 steps of the tiny Llama (fp32, deterministic, gloo on
CPU) the per-step loss and gradient norm of each layout match the single-process run within 1e-5 relative.

The global batch (8 sequences) and seed are fixed, so every layout sees the same samples per step and starts from
the same weights (titan.parallel.parallelize.materialize); only the split of work over ranks differs.
"""

from __future__ import annotations

import pytest

from dist_utils import TINY, max_rel_diff, read_metrics, run_layouts
from titan.train import main

TOL = 1e-5

# name -> (world size, overrides)
LAYOUTS = {
    "fsdp2": (2, []),
    "fsdp2_reshard_always": (2, ["--parallelism.fsdp_reshard_after_forward", "always"]),
    "fsdp2_reshard_never": (2, ["--parallelism.fsdp_reshard_after_forward", "never"]),
    "fsdp2_ac_full": (2, ["--activation_checkpoint.mode", "full"]),
    "fsdp2_ac_selective_op": (2, ["--activation_checkpoint.mode", "selective"]),
    "fsdp2_ac_every_2nd": (2, ["--activation_checkpoint.mode", "selective",
                               "--activation_checkpoint.selective_ac_option", "2"]),
    "fsdp2_compile": (2, ["--compile.enable"]),
    "tp2": (2, ["--parallelism.tensor_parallel_degree", "2"]),
    "ddp2": (2, ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]),
    "compile": (1, ["--compile.enable"]),
    "fsdp4": (4, []),
    "hsdp2x2": (4, ["--parallelism.data_parallel_replicate_degree", "2"]),
    "fsdp2_tp2": (4, ["--parallelism.tensor_parallel_degree", "2"]),
    "fsdp2_tp2_no_loss_parallel": (4, ["--parallelism.tensor_parallel_degree", "2",
                                       "--parallelism.enable_loss_parallel", "false"]),
    "fsdp2_tp2_ac_full": (4, ["--parallelism.tensor_parallel_degree", "2", "--activation_checkpoint.mode", "full"]),
}


def _argv(folder, extra=()):
    return ["--config", TINY, "--job.dump_folder", str(folder), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Metrics of the single-process reference and of every layout (grouped by world size: one spawn each)."""
    root = tmp_path_factory.mktemp("layouts")
    assert main(_argv(root / "reference")) == 0
    for world in sorted({w for w, _ in LAYOUTS.values()}):
        names = [n for n, (w, _) in LAYOUTS.items() if w == world]
        if world == 1:
            assert all(main(_argv(root / n, LAYOUTS[n][1])) == 0 for n in names)
        else:
            run_layouts(world, [_argv(root / n, LAYOUTS[n][1]) for n in names])
    return {n: read_metrics(root / n) for n in ["reference", *LAYOUTS]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(runs, layout):
    ref, got = runs["reference"], runs[layout]
    assert [r["step"] for r in got] == list(range(1, 11))
    assert max_rel_diff([r["loss"] for r in got], [r["loss"] for r in ref]) < TOL
    assert max_rel_diff([r["grad_norm"] for r in got], [r["grad_norm"] for r in ref]) < TOL


def test_reference_is_learning(runs):
    # Guards against a vacuous comparison (e.g. every layout frozen at the initial loss).
    losses = [r["loss"] for r in runs["reference"]]
    assert losses[-1] < losses[0] - 0.2
