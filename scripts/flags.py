"""The scripts' flag checks, in one place: each number flag finite and in its documented range, each path flag of the
kind it names, all before a script does any work; a bad flag is one line naming it, with exit code 2, never a
traceback. Free of torch, so that a light script (loss_compare.py, download_assets.py) checks its flags without
paying for the import. A helper module of the scripts, not a script itself."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

from titan.errors import ConfigError

# What a path flag must name: an existing file or folder, a file or folder the script writes (which may exist), or a
# JSON file of records the script adds to (checked before the work whose results it would fail to add).
FILE, FOLDER, NEW_FILE, NEW_FOLDER = "a file", "a folder", "a file path in an existing folder", "a folder path"
RECORDS = "a JSON object file or a new file path in an existing folder"


def _json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


IS = {FILE: Path.is_file, FOLDER: Path.is_dir,
      NEW_FILE: lambda p: not p.is_dir() and p.absolute().parent.is_dir(),
      NEW_FOLDER: lambda p: not any(q.is_file() for q in (p, *p.absolute().parents)),
      RECORDS: lambda p: IS[NEW_FILE](p) and (not p.exists() or _json_object(p))}


def check_ranges(ns: argparse.Namespace, ranges: dict[str, tuple[float, float]]) -> None:
    """Each flag of `ranges` (named as typed, without the dashes) finite and in [lo, hi], each value of a list flag
    too; a flag left unset (None) passes. NaN fails every comparison, hence the explicit isfinite."""
    for flag, (lo, hi) in ranges.items():
        value = getattr(ns, flag.replace("-", "_"))
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not (math.isfinite(v) and lo <= v <= hi):
                raise ConfigError(f"--{flag} must be in [{lo:,}, {hi:,}] (got {v})")


def check_paths(ns: argparse.Namespace, kinds: dict[str, str]) -> None:
    """Each flag of `kinds` names what it should (a kind above); a flag left unset passes, an empty one does not
    (Path("") is the current folder)."""
    for flag, kind in kinds.items():
        value = getattr(ns, flag.replace("-", "_"))
        if value is not None and not (value.strip() and IS[kind](Path(value))):
            raise ConfigError(f"--{flag} {value!r} is not {kind}")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`prog: error: ...`, exit code 2, as for every other bad input) and the checks
    above made on the parsed flags: `ranges` for check_ranges, `paths` for check_paths, then the script's own
    `check(ns)` (a ConfigError naming the flag)."""

    def __init__(self, *args, ranges: dict | None = None, paths: dict | None = None,
                 check: Callable[[argparse.Namespace], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranges, self.paths, self.check = ranges or {}, paths or {}, check

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        try:
            check_ranges(ns, self.ranges)
            check_paths(ns, self.paths)
            if self.check:
                self.check(ns)
        except ConfigError as e:
            self.error(str(e))
        return ns, rest

    def error(self, message: str):
        name = self.prog.split()[0].removesuffix(".py")  # a sub-command's prog is "script.py command"
        self.exit(2, f"{name}: error: {message} (see --help)\n")
