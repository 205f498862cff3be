#!/usr/bin/env python
"""Benchmark the pre-training data path at scale (docs/performance.md, "Data at scale").

    python scripts/benchmark_data.py [--tokens 1e7 5e9] [--workdir DIR] [--batches 500] [--prepare_mb 32] [--json F]
    python scripts/benchmark_data.py --prepare_only --prepare_mb 256 --rounds 2 --json F

For each N in --tokens it writes a synthetic prepared dataset of N random tokens directly in the on-disk layout
(titan/data/tokens.py; documents of 500-1500 tokens), then, in a fresh process, measures the time from building the
loader to its first batch, the process's peak resident memory, and the loader's batches/s at the debug model's batch
shape (8 x 256), with and without document masking. It also times one debug-model training step (same shape, CPU,
fp32) for the loader/step ratio, and scripts/prepare_data.py's throughput on one file of real text (the Austen corpus
repeated to --prepare_mb MB of JSONL) with 1 and 2 workers, beside the tokenizer's own single-thread speed
(`prepare_throughput`). The synthetic datasets are deleted afterwards.

Targets (issue 13): at the biggest N versus the smallest, time to first batch <= 1.5x + 1 s and peak memory
<= 1.1x + 50 MB (peak resident memory above what the imports alone take: that part varies by tens of MB between
processes on a loaded machine); the loader >= 50x faster than a training step. Issue 31: prepare_data >= 0.85x the
tokenizer's single-thread speed with one worker, >= 1.7x with two, on one file (on two free cores).
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN, BATCH = 256, 8

sys.path.insert(0, str(REPO / "scripts"))  # flags.py, however this file is loaded
from flags import FOLDER, NEW_FILE, Parser  # noqa: E402


def write_synthetic(folder: Path, n_tokens: int, seed: int = 0) -> None:
    """N random ids of the debug tokenizer's vocabulary, in shards of at most 2**30 tokens, as prepare_data writes."""
    from titan.data import tokens
    from titan.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    dtype = tokens.token_dtype(tok.vocab_size)
    shards, left, index = [], n_tokens, 0
    while left > 0:
        n = min(left, 2**30)
        name = f"shard-{index:06d}"
        with open(folder / f"{name}.bin", "wb") as f:
            for start in range(0, n, 2**26):
                rng.integers(0, tok.vocab_size, size=min(2**26, n - start), dtype=np.uint16).astype(dtype).tofile(f)
        lengths = rng.integers(500, 1500, size=n // 500 + 2)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        starts = np.concatenate([starts[starts < n], [n]]).astype(tokens.OFFSET_DTYPE)
        starts.tofile(folder / f"{name}.idx")
        shards.append({"name": name, "num_tokens": n, "num_documents": len(starts) - 1})
        left, index = left - n, index + 1
    manifest = {"format": tokens.FORMAT, "version": tokens.VERSION, "dtype": dtype.name, "plan": "synthetic",
                "tokenizer": {"path": "debug", "sha256": tok.identity, "vocab_size": tok.vocab_size},
                "num_tokens": n_tokens, "num_documents": sum(s["num_documents"] for s in shards),
                "shards": shards, "inputs": []}
    tokens.write_atomically(folder / tokens.MANIFEST, tokens.json_bytes(manifest))


LOADER_PROBE = """
import json, resource, sys, time
from titan.config import Training
from titan.data.pretrain import build_pretrain_dataloader
from titan.data.tokenizer import load_tokenizer
path, batches, masking = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
tok = load_tokenizer()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Python, torch, numpy: not the loader's
start = time.perf_counter()
loader = build_pretrain_dataloader(Training(dataset_path=path, seq_len=%d, local_batch_size=%d,
                                            document_masking=masking), tok, 0, 1)
it = iter(loader)
next(it)
first = time.perf_counter() - start
start = time.perf_counter()
for _ in range(batches):
    next(it)
rate = batches / (time.perf_counter() - start)
print(json.dumps({"first_batch_s": first, "batches_per_s": rate,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base}))
""" % (SEQ_LEN, BATCH)


def probe_loader(path: Path, batches: int, masking: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", LOADER_PROBE, str(path), str(batches), "1" if masking else "0"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_step_seconds(steps: int = 3) -> float:
    """Median time of a debug-model training step (forward, backward, AdamW) at the loader's batch shape."""
    import torch
    import torch.nn.functional as F

    from titan import models

    torch.manual_seed(0)
    model = models.build_model(models.model_args("llama3", "debugmodel", tokenizer_vocab=4096, max_seq_len=SEQ_LEN))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 4096, (BATCH, SEQ_LEN + 1))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def measured_on() -> str:
    """When, on what and at which commit: the line docs/performance.md quotes with the figures."""
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return f"{time.strftime('%Y-%m-%d')}, {cpu}, torch {torch.__version__}, commit {commit.strip() or 'unknown'}"


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (the prepare workers, once joined)."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def prepare_throughput(workdir: Path, megabytes: float, rounds: int = 1) -> dict:
    """scripts/prepare_data.py on ONE JSONL file of `megabytes` MB (the Austen corpus repeated), at the default
    --shard_mb (one shard: the workers share it by chunks), with 1 and 2 workers, next to the tokenizer's own
    single-thread speed on the same documents held in memory (its encode calls alone: no reading, parsing or
    writing). Each row has its wall-clock MB/s, its CPU seconds (processes and workers) and the cores the machine
    gave it (CPU seconds / wall seconds): on a shared, loaded machine the wall-clock ratios say how busy it was, the
    CPU-time ratios what the code costs. Measured side by side, `rounds` times in turn."""
    import os

    from titan.data import documents
    from titan.data.prepare import prepare
    from titan.data.tokenizer import load_tokenizer

    paragraphs = [p for p in (REPO / "titan/assets/data/austen/train.txt").read_text().split("\n\n") if p.strip()]
    lines = [json.dumps({"text": p}) + "\n" for p in paragraphs]
    corpus, size = workdir / "text.jsonl", 0
    with open(corpus, "w") as f:
        for line in itertools.cycle(lines):  # whole paragraphs until the size is reached: a small size is small
            if size >= megabytes * 1e6:
                break
            size += f.write(line)  # JSON is ASCII: characters are bytes
    mb = corpus.stat().st_size / 1e6
    tok, texts = load_tokenizer(), list(documents.documents(corpus, "bench"))

    def measure(run) -> dict:
        load, wall, cpu = os.getloadavg()[0], time.perf_counter(), _cpu_seconds()
        run()
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        return {"mb_per_s": mb / wall, "cpu_s": cpu, "cores_given": cpu / wall, "load_before": load}

    def prepared(workers: int):
        out = workdir / f"prepared-{workers}"
        prepare([str(corpus)], str(out), workers=workers, log=lambda *_: None)
        shutil.rmtree(out)

    result = {"input_mb": mb, "cpus": len(os.sched_getaffinity(0)), "rounds": []}
    for _ in range(rounds):
        row = {"tokenizer": measure(lambda: [tok.encode(text, bos=True, eos=True) for text in texts]),
               "workers_1": measure(lambda: prepared(1)), "workers_2": measure(lambda: prepared(2))}
        base = row["tokenizer"]
        for w in ("workers_1", "workers_2"):
            row[w]["wall_over_tokenizer"] = row[w]["mb_per_s"] / base["mb_per_s"]
            row[w]["cpu_over_tokenizer"] = base["cpu_s"] / row[w]["cpu_s"]  # MB per CPU second, relative
        row["speedup_2_over_1"] = row["workers_2"]["mb_per_s"] / row["workers_1"]["mb_per_s"]
        result["rounds"].append(row)
        one, two = row["workers_1"], row["workers_2"]
        print(f"prepare_data on one {mb:.0f} MB JSONL file ({result['cpus']} CPUs, load average "
              f"{base['load_before']:.0f}): tokenizer alone {base['mb_per_s']:.2f} MB/s on {base['cores_given']:.2f} "
              f"cores; 1 worker {one['mb_per_s']:.2f} MB/s on {one['cores_given']:.2f} cores "
              f"({one['wall_over_tokenizer']:.2f}x the tokenizer by the clock, {one['cpu_over_tokenizer']:.2f}x by "
              f"CPU time); 2 workers {two['mb_per_s']:.2f} MB/s on {two['cores_given']:.2f} cores "
              f"({two['wall_over_tokenizer']:.2f}x, {row['speedup_2_over_1']:.2f}x one worker; "
              f"{two['cpu_over_tokenizer']:.2f}x by CPU time)", flush=True)
    return result


# Each number flag's range: the synthetic datasets and the corpus go to disk (5e9 tokens are 10 GB), and the loader
# needs a few of the debug model's batches of tokens.
RANGES = {"tokens": (10**6, 10**11), "batches": (1, 10**6), "prepare_mb": (1e-3, 1e5), "rounds": (1, 1000)}


def main(argv=None) -> int:
    p = Parser(prog="benchmark_data.py", description=__doc__.split("\n\n")[0], ranges=RANGES,
               paths={"workdir": FOLDER, "json": NEW_FILE})
    p.add_argument("--tokens", type=float, nargs="+", default=[1e7, 5e9], help="dataset sizes, each in [1e6, 1e11]")
    p.add_argument("--workdir", help="an existing folder where the synthetic datasets go (default: a temporary one)")
    p.add_argument("--batches", type=int, default=500, help="batches each loader is timed over, in [1, 10**6]")
    p.add_argument("--prepare_mb", type=float, default=32.0, help="MB of JSONL text prepare_data is timed on, in "
                   "[0.001, 100000]")
    p.add_argument("--prepare_only", action="store_true", help="only the prepare_data rows")
    p.add_argument("--rounds", type=int, default=1, help="prepare_data rows measured this many times in turn")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.prepare_only:
        with tempfile.TemporaryDirectory(prefix="titan-bench-prepare-", dir=args.workdir) as workdir:
            results = {"measured": measured_on(), "prepare": prepare_throughput(Path(workdir), args.prepare_mb,
                                                                                 args.rounds)}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="titan-bench-data-"))
    free = shutil.disk_usage(workdir).free
    results = {"loader": {}, "batch_shape": [BATCH, SEQ_LEN]}
    try:
        for n in map(int, args.tokens):
            if n * 2 > free * 0.8:
                n = int(free * 0.8 // 2 // 10**8 * 10**8)
                print(f"not enough free disk for {args.tokens}; using N = {n:.3g}", file=sys.stderr)
            folder = workdir / f"synthetic-{n}"
            start = time.perf_counter()
            write_synthetic(folder, n)
            write_s = time.perf_counter() - start
            row = {"write_s": write_s, "plain": probe_loader(folder, args.batches, False),
                   "document_masking": probe_loader(folder, args.batches, True)}
            results["loader"][str(n)] = row
            plain = row["plain"]
            print(f"N = {n:.3g} tokens (written in {write_s:.1f} s): first batch {plain['first_batch_s']:.3f} s, "
                  f"peak RSS {plain['peak_rss_mb']:.0f} MB (+{plain['peak_rss_mb'] - plain['base_rss_mb']:.0f} MB over "
                  f"the imports), {plain['batches_per_s']:,.0f} batches/s "
                  f"({row['document_masking']['batches_per_s']:,.0f} with document masking)", flush=True)
            shutil.rmtree(folder)
        step = train_step_seconds()
        results["train_step_s"] = step
        slowest = min(r[k]["batches_per_s"] for r in results["loader"].values() for k in ("plain", "document_masking"))
        results["loader_over_step"] = slowest * step
        print(f"debug-model training step {step * 1000:.0f} ms: the slowest loader is {slowest * step:,.0f}x faster",
              flush=True)
        results["prepare"] = prepare_throughput(workdir, args.prepare_mb, args.rounds)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    sizes = sorted(results["loader"], key=int)
    small, big = results["loader"][sizes[0]]["plain"], results["loader"][sizes[-1]]["plain"]
    print(f"big vs small N: first batch {big['first_batch_s']:.3f} s vs {small['first_batch_s']:.3f} s "
          f"(target <= 1.5x + 1 s), the loader's memory (peak RSS over the imports') "
          f"{big['peak_rss_mb'] - big['base_rss_mb']:.0f} MB vs {small['peak_rss_mb'] - small['base_rss_mb']:.0f} MB "
          f"(target <= 1.1x + 50 MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
