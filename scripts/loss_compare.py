#!/usr/bin/env python
"""Compare the per-step training losses of two titan runs, or of one run against a golden curve.

Two runs (two configs, or one config with two override sets), with the same step count:
    python scripts/loss_compare.py --config A.toml [--config-b B.toml] [--a "--training.seed 0"] [--b "..."]
        [--steps 10] [--tolerance 1e-5] [--nproc-a 1 --nproc-b 2]
One run against a golden curve (tests/test_golden.py does the same check), or rewriting that curve:
    python scripts/loss_compare.py --config tests/configs/golden.toml --golden tests/assets/losses/tiny_cpu.txt
    python scripts/loss_compare.py --config tests/configs/golden.toml --golden tests/assets/losses/tiny_cpu.txt \
        --regenerate

Prints a step-by-step table and the maximum relative difference |a - b| / |b|; exits 1 when it is above
--tolerance, 2 on a bad config. Both runs use the config's seed unless an override sets `--training.seed`, log every
step and write no TensorBoard. A run with --nproc-x 1 runs in this process; more ranks go through torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REGENERATE_HINT = "python scripts/loss_compare.py --config {config} --golden {golden} --regenerate"

sys.path.insert(0, str(REPO / "scripts"))  # flags.py (torch-free), however this file is loaded
from flags import Parser  # noqa: E402


def run_losses(config: str, overrides: list[str], steps: int | None, nproc: int = 1) -> list[float]:
    """Train with titan and return the loss of every step (from the run's metrics.jsonl)."""
    with tempfile.TemporaryDirectory(prefix="titan_loss_compare_") as dump:
        argv = ["--config", config, *([] if steps is None else ["--training.steps", str(steps)]),
                "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false", *overrides,
                "--job.dump_folder", dump]
        if nproc == 1:
            from titan.train import main  # imported here: --help and golden-file errors need no torch

            code = main(argv)
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "titan.train", *argv]
            code = subprocess.run(cmd, cwd=REPO).returncode
        if code != 0:
            raise SystemExit(f"loss_compare: titan exited with {code} for {shlex.join(argv)}")
        records = [json.loads(line) for line in (Path(dump) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def relative_diffs(a: list[float], b: list[float]) -> list[float]:
    """|a - b| / |b| per step (b is the reference); inf when one curve is longer or b is 0 and a is not."""
    diffs = [abs(x - y) / abs(y) if y != 0 else (0.0 if x == 0 else float("inf")) for x, y in zip(a, b)]
    return diffs + [float("inf")] * abs(len(a) - len(b))


def table(a: list[float], b: list[float], name_a: str = "a", name_b: str = "b") -> str:
    diffs = relative_diffs(a, b)
    lines = [f"{'step':>5}  {name_a:>18}  {name_b:>18}  {'rel diff':>10}"]
    for i, d in enumerate(diffs):
        x = f"{a[i]:.10f}" if i < len(a) else "-"
        y = f"{b[i]:.10f}" if i < len(b) else "-"
        lines.append(f"{i + 1:>5}  {x:>18}  {y:>18}  {d:10.3e}")
    lines.append(f"max relative difference: {max(diffs):.3e}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Golden curves: "# comment" lines, then one "step loss" pair per line


def read_golden(path: str | Path) -> list[float]:
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
    if [int(r[0]) for r in rows] != list(range(1, len(rows) + 1)):
        raise ValueError(f"{path}: steps must be 1, 2, 3, ...")
    return [float(r[1]) for r in rows]


def write_golden(path: str | Path, losses: list[float], config: str, overrides: list[str]) -> None:
    import torch

    header = [
        "# Golden loss curve: per-step training loss of a fixed, deterministic fp32 CPU run (tests/test_golden.py).",
        "# Regenerate (only for an intended change of init, data order or numerics; say why in the commit):",
        "#   " + REGENERATE_HINT.format(config=config, golden=path) + (
            f" --a {shlex.quote(shlex.join(overrides))}" if overrides else ""),
        f"# Written with torch {torch.__version__}.",
    ]
    body = [f"{i} {loss!r}" for i, loss in enumerate(losses, 1)]  # repr: every bit of the float32 value survives
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(header + body) + "\n")


# ---------------------------------------------------------------------------------------------------------------


# Each number flag's range: a bad value is one line naming it (a NaN tolerance passed every comparison, 10**12 steps
# or processes never returned).
RANGES = {"steps": (1, 10**6), "nproc-a": (1, 1024), "nproc-b": (1, 1024), "tolerance": (0.0, 1e6)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = Parser(prog="loss_compare.py", description=head, epilog=rest, allow_abbrev=False, ranges=RANGES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="titan TOML config of run a (and of run b without --config-b)")
    p.add_argument("--config-b", help="config of run b (default: --config)")
    p.add_argument("--a", default="",
                   help="overrides for run a as one string: --a \"--training.seed 0\" (a lone flag: --a=--flag)")
    p.add_argument("--b", default="", help="overrides for run b")
    p.add_argument("--steps", type=int, help="steps of both runs (default: the config's training.steps)")
    p.add_argument("--nproc-a", type=int, default=1, help="processes of run a (more than 1: via torchrun)")
    p.add_argument("--nproc-b", type=int, default=1, help="processes of run b")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest allowed relative difference (1e-5)")
    p.add_argument("--golden", help="compare run a with this golden curve file instead of a second run")
    p.add_argument("--regenerate", action="store_true", help="with --golden: run a and (re)write the golden file")
    args = p.parse_args(argv)
    if args.regenerate and not args.golden:
        p.error("--regenerate needs --golden FILE")
    for name in ("config", "config_b") + (("golden",) if not args.regenerate else ()):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            p.error(f"--{name.replace('_', '-')} {path!r} is not a file")
    if args.golden is not None and args.regenerate and (not args.golden.strip() or Path(args.golden).is_dir()):
        p.error(f"--golden {args.golden!r} is not a file path")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    a_over = shlex.split(args.a)
    if args.golden:
        losses = run_losses(args.config, a_over, args.steps, args.nproc_a)
        if args.regenerate:
            write_golden(args.golden, losses, args.config, a_over)
            print(f"wrote {len(losses)} steps to {args.golden}")
            return 0
        golden = read_golden(args.golden)
        print(table(losses, golden, "this run", "golden"))
        bad = max(relative_diffs(losses, golden)) > args.tolerance
    else:
        a = run_losses(args.config, a_over, args.steps, args.nproc_a)
        b = run_losses(args.config_b or args.config, shlex.split(args.b), args.steps, args.nproc_b)
        print(table(a, b))
        bad = max(relative_diffs(a, b)) > args.tolerance
    print(f"{'FAIL' if bad else 'OK'}: tolerance {args.tolerance:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
