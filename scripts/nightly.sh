#!/usr/bin/env bash
# The nightly regression run: install the requested PyTorch, run the whole test suite including slow tests, check the
# golden loss curve, benchmark, and write one markdown report.
#
#   scripts/nightly.sh REPORT.md
#
# Environment (all optional):
#   NIGHTLY_TORCH        nightly (default): latest nightly from NIGHTLY_INDEX when reachable, else the installed torch
#                        installed: keep the installed torch;  any other value: a pip requirement, e.g. torch==2.13.0
#   NIGHTLY_INDEX        nightly wheel index (default https://download.pytorch.org/whl/nightly/cpu)
#   NIGHTLY_PYTEST_ARGS  pytest arguments (default: -m "slow or not slow", i.e. every test). For a quick plumbing
#                        check: NIGHTLY_PYTEST_ARGS='tests/test_metrics.py -q'
#   NIGHTLY_BENCH_CONFIG benchmark config (default train_configs/debug_model.toml)
#   NIGHTLY_BENCH_ARGS   benchmark arguments (default: --steps 20 --warmup 5)
#   PYTHON               interpreter of the environment to test (default: python)
#
# Exit code: 0 when the tests, the golden check and the benchmark all passed, 1 otherwise; the report is written
# either way.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 REPORT.md" >&2
    exit 2
fi
REPORT=$(realpath -m "$1")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
INDEX=${NIGHTLY_INDEX:-https://download.pytorch.org/whl/nightly/cpu}
TORCH_WANTED=${NIGHTLY_TORCH:-nightly}
BENCH_CONFIG=${NIGHTLY_BENCH_CONFIG:-train_configs/debug_model.toml}
eval "PYTEST_ARGS=(${NIGHTLY_PYTEST_ARGS:--m \"slow or not slow\"})"
eval "BENCH_ARGS=(${NIGHTLY_BENCH_ARGS:---steps 20 --warmup 5})"
WORK=$(mktemp -d -t titan_nightly.XXXXXX)
log() { echo "[nightly $(date -u +%H:%M:%S)] $*"; }

# --- 1. PyTorch ------------------------------------------------------------------------------------------------------
install_note=""
case "$TORCH_WANTED" in
    installed)
        install_note="kept the installed torch (NIGHTLY_TORCH=installed)" ;;
    nightly)
        # A quick probe first: without network pip would retry for minutes before giving up.
        if timeout 15 "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" \
            "$INDEX" >/dev/null 2>&1; then
            log "installing the torch nightly from $INDEX"
            if "$PY" -m pip install --quiet --pre --upgrade torch --index-url "$INDEX" >"$WORK/pip.log" 2>&1; then
                install_note="installed the latest nightly from $INDEX"
            else
                install_note="nightly install from $INDEX FAILED (see pip output); testing the installed torch"
            fi
        else
            install_note="nightly index $INDEX not reachable; testing the installed torch instead"
        fi ;;
    *)
        log "installing $TORCH_WANTED"
        if "$PY" -m pip install --quiet "$TORCH_WANTED" >"$WORK/pip.log" 2>&1; then
            install_note="installed $TORCH_WANTED"
        else
            install_note="install of $TORCH_WANTED FAILED; testing the installed torch"
        fi ;;
esac
log "$install_note"

# --- 2. Tests --------------------------------------------------------------------------------------------------------
log "pytest ${PYTEST_ARGS[*]@Q}"
"$PY" -m pytest "${PYTEST_ARGS[@]}" -p no:cacheprovider --junitxml="$WORK/junit.xml" >"$WORK/pytest.log" 2>&1
pytest_rc=$?
tail -n 3 "$WORK/pytest.log"

# --- 3. Golden loss curve --------------------------------------------------------------------------------------------
log "golden loss curve"
OMP_NUM_THREADS=1 "$PY" scripts/loss_compare.py --config tests/configs/golden.toml \
    --golden tests/assets/losses/tiny_cpu.txt >"$WORK/golden.log" 2>&1
golden_rc=$?
tail -n 2 "$WORK/golden.log"

# --- 4. Benchmark ----------------------------------------------------------------------------------------------------
log "benchmark $BENCH_CONFIG ${BENCH_ARGS[*]}"
"$PY" scripts/benchmark.py --config "$BENCH_CONFIG" "${BENCH_ARGS[@]}" --json "$WORK/bench.json" >"$WORK/bench.log" 2>&1
bench_rc=$?
grep -E "^(tokens/s|overhead ratio)" "$WORK/bench.log"

# --- 5. Report -------------------------------------------------------------------------------------------------------
"$PY" - "$REPORT" "$WORK" "$install_note" "$pytest_rc" "$golden_rc" "$bench_rc" "${PYTEST_ARGS[*]@Q}" <<'EOF'
import importlib.metadata, json, platform, subprocess, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

report, work, install_note, pytest_rc, golden_rc, bench_rc, pytest_args = sys.argv[1:]
work = Path(work)
pytest_rc, golden_rc, bench_rc = int(pytest_rc), int(golden_rc), int(bench_rc)


def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:
        return "unknown"


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


versions = "\n".join(f"{p} {version(p)}" for p in ("torch", "torchao", "torchdata", "tiktoken"))
lines = [f"# titan nightly: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
ok = pytest_rc == 0 and golden_rc == 0 and bench_rc == 0
lines += [f"**Result: {'PASS' if ok else 'FAIL'}** (tests {'ok' if pytest_rc == 0 else 'FAILED'}, golden curve "
          f"{'ok' if golden_rc == 0 else 'FAILED'}, benchmark {'ok' if bench_rc == 0 else 'FAILED'})", ""]
lines += ["## Versions", "", f"- commit: {run('git', 'rev-parse', 'HEAD')} ({run('git', 'log', '-1', '--format=%s')})",
          f"- python {platform.python_version()} on {platform.platform()}",
          *[f"- {v}" for v in versions.splitlines()], f"- PyTorch install: {install_note}", ""]

lines += ["## Tests", "", f"`pytest {pytest_args}` exit code {pytest_rc}", ""]
junit = work / "junit.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    lines += ["| tests | passed | failed | errors | skipped | time |", "|---|---|---|---|---|---|",
              f"| {total} | {total - failures - errors - skipped} | {failures} | {errors} | {skipped} | "
              f"{float(suite.get('time', 0)):.0f} s |", ""]
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    if bad:
        lines += ["Failed:", "", *[f"- `{b}`" for b in bad], ""]
else:
    lines += ["No junit report: pytest did not run. Last output:", "", "```",
              *(work / "pytest.log").read_text().splitlines()[-20:], "```", ""]

golden_log = (work / "golden.log").read_text().splitlines()
table_start = next((i for i, line in enumerate(golden_log) if line.split()[:2] == ["step", "this"]), None)
golden_table = golden_log[table_start:] if table_start is not None else golden_log[-20:]  # else: the error
lines += ["## Golden loss curve", "",
          "`scripts/loss_compare.py --config tests/configs/golden.toml --golden tests/assets/losses/tiny_cpu.txt` "
          f"(tolerance 1e-5 relative): {'ok' if golden_rc == 0 else 'FAILED'}", "", "```",
          *golden_table, "```", ""]

lines += ["## Benchmark", ""]
bench = work / "bench.json"
if bench.exists():
    r = json.loads(bench.read_text())
    mfu = "n/a" if r["mfu_pct"] is None else f"{r['mfu_pct']:.2f} %"
    ratio = "n/a" if r["overhead_ratio"] is None else f"{r['overhead_ratio']:.3f}"
    lines += ["| date | device | torch | commit | config | tokens/s | MFU | overhead ratio |",
              "|---|---|---|---|---|---|---|---|",
              f"| {r['date']} | {r['device']} | {r['torch_version']} | {r['commit']} | {r['config']} | "
              f"{r['tokens_per_s']:,.0f} | {mfu} | {ratio} |", ""]
bench_log = (work / "bench.log").read_text().splitlines()
table_start = next((i for i, line in enumerate(bench_log) if line.startswith("config ")), None)
lines += ["```", *(bench_log[table_start:] if table_start is not None else bench_log[-24:]), "```", ""]
Path(report).parent.mkdir(parents=True, exist_ok=True)
Path(report).write_text("\n".join(lines))
print(f"report: {report}")
EOF
report_rc=$?

if [[ $pytest_rc -eq 0 && $golden_rc -eq 0 && $bench_rc -eq 0 && $report_rc -eq 0 ]]; then
    log "PASS"
    exit 0
fi
log "FAIL (pytest $pytest_rc, golden $golden_rc, benchmark $bench_rc, report $report_rc); logs in $WORK"
exit 1
