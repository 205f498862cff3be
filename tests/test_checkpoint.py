"""Checkpoints (titan/checkpoint.py) on the tiny Llama, fp32 and deterministic, gloo on CPU.

- Resume: 20 steps straight (saving at 10 and 20) vs a resume from its step-10 for steps 11-20 at the same layout
  (FSDP=2), sync and async: identical losses (==, bitwise).
- Resharding: step-10 of an FSDP=4 run loaded at dp=2 x tp=2 and at pp=2 x dp=2 gives model and optimizer tensors
  equal to the saved ones, and steps 11-20 match the uninterrupted FSDP=4 run within 1e-5 relative (the layouts'
  summation orders differ; test_parallel.py uses the same tolerance). Several pipeline stages per rank with
  checkpointing are refused for now.
- Crash safety: SIGKILL during an async save leaves step-N.tmp, which the next start ignores (resuming from the
  previous complete checkpoint) and deletes once superseded; SIGTERM saves the current step and exits 0; SIGUSR1
  on one rank stops every rank after the same step.
- Errors (missing folder, unknown load_step, garbled files) exit 2 with one line naming the path; retention.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import REPO, TINY, max_rel_diff, read_metrics, run_layouts, spawn_torchrun_env
from titan.train import main

CKPT = ["--checkpoint.enable", "--checkpoint.interval", "10", "--training.steps", "20"]
ASYNC = ["--checkpoint.async_mode", "async"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]


def _argv(folder, *extra):
    return ["--config", TINY, "--job.dump_folder", str(folder), *CKPT, *extra]


def _losses(folder) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(folder)}


def _resume_folder(src: Path, dst: Path, step: int = 10) -> Path:
    """A dump folder holding only src's step-<step> and its metrics up to that step: the state a job killed right
    after that save would leave (minus later checkpoints)."""
    (dst / "checkpoint").mkdir(parents=True)
    shutil.copytree(src / "checkpoint" / f"step-{step}", dst / "checkpoint" / f"step-{step}")
    lines = (src / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return dst


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    """FSDP=2: straight 20-step runs (sync and async saves), then resumes of each from its step-10."""
    root = tmp_path_factory.mktemp("fsdp2")
    run_layouts(2, [_argv(root / "sync"), _argv(root / "async", *ASYNC)])
    _resume_folder(root / "sync", root / "sync_resumed")
    _resume_folder(root / "async", root / "async_resumed")
    run_layouts(2, [_argv(root / "sync_resumed"), _argv(root / "async_resumed", *ASYNC)])
    return root


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_resume_same_layout_is_identical(fsdp2, mode):
    straight, resumed = _losses(fsdp2 / mode), _losses(fsdp2 / f"{mode}_resumed")
    assert sorted(straight) == list(range(1, 21))
    # metrics.jsonl of the resumed run = the first run's steps 1-10 + its own 11-20 (appended, not truncated).
    assert [r["step"] for r in read_metrics(fsdp2 / f"{mode}_resumed")] == list(range(1, 21))
    assert resumed == straight
    assert sorted(p.name for p in (fsdp2 / f"{mode}_resumed" / "checkpoint").iterdir()) == ["step-10", "step-20"]


def test_async_save_does_not_change_training(fsdp2):
    assert _losses(fsdp2 / "async") == _losses(fsdp2 / "sync")
    assert _losses(fsdp2 / "sync")[20] < _losses(fsdp2 / "sync")[1] - 0.2  # it is learning: not a vacuous ==


# ---------------------------------------------------------------------------------------------------------------
# Resharding: FSDP=4 -> dp=2 x tp=2


def _check_resharded_load(rank, world_size, argv, saved_path, report):
    """Build at another layout (which loads the checkpoint), compare every rank's gathered state (its pipeline
    stages' part of it) to the saved one, then train on."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict

    from titan import config
    from titan.train import build, train

    run = build(config.load(argv))
    try:
        options = StateDictOptions(full_state_dict=True)  # every rank gets full tensors of its stages
        saved = torch.load(saved_path, weights_only=False)
        bad, model_keys, optim_keys = [], set(), set()
        for part in run.model_parts:
            model = get_model_state_dict(part, options=options)
            optim = get_optimizer_state_dict(part, run.optimizer, options=options)
            bad += [k for k, v in model.items() if not torch.equal(v.cpu(), saved["model"][k])]
            bad += [f"{k}.{s}" for k, states in optim["state"].items() for s, v in states.items()
                    if not torch.equal(torch.as_tensor(v).cpu(), torch.as_tensor(saved["optimizer"]["state"][k][s]))]
            model_keys |= set(model)
            optim_keys |= set(optim["state"])
        Path(f"{report}.{rank}").write_text(json.dumps({"mismatched": bad, "model": sorted(model_keys),
                                                        "optim": sorted(optim_keys), "step": run.checkpointer.step}))
        train(run)
        run.checkpointer.close()
        run.metrics.close()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp4(tmp_path_factory):
    """An uninterrupted 20-step FSDP=4 run saving at steps 10 and 20: the source of both resharding tests."""
    folder = tmp_path_factory.mktemp("fsdp4")
    run_layouts(4, [_argv(folder)])
    return folder


@pytest.mark.parametrize("layout", ["dp2_tp2", "pp2_dp2"])
def test_resume_at_another_layout(tmp_path, fsdp4, layout):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    other = TP2 if layout == "dp2_tp2" else ["--parallelism.pipeline_parallel_degree", "2"]  # 1F1B
    resumed = _resume_folder(fsdp4, tmp_path / layout)
    saved = tmp_path / "step10.pt"
    dcp_to_torch_save(resumed / "checkpoint" / "step-10", saved)
    report = tmp_path / "report.json"
    spawn_torchrun_env(_check_resharded_load, 4, _argv(resumed, *other), str(saved), str(report))

    reports = [json.loads(Path(f"{report}.{r}").read_text()) for r in range(4)]
    state = torch.load(saved, weights_only=False)
    assert all(r["step"] == 10 and r["mismatched"] == [] for r in reports)
    # Together the ranks hold every saved tensor: nothing was skipped by the comparison.
    assert set().union(*(r["model"] for r in reports)) == set(state["model"])
    assert set().union(*(r["optim"] for r in reports)) == set(state["optimizer"]["state"])
    ref, res = _losses(fsdp4), _losses(resumed)
    steps = list(range(11, 21))
    assert max_rel_diff([res[s] for s in steps], [ref[s] for s in steps]) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Kill, signal and restart (single process, as a subprocess so that it can be killed)

# Runs titan.train with DCP's file writer slowed down for step-20, so that a SIGKILL lands mid-save.
_SLOW_STEP20 = """
import sys, time
import torch.distributed.checkpoint.filesystem as fs
for cls in fs.FileSystemWriter.__mro__:
    if "write_data" in vars(cls):
        original = cls.write_data
        def write_data(self, plan, planner, _original=original):
            if "step-20" in str(self.path):
                time.sleep(600)
            return _original(self, plan, planner)
        cls.write_data = write_data
        break
from titan.train import main
sys.exit(main(sys.argv[1:]))
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for(predicate, proc, timeout=240.0):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"process exited early with {proc.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_during_async_save_resumes_from_previous(tmp_path):
    ckpt = tmp_path / "checkpoint"
    argv = ["--config", TINY, "--job.dump_folder", str(tmp_path), *CKPT, *ASYNC]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_STEP20, *argv], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (ckpt / "step-10").is_dir() and (ckpt / "step-20.tmp").is_dir(), proc)
        time.sleep(0.5)  # well inside the (stalled) write
    finally:
        proc.kill()
        proc.wait()
    assert not (ckpt / "step-20").exists()

    out = subprocess.run([sys.executable, "-m", "titan.train", *argv], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ignoring incomplete" in out.stdout and "step-20.tmp" in out.stdout
    assert "continuing at step 11" in out.stdout
    # The interrupted save was superseded by a complete step-20 and removed.
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-10", "step-20"]
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps[-10:] == list(range(11, 21))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    argv = ["--config", TINY, "--job.dump_folder", str(tmp_path), "--checkpoint.enable", "--checkpoint.interval",
            "1000", "--training.steps", "400"]
    proc = subprocess.Popen([sys.executable, "-m", "titan.train", *argv], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGTERM" in out
    (saved,) = [p for p in (tmp_path / "checkpoint").iterdir()]
    step = int(saved.name.removeprefix("step-"))
    assert 3 <= step < 400 and read_metrics(tmp_path)[-1]["step"] == step

    # Resuming continues with the next step (2 more steps suffice to show it).
    assert main([*argv, "--training.steps", str(step + 2)]) == 0
    assert [r["step"] for r in read_metrics(tmp_path)][-2:] == [step + 1, step + 2]


def _signal_rank1_at_step3(rank, world_size, argv):
    """Run titan.train.main with rank 1 (only) sending itself SIGUSR1 during step 3."""
    from titan.checkpoint import Checkpointer
    from titan.train import main

    original = Checkpointer.end_of_step

    def end_of_step(self, step, tokens):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler was installed at the end of step 1
        return original(self, step, tokens)

    Checkpointer.end_of_step = end_of_step
    assert main(argv) == 0


def test_signal_on_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    argv = ["--config", TINY, "--job.dump_folder", str(tmp_path), "--checkpoint.enable", "--training.steps", "50"]
    spawn_torchrun_env(_signal_rank1_at_step3, 2, argv)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-3"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# Errors, retention, seed and model-only checkpoints (single process, in-process)


def _single(folder, *extra):
    return ["--config", TINY, "--job.dump_folder", str(folder), "--checkpoint.enable", *extra]


@pytest.fixture
def saved(tmp_path):
    """A dump folder with complete step-2 and step-4 checkpoints."""
    assert main(_single(tmp_path, "--training.steps", "4", "--checkpoint.interval", "2")) == 0
    return tmp_path


def _error_line(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("titan: error: "), err
    return err[0]


def test_errors_name_the_path(tmp_path, saved, capsys):
    folder = saved / "checkpoint"
    line = _error_line(capsys, _single(tmp_path / "none", "--checkpoint.load_step", "2"))
    assert "checkpoint.load_step=2" in line and str(tmp_path / "none" / "checkpoint") in line

    line = _error_line(capsys, _single(saved, "--checkpoint.load_step", "3"))
    assert str(folder / "step-3") in line and "complete steps: 2, 4" in line

    (folder / "step-4" / ".metadata").write_bytes(b"garbage")
    line = _error_line(capsys, _single(saved, "--training.steps", "6"))
    assert str(folder / "step-4") in line

    data = next((folder / "step-2").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])  # torn data file under a valid .metadata
    line = _error_line(capsys, _single(saved, "--training.steps", "6", "--checkpoint.load_step", "2"))
    assert str(folder / "step-2") in line

    line = _error_line(capsys, ["--config", TINY, "--job.dump_folder", str(tmp_path / "x"),
                                "--checkpoint.initial_load_path", str(tmp_path / "missing")])
    assert "checkpoint.initial_load_path" in line and str(tmp_path / "missing") in line

    # The same through the command line: exit code 2 and one line on stderr.
    out = subprocess.run([sys.executable, "-m", "titan.train", *_single(saved, "--checkpoint.load_step", "7")],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"titan: error: checkpoint.load_step=7: no complete checkpoint {folder / 'step-7'} (complete steps: 2, 4)"]


def test_incomplete_ignored_and_retention(saved):
    folder = saved / "checkpoint"
    (folder / "step-3.tmp").mkdir()  # interrupted saves: one older and one newer than what this run will save
    (folder / "step-9.tmp").mkdir()
    assert main(_single(saved, "--training.steps", "8", "--checkpoint.interval", "2",
                        "--checkpoint.keep_latest_k", "2")) == 0
    assert [r["step"] for r in read_metrics(saved)] == list(range(1, 9))  # resumed from step-4
    # step-3.tmp is superseded (a newer save is complete), step-9.tmp is not; only the newest 2 complete remain.
    assert sorted(p.name for p in folder.iterdir()) == ["step-6", "step-8", "step-9.tmp"]

    assert main(_single(saved, "--training.steps", "10", "--checkpoint.interval", "2",
                        "--checkpoint.keep_latest_k", "1")) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["step-10"]


def test_exclude_from_loading(saved):
    # Without the data-loader state a resume replays the first batches: its step 5 differs from a continuation's.
    other = saved.parent / "no_data_state"
    shutil.copytree(saved / "checkpoint", other / "checkpoint")
    assert main(_single(saved, "--training.steps", "6")) == 0
    assert main(_single(other, "--training.steps", "6", "--checkpoint.exclude_from_loading", "dataloader")) == 0
    assert sorted(_losses(other)) == [5, 6]
    assert _losses(other)[5] != _losses(saved)[5]


def test_seed_checkpoint_and_model_only_export(tmp_path):
    seed = tmp_path / "seed"
    assert main(["--config", TINY, "--job.dump_folder", str(seed), "--checkpoint.create_seed_checkpoint"]) == 0
    assert sorted(p.name for p in (seed / "checkpoint").iterdir()) == ["step-0"]
    assert not (seed / "metrics.jsonl").exists() or read_metrics(seed) == []

    # Training from the seed (model weights only) = training from the built-in initialisation.
    assert main(_single(seed, "--training.steps", "2")) == 0
    assert main(["--config", TINY, "--job.dump_folder", str(tmp_path / "plain"), "--training.steps", "2"]) == 0
    assert _losses(seed) == _losses(tmp_path / "plain")

    # model_only + bfloat16: the last save holds just the weights, in bf16; they load as initial weights.
    export = tmp_path / "export"
    assert main(_single(export, "--training.steps", "2", "--checkpoint.model_only", "--checkpoint.export_dtype",
                        "bfloat16")) == 0
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(export / "checkpoint" / "step-2")).read_metadata().state_dict_metadata
    assert all(k.startswith("model.") for k in meta)
    assert {m.properties.dtype for m in meta.values()} == {torch.bfloat16}
    assert main(["--config", TINY, "--job.dump_folder", str(tmp_path / "from_export"), "--training.steps", "1",
                 "--checkpoint.initial_load_path", str(export / "checkpoint" / "step-2")]) == 0
