"""Checkpoints (titan/checkpoint.py) on the tiny Llama, fp32 and deterministic, gloo on CPU.

- Resume: 20 steps straight (saving at 10 and 20) vs a resume from its step-10 for steps 11-20 at the same layout
  (FSDP=2), sync and async: identical losses (==, bitwise).
- Resharding: step-5 of a 10-step FSDP=4 run loaded at dp=2 x tp=2 and at pp=2 x dp=2 gives model and optimizer
  tensors equal to the saved ones, and steps 6-10 match the uninterrupted FSDP=4 run within 1e-5 relative (the layouts'
  summation orders differ; test_parallel.py uses the same tolerance). The same for the tiny Qwen3 at dp=2 x tp=2
  (its replicated q/k norms included), in the same processes. Several pipeline stages per rank with
  checkpointing are refused for now.
- Crash safety: SIGKILL during an async save leaves step-N.tmp, which the next start ignores (resuming from the
  previous complete checkpoint) and deletes once superseded; SIGTERM saves the current step and exits 0; SIGUSR1
  on one rank stops every rank after the same step.
- Errors (missing folder, unknown load_step, garbled files) exit 2 with one line naming the path; retention.
- Integrity and history: a shard with 8 KiB overwritten is caught by its manifest's CRC-32 and the previous
  checkpoint used; a branched resume (load_step older than the newest) is refused unless checkpoint.branch, which
  moves the later checkpoints aside, and retention follows the run's lineage; a SIGKILL at each point of a re-save's
  commit recovers.
- Resuming with other settings: new optimizer values win (lr 1e-30 leaves the weights bitwise unchanged), fewer
  steps than the checkpoint leave nothing to train, another tokenizer is refused.
- Output that fails: a read-only checkpoint folder stops before step 1, a full disk (a small tmpfs, or a faked
  ENOSPC) reports the path and errno and leaves the last checkpoint; scripts/run_train.sh --max_restarts recovers a
  killed worker with the losses of an uninterrupted run.
"""

from __future__ import annotations

import errno
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
from dist_utils import REPO, TINY, max_rel_diff, read_metrics, run_layouts, spawn_torchrun_env, spawn_torchrun_env_runs

from titan.train import main

CKPT = ["--checkpoint.enable", "--checkpoint.interval", "10", "--training.steps", "20"]
ASYNC = ["--checkpoint.async_mode", "async"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]
QWEN3 = ["--model.name", "qwen3", "--model.flavor", "tiny"]
MUON = ["--optimizer.name", "muon", "--optimizer.lr", "0.02", "--optimizer.adamw_lr", "3e-3",
        "--optimizer.muon_ns_dtype", "float32"]  # fp32 iteration: the layouts' results compare within 1e-5


def _argv(folder, *extra, ckpt=CKPT):
    return ["--config", TINY, "--job.dump_folder", str(folder), *ckpt, *extra]


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
# DiLoCo (titan/parallel/semi_sync.py): 2 replica groups x 2 shards, an outer step every 4 steps, so step-10 falls
# between two (the replicas' weights differ): bf16 optimizer states too (their rounding bits come from the step).

DILOCO = ["--parallelism.data_parallel_replicate_degree", "2", "--semi_sync.method", "diloco",
          "--semi_sync.sync_every", "4", "--optimizer.state_dtype", "bfloat16"]


@pytest.fixture(scope="module")
def diloco(tmp_path_factory):
    root = tmp_path_factory.mktemp("diloco")
    run_layouts(4, [_argv(root / "straight", *DILOCO)])
    _resume_folder(root / "straight", root / "resumed")
    run_layouts(4, [_argv(root / "resumed", *DILOCO)])
    return root


def test_diloco_resume_is_identical(diloco):
    from torch.distributed.checkpoint import FileSystemReader

    straight, resumed = _losses(diloco / "straight"), _losses(diloco / "resumed")
    assert sorted(resumed) == list(range(1, 21)) and resumed == straight
    assert straight[20] < straight[1] - 0.2  # it learns
    keys = FileSystemReader(str(diloco / "straight" / "checkpoint" / "step-10")).read_metadata().state_dict_metadata
    # Outer weights and momentum once; each replica's own weights and optimizer state (replica 1's under its name).
    for prefix in ("semi_sync.outer.", "semi_sync.momentum.", "model.layers.", "model.replica1.layers.",
                   "optimizer.state.", "optimizer.replica1.state."):
        assert any(k.startswith(prefix) for k in keys), prefix


# ---------------------------------------------------------------------------------------------------------------
# Resharding: FSDP=4 -> dp=2 x tp=2


def _check_resharded_load(rank, world_size, argv, saved_path, report):
    """Build at another layout (which loads the checkpoint), compare every rank's gathered state (its pipeline
    stages' part of it) to the saved one, then train on."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from titan import config_io
    from titan.build import build
    from titan.train import train

    run = build(config_io.load(argv))
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
        run.close()
    finally:
        dist.destroy_process_group()


# Resharding runs are half as long as the others (10 steps, saving at 5): their TP steps cost several times FSDP's.
RESHARD_CKPT = ["--checkpoint.enable", "--checkpoint.interval", "5", "--training.steps", "10"]


@pytest.fixture(scope="module")
def fsdp4(tmp_path_factory):
    """Uninterrupted 10-step FSDP=4 runs (Llama, Qwen3) saving at steps 5 and 10: the sources of the resharding
    tests."""
    root = tmp_path_factory.mktemp("fsdp4")
    run_layouts(4, [_argv(root / "llama3", ckpt=RESHARD_CKPT), _argv(root / "qwen3", *QWEN3, ckpt=RESHARD_CKPT),
                    _argv(root / "muon", *MUON, ckpt=RESHARD_CKPT)])
    return root


PP2 = ["--parallelism.pipeline_parallel_degree", "2"]  # 1F1B
RESHARD = {"dp2_tp2": (TP2, {"llama3": [], "qwen3": QWEN3, "muon": MUON}), "pp2_dp2": (PP2, {"llama3": []})}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, fsdp4):
    """Each RESHARD layout x family resumed from fsdp4's step-5 and trained to step 10, all in one spawn."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root = tmp_path_factory.mktemp("resharded")
    runs = []
    for layout, (other, families) in RESHARD.items():
        for name, extra in families.items():
            folder = root / layout / name
            resumed = _resume_folder(fsdp4 / name, folder, step=5)
            dcp_to_torch_save(resumed / "checkpoint" / "step-5", f"{folder}_step5.pt")
            runs.append((_argv(resumed, *other, *extra, ckpt=RESHARD_CKPT), f"{folder}_step5.pt",
                         f"{folder}_report.json"))
    spawn_torchrun_env_runs(_check_resharded_load, 4, runs)
    return root


@pytest.mark.parametrize("layout", list(RESHARD))
def test_resume_at_another_layout(resharded, fsdp4, layout):
    tmp_path, families = resharded / layout, RESHARD[layout][1]
    for name in families:
        reports = [json.loads(Path(f"{tmp_path / name}_report.json.{r}").read_text()) for r in range(4)]
        state = torch.load(tmp_path / f"{name}_step5.pt", weights_only=False)
        assert all(r["step"] == 5 and r["mismatched"] == [] for r in reports), name
        # Together the ranks hold every saved tensor: nothing was skipped by the comparison.
        assert set().union(*(r["model"] for r in reports)) == set(state["model"])
        assert set().union(*(r["optim"] for r in reports)) == set(state["optimizer"]["state"])
        assert any("q_norm" in k for k in state["model"]) == (name == "qwen3")
        ref, res = _losses(fsdp4 / name), _losses(tmp_path / name)
        steps = list(range(6, 11))
        assert max_rel_diff([res[s] for s in steps], [ref[s] for s in steps]) < 1e-5, name


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


def test_ctrl_c_and_sigterm_through_run_train_sh_save_and_exit_0(tmp_path):
    """Issue 31: under torchrun (scripts/run_train.sh) a Ctrl-C or SIGTERM saved the step, then torchrun printed its
    40-line SignalException traceback and exited 1 (the docs say 0). Ctrl-C is SIGINT to the terminal's whole
    foreground process group (here: the script's, started in a session of its own); SIGTERM goes to the script."""
    from dist_utils import children

    env = {**_env(), "NGPU": "2", "CONFIG_FILE": TINY}
    argv = ["--job.dump_folder", str(tmp_path), "--checkpoint.enable", "--checkpoint.interval", "1000",
            "--training.steps", "400", "--validation.enable", "false"]
    for signum, stop in ((signal.SIGINT, lambda job: os.killpg(job.pid, signal.SIGINT)),
                         (signal.SIGTERM, lambda job: job.send_signal(signal.SIGTERM))):
        before = len(_logged_steps(tmp_path))
        job = subprocess.Popen(["bash", "scripts/run_train.sh", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            _wait_for(lambda job=job, before=before: len(_logged_steps(tmp_path)) >= before + 2 and children(job.pid),
                      job)
            stop(job)
            out, _ = job.communicate(timeout=180)
        finally:
            job.kill()
        step = _logged_steps(tmp_path)[-1]
        assert job.returncode == 0 and "Traceback" not in out, out[-4000:]
        assert f"received {signum.name}: stopped after step {step}" in out, out[-4000:]
        assert (tmp_path / "checkpoint" / f"step-{step}").is_dir()
    assert "continuing at step" in out  # the second run resumed the first's save


def _signal_at_step3(rank, world_size, argv):
    """Run titan.train.main with rank 1 sending itself SIGINT (Ctrl-C) and rank 0 SIGUSR1 during step 3."""
    from titan.lifecycle import StopRequests
    from titan.train import main

    original, polls = StopRequests.poll, []

    def poll(self):
        polls.append(1)
        if len(polls) == 3:  # the end of step 3; the handlers were installed at the first poll
            os.kill(os.getpid(), signal.SIGINT if rank == 1 else signal.SIGUSR1)
        return original(self)

    StopRequests.poll = poll
    assert main(argv) == 0


def test_signal_on_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    argv = ["--config", TINY, "--job.dump_folder", str(tmp_path), "--checkpoint.enable", "--training.steps", "50"]
    spawn_torchrun_env(_signal_at_step3, 2, argv)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-3"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# Errors, retention, seed and model-only checkpoints (single process, in-process)


def _single(folder, *extra):
    return ["--config", TINY, "--job.dump_folder", str(folder), "--checkpoint.enable", *extra]


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    assert main(_single(folder, "--training.steps", "4", "--checkpoint.interval", "2")) == 0
    return folder


@pytest.fixture
def saved(tmp_path, saved_once):
    """A dump folder with complete step-2 and step-4 checkpoints (a copy: the tests change it)."""
    shutil.copytree(saved_once, tmp_path, dirs_exist_ok=True)
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

    # A checkpoint named by load_step that fails its integrity check is an error (no fallback from a choice).
    (folder / "step-4" / ".metadata").write_bytes(b"garbage")
    line = _error_line(capsys, _single(saved, "--training.steps", "6", "--checkpoint.load_step", "4"))
    assert f"{folder / 'step-4' / '.metadata'} has 7 bytes" in line and "integrity" in line
    manifest = json.loads((folder / "step-4" / "manifest.json").read_text())
    manifest["files"][".metadata"] = "7 bytes"  # a hand-edited entry: was a ValueError traceback
    (folder / "step-4" / "manifest.json").write_text(json.dumps(manifest))
    line = _error_line(capsys, _single(saved, "--training.steps", "6", "--checkpoint.load_step", "4"))
    assert "manifest.json has a malformed entry for '.metadata'" in line

    data = next((folder / "step-2").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])  # torn data file under a valid .metadata
    line = _error_line(capsys, _single(saved, "--training.steps", "6", "--checkpoint.load_step", "2"))
    assert str(data) in line
    # Without a manifest (a checkpoint from before titan wrote them) the torn file is found by DCP's load instead.
    (folder / "step-2" / "manifest.json").unlink()
    line = _error_line(capsys, _single(saved, "--training.steps", "6", "--checkpoint.load_step", "2",
                                       "--checkpoint.branch"))
    assert f"cannot load {folder / 'step-2'}" in line
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4"]  # a failed load moves nothing

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
    # The newest checkpoint a later step confirmed (step-8: step 9 trained finitely on it) stays beside the newest:
    # step 10's state has no step after it yet.
    assert sorted(p.name for p in folder.iterdir()) == ["step-10", "step-8"]


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


def test_one_history_per_folder_on_every_path(tmp_path, capsys):
    """Issue 31: a resume over a model-only save logged "continuing at step 1" and saved its own step-2 over the
    first run's (and truncated metrics.jsonl); load_step without enable trained afresh beside the checkpoint. Both are
    refused in one line with nothing changed; a new run never truncates an earlier run's metrics.jsonl."""
    folder = tmp_path / "checkpoint"
    assert main(_single(tmp_path, "--training.steps", "4", "--checkpoint.interval", "2",
                        "--checkpoint.model_only")) == 0  # step-2 full, step-4 weights only
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    line = _error_line(capsys, _single(tmp_path, "--training.steps", "8"))
    assert "step-4 holds no train_state (a checkpoint.model_only save)" in line and "step-2, step-4" in line
    assert "checkpoint.branch" in line
    line = _error_line(capsys, ["--config", TINY, "--job.dump_folder", str(tmp_path), "--checkpoint.load_step", "2"])
    assert line == ("titan: error: checkpoint.load_step=2 needs checkpoint.enable = true (without it nothing is "
                    "loaded: the run would start afresh beside that checkpoint)")
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4"]
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    # A run without checkpoints in the same folder starts at step 1: the earlier file is kept as metrics.1.jsonl.
    assert main(["--config", TINY, "--job.dump_folder", str(tmp_path), "--training.steps", "1"]) == 0
    assert (tmp_path / "metrics.1.jsonl").read_bytes() == metrics
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


# ---------------------------------------------------------------------------------------------------------------
# Integrity, history and atomic commits (single process, in-process)


def _stdout(capsys) -> str:
    return capsys.readouterr().out


def test_corrupted_shard_is_detected_and_the_previous_checkpoint_used(saved, capsys):
    folder = saved / "checkpoint"
    shard = next((folder / "step-4").glob("*.distcp"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # 8 KiB of garbage inside the shard, its size unchanged
        f.seek(size // 2)
        f.write(os.urandom(8192))
    assert shard.stat().st_size == size
    _stdout(capsys)
    assert main(_single(saved, "--training.steps", "6", "--checkpoint.interval", "2")) == 0
    out = _stdout(capsys)
    assert f"{shard} has CRC-32" in out and "fails its integrity check" in out
    assert "continuing at step 3" in out
    # The bad copy is kept for inspection, out of the folder's history; the run saved its own step-4 and step-6.
    (moved,) = (folder / "superseded").iterdir()
    assert (moved / "step-4" / shard.name).is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4", "step-6", "superseded"]
    records = read_metrics(saved)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert [r["loss"] for r in records[4:6]] == [r["loss"] for r in records[2:4]]  # step 3 on from step-2's state


def test_branched_resume_keeps_its_own_saves_and_is_what_the_next_start_continues(saved, capsys):
    folder = saved / "checkpoint"
    branch = _single(saved, "--checkpoint.load_step", "2", "--training.steps", "3", "--checkpoint.interval", "1",
                     "--checkpoint.keep_latest_k", "2", "--optimizer.lr", "1e-4")
    line = _error_line(capsys, branch)  # step-4 is newer: resuming from step-2 starts a second history
    assert "checkpoint.load_step=2 is older than step-4" in line and "checkpoint.branch = true" in line
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-4"]

    assert main([*branch, "--checkpoint.branch"]) == 0
    out = _stdout(capsys)
    # The old step-4 moved out of the way; retention kept the branch's parent and its own save (keep_latest_k 2);
    # before, it kept the two highest step numbers (3 and 4) and deleted the parent, and the next start resumed step-4.
    assert "moved step-4 to" in out
    assert sorted(p.name for p in folder.iterdir()) == ["step-2", "step-3", "superseded"]
    assert main(_single(saved, "--training.steps", "4", "--optimizer.lr", "1e-4", "--checkpoint.keep_latest_k",
                        "2")) == 0
    out = _stdout(capsys)
    assert f"from {folder / 'step-3'}" in out and "continuing at step 4" in out
    # Retention deletes only this lineage's own older checkpoints: never one outside it, like the moved step-4.
    assert sorted(p.name for p in folder.iterdir()) == ["step-3", "step-4", "superseded"]
    assert len(list((folder / "superseded").glob("*/step-4"))) == 1


def test_retention_follows_the_lineage(tmp_path):
    from titan.checkpoint.store import lineage_after, purge, write_manifest

    def checkpoint(step, run, lineage, manifest=True):
        path = tmp_path / f"step-{step}"
        path.mkdir()
        if manifest:
            write_manifest(path, {"step": step, "run": run, "lineage": lineage}, {})

    a = [["A", None]]
    for step in (10, 20, 30):
        checkpoint(step, "A", a)
    checkpoint(5, "X", [["X", None]])  # copied in from another run
    checkpoint(1, None, None, manifest=False)  # from before manifests
    # Run B resumed from A's step 20 with the step count restarted (exclude train_state): its saves 2 and 4 are the
    # newest of its lineage although their numbers are small.
    b = lineage_after({"run": "A", "lineage": a}, 20, "B")
    assert b == [["A", 20], ["B", None]]
    for step in (2, 4):
        checkpoint(step, "B", b)
    purge(tmp_path, 2, b, 4)
    # Kept: B's two saves; A's step-30 (a later step of A, another branch), X's and the manifest-less one.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-2", "step-30", "step-4", "step-5"]


_PUBLISH = "import sys; from pathlib import Path; from titan.checkpoint.store import publish; " \
           "publish(Path(sys.argv[1]), Path(sys.argv[2]))"


def test_a_kill_at_every_point_of_a_resave_recovers(tmp_path, capsys):
    """A re-save of step-0 (create_seed_checkpoint again, seed 1) SIGKILLed at each point of its commit: after the
    manifest is written, after the old copy is renamed aside, after the new one is renamed in. Each next start
    recovers the newest complete copy. Before, the old copy was deleted before the rename, and a kill between left
    a torn step-0 that the next start failed on."""
    from titan.checkpoint.store import read_manifest

    first = tmp_path / "first"
    assert main(["--config", TINY, "--job.dump_folder", str(first), "--checkpoint.create_seed_checkpoint"]) == 0
    resave = [sys.executable, "-m", "titan.train", "--config", TINY, "--job.dump_folder", str(first),
              "--checkpoint.create_seed_checkpoint", "--training.seed", "1"]
    out = subprocess.run(resave, cwd=REPO, env={**_env(), "TITAN_TEST_KILL_AT": "commit:written"}, timeout=300)
    assert out.returncode == -signal.SIGKILL
    ckpt = first / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-0", "step-0.tmp"]
    new_files = read_manifest(ckpt / "step-0.tmp")["files"]
    assert new_files != read_manifest(ckpt / "step-0")["files"]

    states = {"commit:written": ["step-0", "step-0.tmp"], "publish:aside": ["step-0.old", "step-0.tmp"],
              "publish:renamed": ["step-0", "step-0.old"]}
    for point, left in states.items():
        dump = tmp_path / point.replace(":", "_")
        shutil.copytree(first, dump)
        if point != "commit:written":
            folder = dump / "checkpoint"
            killed = subprocess.run([sys.executable, "-c", _PUBLISH, str(folder / "step-0.tmp"),
                                     str(folder / "step-0")], cwd=REPO, env={**_env(), "TITAN_TEST_KILL_AT": point})
            assert killed.returncode == -signal.SIGKILL
        assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == left, point
        _stdout(capsys)
        assert main(_single(dump, "--training.steps", "1", "--validation.enable", "false")) == 0
        out = _stdout(capsys)
        assert f"from {dump / 'checkpoint' / 'step-0'}" in out, out
        assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-0", "step-1"], point
        assert read_manifest(dump / "checkpoint" / "step-0")["files"] == new_files, point


# ---------------------------------------------------------------------------------------------------------------
# Resuming with other settings


def _model_state(step_folder: Path, tmp_path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step_folder, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=False)["model"]


def test_new_optimizer_settings_win_on_resume(saved, tmp_path, capsys):
    from titan import config_io
    from titan.build import build

    new = ["--optimizer.lr", "1e-30", "--optimizer.eps", "1e-6", "--optimizer.weight_decay", "0.2",
           "--optimizer.betas", "0.8,0.9"]
    argv = _single(saved, "--training.steps", "6", "--checkpoint.interval", "2", *new)
    _stdout(capsys)
    assert main(argv) == 0
    out = _stdout(capsys)
    for change in ("optimizer.lr 0.003 -> 1e-30", "optimizer.eps 1e-08 -> 1e-06", "optimizer.weight_decay 0.1 -> 0.2",
                   "optimizer.betas [0.9, 0.95] -> [0.8, 0.9]", "training.steps 4 -> 6"):
        assert change in out, out
    # The lr used: logged, and in the update (AdamW's step and decay both scale with it). With the restored 3e-3
    # (the bug), steps 5 and 6 moved the weights; with 1e-30 they stay bitwise the same.
    assert all(0 < r["lr"] <= 1e-30 for r in read_metrics(saved)[4:])
    before, after = (_model_state(saved / "checkpoint" / f"step-{s}", tmp_path) for s in (4, 6))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    run = build(config_io.load([*_single(saved, "--training.steps", "8"), *new[2:], "--optimizer.lr", "2e-3"]))
    try:
        group = run.optimizer.param_groups[0]
        assert (group["betas"], group["eps"], group["weight_decay"], group["initial_lr"]) == ((0.8, 0.9), 1e-6, 0.2,
                                                                                              2e-3)
    finally:
        run.close()
        torch.distributed.destroy_process_group()


def test_fewer_steps_than_the_checkpoint_leaves_nothing_to_train(saved, capsys):
    _stdout(capsys)
    assert main(_single(saved, "--training.steps", "2")) == 0  # was a ZeroDivisionError in the lr schedule
    assert "step 4 >= training.steps=2: nothing to train" in _stdout(capsys)
    assert [r["step"] for r in read_metrics(saved)] == [1, 2, 3, 4]


def test_a_destructive_update_never_replaces_the_last_good_checkpoint(saved, capsys):
    """Judging the update, not only the step (issue 31): weight decay 1e30 on resume gives step 5 a finite loss and
    an update to weights of ~1e28, which were saved and, with keep_latest_k 1, replaced step-2/step-4; step 6 was
    skipped as non-finite and the run exited 0. Now retention keeps the newest checkpoint a later step confirmed,
    the skipped last step ends the run with exit code 3, step-5 is moved aside, and a sane resume trains on."""
    folder = saved / "checkpoint"
    argv = _single(saved, "--training.steps", "6", "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "1",
                   "--optimizer.weight_decay", "1e30")
    capsys.readouterr()
    assert main(argv) == 3
    out, err = capsys.readouterr()
    assert "step 6: non-finite loss or gradient norm" in out and "saved " + str(folder / "step-5") in out
    assert err.strip().splitlines() == [err.strip()] and "training.steps=6: the last step 6 had to be skipped" in err
    assert f"the newest checkpoint is {folder / 'step-4'}" in err
    assert sorted(p.name for p in folder.iterdir()) == ["diverged", "step-4"]  # step-2 retired once 4 was confirmed
    assert len(list((folder / "diverged").glob("*/step-5"))) == 1
    assert main(_single(saved, "--training.steps", "6")) == 0
    assert "continuing at step 5" in _stdout(capsys)
    resumed = read_metrics(saved)[-2:]
    assert [r["step"] for r in resumed] == [5, 6] and all(torch.isfinite(torch.tensor(r["loss"])) for r in resumed)
    assert "skipped_steps" not in resumed[-1]


def test_resume_with_another_tokenizer_is_refused(saved, tmp_path, capsys):
    shipped = REPO / "titan" / "assets" / "tokenizer"
    lines = (shipped / "debug.tiktoken").read_text().splitlines()
    (a, rank_a), (b, rank_b) = lines[300].split(), lines[301].split()
    lines[300], lines[301] = f"{a} {rank_b}", f"{b} {rank_a}"  # two tokens swap ids: the same vocabulary size
    other = tmp_path / "other.tiktoken"
    other.write_text("\n".join(lines) + "\n")
    shutil.copy(shipped / "debug.json", tmp_path / "other.json")
    argv = _single(saved, "--training.steps", "5", "--model.tokenizer_path", str(other))
    line = _error_line(capsys, argv)
    assert str(shipped / "debug.tiktoken") in line and str(other) in line and "allow_tokenizer_change" in line
    assert main([*argv, "--checkpoint.allow_tokenizer_change"]) == 0
    assert "resuming anyway" in _stdout(capsys)


# ---------------------------------------------------------------------------------------------------------------
# Output that fails: a read-only or full checkpoint location


@pytest.fixture
def tmpfs():
    """mount(path, options) mounts a small tmpfs where this process may (root with mount rights); False where not."""
    mounted = []

    def mount(path: Path, options: str) -> bool:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                               capture_output=True).returncode:
            return False
        mounted.append(path)
        return True

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_checkpoint_folder_fails_before_step_1(tmp_path, tmpfs, capsys):
    ckpt = tmp_path / "checkpoint"
    if not tmpfs(ckpt, "ro,size=1m"):
        ckpt.chmod(0o555)
        if os.access(ckpt, os.W_OK):
            pytest.skip("cannot make a read-only folder here (root without mount rights)")
    line = _error_line(capsys, _single(tmp_path, "--training.steps", "2"))
    assert f"checkpoint.folder: cannot write to {ckpt} (" in line and ("EROFS" in line or "EACCES" in line), line
    assert not (tmp_path / "metrics.jsonl").exists()  # before step 1


class _FullDisk:
    """A file stream whose writes fail as on a full disk."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def test_full_disk_reports_the_path_and_keeps_the_last_checkpoint(tmp_path, tmpfs, capsys, monkeypatch):
    """A tmpfs with room for one tiny checkpoint (9 MB) and not two; where none can be mounted, DCP's file writes
    for step 2 fail with ENOSPC. Before, the error was DCP's "unexpected pos" traceback and the partial save stayed."""
    import contextlib

    import torch.distributed.checkpoint.filesystem as fs

    from titan.checkpoint.store import read_manifest, verify

    ckpt = tmp_path / "checkpoint"
    real = tmpfs(ckpt, "size=14m")
    if not real:
        original = fs.FileSystem.create_stream

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with original(self, path, mode) as stream:
                yield _FullDisk(stream) if "step-2.tmp" in str(path) and "w" in mode else stream

        monkeypatch.setattr(fs.FileSystem, "create_stream", create_stream)
    argv = _single(tmp_path, "--training.steps", "3", "--checkpoint.interval", "1", "--validation.enable", "false")
    capsys.readouterr()
    assert main(argv) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"titan: error: checkpoint: cannot save step 2 to {ckpt / 'step-2.tmp'} "
                                               f"(ENOSPC: No space left on device"), err
    assert f"the newest checkpoint is {ckpt / 'step-1'}" in err[0]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1"]  # the partial save is gone
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    manifest = read_manifest(ckpt / "step-1")
    assert verify(ckpt / "step-1", manifest, list(manifest["files"])) == []
    if real:  # the next start finds no room for another checkpoint: it stops before step 1
        line = _error_line(capsys, argv)
        assert f"checkpoint.folder: {ckpt} has" in line and "less than one checkpoint" in line


# ---------------------------------------------------------------------------------------------------------------
# Automatic recovery: scripts/run_train.sh --max_restarts


def _logged_steps(folder: Path) -> list[int]:
    """Steps in a metrics.jsonl being written (a last line cut short is left out)."""
    steps = []
    for line in (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def test_relaunch_loop_recovers_a_killed_worker(fsdp2, tmp_path):
    """SIGKILL rank 1 after step-10 is saved: torchrun fails, run_train.sh relaunches it, the relaunch resumes from
    step-10 and the job ends with the losses of the uninterrupted run (fsdp2's, the same config on 2 processes)."""
    from dist_utils import children, running

    env = {**_env(), "NGPU": "2", "CONFIG_FILE": TINY}
    job = subprocess.Popen(["bash", "scripts/run_train.sh", "--max_restarts", "1", "--job.dump_folder", str(tmp_path),
                            *CKPT], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = []
    try:
        _wait_for(lambda: any(s > 10 for s in _logged_steps(tmp_path)), job)  # step-10 is committed by then
        (torchrun,) = children(job.pid)
        for worker in children(torchrun):
            environ = dict(v.split(b"=", 1) for v in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0") if v)
            if environ.get(b"RANK") == b"1":
                os.kill(worker, signal.SIGKILL)
                killed.append(worker)
        out, _ = job.communicate(timeout=600)
    finally:
        job.kill()
    assert len(killed) == 1 and not running(killed[0])
    assert job.returncode == 0, out[-4000:]
    assert "relaunch 1 of 1" in out and "continuing at step 11" in out
    final = {}
    for record in read_metrics(tmp_path):  # steps after step 10 appear twice: the last one counts
        final[record["step"]] = record["loss"]
    assert final == _losses(fsdp2 / "sync")
