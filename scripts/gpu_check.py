"""Check one GPU machine with titan's riskiest CUDA paths in one command, and record the figures.

    python scripts/gpu_check.py --out gpu_check               # one H100/H200, CUDA torch >= 2.11, no downloads
    python scripts/gpu_check.py --plumbing --out /tmp/check   # CPU, tiny shapes: the machinery only (the tests)

Prints one table (check, PASS/WARN/FAIL/SKIP, figures, note) and writes <out>/gpu_check.json; exit code 1 if a
check failed. docs/performance.md#gpu-check says what each line means and what passes. The training checks run
titan's own loop (`titan.train.main`) in this process, on the shipped corpus and 4k-token tokenizer, with Llama 3
1B's transformer shapes and FSDP2 over a mesh of one rank (so one GPU runs the FSDP paths: bf16 parameters, float8
all-gather, CPU offload); the kernel probes are scripts/gpu_check_probes.py's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check_probes as probes  # noqa: E402
from flags import NEW_FOLDER, Parser  # noqa: E402

from titan import config_io, dry_run, train  # noqa: E402
from titan.metrics import MetricsLogger  # noqa: E402
from titan.parallel.mesh import ParallelDims  # noqa: E402

GiB = 2**30
QUIET = ["--metrics.enable_tensorboard", "false", "--validation.enable", "false"]


def shapes(plumbing: bool) -> list[str]:
    """Llama 3.2 1B's transformer (dim 2048, 16 layers, GQA 32/8) at 4 x 2,048 tokens a step, bf16 parameters,
    selective AC (llama3_1b.toml), the shipped tokenizer; plumbing: the tiny flavor at 2 x 32 tokens."""
    if plumbing:
        return ["--config", "train_configs/debug_model.toml", "--model.flavor", "tiny", "--training.seq_len", "32",
                "--training.local_batch_size", "2", "--training.mixed_precision_param", "bfloat16",
                "--optimizer.implementation", "fused", *QUIET]
    return ["--config", "train_configs/llama3_1b.toml", "--model.tokenizer_path=", "--training.seq_len", "2048",
            "--training.local_batch_size", "4", "--lr_scheduler.warmup_steps", "2", *QUIET]


# ---------------------------------------------------------------------------------------------------------------
# Running titan's loop in this process


@contextlib.contextmanager
def one_rank_fsdp():
    """FSDP2 over a mesh of one rank: titan applies FSDP only when the data-parallel degree exceeds one, so on one
    GPU this is how its FSDP paths run at all (a check-only switch; titan has no such setting)."""
    original = ParallelDims.fsdp_enabled
    ParallelDims.fsdp_enabled = property(lambda self: True)
    try:
        yield
    finally:
        ParallelDims.fsdp_enabled = original


class SyncAudit:
    """Host syncs per training step from the end of step 1 on (compilation and start-up are over): every
    MetricsLogger.step call ends a step. torch.cuda.set_sync_debug_mode on a GPU, HostReads on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.per_step, self._block, self._found = device, [], None, None

    @contextlib.contextmanager
    def around(self):
        start, step = train.set_train_timeout, MetricsLogger.step
        audit = self

        def started(*args, **kwargs):  # titan calls it once, at the end of step 1
            start(*args, **kwargs)
            audit._block = probes.host_syncs(audit.device)
            audit._found = audit._block.__enter__()

        def stepped(logger, step_number, **kwargs):
            step(logger, step_number, **kwargs)
            if audit._found is not None:
                audit.per_step.append((step_number, len(audit._found)))
                audit._found.clear()

        train.set_train_timeout, MetricsLogger.step = started, stepped
        try:
            yield self
        finally:
            train.set_train_timeout, MetricsLogger.step = start, step
            if self._block is not None:
                self._block.__exit__(None, None, None)
                self._block = None


def run_titan(name: str, argv: list[str], work: Path, audit: SyncAudit | None = None) -> dict:
    """One titan run; {"code", "records" (metrics.jsonl's step records), "seconds", "folder"}."""
    folder = work / name
    argv = [*argv, "--job.dump_folder", str(folder)]
    torch._dynamo.reset()  # each run compiles for itself (and stays under dynamo's recompilation limit)
    if torch.cuda.is_available():  # the peak the run reports is its own, not an earlier probe's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with one_rank_fsdp(), (audit.around() if audit else contextlib.nullcontext()):
        code = train.main(argv)
    logging.getLogger("titan").handlers.clear()  # main set up logging; the next run sets it up again
    jsonl = folder / "metrics.jsonl"
    records = [r for r in map(json.loads, jsonl.read_text().splitlines()) if "loss" in r] if jsonl.exists() else []
    return {"code": code, "records": records, "seconds": round(time.perf_counter() - start, 1), "folder": folder}


def step_figures(run: dict) -> dict:
    """Median step time and MFU of the steps after the first two (compilation, warm-up), peak memory, skips."""
    late = [r for r in run["records"] if r["step"] > 2] or run["records"]
    times = sorted(r["step_time"] for r in late)
    mfu = [r["mfu"] for r in late if r.get("mfu") is not None]
    return {"step_time_s": round(times[len(times) // 2], 4) if times else None,
            "mfu_pct": round(sorted(mfu)[len(mfu) // 2], 2) if mfu else None,
            "peak_gib": round(max((r.get("memory_gib", 0) for r in run["records"]), default=0), 2),
            "skipped": max((r.get("skipped_steps", 0) for r in run["records"]), default=0),
            "final_loss": round(run["records"][-1]["loss"], 4) if run["records"] else None}


def losses(run: dict) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run["records"]}


# ---------------------------------------------------------------------------------------------------------------
# The checks


class Report:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, status: str, figures: dict | None = None, note: str = "") -> None:
        self.rows.append({"check": name, "status": status, "figures": figures or {}, "note": note})
        print(f"[gpu_check] {name}: {status} {json.dumps(figures or {})} {note}".rstrip(), flush=True)

    def attempt(self, name: str, fn) -> None:
        """fn() -> (status, figures, note); an exception is that check's FAIL, and the next check runs."""
        try:
            self.add(name, *fn())
        except Exception as e:  # noqa: BLE001
            self.add(name, "FAIL", {}, probes.short_error(e))

    def table(self) -> str:
        width = max(len(r["check"]) for r in self.rows)
        lines = [f"{'check':<{width}}  status  figures", "-" * (width + 60)]
        for r in self.rows:
            figures = ", ".join(f"{k} {v}" for k, v in r["figures"].items())
            lines.append(f"{r['check']:<{width}}  {r['status']:<6}  {figures}" + (f"  ({r['note']})" if r["note"]
                                                                                     else ""))
        return "\n".join(lines)


def check_training(report: Report, base: list[str], work: Path, device: torch.device, plumbing: bool) -> None:
    """bf16 eager (with the host-sync audit and the memory estimate), bf16 compiled, float8 tensorwise and rowwise
    compiled: 10 steps each from the same weights and data; plumbing runs 3 steps (float8: 2), eager."""
    steps = ["--training.steps", "3" if plumbing else "10"]
    float8_steps = ["--training.steps", "2"] if plumbing else steps
    compile_flag = [] if plumbing else ["--compile.enable"]
    audit = SyncAudit(device)
    eager = run_titan("bf16_eager", [*base, *steps, "--metrics.log_freq", "100"], work, audit)
    figures = step_figures(eager)
    report.add("train bf16 eager", "PASS" if eager["code"] == 0 and figures["skipped"] == 0 else "FAIL",
               {**figures, "seconds": eager["seconds"]})
    quiet_steps = [n for step, n in audit.per_step if step != int(steps[1])]  # the last step is logged
    report.add("host syncs per step", "PASS" if quiet_steps and max(quiet_steps) <= 1 else "FAIL",
               {"per_step": audit.per_step}, "at most 1 (the non-finite guard's) outside logging steps")
    report.attempt("peak memory vs estimate", lambda: memory_vs_estimate(eager, [*base, *steps], device))

    if plumbing:  # no compilation (minutes on CPU): float8 runs eager too, against the eager bf16 run
        runs = {"bf16": eager}
        report.add("train bf16 compiled", "SKIP", {}, "plumbing mode: no compilation")
    else:
        runs = {"bf16": run_titan("bf16_compiled", [*base, *steps, *compile_flag, "--metrics.log_freq", "1"], work)}
        report.add("train bf16 compiled", _train_status(runs["bf16"]), {**step_figures(runs["bf16"]),
                                                                        "seconds": runs["bf16"]["seconds"]})
    float8 = ["--float8.enable", *(["--float8.emulate"] if plumbing else [])]
    for recipe, extra in (("tensorwise", ["--float8.enable_fsdp_float8_all_gather",
                                          "--float8.precompute_float8_dynamic_scale_for_fsdp"]),
                          ("rowwise", ["--float8.recipe_name", "rowwise"])):
        run = runs[recipe] = run_titan(f"float8_{recipe}", [*base, *float8_steps, *compile_flag, "--metrics.log_freq",
                                                            "1",
                                                            *float8, *extra], work)
        ref, got = losses(runs["bf16"]), losses(run)
        drift = max((abs(got[s] - ref[s]) / abs(ref[s]) for s in ref if s in got), default=math.inf)
        status = _train_status(run) if drift <= 0.05 else "FAIL"
        report.add(f"train float8 {recipe} compiled", status,
                   {**step_figures(run), "max_loss_drift_vs_bf16": round(drift, 4), "seconds": run["seconds"]},
                   "loss within 5 % of bf16 at every step, no skipped step")


def _train_status(run: dict) -> str:
    figures = step_figures(run)
    finite = all(math.isfinite(r["loss"]) for r in run["records"])
    return "PASS" if run["code"] == 0 and run["records"] and finite and figures["skipped"] == 0 else "FAIL"


def memory_vs_estimate(run: dict, argv: list[str], device: torch.device) -> tuple[str, dict, str]:
    """The dry run's estimate of the same job (one rank, FSDP over it) against the measured peak allocation, less
    the estimate's reserve for the CUDA context and fragmentation (not in torch's allocated bytes)."""
    with one_rank_fsdp():
        estimate = dry_run.run(config_io.load([*argv, "--job.dump_folder", str(run["folder"])]), 1).worst.estimate
    predicted = (estimate.total - estimate.reserve) / GiB
    measured = step_figures(run)["peak_gib"]
    figures = {"measured_gib": measured, "estimated_gib": round(predicted, 2)}
    if device.type != "cuda":
        return "SKIP", figures, "CPU memory is peak RSS: not comparable"
    ratio = measured / predicted
    return ("PASS" if abs(ratio - 1) <= 0.15 else "WARN"), {**figures, "ratio": round(ratio, 3)}, "within 15 %"


def check_checkpoint(base: list[str], work: Path, plumbing: bool) -> tuple[str, dict, str]:
    """async_with_pinned_mem saves at steps 3 and 6 of a deterministic 6-step run (plumbing: 2 and 4 of 4); a second
    run resumes from the first save alone: its losses after it must equal the first run's bit for bit (a copy torn
    by the optimizer step would differ)."""
    every, total = (2, 4) if plumbing else (3, 6)
    ckpt = [*base, "--training.steps", str(total), "--metrics.log_freq", "1", "--training.deterministic",
            "--checkpoint.enable", "--checkpoint.interval", str(every), "--checkpoint.async_mode",
            "async_with_pinned_mem"]
    whole = run_titan("ckpt_whole", ckpt, work)
    resumed_folder = work / "ckpt_resumed" / "checkpoint"
    resumed_folder.mkdir(parents=True)
    shutil.copytree(whole["folder"] / "checkpoint" / f"step-{every}", resumed_folder / f"step-{every}")
    resumed = run_titan("ckpt_resumed", ckpt, work)
    a, b = losses(whole), losses(resumed)
    after = range(every + 1, total + 1)
    same = [s for s in after if s in a and s in b and a[s] == b[s]]
    ok = whole["code"] == 0 and resumed["code"] == 0 and len(same) == len(after)
    return ("PASS" if ok else "FAIL"), {"steps_equal_after_resume": same, "seconds": round(
        whole["seconds"] + resumed["seconds"], 1)}, f"saved at {every} and {total}, resumed from {every}"


def check_offload(base: list[str], work: Path, device: torch.device) -> tuple[str, dict, str]:
    """training.enable_cpu_offload: two steps with parameters, gradients and AdamW state in CPU memory."""
    if device.type != "cuda":
        return "SKIP", {}, "needs CUDA (tests/test_gpu_paths.py runs it on a CPU mesh)"
    run = run_titan("cpu_offload", [*base, "--training.steps", "2", "--training.seq_len", "512",
                                    "--training.local_batch_size", "1", "--training.enable_cpu_offload",
                                    "--metrics.log_freq", "1"], work)
    return _train_status(run), {**step_figures(run), "seconds": run["seconds"]}, ""


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with contextlib.suppress(Exception):
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip()
    with contextlib.suppress(ImportError):
        import torchao

        env["torchao"] = torchao.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / GiB, 1), cuda=torch.version.cuda)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="gpu_check.py", description=__doc__.split("\n\n")[0], paths={"out": NEW_FOLDER})
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json (and the runs' logs)")
    parser.add_argument("--plumbing", action="store_true", help="CPU, tiny shapes: check this script's machinery")
    args = parser.parse_args(argv)
    if not args.plumbing and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; --plumbing runs the checks' machinery on CPU", file=sys.stderr)
        return 2
    if not args.plumbing and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 11):
        print(f"gpu_check: error: torch {torch.__version__}: the check needs torch >= 2.11", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.plumbing else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report, base = Report(), shapes(args.plumbing)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        for name, row in probes.attention(device, args.plumbing).items():
            report.add(name, *row)
        report.attempt("rmsnorm fused bf16", lambda: probes.rms_norm(device, args.plumbing))
        report.attempt("moe grouped GEMM", lambda: probes.moe_layer(device, args.plumbing))
        try:
            check_training(report, base, work, device, args.plumbing)
        except Exception as e:  # noqa: BLE001 - the remaining checks still run
            report.add("training runs", "FAIL", {}, probes.short_error(e))
        report.attempt("checkpoint async pinned", lambda: check_checkpoint(base, work, args.plumbing))
        report.attempt("cpu offload", lambda: check_offload(base, work, device))
    elapsed = round(time.perf_counter() - started, 1)
    result = {"environment": environment(device), "mode": "plumbing" if args.plumbing else "gpu",
              "elapsed_s": elapsed, "checks": report.rows}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"\ngpu_check ({result['mode']}, {elapsed} s): {json.dumps(result['environment'])}\n{report.table()}")
    return 1 if any(r["status"] == "FAIL" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
