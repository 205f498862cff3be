"""The machinery around the config schema (titan/config.py): TOML files with `extends`, values checked against the
schema's types, the command line (`--section.key value` and the options that are not keys), `--help`, and the
resolved config written back as TOML (and compared with a resumed checkpoint's).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from titan.config import Config, did_you_mean, section_keys, sections, type_name, unwrap_optional, validate
from titan.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _coerce(key: str, tp, value, choices):
    """Check a TOML (or parsed CLI) value against the schema type; ints are accepted where floats are expected."""
    base, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be none")
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {typing.get_args(base)[0].__name__} (got {value!r})")
        item = typing.get_args(base)[0]
        return [_coerce(f"{key}[{i}]", item, v, None) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[base]
    if not ok:
        raise ConfigError(f"{key} must be {type_name(tp)} (got {value!r})")
    value = float(value) if base is float else value
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))} (got {value!r})"
                          f"{did_you_mean(value, choices)}")
    return value


def from_dict(data: dict, source: str = "config") -> Config:
    """Build a Config from nested {section: {key: value}}, rejecting unknown sections/keys and wrong types."""
    cfg = Config()
    known = sections()
    for section, values in data.items():
        if section not in known:
            raise ConfigError(f"unknown section [{section}] in {source}{did_you_mean(section, known)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] in {source} must be a table of keys")
        obj, keys = getattr(cfg, section), section_keys(known[section])
        for key, value in values.items():
            if key not in keys:
                raise ConfigError(f"unknown key {section}.{key} in {source}{did_you_mean(key, keys)}")
            tp, f = keys[key]
            setattr(obj, key, _coerce(f"{section}.{key}", tp, value, f.metadata.get("choices")))
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# TOML files with `extends`


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_toml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a TOML file; `extends = "other.toml"` (relative to this file) is loaded first and deep-merged under it."""
    path = Path(path)
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, OSError):
        raise ConfigError(f"config file not found: {path}") from None
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ConfigError(f"'extends' cycle: {cycle}")
    try:
        data = tomllib.loads(resolved.read_text(encoding="utf-8"))  # TOML is UTF-8 whatever the locale
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a file path string (got {parent!r})")
    return _merge(load_toml(resolved.parent / parent, (*_chain, resolved)), data)


# ---------------------------------------------------------------------------------------------------------------
# Command line

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
CONFIG_FLAGS = ("--config", "--job.config_file")


def _parse_cli_value(key: str, tp, text: str):
    base, optional = unwrap_optional(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return [_parse_cli_value(f"{key}[{i}]", item, p) for i, p in enumerate(parts)]
    try:
        if base is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        return base(text)
    except ValueError:
        raise ConfigError(f"--{key} expects {type_name(tp)} (got {text!r})") from None


@dataclass
class RunFlags:
    """Options of `python -m titan.train` that are not config keys: `--help`, and the dry run's (titan/dry_run.py)."""

    help: bool = False
    dry_run: bool = False
    check_only: bool = False  # --check: validate the config for a --world_size job and exit (scripts/run_train.sh)
    world_size: int | None = None  # the job to simulate; default: the smallest world the degrees allow
    device_memory_gib: float | None = None  # per device; default: titan.dry_run.DEFAULT_DEVICE_MEMORY_GIB

    def check(self) -> None:
        if self.dry_run and self.check_only:
            raise ConfigError("--check and --dry_run: use one (--dry_run checks too, and estimates memory)")
        if self.device_memory_gib is not None and not self.dry_run:
            raise ConfigError("--device_memory_gib only applies with --dry_run")
        if self.world_size is not None and not (self.dry_run or self.check_only):
            raise ConfigError("--world_size only applies with --dry_run or --check")
        for name in ("world_size", "device_memory_gib"):  # at most 2**20 ranks or GiB: beyond any job, and a
            value = getattr(self, name)  # world of 10**12 would take forever to lay out
            if value is not None and not (0 < value <= MAX_WORLD and math.isfinite(value)):
                raise ConfigError(f"--{name} must be a finite number in (0, {MAX_WORLD}] (got {value})")


_RUN_FLAGS = {"--world_size": int, "--device_memory_gib": float}
MAX_WORLD = 2**20


def parse_args(argv: list[str]) -> tuple[str | None, dict, RunFlags]:
    """Split argv into (config path, {section: {key: value}} overrides, the options that are not config keys)."""
    known = sections()
    config_path, overrides, flags = None, {}, RunFlags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            flags.help = True
            continue
        if arg == "--dry_run":
            flags.dry_run = True
            continue
        if arg == "--check":
            flags.check_only = True
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key value")
        name, eq, text = arg[2:].partition("=")
        bool_flag = False
        if not eq:
            # `--training.deterministic` alone means true; every other key needs a value.
            nxt = argv[i] if i < len(argv) else None
            if nxt is None or (nxt.startswith("--") and not _is_number(nxt)):
                text, bool_flag = None, True
            else:
                text, i = nxt, i + 1
        if f"--{name}" in CONFIG_FLAGS:
            if not text:  # also `--config=` or `--config ""`: an unset shell variable must not train the defaults
                raise ConfigError(f"--{name} needs a file path" + ("" if text is None else " (got an empty string)"))
            config_path = text
            continue
        if f"--{name}" in _RUN_FLAGS:
            kind = _RUN_FLAGS[f"--{name}"]
            try:
                setattr(flags, name, kind(text))
            except (TypeError, ValueError):
                raise ConfigError(f"--{name} expects {kind.__name__} (got {text!r})") from None
            continue
        section, _, key = name.partition(".")
        keys = section_keys(known[section]) if section in known else {}
        if key not in keys:
            options = [f"--{s}.{k}" for s in known for k in section_keys(known[s])] + list(CONFIG_FLAGS)
            options += ["--dry_run", "--check", *_RUN_FLAGS]
            raise ConfigError(f"unknown option --{name}{did_you_mean('--' + name, options)}")
        tp, f = keys[key]
        if bool_flag:
            if unwrap_optional(tp)[0] is not bool:
                raise ConfigError(f"--{name} needs a value ({type_name(tp)})")
            value = True
        else:
            value = _parse_cli_value(name, tp, text)
        overrides.setdefault(section, {})[key] = value
    flags.check()
    return config_path, overrides, flags


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load(argv: list[str] | None = None) -> Config:
    """Config from `--config FILE` (with `extends`) plus `--section.key value` overrides, validated.

    Raises SystemExit(0) after printing the help for `--help`; the dry run's options are `load_run`'s.
    """
    cfg, flags = load_run(argv)
    if flags.dry_run or flags.check_only:
        raise ConfigError(f"--{'dry_run' if flags.dry_run else 'check'} is an option of `python -m titan.train`")
    return cfg


def load_run(argv: list[str] | None = None) -> tuple[Config, RunFlags]:
    """`load`, also returning the options of `python -m titan.train` that are not config keys (`--dry_run` ...)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):  # before anything else can fail: help is never lost behind an
        print(help_text())  # error in the other arguments
        raise SystemExit(0)
    config_path, overrides, flags = parse_args(argv)
    if flags.help:
        print(help_text())
        raise SystemExit(0)
    data = load_toml(config_path) if config_path else {}
    source = config_path or "defaults"
    cfg = from_dict(data, source)
    # CLI values are already typed; run them through the same checks (choices, lists) as file values.
    for section, values in overrides.items():
        from_dict({section: values}, "command line")  # raises on a bad choice
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    validate(cfg)
    return cfg, flags


def help_text() -> str:
    lines = [
        "usage: python -m titan.train [--config FILE.toml] [--section.key VALUE ...]",
        "       torchrun --nproc_per_node=N -m titan.train --config FILE.toml [...]",
        "       python -m titan.train --config FILE.toml --dry_run [--world_size N] [--device_memory_gib M]",
        "       python -m titan.train --config FILE.toml --check [--world_size N] [...]",
        "",
        "--config FILE (alias --job.config_file): a TOML file; `extends = \"base.toml\"` at its top inherits another.",
        "Every key below can be set in the file under [section] or on the command line as --section.key VALUE",
        "(or --section.key=VALUE; lists are comma-separated; a bool flag alone means true).",
        "--dry_run: check the config for an N-rank job in this one CPU process and estimate every rank's memory on",
        "a device of M GiB, without allocating the model (docs/planning.md).",
        "--check: only the checks a run makes before it builds the model (keys, values, the parallel degrees against",
        "N ranks, the tokenizer, the model's shape), in this one process; scripts/run_train.sh runs it before",
        "torchrun.",
    ]
    for section, cls in sections().items():
        lines.append(f"\n[{section}]")
        for key, (tp, f) in section_keys(cls).items():
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            choices = f.metadata.get("choices")
            extra = f" (one of: {', '.join(choices)})" if choices else ""
            flag = f"--{section}.{key}"
            lines.append(f"  {flag:<48} {type_name(tp):<14} default={toml_value(default)}")
            lines.append(f"      {f.metadata['help']}{extra}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Writing the resolved config


def toml_value(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf") if not math.isnan(v) else "nan"
    if isinstance(v, str):
        # JSON's quoting and short escapes are TOML's; non-ASCII is escaped by hand because JSON writes astral
        # characters as surrogate pairs (and leaves DEL raw), which TOML rejects. ASCII output: any locale can write it.
        return "".join(c if ord(c) < 0x7F else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
                       for c in json.dumps(v, ensure_ascii=False))
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v)


def changes(saved_toml: str, cfg: Config) -> list[str]:
    """`section.key old -> new` for each value of `cfg` that differs from a saved resolved config (config.toml of
    the run a checkpoint came from); keys the saved one lacks (older schema) are not listed."""
    try:
        saved = tomllib.loads(saved_toml)
    except tomllib.TOMLDecodeError:
        return []
    now = tomllib.loads(to_toml(cfg))
    out = []
    for section, values in now.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key, value)
            if old != value:
                out.append(f"{section}.{key} {toml_value(old)} -> {toml_value(value)}")
    known = sections()
    for section, values in saved.items():  # a key set before and none now (TOML has no null)
        for key, old in values.items() if section in known else ():
            if key not in now.get(section, {}) and key in section_keys(known[section]):
                out.append(f"{section}.{key} {toml_value(old)} -> none")
    return out


def to_toml(cfg: Config) -> str:
    """The full resolved config as TOML (keys whose value is none are omitted: TOML has no null)."""
    out = []
    for section in sections():
        out.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            if value is not None:
                out.append(f"{key} = {toml_value(value)}")
        out.append("")
    return "\n".join(out)
