"""The CUDA paths of issue 27, shown on CPU where a mechanism can show them (what needs a GPU is
scripts/gpu_check.py's, see docs/performance.md#gpu-check):

1. CPU offload: parameters materialised in CPU memory under FSDP2's CPUOffloadPolicy, one step equal to the same
   step without it; `cuda:nccl,cpu:gloo` when offloading on GPUs.
2. float8: rowwise under compile sets inductor's emulate_precision_casts; eager float8 says so.
3. Async pinned checkpoint: the stager's copy waits for the step's kernels and the next optimizer step waits for the
   copy (by mechanism, with recording streams); a save holds its own step however soon the weights change after.
4. MoE under autocast takes the grouped GEMM (host syncs: tests/test_host_syncs.py).
5. Selective-AC save list: its contents, and an MoE block's expert GEMMs are not recomputed in backward.
6. RMSNorm on CUDA hands F.rms_norm the bf16 activation; the grad norm is one reduction per mesh, equal to the
   per-parameter DTensor computation within 1e-6 (FSDP, TP with Partial and Replicate gradients, clipping).
7. Launchers export the allocator, flight-recorder and gloo-interface variables; every process group gets
   comm's timeouts; the metrics line shows allocator retries and OOMs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import REPO, TINY, spawn_torchrun_env
from torch import nn
from torch.distributed.tensor import DTensor

from titan.config import Float8, Metrics
from titan.parallel import float8

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------------------------
# 5. Selective activation checkpointing


def test_selective_ac_saves_float8_expert_attention_and_all_to_all_outputs():
    from torch._higher_order_ops import flex_attention

    from titan.parallel.activation_checkpoint import _SAVE_OPS

    aten, c10d = torch.ops.aten, torch.ops._c10d_functional
    assert {aten.max.default, aten._scaled_mm.default, aten._grouped_mm.default, c10d.all_to_all_single.default,
            aten.bmm.default, aten._safe_softmax.default, flex_attention, aten.mm.default,
            c10d.reduce_scatter_tensor.default} <= _SAVE_OPS


def _grouped_mm_calls(mode: str) -> int:
    """torch._grouped_mm calls in one forward + backward of the tiny MoE model under activation checkpointing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from titan import models
    from titan.parallel.activation_checkpoint import apply_ac

    torch.manual_seed(0)
    args = dataclasses.replace(models.model_args("qwen3_moe", "tiny", tokenizer_vocab=64, max_seq_len=16), n_layers=1)
    model = models.build_model(args)
    model.init_weights()
    apply_ac(model, mode, "op")
    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        model(torch.randint(0, 64, (2, 16))).square().mean().backward()
    return calls.count(torch.ops.aten._grouped_mm.default)


def test_selective_ac_does_not_recompute_the_expert_gemms():
    # One MoE layer: 3 forward + 6 backward grouped GEMMs; full recomputation runs the 3 forward ones again.
    assert _grouped_mm_calls("selective") == 9
    assert _grouped_mm_calls("full") == 12


# ---------------------------------------------------------------------------------------------------------------
# 6. RMSNorm on CUDA, grad norm (the distributed part is in test_distributed_paths)


def test_fused_rms_norm_gets_the_bf16_activation(monkeypatch):
    """Where F.rms_norm is one kernel (CUDA; forced here for CPU), titan hands it x in its own dtype, not an fp32
    copy; the result matches the fp32 computation to bf16's rounding."""
    from titan.models import layers

    seen = []
    real = layers.F.rms_norm

    def spy(x, shape, weight, eps):
        seen.append((x.dtype, weight.dtype))
        return real(x, shape, weight, eps)

    monkeypatch.setattr(layers, "FUSED_RMS_NORM", {"cpu"})
    monkeypatch.setattr(layers.F, "rms_norm", spy)
    norm = layers.RMSNorm(64, 1e-5)
    x = torch.randn(2, 8, 64)
    out = norm(x.bfloat16())
    ref = layers.RMSNormFunction.apply(x.bfloat16().float(), norm.weight.float(), 1e-5)
    assert seen == [(torch.bfloat16, torch.bfloat16)] and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# 4. MoE under autocast


def test_moe_experts_take_the_grouped_gemm_under_autocast(monkeypatch):
    """fp32 tokens under bf16 autocast (one device without FSDP): the experts run as grouped GEMMs in bf16, as their
    linears would, not as the per-expert loop (a host sync)."""
    from titan.models.moe import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(64, 32, 4)
    experts.init_weights(0.02)
    x, counts = torch.randn(24, 64), torch.tensor([6, 0, 10, 8])
    monkeypatch.setattr(GroupedExperts, "_loop", staticmethod(lambda *a: pytest.fail("the per-expert loop ran")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, counts)
    monkeypatch.undo()
    ref = experts._loop(x, counts, experts.w1, experts.w2, experts.w3)
    assert out.dtype == torch.bfloat16 and ((out.float() - ref).norm() / ref.norm()) < 1e-2


# ---------------------------------------------------------------------------------------------------------------
# 2. float8 and compile


def test_float8_rowwise_under_compile_emulates_precision_casts(caplog):
    import torch._inductor.config as inductor

    before = inductor.emulate_precision_casts
    try:
        inductor.emulate_precision_casts = False
        float8.convert(nn.Sequential(nn.Linear(64, 64)), Float8(enable=True), False, "cpu", compiled=True)
        assert not inductor.emulate_precision_casts  # tensorwise: left alone
        float8.convert(nn.Sequential(nn.Linear(64, 64)), Float8(enable=True, recipe_name="rowwise"), False, "cpu",
                       compiled=True)
        assert inductor.emulate_precision_casts
        caplog.clear()
        with caplog.at_level("INFO", logger="titan"):
            float8.convert(nn.Sequential(nn.Linear(64, 64)), Float8(enable=True), False, "cpu", compiled=False)
        assert any("float8: running eager" in r.message for r in caplog.records)
    finally:
        inductor.emulate_precision_casts = before


# ---------------------------------------------------------------------------------------------------------------
# 3. Async checkpoint with pinned memory


class _Recorder:
    """Stand-ins for torch.cuda's streams and events that log what is asked of them, in order."""

    def __init__(self):
        self.log = []
        self.compute = self.Stream(self, "compute")

    def Stream(self, recorder=None, name="copy"):  # noqa: N802 - stands in for torch.cuda.Stream
        log = (recorder or self).log

        class Stream:
            def __init__(self):
                self.name = name

            def wait_stream(self, other):
                log.append(f"{self.name} waits for {other.name}")

            def wait_event(self, event):
                log.append(f"{self.name} waits for the copy's event")

            def __enter__(self):
                log.append(f"on {self.name}")

            def __exit__(self, *exc):
                log.append(f"off {self.name}")

        return Stream()

    def Event(self):  # noqa: N802
        log = self.log

        class Event:
            def record(self, stream):
                log.append(f"event after {stream.name}")

            def synchronize(self):
                log.append("writer waits for the event")

        return Event()


def test_pinned_stager_copies_after_the_step_and_the_next_step_waits(monkeypatch):
    """The CUDA path of PinnedStager with recording streams (the copies themselves run on CPU tensors): the copy
    stream waits for the compute stream before any copy, the copy is made on the copy stream, an event marks its end,
    the background writer waits for that event, and the next optimizer step makes the compute stream wait for it."""
    from titan.checkpoint import staging

    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: rec.Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: rec.compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: s)
    monkeypatch.setattr(torch.cuda, "Event", rec.Event)
    real_copy = staging._copy_state_dict

    def copy(*args, **kwargs):
        rec.log.append(f"copy (non_blocking={kwargs['non_blocking']})")
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(staging, "_copy_state_dict", copy)

    model = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    stager = staging.PinnedStager(torch.device("cuda"))
    optimizer.register_step_pre_hook(lambda *_: stager.before_update())  # as titan/checkpoint/save.py does
    before = model.weight.detach().clone()
    staged = stager.stage({"model": model.state_dict(), "step": 3}).result()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert rec.log == ["copy waits for compute", "on copy", "copy (non_blocking=True)", "off copy",
                       "event after copy", "writer waits for the event", "compute waits for the copy's event"]
    assert torch.equal(staged["model"]["weight"], before) and staged["step"] == 3
    assert not torch.equal(model.weight.detach(), before)
    stager.close()


def test_async_pinned_save_holds_its_step_however_soon_the_weights_change(tmp_path):
    """On CPU the copy is made before save() returns: weights changed right after it are not in the checkpoint."""
    import torch.distributed.checkpoint as dcp

    from titan import config_io
    from titan.build import build

    argv = ["--config", TINY, "--job.dump_folder", str(tmp_path), "--checkpoint.enable", "--checkpoint.async_mode",
            "async_with_pinned_mem", "--validation.enable", "false"]
    run = build(config_io.load(argv))
    try:
        saved = {k: v.detach().clone() for k, v in run.model_parts[0].state_dict().items()}
        run.checkpointer.save(1)
        with torch.no_grad():
            for p in run.model_parts[0].parameters():
                p.add_(1.0)  # while the background write goes on
        run.checkpointer.wait()
        loaded = {k: torch.empty_like(v) for k, v in saved.items()}
        dcp.load({"model": loaded}, checkpoint_id=str(tmp_path / "checkpoint" / "step-1"))
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)
        run.close()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# 7. The metrics line, the backend, the launchers


def test_metrics_line_shows_allocator_retries_and_ooms(tmp_path, monkeypatch, caplog):
    from titan.metrics import MetricsLogger

    for name, value in (("max_memory_allocated", 3 * 2**30), ("max_memory_reserved", 4 * 2**30)):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, v=value: v)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {"num_alloc_retries": 7, "num_ooms": 1})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "unknown")
    metrics = MetricsLogger(Metrics(enable_tensorboard=False), str(tmp_path), rank=0, world_size=1,
                            device=torch.device("cuda"), flops_per_token=1.0, peak_flops=None, total_steps=1)
    with caplog.at_level("INFO", logger="titan"):
        metrics.step(1, loss=1.0, grad_norm=1.0, lr=1e-3, tokens=10, step_time=1.0)
    metrics.close()
    assert "retries 7 ooms 1" in caplog.records[-1].message
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["alloc_retries"] == 7 and record["ooms"] == 1


def test_cpu_offload_on_gpus_adds_gloo_for_cpu_tensors(monkeypatch):
    from titan.parallel import process_group

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: seen.append(backend))
    for offload in (False, True):
        process_group.init_distributed(False, 0, 60, cpu_collectives=offload)
    assert seen == ["nccl", "cuda:nccl,cpu:gloo"]


def _fake_bin(folder: Path, scripts: dict[str, str]) -> dict:
    folder.mkdir()
    for name, body in scripts.items():
        (folder / name).write_text("#!/bin/sh\n" + body)
        (folder / name).chmod(stat.S_IRWXU)
    return {**ENV, "PATH": f"{folder}:{ENV['PATH']}"}


def _launched_env(out: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)


LAUNCH_VARS = ("PYTORCH_ALLOC_CONF", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
               "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "GLOO_SOCKET_IFNAME", "PYTORCH_CUDA_ALLOC_CONF", "NCCL_SOCKET_IFNAME",
               "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")


def test_launchers_export_allocator_flight_recorder_and_gloo_interface(tmp_path):
    """scripts/run_train.sh, and scripts/multinode.sbatch through it, with torchrun (and Slurm's srun, scontrol and
    a host lookup) replaced by stand-ins that record the environment the workers would get."""
    out = tmp_path / "env.txt"
    # The one-process config check before torchrun is tests/test_scripts.py's: a stand-in python passes it here.
    env = _fake_bin(tmp_path / "bin", {"torchrun": f'env > "{out}"\n', "python": "exit 0\n"})
    env = {k: v for k, v in env.items() if k not in LAUNCH_VARS}
    base = [*(["bash", "scripts/run_train.sh"]), "--job.dump_folder", str(tmp_path / "d")]

    def launch(extra_env, argv=base, extra_args=()):
        done = subprocess.run([*argv, *extra_args], cwd=REPO, env={**env, **extra_env}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return _launched_env(out), done.stderr

    one, _ = launch({"NGPU": "1", "CONFIG_FILE": TINY})
    assert one["PYTORCH_ALLOC_CONF"] == "expandable_segments:True" and one["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert int(one["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0 and one["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"]
    assert "GLOO_SOCKET_IFNAME" not in one  # one node: gloo stays on this machine
    # A stop signal that reaches torchrun gives the saving workers 10 minutes before SIGKILL (torch's default: 30 s).
    assert one["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "600"
    assert launch({"NGPU": "1", "CONFIG_FILE": TINY, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "90"})[0][
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"
    # Two nodes: the interface that reaches the rendezvous host (localhost here: lo), or NCCL's; the user's wins.
    two = {"NGPU": "1", "NNODES": "2", "RDZV_ENDPOINT": "localhost:29999", "CONFIG_FILE": TINY}
    assert launch(two)[0]["GLOO_SOCKET_IFNAME"] == "lo"
    assert launch({**two, "NCCL_SOCKET_IFNAME": "ib0"})[0]["GLOO_SOCKET_IFNAME"] == "ib0"
    mine, _ = launch({**two, "GLOO_SOCKET_IFNAME": "eth9", "PYTORCH_CUDA_ALLOC_CONF": "backend:native"})
    assert mine["GLOO_SOCKET_IFNAME"] == "eth9" and "PYTORCH_ALLOC_CONF" not in mine
    # The Slurm example: every node runs run_train.sh; the flight recorder's dumps go to a folder of the job.
    slurm_bin = _fake_bin(tmp_path / "slurm", {
        "scontrol": "echo node0; echo node1\n",
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@"\n',
        "getent": 'echo "127.0.0.1 STREAM $2"\n'})["PATH"].split(":")[0]
    env = {**env, "PATH": f"{slurm_bin}:{env['PATH']}"}
    slurm = {"SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77", "CONFIG_FILE": TINY}
    sbatch, _ = launch(slurm, ["bash", "scripts/multinode.sbatch"],
                       ["--training.global_batch_size", "32", "--job.dump_folder", str(tmp_path / "s")])
    assert sbatch["GLOO_SOCKET_IFNAME"] == "lo" and sbatch["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert sbatch["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"].endswith("nccl_traces_77/rank_")
    Path(sbatch["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"]).parent.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# 1, 6, 7 on two gloo processes: timeouts of every group, grad norm per mesh, CPU offload


def _timeouts() -> set[float]:
    groups = dist.distributed_c10d._world.pg_map
    return {g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups}


def _per_parameter_norm(params) -> torch.Tensor:
    """The grad norm as titan computed it before issue 27: a DTensor square-sum per parameter, per mesh."""
    groups = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    squares = 0
    for grads in groups.values():
        part = sum(g.float().square().sum() for g in grads)
        squares = squares + (part.full_tensor() if isinstance(part, DTensor) else part)
    return squares.sqrt()


def _tiny(parallel, offload=False):
    from titan import models
    from titan.parallel.parallelize import materialize

    with torch.device("meta"):
        model = models.build_model(models.model_args("llama3", "tiny", tokenizer_vocab=64, max_seq_len=16))
    parallel(model)
    materialize(model, torch.device("cpu"), seed=3, cpu_offload=offload)
    return model


def _step(model, mesh_pp, max_norm=0.0):
    from titan.optim import clip_grad_norm

    torch.manual_seed(dist.get_rank())
    loss = model(torch.randint(0, 64, (2, 16))).float().square().mean()
    loss.backward()
    params = list(model.parameters())
    reference = _per_parameter_norm(params)
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.utils._python_dispatch import TorchDispatchMode

    dtensor_ops = []

    class DTensorOps(TorchDispatchMode):  # a mode sees a DTensor's op before DTensor unwraps it
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(isinstance(a, DTensor) for a in torch.utils._pytree.tree_leaves((args, kwargs))):
                dtensor_ops.append(func)
            return func(*args, **(kwargs or {}))

    with CommDebugMode() as comms, DTensorOps():
        norm = clip_grad_norm(params, max_norm, mesh_pp)
    return loss.detach(), norm, reference, (comms.get_total_counts(), len(dtensor_ops))


def _distributed_paths(rank, world_size, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from titan import config_io
    from titan.build import build
    from titan.lifecycle import StopRequests
    from titan.parallel.fsdp import apply_fsdp
    from titan.parallel.process_group import set_train_timeout
    from titan.parallel.tensor_parallel import apply_tp

    # 7: comm's timeouts reach every group: the mesh's, the checkpoint's and the stop requests' gloo groups.
    argv = ["--config", TINY, "--job.dump_folder", tmp, "--checkpoint.enable", "--comm.init_timeout_seconds", "123"]
    run = build(config_io.load(argv))
    stop = StopRequests(world_size)
    assert _timeouts() == {123.0} and len(dist.distributed_c10d._world.pg_map) > 5
    set_train_timeout(run.mesh, 45)
    assert _timeouts() == {45.0} and stop._group in dist.distributed_c10d._world.pg_map
    run.close()

    pp = init_device_mesh("cpu", (1,))
    mesh = init_device_mesh("cpu", (world_size,))
    # 6: FSDP, one mesh: one collective, no op on a DTensor (the per-parameter way: 3 per parameter), its value.
    fsdp = _tiny(lambda m: apply_fsdp(m, mesh, torch.float32, torch.float32, "default", False))
    _, norm, reference, (comms, dtensor_ops) = _step(fsdp, pp)
    assert abs(norm - reference) <= 1e-6 * reference and comms == 1 and dtensor_ops == 0, (norm, reference, comms,
                                                                                             dtensor_ops)
    # TP with sequence parallel: sharded, replicated and Partial gradients (the norm weights') on one mesh.
    tp = _tiny(lambda m: apply_tp(m, mesh, False, False, False))
    _, norm, reference, _ = _step(tp, pp)
    placements = {tuple(type(x).__name__ for x in p.grad.placements) for p in tp.parameters()}
    assert {("Shard",), ("Replicate",)} <= placements, placements
    assert abs(norm - reference) <= 1e-6 * reference, (norm, reference)
    # 1: CPU offload: FSDP2's CPUOffloadPolicy (unpinned on a CPU mesh), one clipped AdamW step equal to the same
    # step without offloading.
    plain = _tiny(lambda m: apply_fsdp(m, mesh, torch.float32, torch.float32, "default", False))
    offloaded = _tiny(lambda m: apply_fsdp(m, mesh, torch.float32, torch.float32, "default", True), offload=True)
    assert all(p.offload_to_cpu for m in offloaded.modules() if isinstance(m, FSDPModule)
               for group in [m._get_fsdp_state()._fsdp_param_group] if group for p in group.fsdp_params)
    results = []
    for model in (plain, offloaded):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss, norm, _, _ = _step(model, pp, max_norm=0.01)
        optimizer.step()
        results.append((loss, norm, [p.detach().to_local().clone() for p in model.parameters()]))
    (loss_a, norm_a, params_a), (loss_b, norm_b, params_b) = results
    assert loss_a == loss_b and norm_a == norm_b and all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert all(p.to_local().device.type == "cpu" for p in offloaded.parameters())
    dist.destroy_process_group()


def test_distributed_paths(tmp_path):
    """Two gloo processes: every group gets comm's timeouts, the grad norm per mesh equals the per-parameter one
    (FSDP, TP), and one step under CPU offload equals one without."""
    spawn_torchrun_env(_distributed_paths, 2, str(tmp_path))


def test_materialize_puts_parameters_in_cpu_memory_and_buffers_on_the_device(monkeypatch):
    """With cpu_offload the parameters are allocated on the CPU (FSDP2 refuses others at its first forward) and the
    buffers (RoPE table, MoE statistics) on the device the forward runs on: "meta" stands in for a GPU here (the
    weights' values are filled unit by unit afterwards, which this leaves out)."""
    from titan import models
    from titan.parallel import parallelize

    with torch.device("meta"):
        model = models.build_model(models.model_args("qwen3_moe", "tiny", tokenizer_vocab=64, max_seq_len=16))
    monkeypatch.setattr(parallelize, "_init_units", lambda model: [])
    parallelize.materialize(model, torch.device("meta"), seed=0, cpu_offload=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    buffers = dict(model.named_buffers())
    assert "freqs_cis" in buffers and any("tokens_per_expert" in n for n in buffers)
    assert all(b.is_meta for b in buffers.values())
    parallelize.materialize(model, torch.device("meta"), seed=0, cpu_offload=False)
    assert all(p.is_meta for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# scripts/gpu_check.py's plumbing


def test_gpu_check_plumbing_runs_end_to_end(tmp_path, capsys, one_thread):
    """The command docs/performance.md shows, run in this process: every check's machinery on CPU (tiny shapes,
    titan's real loop), one table, the JSON report; only the GPU-only checks are skipped."""
    import re

    from dist_utils import load_script

    page = (REPO / "docs" / "performance.md").read_text()
    commands = [line for block in re.findall(r"```bash\n(.*?)```", page, re.S) for line in block.splitlines()
                if line.startswith("python scripts/gpu_check.py --plumbing")]
    assert len(commands) == 1, commands
    args = commands[0].split()[2:]
    args[args.index("--out") + 1] = str(tmp_path)
    assert load_script("gpu_check").main(args) == 0, capsys.readouterr().out[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["check"]: r for r in report["checks"]}
    assert report["mode"] == "plumbing" and set(rows) == {
        "attention causal GQA", "attention cuDNN causal", "attention document mask", "attention dense document mask",
        "attention CP all-gather", "attention flex (document mask)", "attention CP ring blocks", "rmsnorm fused bf16",
        "moe grouped GEMM", "train bf16 eager", "host syncs per step", "peak memory vs estimate",
        "train bf16 compiled", "train float8 tensorwise compiled", "train float8 rowwise compiled",
        "checkpoint async pinned", "cpu offload"}
    skipped = {name for name, r in rows.items() if r["status"] == "SKIP"}
    assert skipped == {"attention cuDNN causal", "peak memory vs estimate", "train bf16 compiled", "cpu offload"}, rows
    assert all(r["status"] == "PASS" for name, r in rows.items() if name not in skipped), rows
    assert rows["host syncs per step"]["figures"]["per_step"] == [[2, 1], [3, 1]]  # the guard's read alone
    assert rows["moe grouped GEMM"]["figures"]["syncs_fwd_bwd"] == 0
    # Issue 26's attention rows: flex against the dense mask (forward on CPU), the ring's blocks, the seam's kernel.
    assert set(rows["attention flex (document mask)"]["figures"]) >= {"out_rel_diff", "sparsity"}
    assert set(rows["attention CP ring blocks"]["figures"]) == {"out", "dq", "dk", "dv"}
    assert rows["attention causal GQA"]["figures"]["seq"] == 256
    assert rows["checkpoint async pinned"]["figures"]["steps_equal_after_resume"] == [3, 4]
    table = capsys.readouterr().out
    assert "check" in table and all(name in table.split("gpu_check (plumbing")[1] for name in rows)
    assert not list(tmp_path.glob("tmp*"))  # the runs' folders are gone
