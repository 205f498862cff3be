"""scripts/: loss_compare.py passes identical runs and fails (exit code 1) on a changed seed; benchmark.py prints
its table (with the overhead ratio and how it was measured) and writes JSON; benchmark_generate.py prints its row
after checking that the KV cache and recomputation give the same tokens; nightly.sh is valid bash; every script's
flags, walked with hostile values, give one line and no traceback or hang.
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
# ---------------------------------------------------------------------------------------------------------------
# Every script's flags, walked with hostile values (issue 31)

HOSTILE = ["0", "-1", "nan", "inf", "-inf", "1000000000000", ""]


def _walk(run, base: dict[str, str], argv_of, paths: dict[str, str]) -> list[str]:
    """Each flag of `base` set to each hostile value (and each path flag to a file where a folder goes or the
    reverse): `run(argv)` -> (exit code, stderr) must show no traceback, and an error must be one line. Returns the
    cases, for the count."""
    cases = []
    for flag in base:
        for value in HOSTILE + ([paths[flag]] if flag in paths else []):
            argv = argv_of({**base, flag: value})
            code, err = run(argv)
            lines = [line for line in err.splitlines() if "error" in line]
            assert "Traceback" not in err and (code == 0 or len(lines) == 1), (argv, code, err[-2000:])
            cases.append(f"{flag}={value!r}: {code}")
    return cases


def _in_process(script: str):
    """main(argv) of a script, in this process, with a 120 s alarm: a hang fails the test instead of the suite."""
    import signal

    module = load_script(script)

    def run(argv, capsys):
        def hang(*_):
            raise TimeoutError(f"{script} {argv} did not return in 120 s")

        old = signal.signal(signal.SIGALRM, hang)
        signal.alarm(120)
        try:
            code = module.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        return code, capsys.readouterr().err

    return run


def _flags(values: dict[str, str], positional=()) -> list[str]:
    named = (x for k, v in values.items() if k not in positional for x in (k, v))
    return [*(values[p] for p in positional), *named]


@pytest.fixture
def a_file_and_a_folder(tmp_path):
    """What path flags are given where the other kind goes: a JSONL file of 50 documents and an empty folder."""
    a_file, a_folder = tmp_path / "a.jsonl", tmp_path / "folder"
    a_file.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    a_folder.mkdir()
    return a_file, a_folder


def test_every_scripts_flags_take_hostile_values_without_a_traceback_or_a_hang(tmp_path, capsys, one_thread,
                                                                             monkeypatch, a_file_and_a_folder):
    monkeypatch.chdir(tmp_path)  # a hostile value taken as a relative path ("0", "inf") lands here, not in the checkout
    a_file, a_folder = a_file_and_a_folder
    outputs = iter(range(10**6))
    cases = []
    plan = _in_process("plan")
    cases += _walk(lambda argv: plan(argv, capsys), {
        "--config": str(REPO / "train_configs" / "debug_model.toml"), "--world_size": "2", "--top": "1",
        "--verify": "0", "--device_memory_gib": "80", "--gpus_per_node": "8", "--peak_tflops": "989", "--mfu": "0.5",
        "--nvlink_gbps": "360", "--ib_gbps": "45"}, _flags, {"--config": str(a_folder)})

    prepare = _in_process("prepare_data")
    base = {"--input": str(a_file), "--output": "NEW", "--workers": "1", "--shard_mb": "1", "--num_shards": "1",
            "--shard_index": "0", "--text_key": "text", "--tokenizer": ""}  # NEW: a fresh folder for each run
    cases += _walk(lambda argv: prepare(argv, capsys), base,
                   lambda v: _flags({**v, "--output": str(tmp_path / f"out{next(outputs)}") if v["--output"] == "NEW"
                                    else v["--output"]}),
                   {"--input": str(a_folder), "--output": str(a_file), "--tokenizer": str(a_file)})
    cases += _walk(lambda argv: prepare(argv, capsys), {"--verify": str(a_folder)}, _flags,
                   {"--verify": str(a_file)})

    generate = _in_process("generate")
    cases += _walk(lambda argv: generate(argv, capsys), {
        "--hf": str(a_folder), "--prompt": "x", "--max_new_tokens": "1", "--temperature": "0", "--top_k": "0",
        "--seed": "0", "--max_seq_len": "0", "--top_p": "1", "--batch_size": "1"}, _flags, {"--hf": str(a_file)})

    convert = _in_process("convert_checkpoint")
    cases += _walk(lambda argv: convert(["to-hf", *argv], capsys), {
        "src": str(a_folder), "dst": str(tmp_path / "hf"), "--flavor": "tiny", "--max-seq-len": "32",
        "--lora-scale": "2", "--tokenizer": "", "--model": "llama3", "--dtype": "float32"},
        lambda v: _flags(v, ("src", "dst")), {"src": str(a_file), "dst": str(a_file), "--tokenizer": str(a_folder)})
    cases += _walk(lambda argv: convert(["from-hf", *argv], capsys), {"src": str(a_folder), "dst": str(tmp_path / "d"),
                                                                       "--dtype": "float32"},
                   lambda v: _flags(v, ("src", "dst")), {"src": str(a_file), "dst": str(a_file)})

    evaluate = _in_process("eval")  # --hf an empty folder: every case ends at a flag or at the model's load
    cases += _walk(lambda argv: evaluate(argv, capsys), {
        "--hf": str(a_folder), "--tasks": "x", "--limit": "0", "--max_seq_len": "0", "--include_path": str(a_folder),
        "--output": str(tmp_path / "scores.json")}, _flags,
        {"--hf": str(a_file), "--include_path": str(a_file), "--output": str(a_folder)})

    compare = _in_process("loss_compare")  # the valid cases train the golden config for one step, twice
    cases += _walk(lambda argv: compare(argv, capsys), {
        "--config": CONFIG, "--config-b": CONFIG, "--steps": "1", "--tolerance": "1e-5", "--nproc-a": "1",
        "--nproc-b": "1", "--a": "--training.seed 0"}, lambda v: [f"{k}={x}" for k, x in v.items()],
        {"--config": str(a_folder), "--config-b": str(a_folder)})
    cases += _walk(lambda argv: compare(argv, capsys), {"--golden": str(REPO / "tests" / "assets" / "losses" /
                                                                    "tiny_cpu.txt")},
                   lambda v: ["--config", CONFIG, "--steps", "1", *_flags(v)], {"--golden": str(a_folder)})

    train = _in_process_train(capsys)
    cases += _walk(train, {"--dry_run": "", "--world_size": "2", "--device_memory_gib": "80",
                           "--config": str(REPO / "tests" / "configs" / "tiny.toml")},
                   lambda v: ["--dry_run" if k == "--dry_run" else x for k, val in v.items()
                              for x in ((k,) if k == "--dry_run" else (k, val))], {"--config": str(a_folder)})

    def run_train(argv: list[str]) -> tuple[int, str]:  # env settings first (NGPU=..), then the script's flags
        env = {**ENV, **dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))}
        done = subprocess.run(["bash", "scripts/run_train.sh", *[a for a in argv if a.startswith("--") or "=" not in a],
                               "--training.steps", "-5"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)  # -5 steps: a run that gets as far as the config check stops there
        return done.returncode, done.stderr

    cases += _walk(run_train, {"NGPU": "1", "NNODES": "1", "--max_restarts": "0"},
                   lambda v: [f"{k}={val}" if not k.startswith("--") else x for k, val in v.items()
                              for x in ((k, val) if k.startswith("--") else (f"{k}={val}",))], {})
    assert len(cases) > 200


def _in_process_train(capsys):
    """titan.train's options that are not config keys (the schema's keys have their own walk in test_config.py)."""
    from titan.train import main

    def run(argv):
        try:
            code = main([a for a in argv if a != ""] if argv[:1] == ["--dry_run"] else argv)
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err

    return run


def test_developer_tools_flags_take_hostile_values_without_a_traceback_or_a_hang(tmp_path, capsys, one_thread,
                                                                               monkeypatch, a_file_and_a_folder):
    """The same walk over the benchmarks, download_assets.py, gpu_check.py and make_chat_fixtures.py. Each script
    runs in a folder of its own (a hostile value taken as a path lands there) at tiny sizes, as an accepted value runs
    it in full: an output named "0" or "nan" is valid. The network is a closed local port and CUDA is absent, so
    download_assets.py and gpu_check.py end with one line (exit 3, 2) wherever their flags are valid.
    gpu_check_probes.py and smollm2_gguf.py are helper modules without flags."""
    import torch

    a_file, a_folder = a_file_and_a_folder
    fresh = (str(tmp_path / f"dump{i}") for i in range(10**6))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def walk(script: str, base: dict[str, str], paths: dict[str, str], argv_of=_flags, patch=None) -> dict:
        """{case: exit code} of the script's walk, run in tmp_path/<script>; `patch(module)` before it."""
        run = _in_process(script)
        if patch:
            patch(sys.modules[script])
        (tmp_path / script).mkdir()
        monkeypatch.chdir(tmp_path / script)
        return dict(case.rsplit(": ", 1) for case in _walk(lambda argv: run(argv, capsys), base, argv_of, paths))

    walks = {"benchmark": walk("benchmark", {"--config": CONFIG, "--steps": "1", "--warmup": "1", "--json": "b.json"},
                               {"--config": str(a_folder), "--json": str(a_folder)},
                               lambda v: [*_flags(v), "--job.dump_folder", next(fresh)])}
    walks["benchmark_data"] = walk("benchmark_data", {  # the prepare_data rows only, on one paragraph of text
        "--tokens": "1e6", "--batches": "1", "--prepare_mb": "0.001", "--rounds": "1", "--workdir": str(a_folder),
        "--json": "d.json"}, {"--workdir": str(a_file), "--json": str(a_folder)},
        lambda v: ["--prepare_only", *_flags(v)])
    walks["benchmark_generate"] = walk("benchmark_generate", {
        "--model": "llama3", "--flavor": "tiny", "--batch": "1", "--prompt_tokens": "2", "--new_tokens": "2",
        "--repeats": "1", "--seed": "1", "--json": "g.json", "--record": "runs.json"},
        {"--json": str(a_folder), "--record": str(a_file)})  # a JSONL file is not a JSON file of runs
    walks["benchmark_loss"] = walk("benchmark_loss", {
        "--vocab": "64", "--dim": "8", "--tokens": "16", "--chunk_tokens": "4", "--device": "cpu", "--dtype": "float32",
        "--threads": "1", "--json": "l.json"}, {"--json": str(a_folder)})
    walks["benchmark_model"] = walk("benchmark_model", {
        "--shapes": "tiny", "--modes": "eager", "--steps": "1", "--warmup": "1", "--reference": "plain",
        "--threads": "1", "--reference_path": "", "--json": "m.json"},
        {"--reference_path": str(a_file), "--json": str(a_folder)})
    walks["benchmark_moe"] = walk("benchmark_moe", {
        "--config": str(REPO / "tests" / "configs" / "tiny_moe.toml"), "--steps": "1", "--warmup": "1",
        "--json": "moe.json"}, {"--config": str(a_folder), "--json": str(a_folder)},
        lambda v: [*_flags(v), "--training.global_batch_size", "2"])
    walks["benchmark_optimizers"] = walk(  # a tiny run beside the debug model's, which take seconds a step
        "benchmark_optimizers", {"--out": "o.json", "--only": "tiny", "--steps": "1"}, {"--out": str(a_file)},
        patch=lambda m: monkeypatch.setitem(m.RUNS, "tiny", ("tests/configs/tiny.toml", 1, [])))
    walks["download_assets"] = walk("download_assets", {
        "asset": "llama3-tokenizer", "--out": "new", "--source": "hub", "--cache": "cache", "--dtype": "float32"},
        {"--out": str(a_file), "--cache": str(a_file)}, lambda v: _flags(v, ("asset",)))
    walks["gpu_check"] = walk("gpu_check", {"--out": "gpu"}, {"--out": str(a_file)})
    walks["make_chat_fixtures"] = walk("make_chat_fixtures", {"argument": ""}, {}, lambda v: [v["argument"]])

    # Accepted (exit 0): only new output names, and the few hostile numbers in range; the runs wrote their figures.
    def named(flag: str) -> list[str]:
        return [f"{flag}={v!r}" for v in ("0", "-1", "nan", "inf", "1000000000000")]

    accepted = {script: sorted(case for case, code in cases.items() if code == "0") for script, cases in walks.items()}
    assert accepted == {name: sorted(cases) for name, cases in {
        "benchmark": named("--json"), "benchmark_data": named("--json"),
        "benchmark_generate": named("--json") + named("--record") + ["--seed='0'", "--seed='1000000000000'"],
        "benchmark_loss": named("--json") + ["--threads='0'"],
        "benchmark_model": named("--json") + ["--threads='0'", "--reference_path=''"],
        "benchmark_moe": named("--json"), "benchmark_optimizers": named("--out"),
        "download_assets": [], "gpu_check": [], "make_chat_fixtures": []}.items()}
    for script in ("benchmark", "benchmark_data", "benchmark_generate", "benchmark_loss", "benchmark_model",
                   "benchmark_moe"):
        assert json.loads((tmp_path / script / "nan").read_text()), script
    assert json.loads((tmp_path / "benchmark_optimizers" / "inf").read_text())["tiny"]["loss"]
    assert set(walks["download_assets"].values()) == {"2", "3"}  # a bad flag; the Hub unreachable
    assert not (tmp_path / "download_assets" / "new").exists()
    assert set(walks["gpu_check"].values()) == {"2"} and not (tmp_path / "gpu_check" / "gpu").exists()
    assert sum(map(len, walks.values())) > 350
