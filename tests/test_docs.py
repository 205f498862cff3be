"""Docs never drift: every titan command in a ```bash block of README.md or docs/*.md runs (with a tiny step count
appended), and .ci/run installs and tests exactly as the README's second set-up command says. A `torchrun ... -m
titan.train` command's arguments run in tests/test_parallel.py's spawns of as many gloo processes (see
torchrun_commands); tests/test_launch.py runs torchrun itself.

Commands that need GPUs or downloaded assets are shown in ```text blocks instead and are not run here; the presets
they use are parsed and validated by tests/test_presets.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import REPO, read_metrics

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNER = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:python -m titan\.train|torchrun|(?:bash )?\.?/?scripts/run_train\.sh"
                    r"|python scripts/(?:prepare_data|plan)\.py)\b")
PREPARE = "scripts/prepare_data.py"  # its commands make data that the page's training commands then use
# Commands another test runs in full, with stronger checks (a learning curve, the mesh line): they are not run twice.
# Each of those tests reads its command from README.md, so this map cannot drift from what the page shows.
RUN_ELSEWHERE = {
    "python -m titan.train --config train_configs/debug_model.toml": ("test_train.py", "readme_train_command()"),
    "torchrun --standalone --nproc_per_node=4 -m titan.train --config train_configs/debug_model.toml "
    "--parallelism.data_parallel_shard_degree 2 --parallelism.tensor_parallel_degree 2":
        ("test_launch.py", "readme_command(\"torchrun --standalone --nproc_per_node=4\")"),
}


# `torchrun [options] --nproc_per_node=N [options] -m titan.train ARGS`: run as ARGS on N spawned processes (below).
TORCHRUN_TRAIN = re.compile(r"^torchrun (?:--\S+ )*--nproc_per_node=(\d+) (?:--\S+ )*-m titan\.train (.*)$")
STEPS = "--training.steps 2"


def bash_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)


def doc_commands() -> list[tuple[str, str]]:
    """(first page showing it, command) for every distinct runnable command: one shown on several pages runs once."""
    found = {}
    for page in PAGES:
        for block in bash_blocks(page):
            for line in block.splitlines():
                for part in line.split("&&"):
                    if RUNNER.match(part.strip()):
                        found.setdefault(part.strip(), page.name)
    return [(page, command) for command, page in found.items()]


def test_readme_has_two_setup_commands_and_ci_runs_the_second():
    setup = (REPO / "README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(blocks) == 2 and all("\n" not in b for b in blocks), blocks
    train, test = blocks
    assert train.endswith("python -m titan.train --config train_configs/debug_model.toml")
    assert "pytest" in test
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines, ".ci/run must run the README's test command verbatim"


def test_docs_have_runnable_commands():
    pages = {page.name for page in PAGES for block in bash_blocks(page) if RUNNER.search(block.replace("&& ", "\n"))}
    assert {"README.md", "getting_started.md", "config.md", "parallelism.md"} <= pages


def torchrun_commands() -> dict[str, tuple[int, list[str]]]:
    """The pages' `torchrun ... -m titan.train` commands (but RUN_ELSEWHERE's): {command: (--nproc_per_node, its
    titan.train arguments + STEPS)}. tests/test_parallel.py runs them in its spawns of that many gloo processes,
    with torchrun's environment (a torchrun launch each cost 20-80 s here); tests/test_launch.py runs torchrun."""
    found = {}
    for page, command in doc_commands():
        if (m := TORCHRUN_TRAIN.match(command)) and command not in RUN_ELSEWHERE:
            assert not [c for p, c in doc_commands() if p == page and PREPARE in c], f"{page}: prepares data"
            found[command] = (int(m[1]), [*shlex.split(m[2]), *STEPS.split()])
    return found


@pytest.mark.parametrize("page, command", doc_commands())
def test_doc_command_runs(tmp_path, page, command):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(cmd):
        out = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{page}: {cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    if command in RUN_ELSEWHERE:
        test_file, reads_it = RUN_ELSEWHERE[command]
        assert reads_it in (REPO / "tests" / test_file).read_text()
        return
    if PREPARE in command:  # idempotent: a finished folder of the same inputs is left as it is
        run(command)
        output = command.split("--output", 1)[1].split()[0]
        assert (REPO / output / "manifest.json").is_file()
        return
    if TORCHRUN_TRAIN.match(command):
        assert command in torchrun_commands() and "torchrun_commands()" in (REPO / "tests/test_parallel.py").read_text()
        return
    for prerequisite in [c for p, c in doc_commands() if p == page and PREPARE in c]:
        run(prerequisite)
    help_only = "--help" in command
    plans = "--dry_run" in command or "scripts/plan.py" in command  # they train nothing: check their report
    out = run(command + ("" if help_only or plans else f" {STEPS} --job.dump_folder {tmp_path}"))
    if help_only:
        assert "usage:" in out.stdout
    elif plans:
        assert "verdict: fits" in out.stdout or "layouts fit" in out.stdout, out.stdout[-3000:]
    else:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def config_table_rows() -> dict[str, list[str]]:
    """The rows docs/config.md must show: one table per section, generated from the schema (as --help is)."""
    import dataclasses

    from titan.config import section_keys, sections, type_name
    from titan.config_io import toml_value

    rows = {}
    for section, cls in sections().items():
        rows[section] = []
        for key, (tp, f) in section_keys(cls).items():
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            choices = f.metadata.get("choices")
            text = f.metadata["help"] + (f" (one of: {', '.join(choices)})" if choices else "")
            rows[section].append(f"| `{key}` | {type_name(tp).replace('|', chr(92) + '|')} | `{toml_value(default)}` "
                                 f"| {text} |")
    return rows


def test_config_doc_lists_every_key_as_the_schema_says():
    doc = (REPO / "docs" / "config.md").read_text()
    missing = [row for rows in config_table_rows().values() for row in rows if row not in doc]
    assert not missing, "docs/config.md is out of date; missing or changed rows:\n" + "\n".join(missing)


# ---------------------------------------------------------------------------------------------------------------
# Figures the pages state about shipped runs, read from the benchmark files that recorded them (issue 31: README's
# "~4.7" and fine_tuning.md's first-step losses had gone stale; README's loss is checked by tests/test_train.py)

BENCHMARKS = REPO / "docs" / "benchmarks"


def prepare_rows(data: dict) -> list[str]:
    """docs/performance.md's prepare_data rows, as scripts/benchmark_data.py --prepare_only --json recorded them."""
    rows = []
    for i, r in enumerate(data["prepare"]["rounds"], 1):
        tok, one, two = r["tokenizer"], r["workers_1"], r["workers_2"]
        rows.append(f"| {i} | {tok['load_before']:.0f} | {tok['mb_per_s']:.2f} MB/s on {tok['cores_given']:.2f} "
                    f"cores | {one['mb_per_s']:.2f} MB/s on {one['cores_given']:.2f} cores: "
                    f"{one['wall_over_tokenizer']:.2f}x by the clock, {one['cpu_over_tokenizer']:.2f}x by CPU time | "
                    f"{two['mb_per_s']:.2f} MB/s on "
                    f"{two['cores_given']:.2f} cores: {two['wall_over_tokenizer']:.2f}x by the clock "
                    f"({r['speedup_2_over_1']:.2f}x one worker), {two['cpu_over_tokenizer']:.2f}x by CPU time |")
    return rows


def test_prepare_benchmark_rows_are_the_recorded_ones():
    data = json.loads((BENCHMARKS / "prepare_data.json").read_text())
    page = (REPO / "docs" / "performance.md").read_text()
    assert data["prepare"]["input_mb"] >= 64 and len(data["prepare"]["rounds"]) >= 2
    missing = [row for row in prepare_rows(data) if row not in page]
    assert not missing, "docs/performance.md's prepare_data rows differ from docs/benchmarks/prepare_data.json:\n" + \
        "\n".join(missing)
    flat = " ".join(page.split())
    assert data["measured"] in flat and f"One {data['prepare']['input_mb']:.0f} MB JSONL file" in flat
    def span(values: list[float]) -> str:
        lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
        return f"{lo}x" if lo == hi else f"{lo}-{hi}x"

    rounds = data["prepare"]["rounds"]
    for label, key in (("one worker runs at", "workers_1"), ("two workers at", "workers_2")):
        for clock, field in (("By the clock", "wall_over_tokenizer"), ("By CPU time", "cpu_over_tokenizer")):
            figure = f"{label} {span([r[key][field] for r in rounds])}"
            assert figure in flat[flat.index(clock):], (clock, figure)
    assert f"{span([r['speedup_2_over_1'] for r in rounds])} one worker" in flat


def test_fine_tuning_first_step_losses_are_the_recorded_ones():
    """tests/test_assets.py (nightly) holds the file to a real first step of each preset."""
    data = json.loads((BENCHMARKS / "fine_tuning.json").read_text())
    page = (REPO / "docs" / "fine_tuning.md").read_text()
    sft, qlora = (f"{data[k]:.3f}" for k in ("sft_first_step_reply_loss", "qlora_first_step_reply_loss"))
    assert f"reply loss of {sft}" in page and f"from {sft} to {qlora}" in page
    performance = (REPO / "docs" / "performance.md").read_text()
    assert f"reply loss is {qlora} with QLoRA against {sft} with LoRA" in " ".join(performance.split())
