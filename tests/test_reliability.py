"""Runs that never lose work (titan/guard.py, titan/lifecycle.py), each defect reproduced rather than mocked:

- A diverging lr (1e30) makes step 2 non-finite: the step makes no update, is logged and counted, and after
  max_consecutive_skips in a row the run stops with exit code 3, keeping its last good checkpoint (interval 1 and
  keep_latest_k 1 used to replace it with NaN ones) - on one process, with DPO, and with FSDP, TP and PP on 2 ranks.
- Loss-spike skipping (off by default) skips a step above factor x the recent mean. The lr schedule advances over
  skipped steps.
- One writer per dump folder: a held lock refuses a second run with one line naming the holder; a stale one (holder
  gone) is taken over with a warning. SIGKILLing the torchrun agent takes its workers down within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_utils import REPO, TINY, children, read_metrics, run_layouts, running

from titan.config_io import load
from titan.errors import ConfigError
from titan.guard import StepGuard
from titan.lifecycle import LOCK_FILE, STALE_SECONDS, RunLock
from titan.optim import lr_lambda
from titan.train import main

DIVERGE = ["--optimizer.lr", "1e30", "--training.max_consecutive_skips", "2", "--checkpoint.enable",
           "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "1", "--validation.enable", "false"]


def _argv(folder, *extra):
    return ["--config", TINY, "--job.dump_folder", str(folder), *extra]


def _check_diverged(folder):
    """What a diverged run must leave: steps 2 and 3 logged as skipped; step-1, saved after the update the run
    diverged from (lr 1e30 made its weights huge), moved to diverged/<run>/ and no checkpoint for a resume to take."""
    records = read_metrics(folder)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert torch.isfinite(torch.tensor([records[0]["loss"], records[0]["grad_norm"]])).all()
    for r, skipped in zip(records[1:], (1, 2)):
        assert not torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() and r["skipped_steps"] == skipped
    assert sorted(p.name for p in (folder / "checkpoint").iterdir()) == ["diverged"]
    assert len(list((folder / "checkpoint" / "diverged").glob("*/step-1"))) == 1


def test_diverging_lr_stops_with_exit_3_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    assert main(_argv(tmp_path, *DIVERGE)) == 3
    out, err = capsys.readouterr()
    assert err.splitlines() == [err.strip()] and "training.max_consecutive_skips=2: steps 2-3" in err
    assert "no checkpoint has been saved; step-1 moved to " + str(tmp_path / "checkpoint" / "diverged") in err
    assert "step 2: non-finite loss or gradient norm" in out and "not saving step 2" in out
    _check_diverged(tmp_path)
    # Skipped steps make no update but the lr schedule advances: the lr stays a function of the step.
    cfg = load(_argv(tmp_path, *DIVERGE))
    assert [r["lr"] for r in read_metrics(tmp_path)] == [1e30 * lr_lambda(s, cfg.lr_scheduler, 10) for s in range(3)]

    # step-1's weights are what step 2 diverged on: a resume with a sane lr starts afresh instead of from them
    # (before, it resumed step-1 and was NaN at once). A resume from a good checkpoint:
    # test_checkpoint.py::test_a_destructive_update_never_replaces_the_last_good_checkpoint.
    assert main(_argv(tmp_path, "--checkpoint.enable", "--training.steps", "2", "--validation.enable", "false",
                      "--optimizer.lr", "1e-3")) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records][-2:] == [1, 2] and "skipped_steps" not in records[-1]


def test_diverging_dpo_stops_with_exit_3(tmp_path):
    dpo = ["--training.recipe", "dpo", "--training.dataset", "tiny_preferences", "--training.global_batch_size", "4",
           "--model.tokenizer_path", "debug_chat"]
    assert main(_argv(tmp_path, *DIVERGE, *dpo)) == 3
    _check_diverged(tmp_path)


def test_diverging_lr_stops_every_layout_at_the_same_step(tmp_path):
    """The loss is summed over the pipeline stages and data ranks before the check, so every rank skips alike (with
    PP only the last stage computes the loss)."""
    layouts = {"fsdp2": [], "tp2": ["--parallelism.tensor_parallel_degree", "2"],
               "pp2": ["--parallelism.pipeline_parallel_degree", "2"]}
    run_layouts(2, [_argv(tmp_path / name, *DIVERGE, *extra) for name, extra in layouts.items()], expected=3)
    for name in layouts:
        _check_diverged(tmp_path / name)


def test_loss_spike_skipping():
    cfg = load(["--training.loss_spike_factor", "1.5", "--training.loss_spike_window", "3"]).training
    guard = StepGuard(cfg)
    losses = [4.0, 4.2, 3.8, 6.1, 5.9, 4.1, float("nan")]
    decisions = [guard.check(i + 1, torch.tensor(x), torch.tensor(1.0))[2] for i, x in enumerate(losses)]
    # 6.1 > 1.5 x 4.0 (mean of 4.0, 4.2, 3.8) is a spike; 5.9 is below 6.0; the mean then moves on.
    assert decisions == [False, False, False, True, False, False, True]
    assert guard.total == 2 and guard.metrics() == {"skipped_steps": 2}
    assert not load([]).training.loss_spike_factor  # off by default
    with pytest.raises(ConfigError, match="training.loss_spike_factor"):
        load(["--training.loss_spike_factor", "0.9"])  # would skip ordinary steps


# ---------------------------------------------------------------------------------------------------------------
# One writer per dump folder


def test_a_held_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path, capsys):
    lock_file = tmp_path / LOCK_FILE
    # Held by a live process on this host (this test's parent): refused, with one line naming the holder.
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "process_start": None, "started": "earlier"}
    lock_file.write_text(json.dumps(holder))
    assert main(_argv(tmp_path, "--training.steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by another run (host {holder['host']}, pid {holder['pid']}" in err[0], err
    assert json.loads(lock_file.read_text()) == holder and not (tmp_path / "metrics.jsonl").exists()

    # Its pid now names another process (the start time differs), or the holder is gone: stale, taken over.
    holder["process_start"] = 1
    lock_file.write_text(json.dumps(holder))
    RunLock.acquire(str(tmp_path)).release()
    assert not lock_file.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file.write_text(json.dumps({**holder, "pid": dead.pid, "process_start": None}))
    assert main(_argv(tmp_path, "--training.steps", "1", "--validation.enable", "false")) == 0
    assert f"taking over the stale {lock_file}" in capsys.readouterr().out and not lock_file.exists()

    # A holder that has exited but was not reaped yet (a zombie: in a container whose pid 1 reaps nothing, a relaunch
    # found its crashed predecessor's rank 0 so and gave up at once) is gone; a live one is waited for when asked
    # (scripts/run_train.sh sets TITAN_LOCK_WAIT for a relaunch).
    for code in ("pass", "import time; time.sleep(1.5)"):
        holder_process = subprocess.Popen([sys.executable, "-c", code])  # never waited for: it stays a zombie
        if code == "pass":
            while Path(f"/proc/{holder_process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                time.sleep(0.05)
        lock_file.write_text(json.dumps({**holder, "pid": holder_process.pid, "process_start": None}))
        RunLock.acquire(str(tmp_path), wait=0 if code == "pass" else 60).release()
        assert not lock_file.exists()
        holder_process.wait()

    # Another host: alive while it refreshes the lock, stale after STALE_SECONDS without.
    lock_file.write_text(json.dumps({**holder, "host": "elsewhere"}))
    with pytest.raises(ConfigError, match="host elsewhere"):
        RunLock.acquire(str(tmp_path))
    old = time.time() - STALE_SECONDS - 1
    os.utime(lock_file, (old, old))
    RunLock.acquire(str(tmp_path)).release()


def test_sigkilled_launcher_takes_its_workers_down(tmp_path, capsys):
    """torchrun starts its workers in sessions of their own; without titan's tie to the launcher they would train on
    as orphans after the agent is SIGKILLed. While the run is alive a second one on its folder is refused."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "titan.train", *_argv(tmp_path, "--training.steps", "100000",
                                                           "--validation.enable", "false")],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert agent.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.1)
        workers = children(agent.pid)
        assert len(workers) == 2, workers
        assert main(_argv(tmp_path, "--training.steps", "1")) == 2
        err = capsys.readouterr().err
        assert "in use by another run" in err and any(f"pid {w}," in err for w in workers), err

        agent.kill()
        agent.wait()
        deadline = time.time() + 10
        while any(running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(running(w) for w in workers), "orphaned workers kept running"
    finally:
        agent.kill()
        for w in workers:
            if running(w):
                os.kill(w, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# Sizes too big for the machine


@pytest.mark.parametrize("config, argv, key", [
    (TINY, ["--training.seq_len", "1000000000"], "training.seq_len=1000000000 (its RoPE table)"),
    (TINY, ["--lora.enable", "--lora.rank", "100000000"], "lora.rank=100000000 (an adapter)"),
    (str(REPO / "tests" / "configs" / "tiny_moe.toml"), ["--moe.n_experts", "10000000"], "moe.n_experts=10000000"),
])
def test_an_allocation_failure_is_one_line_naming_the_key_that_sized_it(tmp_path, capsys, config, argv, key):
    """A huge seq_len, an absurd LoRA rank and 10^7 experts each failed with an allocator traceback."""
    assert main(["--config", config, "--job.dump_folder", str(tmp_path), "--training.steps", "1",
                 "--validation.enable", "false", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("titan: error: out of memory: cannot allocate") and key in err[0], err
