"""W&B and MLflow beside TensorBoard (titan/trackers.py): one tiny run logs to both (offline: WANDB_MODE=offline, an
MLflow file store), and the W&B run's own files (read here record by record) and MLflow's metrics hold exactly the
values of metrics.jsonl under TensorBoard's tags; the run's name and config are recorded; other ranks open nothing; a
missing package is one line naming the extra. Each part skips without its package."""

from __future__ import annotations

import glob
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import TINY, read_metrics

from titan.config import Metrics
from titan.metrics import MetricsLogger
from titan.train import main

TAGS = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr", "tps": "throughput/tps",
        "tps_per_device": "throughput/tps_per_device", "step_time": "time/step_time_s", "data_time": "time/data_time_s",
        "memory_gib": "memory/memory_gib", "val_loss": "val/loss"}


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (.wandb): a LevelDB-style log of 32 KiB blocks, each record a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def expected(dump) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: {tag: value}}, training and validation records merged."""
    out = {}
    for record in read_metrics(dump) + [r for r in read_metrics(dump, validation=True) if "val_loss" in r]:
        out.setdefault(record["step"], {}).update({TAGS[k]: v for k, v in record.items() if k in TAGS})
    return out


def test_wandb_and_mlflow_hold_the_metrics_jsonl_values(tmp_path, monkeypatch, one_thread):
    have = [name for name in ("wandb", "mlflow") if _importable(name)]
    if not have:
        pytest.skip("needs wandb or mlflow (pip install -e '.[wandb]' / '.[mlflow]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dump = tmp_path / "run"
    argv = ["--config", TINY, "--job.dump_folder", str(dump), "--training.steps", "4", "--metrics.log_freq", "2",
            "--validation.enable", "--validation.freq", "2", "--validation.steps", "1", "--metrics.run_name", "tiny-29",
            *[f"--metrics.{name}" for name in have]]
    assert main(argv) == 0
    want = expected(dump)
    assert sorted(want) == [1, 2, 4] and "val/loss" in want[2]
    if "wandb" in have:
        [run_file] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
        history, config, name = {}, {}, None
        for record in wandb_records(Path(run_file)):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(items.pop("_step"), {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
            elif kind == "run":  # the run's start: its name and config
                name = record.run.display_name
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        assert {s: {k: v for k, v in h.items() if k in want[s]} for s, h in history.items()} == want
        assert all(set(h) - set(want[s]) <= {"throughput/mfu_pct"} for s, h in history.items())  # nothing else
        assert name == "tiny-29" and config["training"]["seq_len"] == 32
    if "mlflow" in have:
        from mlflow.tracking import MlflowClient

        client = MlflowClient((dump / "mlruns").as_uri())
        [run] = client.search_runs([client.get_experiment_by_name("titan").experiment_id])
        got = {}
        for tag in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, tag):
                got.setdefault(m.step, {})[tag] = m.value
        assert {s: {k: v for k, v in g.items() if k in want[s]} for s, g in got.items()} == want
        assert run.data.params["training.seq_len"] == "32" and run.info.run_name == "tiny-29"


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_only_rank_0_opens_trackers_and_a_missing_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow", None)
    common = dict(world_size=2, device=torch.device("cpu"), flops_per_token=1.0, peak_flops=None, total_steps=2)
    quiet = MetricsLogger(Metrics(wandb=True, mlflow=True), str(tmp_path / "r1"), rank=1, **common)
    quiet.step(1, loss=1.0, grad_norm=1.0, lr=1.0, tokens=1, step_time=1.0)
    quiet.close()
    assert not (tmp_path / "r1").exists()
    for name in ("wandb", "mlflow"):
        assert main(["--config", TINY, "--job.dump_folder", str(tmp_path / name), f"--metrics.{name}"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err == [f'titan: error: metrics.{name} needs the {name} package: pip install -e ".[{name}]"'], err
