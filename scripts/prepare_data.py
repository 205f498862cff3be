#!/usr/bin/env python
"""Tokenize a corpus once into token shards that training reads with constant memory and start-up time
(`--training.dataset_path DIR`). See docs/data.md for the formats, the layout and the options.

    python scripts/prepare_data.py --input corpus/ more/*.jsonl.gz --output data/corpus [--tokenizer PATH]
        [--workers N] [--text_key text] [--shard_mb 256] [--num_shards K --shard_index I]
    python scripts/prepare_data.py --verify data/corpus

Inputs: Hugging Face datasets (hf:org/name[:split], from the local datasets cache; the datasets extra), files, folders
(searched recursively) and globs of .txt (one document per file), .jsonl / .jsonl.gz /
.jsonl.zst (one document per line, in its --text_key field) and .parquet (one per row; .zst and .parquet need
`pip install -e ".[data]"`). The output is the same, byte for byte, whatever --workers is; an interrupted run keeps
its finished shards and resumes (redoing the shards of inputs edited since). With --num_shards K --shard_index I, each
of K jobs (a Slurm array, say: scripts/prepare_data.sbatch) prepares its part into the same --output, and the last to
finish writes the manifest. --verify reads a prepared folder in full: every shard against its CRC-32, every token id
and document offset. Bad input: one line naming the file (and line), exit code 2, nothing of yours deleted; a worker
that dies: one line, exit code 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from titan.data import tokens
from titan.data.hub import materialize
from titan.data.prepare import PrepareFailed, prepare
from titan.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flags.py, however this file is loaded
from flags import Parser  # noqa: E402


def verify(folder: str) -> int:
    path = Path(folder)
    if not (path / tokens.MANIFEST).is_file():
        raise ConfigError(f"--verify: {path} is not a prepared folder (no {tokens.MANIFEST})")
    problems = tokens.verify(path)
    for problem in problems:
        print(f"prepare_data: error: --verify: {problem}", file=sys.stderr)
    if not problems:
        manifest = tokens.read_manifest(path, "--verify")
        print(f"prepare_data: {path} is sound: {len(manifest['shards'])} shards, {manifest['num_tokens']:,} tokens",
              file=sys.stderr)
    return 2 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="prepare_data.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--input", nargs="+", metavar="PATH", help="files, folders or globs")
    p.add_argument("--output", metavar="DIR", help="folder to write (new, empty, or an unfinished preparation of the "
                   "same inputs)")
    p.add_argument("--verify", metavar="DIR", help="check a prepared folder in full instead of preparing one")
    p.add_argument("--tokenizer", default="", help="what model.tokenizer_path takes; empty = the shipped debug one")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizing processes")
    p.add_argument("--text_key", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--shard_mb", type=float, default=256.0, help="input MB per shard (default 256)")
    p.add_argument("--num_shards", type=int, default=1, help="split the input into K parts (one job each)")
    p.add_argument("--shard_index", type=int, default=0, help="the part this job prepares, 0 <= I < K")
    p.add_argument("--streaming", action="store_true", help="hf: inputs: stream the records (no Arrow copy)")
    args = p.parse_args(argv)
    if args.verify is None and (args.input is None or args.output is None):
        p.error("--input and --output are required (or --verify DIR)")
    try:
        if args.verify is not None:
            return verify(args.verify)
        # A Hugging Face dataset (hf:org/name[:split], the datasets extra) is read as the JSONL file of its split.
        inputs = [str(materialize("--input", x, "train", (), args.streaming)) if x.startswith("hf:") else x
                  for x in args.input]
        prepare(inputs, args.output, args.tokenizer, args.workers, args.text_key, args.shard_mb,
                args.num_shards, args.shard_index)
    except ConfigError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    except PrepareFailed as e:
        print(f"\nprepare_data: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nprepare_data: interrupted; finished shards are kept: run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
