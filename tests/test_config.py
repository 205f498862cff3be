"""The config system: `extends`, CLI overrides typed by the schema, one-line errors naming the key (with a
suggestion), `config.validate`, `--help` and the exit-2 path of `python -m titan.train`, and the TOML round trip."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import tomllib

from titan import config
from titan.config import Config
from titan.config_io import from_dict, load, to_toml
from titan.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEBUG_TOML = str(REPO / "train_configs" / "debug_model.toml")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error(argv: list[str]) -> str:
    """The message of the ConfigError that `load(argv)` raises, checked to be one line."""
    with pytest.raises(ConfigError) as e:
        load(argv)
    message = str(e.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------
# extends


def test_extends_is_relative_to_the_child_and_merges_deeply(tmp_path, monkeypatch):
    write(tmp_path / "cfg" / "base.toml", "[training]\nsteps = 7\nseq_len = 64\nseed = 3\n[optimizer]\nlr = 0.5\n")
    child = write(tmp_path / "cfg" / "sub" / "child.toml",
                  'extends = "../base.toml"\n[training]\nsteps = 9\n[job]\ndescription = "child"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a cwd-relative lookup would miss ../base.toml from here
    cfg = load(["--config", str(child)])
    assert cfg.training.steps == 9  # the child wins
    assert (cfg.training.seq_len, cfg.training.seed) == (64, 3)  # the base's other keys in that section survive
    assert cfg.optimizer.lr == 0.5  # a section only the base has
    assert cfg.job.description == "child"
    assert cfg.training.local_batch_size == config.Training().local_batch_size  # neither sets it: the default


def test_extends_chain_of_three(tmp_path):
    write(tmp_path / "a.toml", "[training]\nsteps = 1\nseq_len = 16\nseed = 11\n")
    write(tmp_path / "b.toml", 'extends = "a.toml"\n[training]\nsteps = 2\nseq_len = 32\n')
    c = write(tmp_path / "c.toml", 'extends = "b.toml"\n[training]\nsteps = 3\n')
    t = load(["--config", str(c)]).training
    assert (t.steps, t.seq_len, t.seed) == (3, 32, 11)


def test_extends_cycles(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    write(tmp_path / "self.toml", 'extends = "self.toml"\n[training]\nsteps = 1\n')
    message = error(["--config", str(tmp_path / "a.toml")])
    a, b = str((tmp_path / "a.toml").resolve()), str((tmp_path / "b.toml").resolve())
    assert "'extends' cycle" in message and message.endswith(f"{a} -> {b} -> {a}"), message
    message = error(["--config", str(tmp_path / "self.toml")])
    me = str((tmp_path / "self.toml").resolve())
    assert "'extends' cycle" in message and message.endswith(f"{me} -> {me}"), message


def test_extends_missing_parent_and_bad_type(tmp_path):
    child = write(tmp_path / "child.toml", 'extends = "no_such_base.toml"\n')
    assert "no_such_base.toml" in error(["--config", str(child)])
    bad = write(tmp_path / "bad.toml", "extends = 3\n")
    message = error(["--config", str(bad)])
    assert "extends" in message and "bad.toml" in message


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_values_are_typed_by_the_schema():
    cfg = load([
        "--training.steps", "5",
        "--optimizer.lr=1e-3",
        "--optimizer.betas", "0.9,0.99",
        "--compile.components=loss",
        "--lr_scheduler.decay_ratio", "0.25",
        "--lr_scheduler.decay_type", "sqrt",
        "--job.description=a b",
        "--training.global_batch_size", "-1",
    ])
    assert cfg.training.steps == 5 and type(cfg.training.steps) is int
    assert cfg.optimizer.lr == 1e-3 and type(cfg.optimizer.lr) is float
    assert cfg.optimizer.betas == [0.9, 0.99] and all(type(b) is float for b in cfg.optimizer.betas)
    assert cfg.compile.components == ["loss"]
    assert cfg.lr_scheduler.decay_ratio == 0.25 and cfg.lr_scheduler.decay_type == "sqrt"
    assert cfg.job.description == "a b"
    assert cfg.training.global_batch_size == -1
    cfg = load(["--lr_scheduler.decay_ratio", "0.5", "--lr_scheduler.decay_ratio", "none"])  # the last one wins
    assert cfg.lr_scheduler.decay_ratio is None


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False), ("TRUE", True),
])
def test_cli_bools(text, expected):
    assert load(["--training.deterministic", text]).training.deterministic is expected
    assert load([f"--metrics.enable_tensorboard={text}"]).metrics.enable_tensorboard is expected


def test_bare_bool_flag_means_true():
    cfg = load(["--training.deterministic", "--training.steps", "3", "--compile.enable"])
    assert cfg.training.deterministic is True and cfg.compile.enable is True and cfg.training.steps == 3
    # A bare non-bool key is an error naming it, not a silent default.
    assert "--training.steps" in error(["--training.steps", "--training.seed", "1"])


def test_cli_beats_the_file_and_config_file_alias(tmp_path):
    path = write(tmp_path / "run.toml", "[training]\nsteps = 7\nseed = 5\n[optimizer]\nbetas = [0.5, 0.6]\n")
    for flag in ("--config", "--job.config_file"):
        cfg = load([flag, str(path), "--training.steps", "99", "--optimizer.betas", "0.8,0.9"])
        assert (cfg.training.steps, cfg.training.seed, cfg.optimizer.betas) == (99, 5, [0.8, 0.9])
    # Order does not matter: an override given before the file still wins.
    assert load(["--training.steps=42", f"--job.config_file={path}"]).training.steps == 42


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line, the key named, the closest valid key suggested


def test_unknown_section_and_key_in_a_file(tmp_path):
    path = write(tmp_path / "typo.toml", "[trainig]\nsteps = 1\n")
    message = error(["--config", str(path)])
    assert "trainig" in message and "'training'" in message and "typo.toml" in message
    path = write(tmp_path / "typo2.toml", "[training]\nstpes = 1\n")
    message = error(["--config", str(path)])
    assert "training.stpes" in message and "'steps'" in message


def test_unknown_cli_flag_suggests_the_closest():
    message = error(["--training.stpes", "5"])
    assert "--training.stpes" in message and "--training.steps" in message
    message = error(["--optimzer.lr", "1"])
    assert "--optimzer.lr" in message and "--optimizer.lr" in message
    assert "'positional'" in error(["positional"])
    # Other trainers' names get titan's by meaning (it suggested --optimizer.name for --optimizer.learning_rate).
    assert "(did you mean '--optimizer.lr'?)" in error(["--optimizer.learning_rate", "1e-3"])
    assert "(did you mean '--training.steps'?)" in error(["--training.max_steps", "10"])


def test_help_is_never_lost_behind_an_error(capsys):
    for argv in (["--optimizer.learning_rate", "3", "--help"], ["--config", "/missing.toml", "-h"]):
        with pytest.raises(SystemExit) as e:
            load(argv)
        assert e.value.code == 0 and "usage: python -m titan.train" in capsys.readouterr().out


@pytest.mark.parametrize("line, key", [
    ('[training]\nsteps = "ten"', "training.steps"),
    ("[training]\nsteps = 10.5", "training.steps"),
    ("[training]\ndeterministic = 1", "training.deterministic"),
    ('[optimizer]\nlr = "fast"', "optimizer.lr"),
    ("[optimizer]\nbetas = 0.9", "optimizer.betas"),
    ('[optimizer]\nbetas = [0.9, "x"]', "optimizer.betas"),
    ("[compile]\ncomponents = [1]", "compile.components"),
    ("training = 3", "[training]"),
])
def test_wrong_types_in_a_file(tmp_path, line, key):
    path = write(tmp_path / "bad.toml", line + "\n")
    assert key in error(["--config", str(path)])


@pytest.mark.parametrize("argv, key", [
    (["--training.steps", "x"], "--training.steps"),
    (["--training.steps", "1.5"], "--training.steps"),
    (["--optimizer.lr", "fast"], "--optimizer.lr"),
    (["--training.deterministic", "maybe"], "--training.deterministic"),
    (["--optimizer.betas", "0.9,x"], "--optimizer.betas"),
    (["--training.seed", "none"], "--training.seed"),  # none only for optional keys
])
def test_wrong_types_on_the_command_line(argv, key):
    assert key in error(argv)


def test_bad_choice_suggests_the_closest(tmp_path):
    path = write(tmp_path / "c.toml", '[lr_scheduler]\ndecay_type = "cosin"\n')
    message = error(["--config", str(path)])
    assert "lr_scheduler.decay_type" in message and "'cosine'" in message
    message = error(["--lr_scheduler.decay_type", "cosin"])
    assert "lr_scheduler.decay_type" in message and "'cosine'" in message
    assert "optimizer.implementation" in error(["--optimizer.implementation", "fast"])


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path / "broken.toml", "[training\nsteps = \n")
    message = error(["--config", str(path)])
    assert "broken.toml" in message and "invalid TOML" in message


def test_missing_config_file(tmp_path):
    assert "nope.toml" in error(["--config", str(tmp_path / "nope.toml")])
    assert "--config" in error(["--config"])


@pytest.mark.parametrize("argv, key", [
    (["--training.steps", "0"], "training.steps"),
    (["--training.seq_len", "-4"], "training.seq_len"),
    (["--training.local_batch_size", "0"], "training.local_batch_size"),
    (["--training.global_batch_size", "0"], "training.global_batch_size"),
    (["--optimizer.lr", "0"], "optimizer.lr"),
    (["--optimizer.lr", "-1e-3"], "optimizer.lr"),
    (["--optimizer.lr", "nan"], "optimizer.lr"),
    (["--optimizer.lr", "inf"], "optimizer.lr"),
    (["--optimizer.betas", "0.9,1.0"], "optimizer.betas"),
    (["--optimizer.betas", "-0.1,0.9"], "optimizer.betas"),
    (["--optimizer.betas", "0.9"], "optimizer.betas"),
    (["--lr_scheduler.decay_ratio", "1.5"], "lr_scheduler.decay_ratio"),
    (["--lr_scheduler.warmup_steps", "-1"], "lr_scheduler.warmup_steps"),
    (["--lr_scheduler.min_lr_factor", "2"], "lr_scheduler.min_lr_factor"),
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "sometimes"],
     "activation_checkpoint.selective_ac_option"),
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "0"],
     "activation_checkpoint.selective_ac_option"),
    (["--compile.components", "model,lose"], "compile.components"),
    (["--parallelism.data_parallel_shard_degree", "0"], "parallelism.data_parallel_shard_degree"),
    (["--parallelism.data_parallel_shard_degree", "-2"], "parallelism.data_parallel_shard_degree"),
    (["--parallelism.tensor_parallel_degree", "0"], "parallelism.tensor_parallel_degree"),
    (["--validation.steps", "0"], "validation.steps"),
    (["--metrics.log_freq", "0"], "metrics.log_freq"),
    (["--optimizer.muon_ns_coefficients", "3.4,-4.7"], "optimizer.muon_ns_coefficients"),
    (["--optimizer.adamw_lr", "0"], "optimizer.adamw_lr"),
    (["--optimizer.name", "SGD", "--optimizer.state_dtype", "bfloat16"], "optimizer.state_dtype"),
    (["--optimizer.name", "muon", "--lora.enable"], "optimizer.name=muon"),
    (["--optimizer.name", "muon", "--training.enable_cpu_offload"], "training.enable_cpu_offload"),
    (["--semi_sync.method", "diloco"], "parallelism.data_parallel_replicate_degree"),
    (["--semi_sync.method", "diloco", "--parallelism.data_parallel_replicate_degree", "2", "--semi_sync.sync_every",
      "2", "--semi_sync.fragments", "3"], "semi_sync.fragments"),
    (["--semi_sync.outer_momentum", "1"], "semi_sync.outer_momentum"),
])
def test_validate_rejects_impossible_values(argv, key):
    assert key in error(argv)


def test_validate_accepts_the_boundaries():
    cfg = load(["--lr_scheduler.decay_ratio", "1", "--lr_scheduler.warmup_steps", "0", "--optimizer.betas", "0,0.999",
                "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "2",
                "--validation.steps", "-1", "--compile.components", "loss,model"])
    assert cfg.lr_scheduler.decay_ratio == 1.0 and cfg.activation_checkpoint.selective_ac_option == "2"
    assert "'loss'" in error(["--compile.components", "lose"])  # the closest component is suggested


# ---------------------------------------------------------------------------------------------------------------
# The resolved config written at start-up


def test_to_toml_round_trip():
    cfg = Config()
    cfg.job.description = 'quotes " back\\slash \n new line, tab\t, café, emoji 😀, DEL \x7f'
    cfg.model.flavor = "8B"
    cfg.optimizer.lr = 1e-8
    cfg.optimizer.betas = [0.8, 0.999]
    cfg.optimizer.implementation = "fused"
    cfg.lr_scheduler.decay_ratio = None
    cfg.lr_scheduler.decay_type = "cosine"
    cfg.training.global_batch_size = 64
    cfg.training.deterministic = True
    cfg.training.max_norm = float("inf")
    cfg.compile.components = []
    cfg.metrics.enable_tensorboard = False
    assert cfg != Config()
    text = to_toml(cfg)
    assert text.isascii()  # train.py writes it with the locale's encoding, whatever that is
    assert from_dict(tomllib.loads(text)) == cfg
    cfg.lr_scheduler.decay_ratio = 0.25
    cfg.compile.components = ["loss", "model"]
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_file_is_read_as_utf8_whatever_the_locale(tmp_path):
    # TOML files are UTF-8; an ASCII (or cp1252) locale must not change what is read.
    path = write(tmp_path / "u.toml", '[job]\ndescription = "Austen — café 😀"\n')
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    code = "import sys; from titan import config_io; print(config_io.load(['--config', sys.argv[1]]).job.description)"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode("utf-8").strip() == "Austen — café 😀"


# ---------------------------------------------------------------------------------------------------------------
# `python -m titan.train`: --help, and config errors as one line with exit code 2. The processes are started
# together (each pays ~3 s importing torch) and collected by the tests; the missing-file case calls `main` in-process.


def test_missing_config_file_exits_2_in_main(tmp_path, capsys):
    from titan.train import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(["--config", str(tmp_path / "does_not_exist.toml")]) == 2
    finally:  # main() points the root logger at this test's captured stdout
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "does_not_exist.toml" in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    dump = str(tmp_path_factory.mktemp("dump"))
    commands = {
        "help": ["--help"],
        "typo": ["--config", DEBUG_TOML, "--training.stpes", "5"],
        "batch": ["--config", DEBUG_TOML, "--training.global_batch_size", "12", "--training.local_batch_size", "8",
                  "--training.steps", "1", "--job.dump_folder", dump, "--validation.enable", "false"],
        "empty_config": ["--config=", "--training.steps", "1"],  # an unset shell variable: not the defaults
        "non_utf8": ["--config", DEBUG_TOML, "--job.dump_folder", b"/tmp/\xff\xfe"],  # bytes a shell can pass
        "ep_ranks": ["--config", DEBUG_TOML, "--parallelism.expert_parallel_degree", "2", "--job.dump_folder", dump],
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = {name: subprocess.Popen([sys.executable, "-m", "titan.train", *argv], cwd=REPO, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, argv in commands.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        results[name] = (p.returncode, out, err)
    return results


def test_help_lists_every_key_with_type_and_default(cli_runs):
    rc, out, err = cli_runs["help"]
    assert rc == 0, err
    lines = out.splitlines()
    for section, cls in config.sections().items():
        assert f"[{section}]" in lines
        for f in dataclasses.fields(cls):
            flag = f"--{section}.{f.name}"
            line = next((ln for ln in lines if ln.split()[:1] == [flag]), None)
            assert line is not None, f"{flag} missing from --help"
            # The annotation as written in config.py (`float | None`), with None spelled as on the command line.
            assert f" {f.type.replace('None', 'none')} " in line, line
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert line.endswith(f"default={'none' if default is None else json.dumps(default)}"), line
    assert "--config" in out and "--job.config_file" in out


@pytest.mark.parametrize("name, needles", [
    ("typo", ("training.stpes", "training.steps")),
    ("batch", ("training.global_batch_size",)),
    ("empty_config", ("--config needs a file path (got an empty string)",)),
    ("non_utf8", ("job.dump_folder must be UTF-8 text", "\\udcff")),
    ("ep_ranks", ("parallelism.expert_parallel_degree=2 does not divide the ranks it borrows",)),
])
def test_config_errors_exit_2_with_one_line(cli_runs, name, needles):
    rc, out, err = cli_runs[name]
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    for needle in needles:
        assert needle in err


# ---------------------------------------------------------------------------------------------------------------
# The schema walk: every key of the schema (as it is when the test runs, keys added later included) against the
# values a user can type that used to reach a traceback.

HOSTILE = {int: ["-1", "0", str(2**64), str(-2**64)], float: ["nan", "inf", "-inf", "-1", "0", str(2.0**64)],
           str: ["", "\udcff\udcfe"]}  # the second: bytes that are not UTF-8, as Python decodes them from argv


def schema() -> list[tuple[str, str, type, config.Range]]:
    """(section, key, type of its values (of a list's items), declared Range) of every number and text key."""
    out = []
    for section, cls in config.sections().items():
        for key, (tp, f) in config.section_keys(cls).items():
            base = config.unwrap_optional(tp)[0]
            item = typing.get_args(base)[0] if typing.get_origin(base) is list else base
            if item in HOSTILE:
                out.append((section, key, item, f.metadata.get("valid") or config.Range()))
    return out


def test_schema_walk_rejects_hostile_values_with_one_line_naming_the_key():
    walked = 0
    for section, key, item, valid in schema():
        for text in HOSTILE[item]:
            walked += 1
            try:
                load([f"--{section}.{key}", text])
            except ConfigError as e:
                assert f"{section}.{key}" in str(e) and "\n" not in str(e), (section, key, text, str(e))
                str(e).encode("utf-8")  # printable whatever the value held
                continue
            # Accepted: only what the key's declared range admits (never nan, inf or an int beyond 64 bits), and text.
            assert item is str or valid.accepts(float(text) if item is float else int(text)), (section, key, text)
            assert text not in ("nan", "inf", "-inf", str(2**64), str(-2**64)), (section, key, text)
            assert "\udcff" not in text, (section, key)
    assert walked > 200


def test_every_numeric_key_declares_its_range():
    """A new number key gets `opt(..., valid=Range(...))`; without one it is only held to finite, 64-bit values."""
    undeclared = [f"{s}.{k}" for s, k, item, _ in schema() if item is not str and
                  not config.section_keys(config.sections()[s])[k][1].metadata.get("valid")]
    assert not undeclared, f"declare a range (opt(..., valid=...)) for {', '.join(undeclared)}"


@pytest.mark.parametrize("argv, key", [
    (["--job.dump_folder", "{file}"], "job.dump_folder: {file} is a file"),
    (["--job.dump_folder", "{file}/sub"], "job.dump_folder: cannot write to {file}/sub (ENOTDIR"),
    (["--checkpoint.enable", "--checkpoint.folder", "{file}"], "checkpoint.folder: {file} is a file"),
    (["--checkpoint.initial_load_path", "{file}"], "checkpoint.initial_load_path: {file} is not a folder"),
    (["--checkpoint.initial_load_path", "{folder}"], "checkpoint.initial_load_path: {folder} is not a readable"),
    (["--model.tokenizer_path", "{file}"], "model.tokenizer_path="),
    (["--model.tokenizer_path", "{folder}"], "model.tokenizer_path="),
    (["--training.dataset_path", "{folder}"], "training.dataset_path"),
    (["--model.flavor", ""], "model.flavor"),
    (["--training.dataset", ""], "training.dataset"),
])
def test_hostile_paths_and_names_exit_2_with_one_line(tmp_path, capsys, argv, key):
    """Values only their user can judge (paths, names): a file where a folder is expected, an empty folder."""
    from titan.train import main

    (tmp_path / "file").write_text("not a folder\n")
    (tmp_path / "folder").mkdir()
    fill = {"file": str(tmp_path / "file"), "folder": str(tmp_path / "folder")}
    argv = [a.format(**fill) for a in argv]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = main(["--config", DEBUG_TOML, "--job.dump_folder", str(tmp_path / "run"), "--training.steps", "1",
                     *argv])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and key.format(**fill) in err[0], err
