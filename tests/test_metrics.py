"""MetricsLogger output (jsonl, printed line, TensorBoard, rank 0 only), the FLOPs formula and the peak table."""

import json
import logging
import re

import pytest
import torch

from titan.config import Metrics
from titan.metrics import MetricsLogger, num_flops_per_token, peak_flops


def make_logger(tmp_path, *, log_freq=5, tensorboard=False, rank=0, peak=None, total_steps=12):
    return MetricsLogger(
        Metrics(log_freq=log_freq, enable_tensorboard=tensorboard), str(tmp_path / "dump"), rank=rank, world_size=2,
        device=torch.device("cpu"), flops_per_token=100.0, peak_flops=peak, total_steps=total_steps,
    )


def run_steps(m, total_steps=12, **extra):
    for s in range(1, total_steps + 1):
        m.step(s, loss=10.0 / s, grad_norm=1.5, lr=1e-3 * s, tokens=1000, step_time=0.1 * s, **extra)


def read_jsonl(tmp_path):
    return [json.loads(line) for line in (tmp_path / "dump" / "metrics.jsonl").read_text().splitlines()]


def test_flops_per_token_by_hand():
    # 6 * (1000 - 200) = 4800 for the matmul weights; 12 * 2 layers * 4 heads * 8 dims * 16 tokens = 12288.
    assert num_flops_per_token(1000, 200, n_layers=2, n_heads=4, head_dim=8, seq_len=16) == 4800 + 12288


def test_jsonl_steps_and_window_averages(tmp_path):
    m = make_logger(tmp_path, peak=1e6)
    run_steps(m, moe_aux=0.25)
    rows = read_jsonl(tmp_path)  # readable before close(): flushed per line
    m.close()
    assert [r["step"] for r in rows] == [1, 5, 10, 12]
    r5 = rows[1]  # window = steps 2..5: 4000 tokens in 0.2 + 0.3 + 0.4 + 0.5 = 1.4 s
    assert r5["loss"] == 2.0 and r5["grad_norm"] == 1.5 and r5["lr"] == pytest.approx(5e-3)
    assert r5["tps"] == pytest.approx(4000 / 1.4)
    assert r5["tps_per_device"] == pytest.approx(4000 / 1.4 / 2)
    assert r5["step_time"] == pytest.approx(0.35)
    assert r5["mfu"] == pytest.approx(100 * 100.0 * (4000 / 1.4 / 2) / 1e6)  # percent
    assert r5["moe_aux"] == 0.25 and r5["memory_gib"] > 0
    assert rows[0]["tps"] == pytest.approx(1000 / 0.1)  # the first step is its own window


def test_log_freq_one_logs_every_step_and_validation_lines(tmp_path):
    m = make_logger(tmp_path, log_freq=1, total_steps=3)
    run_steps(m, total_steps=3)
    m.validation(3, loss=2.5, ppl=12.2)
    m.close()
    rows = read_jsonl(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 3]
    assert rows[-1] == {"step": 3, "val_loss": 2.5, "val_ppl": 12.2}
    assert all(r["mfu"] is None for r in rows[:3])


def test_new_run_truncates_metrics_jsonl(tmp_path):
    (tmp_path / "dump").mkdir()
    (tmp_path / "dump" / "metrics.jsonl").write_text('{"step": 99}\n')
    m = make_logger(tmp_path)
    m.step(1, loss=1.0, grad_norm=1.0, lr=1e-3, tokens=10, step_time=1.0)
    m.close()
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1]


def test_printed_lines_are_fixed_width(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="titan")
    m = make_logger(tmp_path, total_steps=120)
    for s in range(1, 121):  # loss from 10 down, throughput up 120x
        m.step(s, loss=10.0 / s ** 0.5, grad_norm=100.0 / s, lr=8e-4 * s / 120, tokens=1000 * s * s, step_time=0.01 * s)
    m.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "titan" and r.getMessage().startswith("step")]
    assert len(lines) == 1 + 120 // 5
    assert len({len(line) for line in lines}) == 1
    for label in ("loss", "grad_norm", "lr", "tok/s", "mfu", "peak_rss", "step_time", "eta"):
        assert len({line.index(f"  {label} ") for line in lines}) == 1, label
    first, last = lines[0], lines[-1]
    assert re.match(r"step +1  loss  10\.0000  grad_norm 100\.0000  lr 6\.667e-06  tok/s +100,000 \( +50,000/dev\)  "
                    r"mfu +n/a  peak_rss +\d+\.\d\d GiB  step_time +0\.010s  eta +0:00:01$", first), first
    tps = sum(1000 * s * s for s in range(116, 121)) / sum(0.01 * s for s in range(116, 121))  # window 116..120
    assert last.startswith("step 120  loss   0.9129") and last.endswith("eta  0:00:00")
    assert f"tok/s {tps:>12,.0f} ({tps / 2:>10,.0f}/dev)" in last


def test_eta_uses_the_window_average(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="titan")
    m = make_logger(tmp_path)
    run_steps(m)
    m.close()
    step5 = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step  5")][0]
    assert step5.endswith("eta  0:00:02")  # 0.35 s x 7 remaining steps = 2.45 s


def test_other_ranks_write_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="titan")
    m = make_logger(tmp_path, rank=1, tensorboard=True)
    run_steps(m)
    m.validation(12, loss=1.0)
    m.close()
    assert not (tmp_path / "dump").exists()
    assert not [r for r in caplog.records if r.name == "titan"]


def test_tensorboard_only_when_enabled(tmp_path):
    m = make_logger(tmp_path, tensorboard=True)
    run_steps(m)
    m.close()
    events = list((tmp_path / "dump" / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0

    off = tmp_path / "off"
    m = make_logger(off, tensorboard=False)
    run_steps(m)
    m.close()
    assert (off / "dump" / "metrics.jsonl").exists() and not (off / "dump" / "tb").exists()


CUDA0 = torch.device("cuda", 0)


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", 989.5e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10G", 125e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA B200", 2.25e15),
    ("NVIDIA GB200", 2.5e15),
    ("AMD Instinct MI300X", 1307.4e12),
    ("AMD Instinct MI325X", 1307.4e12),
    ("NVIDIA H20", None),  # whole-token match: not an H200
    ("NVIDIA L40", None),  # nor is an L40 an L4
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table_bf16(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(CUDA0, torch.bfloat16) == expected


@pytest.fixture
def restore_tf32():
    # Not monkeypatch: cuBLASModule's allow_tf32 is a computed attribute that monkeypatch's undo tries to delete.
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_peak_by_dtype(monkeypatch, restore_tf32):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(CUDA0, torch.float8_e4m3fn) == 989.5e12  # MFU in bf16-equivalent FLOPs
    torch.backends.cuda.matmul.allow_tf32 = True
    assert peak_flops(CUDA0, torch.float32) == 494.5e12
    torch.backends.cuda.matmul.allow_tf32 = False
    assert peak_flops(CUDA0, torch.float32) == 67e12
    assert peak_flops(CUDA0, torch.float64) is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_amd_tf32_peak_is_unknown(monkeypatch, restore_tf32):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI300X")
    torch.backends.cuda.matmul.allow_tf32 = True
    assert peak_flops(CUDA0, torch.float32) is None
    torch.backends.cuda.matmul.allow_tf32 = False
    assert peak_flops(CUDA0, torch.float32) == 163.4e12
