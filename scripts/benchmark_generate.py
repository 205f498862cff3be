"""Generation speed: KV-cache decoding (titan/generation.py:generate) against recomputing the whole sequence for
every new token (titan/generation.py:generate_without_cache), greedy, on a registered flavor with seeded weights.

  python scripts/benchmark_generate.py --flavor debugmodel --new_tokens 256
  python scripts/benchmark_generate.py --flavor debugmodel --new_tokens 256 --batch 4 \
      --record tests/assets/benchmarks/generation.json

Both methods decode the same prompts (batch rows of --prompt_tokens tokens, the rows' lengths spread down to half of
it, so the cache's left padding is exercised); every row must give the same tokens both ways (exit 1 otherwise).
The recomputation decodes one row at a time, as it has no padding. The two alternate `--repeats` times; prints a
markdown table row of the medians: tokens/s of each and the speed-up; `--json` writes the figures (with the load
average: on a shared machine, say what else ran); `--record` adds them to a file of runs under the key `key`
returns (tests/assets/benchmarks/generation.json: the rows docs/performance.md shows, checked by
tests/test_generate.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from titan.errors import ConfigError
from titan.generation import generate, generate_without_cache
from titan.models import FAMILIES, build_model, model_args

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flags.py, however this file is loaded
from flags import NEW_FILE, RECORDS, Parser  # noqa: E402


def measure(ns) -> dict:
    torch.manual_seed(ns.seed)
    args = model_args(ns.model, ns.flavor, max_seq_len=ns.prompt_tokens + ns.new_tokens)
    model = build_model(args)
    model.init_weights()
    model.eval()
    lengths = [max(1, ns.prompt_tokens - (i * ns.prompt_tokens) // (2 * ns.batch)) for i in range(ns.batch)]
    gen = torch.Generator().manual_seed(ns.seed)
    prompts = [torch.randint(10, args.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    generate(model, prompts, 4)  # warm-up: first-call allocations
    times_cache, times_full = [], []
    for _ in range(ns.repeats):  # alternating, so that a change in the machine's load hits both alike
        start = time.perf_counter()
        cached = generate(model, prompts, ns.new_tokens)
        times_cache.append(time.perf_counter() - start)
        start = time.perf_counter()
        full = [generate_without_cache(model, p, ns.new_tokens) for p in prompts]
        times_full.append(time.perf_counter() - start)
    t_cache, t_full = statistics.median(times_cache), statistics.median(times_full)
    if cached != full:
        bad = next(i for i, (a, b) in enumerate(zip(cached, full)) if a != b)
        raise SystemExit(f"benchmark_generate: row {bad}: the cached and the recomputed tokens differ")
    n_tokens = sum(len(r) for r in cached)
    return {"model": ns.model, "flavor": ns.flavor, "batch": ns.batch, "prompt_tokens": lengths,
            "new_tokens": ns.new_tokens, "generated": n_tokens, "threads": torch.get_num_threads(),
            "repeats": ns.repeats, "kv_cache_s": t_cache, "recompute_s": t_full,
            "kv_cache_tokens_per_s": n_tokens / t_cache, "recompute_tokens_per_s": n_tokens / t_full,
            "speedup": t_full / t_cache,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d"), "commit": commit()}


def commit() -> str:
    """The checkout's short commit (what the figures were measured on), or "unknown" outside a git checkout."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                         text=True)
    return out.stdout.strip() or "unknown"


def key(r: dict) -> str:
    """A run's name in a --record file: model, flavor, batch and new tokens."""
    return f"{r['model']}_{r['flavor']}_{r['batch']}x{r['new_tokens']}"


def row(r: dict) -> str:
    """The markdown table row of one run (docs/performance.md shows these)."""
    return (f"| {r['model']} {r['flavor']} | {r['batch']} x {r['new_tokens']} | {r['kv_cache_tokens_per_s']:,.1f} | "
            f"{r['recompute_tokens_per_s']:,.1f} | {r['speedup']:.1f}x |")


# Each number flag's range: the RoPE table holds prompt + new tokens, and each measured round decodes them all.
RANGES = {"batch": (1, 4096), "prompt_tokens": (1, 2**16), "new_tokens": (1, 2**16), "repeats": (1, 1000),
          "seed": (0, 2**63 - 1)}


def check_flavor(ns) -> None:
    if ns.flavor not in FAMILIES[ns.model].flavors:
        raise ConfigError(f"--flavor {ns.flavor!r} is not one of {', '.join(FAMILIES[ns.model].flavors)}")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="benchmark_generate.py", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
                    ranges=RANGES, paths={"json": NEW_FILE, "record": RECORDS}, check=check_flavor)
    parser.add_argument("--model", default="llama3", choices=sorted(FAMILIES), help="model.name (a registered family)")
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together, in [1, 4096]")
    parser.add_argument("--prompt_tokens", type=int, default=32, help="the longest prompt's tokens, in [1, 2**16]")
    parser.add_argument("--new_tokens", type=int, default=256, help="in [1, 2**16]")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds (medians reported), in [1, 1000]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--record", help="add the figures to this JSON file of runs (under the run's key)")
    ns = parser.parse_args(argv)
    try:
        r = measure(ns)
    except ConfigError as e:
        print(f"benchmark_generate: error: {e}", file=sys.stderr)
        return 2
    print("| model | batch x new tokens | KV cache, tokens/s | recomputation, tokens/s | speed-up |")
    print("|---|---|---|---|---|")
    print(row(r))
    if ns.json:
        Path(ns.json).write_text(json.dumps(r, indent=1) + "\n")
    if ns.record:
        path = Path(ns.record)
        runs = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**runs, key(r): r}, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
