"""Expert parallelism (titan/parallel/expert_parallel.py) trains exactly like one process: the tiny Qwen3-MoE (8
experts, top-2; fp32, deterministic, gloo on CPU) with the auxiliary balance loss and the expert-bias update on
matches its single-process run within 1e-5 relative in loss and gradient norm over 6 steps at EP=2, EP=4,
EP2 x FSDP2 (with full activation checkpointing), EP2 x TP2, EP2 x PP2 and EP2 x CP2, and ends with the same
expert biases. Checkpoints reshard: EP4's step 3 resumed at EP2, and EP2's step 3 resumed in one process, hold
exactly the saved model and optimizer tensors and go on with the reference's losses (1e-5). Bad EP degrees are one
line naming the key and exit code 2 (the real CLI's subprocess run is in tests/test_config.py, `ep_ranks`).

Two spawns, one per world size (4 ranks first: EP4 writes the checkpoint the 2-rank spawn resumes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_utils import REPO, TINY, max_rel_diff, read_metrics, spawn_torchrun_env_runs
from test_checkpoint import _check_resharded_load, _resume_folder

from titan.train import main

TOL = 1e-5
TINY_MOE = str(REPO / "tests" / "configs" / "tiny_moe.toml")  # aux loss and bias update on
MOE = ["--moe.grouped_mm", "false"]  # the per-expert loop: torch._grouped_mm is ~20x slower at these shapes on CPU
STEPS = ["--training.steps", "6", "--validation.enable", "false"]
CKPT = ["--checkpoint.enable", "--checkpoint.interval", "3"]


def _ep(n: int) -> list[str]:
    return ["--parallelism.expert_parallel_degree", str(n)]


# name -> (world size, overrides). dp_shard fills what the other degrees leave; ep borrows from dp_shard x cp.
LAYOUTS = {
    "ep4": (4, _ep(4) + CKPT),
    "ep2_fsdp2": (4, _ep(2) + ["--activation_checkpoint.mode", "full"]),
    "ep2_tp2": (4, _ep(2) + ["--parallelism.tensor_parallel_degree", "2"]),
    "ep2_pp2": (4, _ep(2) + ["--parallelism.pipeline_parallel_degree", "2"]),
    "ep2": (2, _ep(2) + CKPT),
    "ep2_cp2": (2, _ep(2) + ["--parallelism.context_parallel_degree", "2"]),
}


def _argv(folder, extra=()) -> list[str]:
    return ["--config", TINY_MOE, "--job.dump_folder", str(folder), *MOE, *STEPS, *extra]


def _run(rank, world_size, kind, *args):
    """One run of a spawn: a training run (`main`), or a resharded resume checked against its saved state."""
    if kind == "train":
        assert main(args[0]) == 0
    else:
        _check_resharded_load(rank, world_size, *args)


def _resume(root: Path, src: str, name: str, extra: list[str]) -> tuple:
    """A resume at another layout of `src`'s step 3: (argv, the saved state as one torch.save file, report path)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = _resume_folder(root / src, root / name, step=3)
    dcp_to_torch_save(folder / "checkpoint" / "step-3", root / f"{name}.pt")
    return _argv(folder, extra + CKPT), str(root / f"{name}.pt"), str(root / f"{name}_report.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    for world in (4, 2):
        jobs = [("train", _argv(root / n, extra)) for n, (w, extra) in LAYOUTS.items() if w == world]
        if world == 2:
            jobs.append(("resume", *_resume(root, "ep4", "ep4_to_ep2", _ep(2))))
        spawn_torchrun_env_runs(_run, world, jobs)
    assert main(_argv(root / "reference")) == 0
    _check_resharded_load(0, 1, *_resume(root, "ep2", "ep2_to_1", []))
    return root


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(runs, layout):
    ref, got = read_metrics(runs / "reference"), read_metrics(runs / layout)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert max_rel_diff([r["loss"] for r in got], [r["loss"] for r in ref]) < TOL
    assert max_rel_diff([r["grad_norm"] for r in got], [r["grad_norm"] for r in ref]) < TOL


def test_reference_balances_and_learns(runs):
    """Guards against a vacuous comparison: the bias update moved the biases, and the loss went down (over 6 steps
    of shuffled windows the last step's loss is noisier than that: the lowest one)."""
    state = torch.load(runs / "ep2_to_1.pt", weights_only=False)["model"]
    biases = [v for k, v in state.items() if k.endswith("expert_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    losses = [r["loss"] for r in read_metrics(runs / "reference")]
    assert min(losses[1:]) < losses[0] - 0.05


@pytest.mark.parametrize("name, world", [("ep4_to_ep2", 2), ("ep2_to_1", 1)])
def test_resume_at_another_ep_degree(runs, name, world):
    reports = [json.loads(Path(f"{runs / name}_report.json.{r}").read_text()) for r in range(world)]
    state = torch.load(runs / f"{name}.pt", weights_only=False)
    assert all(r["step"] == 3 and r["mismatched"] == [] for r in reports)
    # Together the ranks hold every saved tensor, the experts' and their optimizer state among them.
    assert set().union(*(r["model"] for r in reports)) == set(state["model"])
    assert set().union(*(r["optim"] for r in reports)) == set(state["optimizer"]["state"])
    assert any("experts.w1" in k for k in state["optimizer"]["state"])
    ref, got = read_metrics(runs / "reference"), read_metrics(runs / name)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert max_rel_diff([r["loss"] for r in got[3:]], [r["loss"] for r in ref[3:]]) < TOL


@pytest.mark.parametrize("extra, world, needle", [
    (["--config", TINY, "--parallelism.expert_parallel_degree", "2"], 2,
     "parallelism.expert_parallel_degree=2 needs a Mixture-of-Experts family"),
    (["--config", TINY_MOE, "--parallelism.expert_parallel_degree", "3", "--training.global_batch_size", "6"], 3,
     "parallelism.expert_parallel_degree=3 does not divide the number of experts (8)"),
    (["--config", TINY_MOE, "--parallelism.expert_parallel_degree", "4", "--parallelism.tensor_parallel_degree", "2"],
     4, "parallelism.expert_parallel_degree=4 does not divide the ranks it borrows"),
])
def test_bad_ep_degree_is_one_line(capsys, extra, world, needle):
    capsys.readouterr()
    assert main(["--check", "--world_size", str(world), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"titan: error: {needle}"), err
