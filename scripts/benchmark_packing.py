#!/usr/bin/env python
"""Benchmark SFT packing (titan/data/chat.py:pack_rows, best-fit decreasing) on a lognormal mix of conversation
lengths (docs/performance.md, "Packing").

    python scripts/benchmark_packing.py [--conversations 20000] [--seq_len 4096] [--median 400] [--sigma 1.0]
                                        [--json F]

The lengths are drawn with a fixed seed (lognormal around `median`, cut to seq_len + 1 as titan cuts conversations),
so the figures are exact and repeatable: the fill ratio (tokens of conversations / tokens of the rows) and the row
count of titan's packing and of packing in file order (a new row whenever the next conversation does not fit: what
titan did before), and the time titan's takes. Target (issue 26): fill >= 95 %.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_common import git_commit  # noqa: E402
from flags import NEW_FILE, Parser  # noqa: E402

from titan.data.chat import pack_rows  # noqa: E402


def lognormal_lengths(n: int, seq_len: int, median: float, sigma: float, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.log(torch.tensor(median)) + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return lengths.round().clamp(2, seq_len + 1).long().sub(1).tolist()  # seq_len + 1 tokens -> seq_len inputs


def in_order_rows(lengths: list[int], seq_len: int) -> int:
    rows, used = 0, seq_len
    for n in lengths:
        if used + n > seq_len:
            rows, used = rows + 1, 0
        used += n
    return rows


def measure(n: int, seq_len: int, median: float, sigma: float) -> dict:
    lengths = lognormal_lengths(n, seq_len, median, sigma)
    examples = [(torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)) for k in lengths]
    start = time.perf_counter()
    rows = pack_rows(examples, seq_len, pad_id=0)
    seconds = time.perf_counter() - start
    tokens, in_order = sum(lengths), in_order_rows(lengths, seq_len)
    return {"conversations": n, "seq_len": seq_len, "median": median, "sigma": sigma, "tokens": tokens,
            "best_fit_rows": len(rows), "best_fit_fill": tokens / (len(rows) * seq_len), "seconds": seconds,
            "in_order_rows": in_order, "in_order_fill": tokens / (in_order * seq_len), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


# Each number flag's range: the conversations are tensors in memory, and a length is a positive token count.
RANGES = {"conversations": (1, 10**7), "seq_len": (1, 2**20), "median": (1, 2**20), "sigma": (0, 100)}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="benchmark_packing.py", description=__doc__.split("\n\n")[0], ranges=RANGES,
                    paths={"json": NEW_FILE})
    parser.add_argument("--conversations", type=int, default=20000, help="in [1, 10**7]")
    parser.add_argument("--seq_len", type=int, default=4096, help="in [1, 2**20]")
    parser.add_argument("--median", type=float, default=400.0, help="median length in tokens, in [1, 2**20]")
    parser.add_argument("--sigma", type=float, default=1.0, help="of the lengths' log, in [0, 100]")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    r = measure(args.conversations, args.seq_len, args.median, args.sigma)
    print(f"{r['conversations']:,} conversations (lognormal, median {r['median']:g}, sigma {r['sigma']:g}), "
          f"{r['tokens']:,} tokens, rows of {r['seq_len']}:")
    print(f"  best-fit decreasing  {r['best_fit_rows']:>7,} rows  {r['best_fit_fill']:.2%} full  "
          f"({r['seconds']:.2f} s)")
    print(f"  in file order        {r['in_order_rows']:>7,} rows  {r['in_order_fill']:.2%} full")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
