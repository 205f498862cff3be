"""torchrun launches, as users run them: several processes on one node (FSDP x TP), and two "nodes" (two torchrun
launchers on this machine) meeting through torchrun's c10d rendezvous, which must train exactly like the same ranks
started together on one machine (spawned here with torchrun's environment: a third launch would only add its
start-up time)."""

from __future__ import annotations

import os
import subprocess
import sys

from dist_utils import REPO, TINY, free_port, losses, readme_command, run_layouts

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_torchrun_fsdp_x_tp_debug_model_loss_falls(tmp_path):
    # README.md's torchrun example, run for 6 steps (tests/test_docs.py leaves this command to this test).
    command = readme_command("torchrun --standalone --nproc_per_node=4")
    assert "--parallelism.tensor_parallel_degree 2" in command
    out = _wait(_torchrun([
        *command.split()[1:],
        "--training.steps", "6", "--lr_scheduler.warmup_steps", "2", "--validation.enable", "false",
        "--metrics.log_freq", "1",
        "--job.dump_folder", str(tmp_path),
    ]))
    assert "mesh: pp=1 dp_replicate=1 dp_shard=2 cp=1 tp=2 (world 4)" in out
    curve = losses(tmp_path)
    assert len(curve) == 6 and curve[-1] < 0.85 * curve[0], curve


def test_two_node_rendezvous_matches_one_launcher(tmp_path):
    common = ["--config", TINY, "--training.steps", "5"]
    single = tmp_path / "single"
    run_layouts(4, [[*common, "--job.dump_folder", str(single)]])

    two = tmp_path / "two_nodes"
    endpoint = f"localhost:{free_port()}"
    env = {**ENV, "NNODES": "2", "NGPU": "2", "RDZV_ENDPOINT": endpoint, "RDZV_ID": "titan-test",
           "CONFIG_FILE": TINY}
    nodes = [subprocess.Popen(["bash", "scripts/run_train.sh", "--training.steps", "5", "--job.dump_folder", str(two)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [_wait(node) for node in nodes]
    assert any("mesh: pp=1 dp_replicate=1 dp_shard=4 cp=1 tp=1 (world 4)" in o for o in outputs)
    assert losses(two) == losses(single)  # same ranks, same data, same reductions: bitwise equal
