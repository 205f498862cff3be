"""scripts/: loss_compare.py passes identical runs and fails (exit code 1) on a changed seed; benchmark.py prints
its table (with the overhead ratio and how it was measured) and writes JSON; benchmark_generate.py prints its row
after checking that the KV cache and recomputation give the same tokens; nightly.sh is valid bash.
Kept small: the tiny golden config, 2-3 steps, one thread."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from dist_utils import REPO

CONFIG = str(REPO / "tests" / "configs" / "golden.toml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in the script look their module up there
    spec.loader.exec_module(module)
    return module


def test_loss_compare_passes_identical_runs(one_thread, capsys):
    loss_compare = load_script("loss_compare")
    assert loss_compare.main(["--config", CONFIG, "--steps", "3", "--a", "--training.seed 0"]) == 0
    out = capsys.readouterr().out
    assert "max relative difference: 0.000e+00" in out and "OK: tolerance 1e-05" in out


def test_loss_compare_fails_on_a_changed_seed(one_thread, capsys):
    loss_compare = load_script("loss_compare")  # main's return value is the script's exit code (sys.exit(main()))
    assert loss_compare.main(["--config", CONFIG, "--steps", "2", "--a", "--training.seed 0",
                              "--b", "--training.seed 1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "FAIL: tolerance 1e-05"
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "a", "b"])
    assert [line.split()[0] for line in lines[header + 1:header + 3]] == ["1", "2"]  # one row per step


def test_loss_compare_relative_diff_and_lengths():
    lc = load_script("loss_compare")
    assert lc.relative_diffs([1.0, 2.2], [1.0, 2.0]) == pytest.approx([0.0, 0.1])
    assert lc.relative_diffs([1.0], [1.0, 2.0])[-1] == float("inf")  # a shorter run never passes


def test_benchmark_prints_table_and_writes_json(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "scripts/benchmark.py", "--config", CONFIG, "--steps", "2", "--warmup", "1",
           "--json", str(out_json), "--job.dump_folder", str(tmp_path / "dump")]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for row in ("tokens/s", "MFU", "FLOPs/token", "step time", "data", "forward_backward", "optimizer",
                "checkpoint", "peak memory", "minimal loop", "overhead ratio", "measured as"):
        assert any(line.lstrip().startswith(row) for line in out.stdout.splitlines()), (row, out.stdout)
    assert "n/a (no known peak for this device)" in out.stdout  # CPU: no MFU rather than a made-up peak
    assert "median of per-step wall times after warm-up" in out.stdout
    r = json.loads(out_json.read_text())
    assert r["overhead_ratio"] > 0 and r["mfu_pct"] is None and r["tokens_per_s"] > 0
    assert r["titan"]["tokens_per_step"] == 4 * 32 and r["titan"]["checkpoint_hook"] is True
    assert set(r["titan"]["breakdown_median_s"]) >= {"data", "forward_backward", "optimizer", "checkpoint", "other"}
    assert "num_flops_per_token" in r["flop_convention"]


def test_nightly_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "nightly.sh")]).returncode == 0


# scripts/run_train.sh checks the config in one process before torchrun starts the workers


def test_run_train_sh_reports_a_misspelled_key_in_one_line(tmp_path):
    """A misspelled key in the TOML file: one `titan: error:` line naming it and exit code 2, before any worker
    starts (no torchrun ChildFailedError traceback, no per-rank copies of the line)."""
    cfg = tmp_path / "typo.toml"
    cfg.write_text(f'extends = "{REPO / "tests" / "configs" / "tiny.toml"}"\n\n[training]\nstepz = 3\n')
    dump = tmp_path / "dump"
    out = subprocess.run(["bash", "scripts/run_train.sh", "--job.dump_folder", str(dump)], cwd=REPO,
                         env={**ENV, "NGPU": "2", "CONFIG_FILE": str(cfg)}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stderr.splitlines() == [f"titan: error: unknown key training.stepz in {cfg} (did you mean "
                                       "'steps'?)"], out.stderr
    assert "Traceback" not in out.stdout + out.stderr and not dump.exists()


def test_check_validates_degrees_against_the_world_size(tmp_path, capsys):
    """`--check` (what run_train.sh runs) makes the run's checks for an N-rank job without a process group of N,
    and writes nothing."""
    from titan.train import main

    argv = ["--config", str(REPO / "tests" / "configs" / "tiny.toml"), "--job.dump_folder", str(tmp_path / "d"),
            "--check"]
    assert main([*argv, "--world_size", "4", "--parallelism.tensor_parallel_degree", "2"]) == 0
    capsys.readouterr()
    assert main([*argv, "--world_size", "3", "--parallelism.tensor_parallel_degree", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("titan: error: ") and "world size 3" in err[0], err
    assert main([*argv, "--model.tokenizer_path", str(tmp_path / "none.model")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "none.model" in err[0], err
    assert not (tmp_path / "d").exists()


def test_benchmark_generate_prints_a_row_and_checks_the_tokens(tmp_path):
    """scripts/benchmark_generate.py: the KV cache against recomputation on the tiny model (the row docs/
    performance.md shows, from the debug model); both decodings must give the same tokens (exit 0 says they did)."""
    out_json, record = tmp_path / "gen.json", tmp_path / "runs.json"
    record.write_text(json.dumps({"earlier_run": {"kept": True}}))
    cmd = [sys.executable, "scripts/benchmark_generate.py", "--flavor", "tiny", "--batch", "3", "--prompt_tokens",
           "6", "--new_tokens", "8", "--repeats", "2", "--json", str(out_json), "--record", str(record)]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.splitlines()[2].startswith("| llama3 tiny | 3 x 8 | ")
    figures = json.loads(out_json.read_text())
    assert figures["generated"] == 24 and figures["prompt_tokens"] == [6, 5, 4] and figures["speedup"] > 0
    assert json.loads(record.read_text()) == {"earlier_run": {"kept": True}, "llama3_tiny_3x8": figures}
    assert len(figures["commit"]) >= 7 and figures["date"].startswith("20")  # what docs/performance.md names
