"""Score a titan checkpoint or a Hugging Face folder on lm-evaluation-harness tasks (one process; the `eval` extra).

  python scripts/eval.py --checkpoint outputs/sft/checkpoint/step-200 --tasks hellaswag,arc_easy
  python scripts/eval.py --hf assets/smollm2-135m-instruct --tasks tiny_mc --include_path my_tasks/ --limit 100

The model is loaded as scripts/generate.py loads it (`--checkpoint`: the run's config.toml rebuilds it, LoRA adapters
as trained, an adapter-only checkpoint's base from checkpoint.initial_load_path) and scored through
`titan.evaluation.TitanLM`, lm-eval's model interface over titan's own model: no export needed. Tasks are lm-eval's
names; `--include_path` adds task YAMLs of your own, e.g. a multiple-choice task over a local JSONL file
(`dataset_path: json`, `dataset_kwargs: {data_files: {test: questions.jsonl}}`), which runs offline.

Prints one line per metric (`task metric value`) and, with --output, writes lm-eval's results JSON. Bad input: one line
`eval: error: ...`, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # generate.py's loaders and flags.py, beside this script

from flags import Parser, check_ranges  # noqa: E402
from generate import check_source, from_checkpoint, from_hf  # noqa: E402

from titan.errors import ConfigError  # noqa: E402


def check_flags(ns) -> None:
    """Every flag before the model loads: one line naming the flag, exit code 2."""
    check_ranges(ns, {"limit": (0, 2**31 - 1), "max_seq_len": (0, 2**20)})
    check_source(ns)
    if not any(t.strip() for t in ns.tasks.split(",")):
        raise ConfigError(f"--tasks needs at least one lm-eval task name (got {ns.tasks!r})")
    if ns.include_path and not Path(ns.include_path).is_dir():
        raise ConfigError(f"--include_path {ns.include_path}: no such folder")
    if ns.output and (Path(ns.output).is_dir() or not Path(ns.output).resolve().parent.is_dir()):
        raise ConfigError(f"--output {ns.output}: not a file path in an existing folder")


def run(ns) -> dict:
    from titan.evaluation import run_tasks, scores, titan_lm

    check_flags(ns)
    torch.manual_seed(0)
    if ns.hf:
        model, tokenizer = from_hf(Path(ns.hf), ns.max_seq_len)
    else:
        model, tokenizer = from_checkpoint(Path(ns.checkpoint), Path(ns.config) if ns.config else None,
                                           ns.max_seq_len)
    lm = titan_lm(model.eval(), tokenizer, key="--tasks")
    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    results = run_tasks(lm, tasks, ns.include_path, ns.limit, key="--tasks")
    for name, value in scores(results).items():
        print(f"{name} {value:.6g}", flush=True)
    if ns.output:
        Path(ns.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="eval.py", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Hugging Face model folder")
    source.add_argument("--checkpoint", help="titan checkpoint step folder <dump_folder>/checkpoint/step-N")
    parser.add_argument("--config", help="the run's config (default: <dump_folder>/config.toml); --checkpoint only")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include_path", default="", help="a folder of lm-eval task YAMLs (local tasks)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many documents per task (0 = all)")
    parser.add_argument("--max_seq_len", type=int, default=0, help="RoPE table length (default: the model's)")
    parser.add_argument("--output", default="", help="write lm-eval's results JSON here")
    ns = parser.parse_args(argv)
    if ns.config and not ns.checkpoint:
        parser.error("--config goes with --checkpoint")
    try:
        run(ns)
    except (ConfigError, ValueError) as e:
        print(f"eval: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
