"""Expert parallelism (titan/parallel/expert_parallel.py) trains exactly like one process: the tiny Qwen3-MoE (8
experts, top-2; fp32, deterministic, gloo on CPU) with the auxiliary balance loss and the expert-bias update on
matches its single-process run within 1e-5 relative in loss, gradient norm and aux loss over 6 steps at EP=2, EP=4,
EP2 x FSDP2 (with full activation checkpointing), EP2 x HSDP (dp_replicate 2 x dp_shard 2), EP2 x TP2, EP2 x PP2
and EP2 x CP2, and ends with the same expert biases. Checkpoints reshard: EP4's step 3 resumed at EP2, and EP2's
step 3 resumed in one process, hold exactly the saved model and optimizer tensors and go on with the reference's
losses (1e-5). Bad EP degrees are one line naming the key and exit code 2 (the real CLI's subprocess run is in
tests/test_config.py, `ep_ranks`), and so is op-level selective AC with compile for MoE (torch 2.13).

Composition, checked by what the runs' `parallelize` made of the model (`_train` records it), not by timing:
- float8: EP2 with float8 matches the single-process float8 run within 1e-5 (3 steps; measured about 1e-7, where
  tests/test_float8.py's 10-step layouts allow 1e-4); the attention linears were Float8Linear, the routers' gates
  plain nn.Linear, the experts fp32.
- torch.compile: a compiled single-process run (3 steps) matches the eager reference within 1e-5; every block's
  attention and norms were compiled (fullgraph, no graph break), its MoE layer not.

DeepSeek-V3 and gpt-oss (tiny flavors, both kinds of balancing on; 4 steps) ride in the same two spawns, each against
its own single-process run within 1e-5: EP2 x FSDP2 with activation checkpointing, EP2 x TP2 (MLA's per-head
projections and gpt-oss's sinks split by head), EP2 x PP2, EP2 x CP2 (allgather: gpt-oss's windows and sinks over
the true positions), EP2 with float8 (against the float8 run; MLA's latents kept high precision), and for
DeepSeek-V3 also CP2 with the ring (MLA's value head size apart from the key's) and MTP under EP2 x HSDP; each
compiled in one process against its eager run; and Muon on each (DeepSeek-V3 at TP2, gpt-oss at EP2) against its own
single-process Muon run.

Two spawns, one per world size (4 ranks first: EP4 writes the checkpoint the 2-rank spawn resumes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_utils import REPO, TINY, max_rel_diff, read_metrics, spawn_torchrun_env_runs
from test_checkpoint import _check_resharded_load, _resume_folder

from titan.models.moe import moe_layers
from titan.train import main

TOL = 1e-5
TINY_MOE = str(REPO / "tests" / "configs" / "tiny_moe.toml")  # aux loss and bias update on
MOE = ["--moe.grouped_mm", "false"]  # the per-expert loop: torch._grouped_mm is ~20x slower at these shapes on CPU
STEPS = ["--training.steps", "6", "--validation.enable", "false"]
CKPT = ["--checkpoint.enable", "--checkpoint.interval", "3"]


F8 = ["--float8.enable", "--training.steps", "3"]
# Muon (titan/muon.py): each expert orthogonalised on its own, gathered over ep and efsdp; fp32 iteration.
MUON = ["--optimizer.name", "muon", "--optimizer.lr", "0.02", "--optimizer.adamw_lr", "3e-3",
        "--optimizer.muon_ns_dtype", "float32"]


def _ep(n: int) -> list[str]:
    return ["--parallelism.expert_parallel_degree", str(n)]


# name -> (world size, overrides). dp_shard fills what the other degrees leave; ep borrows from dp_shard x cp.
LAYOUTS = {
    "ep4": (4, _ep(4) + CKPT),
    "ep2_fsdp2": (4, _ep(2) + ["--activation_checkpoint.mode", "full"]),
    "ep2_hsdp2": (4, _ep(2) + ["--parallelism.data_parallel_replicate_degree", "2",
                               "--parallelism.data_parallel_shard_degree", "2"]),
    "ep2_tp2": (4, _ep(2) + ["--parallelism.tensor_parallel_degree", "2"]),
    "ep2_pp2": (4, _ep(2) + ["--parallelism.pipeline_parallel_degree", "2"]),
    "ep2": (2, _ep(2) + CKPT),
    "ep2_cp2": (2, _ep(2) + ["--parallelism.context_parallel_degree", "2"]),
    "ep2_float8": (2, _ep(2) + F8),
    "ep2_fsdp2_muon": (4, _ep(2) + MUON),
}
# The layouts compared to another single-process run than "reference" (its overrides, and the tolerance).
REFERENCES = {"ep2_float8": ("float8_reference", F8, TOL), "ep2_fsdp2_muon": ("muon_reference", MUON, TOL)}

# DeepSeek-V3 ("ds_": MLA, group-limited sigmoid routing, shared expert, a dense first layer; MTP where named) and
# gpt-oss ("go_": biases, sinks, sliding windows, biased clamped-SwiGLU experts) in the same spawns, 4 steps each,
# against their own single-process runs: every axis at least once (MLA's heads and the sinks split by TP, the window
# and sinks across CP shards, MLA's value head size in the ring).
FAMILIES = {"ds": str(REPO / "tests" / "configs" / "tiny_deepseek_v3.toml"),
            "go": str(REPO / "tests" / "configs" / "tiny_gpt_oss.toml")}
FAMILY_STEPS = ["--training.steps", "4"]
MTP = ["--model.mtp_layers", "1"]
for fam in FAMILIES:
    LAYOUTS.update({
        f"{fam}_ep2_fsdp2_ac": (4, _ep(2) + ["--activation_checkpoint.mode", "full" if fam == "ds" else "selective"]),
        f"{fam}_ep2_tp2": (4, _ep(2) + ["--parallelism.tensor_parallel_degree", "2"]),
        f"{fam}_ep2_pp2": (4, _ep(2) + ["--parallelism.pipeline_parallel_degree", "2"]),
        f"{fam}_ep2_cp2": (2, _ep(2) + ["--parallelism.context_parallel_degree", "2"]),
        f"{fam}_ep2_float8": (2, _ep(2) + F8),
    })
    REFERENCES.update({n: (f"{fam}_reference", [], TOL) for n in LAYOUTS if n.startswith(fam)})
    REFERENCES[f"{fam}_ep2_float8"] = (f"{fam}_float8_reference", F8, TOL)
LAYOUTS.update({"ds_mtp_ep2_hsdp2": (4, MTP + _ep(2) + ["--parallelism.data_parallel_replicate_degree", "2",
                                                          "--parallelism.data_parallel_shard_degree", "2"]),
                "ds_cp2_ring": (2, ["--parallelism.context_parallel_degree", "2",
                                    "--parallelism.context_parallel_rotate_method", "ring"])})
REFERENCES.update({"ds_mtp_ep2_hsdp2": ("ds_mtp_reference", MTP, TOL), "ds_cp2_ring": ("ds_reference", [], TOL)})
# Muon on the new families' parameters (titan/muon.py:is_hidden_matrix): MLA's per-head projections split by TP and
# its latent projections replicated, each orthogonalised whole; gpt-oss's stacked experts split by EP, one matrix per
# expert, while its stacked expert biases and sinks take AdamW.
LAYOUTS.update({"ds_tp2_muon": (2, MUON + ["--parallelism.tensor_parallel_degree", "2"]),
                "go_ep2_muon": (2, MUON + _ep(2))})
REFERENCES.update({"ds_tp2_muon": ("ds_muon_reference", MUON, TOL), "go_ep2_muon": ("go_muon_reference", MUON, TOL)})


def _argv(folder, extra=()) -> list[str]:
    family = FAMILIES.get(Path(folder).name[:2]) if Path(folder).name[2:3] == "_" else None
    steps = [*STEPS, *FAMILY_STEPS] if family else STEPS  # the later value of a key wins
    return ["--config", family or TINY_MOE, "--job.dump_folder", str(folder), *MOE, *steps, *extra]


def _train(argv: list[str], rank: int = 0) -> None:
    """A training run (`main`) that also writes what `parallelize` made of this rank's model to
    <dump folder>/modules.<rank>.json: the names of its float8 linears, plain linears and compiled modules, and
    the dtypes of its experts' weights."""
    from torchao.float8.float8_linear import Float8Linear

    import titan.build

    real, seen = titan.build.parallelize, {"float8": [], "linear": [], "compiled": [], "experts": []}

    def parallelize(part, *args, **kwargs):
        real(part, *args, **kwargs)
        for name, m in part.named_modules():
            name = name.replace("._checkpoint_wrapped_module", "")
            if isinstance(m, torch.nn.Linear):
                seen["float8" if isinstance(m, Float8Linear) else "linear"].append(name)
            if getattr(m, "_compiled_call_impl", None) is not None:
                seen["compiled"].append(name)
            if name.endswith("experts"):
                seen["experts"].append(str(m.w1.dtype))

    titan.build.parallelize = parallelize
    try:
        assert main(argv) == 0
    finally:
        titan.build.parallelize = real
    folder = Path(argv[argv.index("--job.dump_folder") + 1])
    (folder / f"modules.{rank}.json").write_text(json.dumps(seen))


def _modules(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"modules.{rank}.json").read_text())


def _run(rank, world_size, kind, *args):
    """One run of a spawn: a training run (`_train`), or a resharded resume checked against its saved state."""
    if kind == "train":
        _train(args[0], rank)
    else:
        _check_resharded_load(rank, world_size, *args)


def _resume(root: Path, src: str, name: str, extra: list[str]) -> tuple:
    """A resume at another layout of `src`'s step 3: (argv, the saved state as one torch.save file, report path)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = _resume_folder(root / src, root / name, step=3)
    dcp_to_torch_save(folder / "checkpoint" / "step-3", root / f"{name}.pt")
    return _argv(folder, extra + CKPT), str(root / f"{name}.pt"), str(root / f"{name}_report.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    for world in (4, 2):
        jobs = [("train", _argv(root / n, extra)) for n, (w, extra) in LAYOUTS.items() if w == world]
        if world == 2:
            jobs.append(("resume", *_resume(root, "ep4", "ep4_to_ep2", _ep(2))))
        spawn_torchrun_env_runs(_run, world, jobs)
    _train(_argv(root / "reference"))
    for name, extra in {name: extra for name, extra, _ in REFERENCES.values()}.items():
        _train(_argv(root / name, extra))
    from torch._dynamo.utils import counters

    for name in ("compiled", "ds_compiled", "go_compiled"):
        counters.clear()
        _train(_argv(root / name, ["--compile.enable", "--compile.components", "model", "--training.steps", "3"]))
        (root / f"{name}.dynamo_counters.json").write_text(json.dumps({k: dict(v) for k, v in counters.items()}))
    _check_resharded_load(0, 1, *_resume(root, "ep2", "ep2_to_1", []))
    return root


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(runs, layout):
    reference, _, tol = REFERENCES.get(layout, ("reference", [], TOL))
    ref, got = read_metrics(runs / reference), read_metrics(runs / layout)
    assert [r["step"] for r in got] == [r["step"] for r in ref] and len(got) >= 3
    for key in ("loss", "grad_norm", "aux_loss", "mtp_loss"):
        if key in ref[0] or key in got[0]:
            assert max_rel_diff([r[key] for r in got], [r[key] for r in ref]) < tol, key


@pytest.mark.parametrize("family, dense", [("ds", {"layers.0"}), ("go", set())])
def test_compiled_new_families_match_eager(runs, family, dense):
    """DeepSeek-V3's MLA blocks and gpt-oss's sink/window attention compile (fullgraph, no graph break) around the
    eager MoE layers; the dense first layer of DeepSeek-V3 compiles whole; 3 steps as the eager run's."""
    modules = _modules(runs / f"{family}_compiled")
    counters = json.loads((runs / f"{family}_compiled.dynamo_counters.json").read_text())
    parts = {f"layers.{i}.{p}" for i in range(4) for p in ("attention_norm", "attention", "ffn_norm")
             if f"layers.{i}" not in dense}
    assert set(modules["compiled"]) == parts | dense and not counters.get("graph_break")
    ref, got = read_metrics(runs / f"{family}_reference")[:3], read_metrics(runs / f"{family}_compiled")
    for key in ("loss", "grad_norm", "aux_loss"):
        assert max_rel_diff([r[key] for r in got], [r[key] for r in ref]) < TOL, key


def test_float8_keeps_mla_latents_and_routers_high_precision(runs):
    """DeepSeek-V3 under float8 (EP2 and one process): the per-head projections are Float8Linear, the latent
    down-projections (wq_a, wkv_a), the routers and the output stay nn.Linear."""
    for modules in (_modules(runs / "ds_ep2_float8", 0), _modules(runs / "ds_float8_reference")):
        kept = set(modules["linear"])
        assert {f"layers.{i}.attention.{n}" for i in range(4) for n in ("wq_a", "wkv_a")} <= kept
        assert {f"layers.{i}.feed_forward.router.gate" for i in range(1, 4)} <= kept
        assert {f"layers.{i}.attention.{n}" for i in range(4) for n in ("wq_b", "wkv_b", "wo")} <= \
            set(modules["float8"])


def test_float8_converts_attention_and_keeps_experts_and_routers_high_precision(runs):
    """By mechanism: what float8 made of the modules on every rank of the EP2 run and in one process; and its
    arithmetic really differs from the fp32 run's."""
    for modules in (_modules(runs / "ep2_float8", 0), _modules(runs / "ep2_float8", 1),
                    _modules(runs / "float8_reference")):
        attention = [n for n in modules["float8"] if ".attention.w" in n]
        assert len(attention) == 4 * 4 and set(modules["float8"]) == set(attention)  # 4 layers x wq wk wv wo
        assert {n for n in modules["linear"] if n.endswith("router.gate")} == {f"layers.{i}.feed_forward.router.gate"
                                                                               for i in range(4)}
        assert modules["experts"] == ["torch.float32"] * 4
    assert _modules(runs / "reference")["float8"] == []
    fp32, f8 = read_metrics(runs / "reference")[:3], read_metrics(runs / "float8_reference")
    assert 1e-6 < max_rel_diff([r["loss"] for r in f8], [r["loss"] for r in fp32]) < 0.01


def test_debug_flavor_router_is_not_float8():
    """The tiny flavor's gates (8 experts) are too narrow to convert anyway; debugmodel's (16) would be."""
    from titan import models
    from titan.config import Float8
    from titan.parallel import float8

    with torch.device("meta"):
        model = models.build_model(models.model_args("qwen3_moe", "debugmodel"))
    float8.convert(model, Float8(enable=True), fsdp_enabled=False, device_type="cpu")
    assert all(type(m.router.gate) is torch.nn.Linear for _, m in moe_layers([model]))
    assert type(model.layers["0"].attention.wq) is not torch.nn.Linear


def test_compiled_moe_run_matches_eager(runs):
    """Blocks with an MoE layer compile their attention and norms (fullgraph: no graph break), the MoE layer runs
    eagerly; the first 3 steps are those of the eager reference within 1e-5."""
    modules, counters = _modules(runs / "compiled"), json.loads((runs / "compiled.dynamo_counters.json").read_text())
    parts = {f"layers.{i}.{p}" for i in range(4) for p in ("attention_norm", "attention", "ffn_norm")}
    assert set(modules["compiled"]) == parts
    assert counters["stats"]["unique_graphs"] >= 2 and not counters.get("graph_break")
    ref, got = read_metrics(runs / "reference")[:3], read_metrics(runs / "compiled")
    assert [r["step"] for r in got] == [1, 2, 3]
    for key in ("loss", "grad_norm", "aux_loss"):
        assert max_rel_diff([r[key] for r in got], [r[key] for r in ref]) < TOL, key


def test_compile_blocks_keeps_only_moe_layers_eager():
    """A dense block (mlp_only_layers) compiles whole, inside activation checkpointing's wrapper too; an MoE block
    all but its MoE layer (module.compile is lazy: nothing is compiled here)."""
    import dataclasses

    from titan import models
    from titan.parallel.activation_checkpoint import apply_ac
    from titan.parallel.parallelize import compile_blocks

    args = dataclasses.replace(models.model_args("qwen3_moe", "tiny"), mlp_only_layers=(1,))
    with torch.device("meta"):
        model = models.build_model(args)
    apply_ac(model, "full", "op")
    compile_blocks(model, fullgraph=True)
    compiled = {n.replace("._checkpoint_wrapped_module", "") for n, m in model.named_modules()
                if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == {"layers.1"} | {f"layers.{i}.{p}" for i in (0, 2, 3)
                                       for p in ("attention_norm", "attention", "ffn_norm")}


def test_reference_balances_and_learns(runs):
    """Guards against a vacuous comparison: the bias update moved the biases, and the loss went down (over 6 steps
    of shuffled windows the last step's loss is noisier than that: the lowest one)."""
    state = torch.load(runs / "ep2_to_1.pt", weights_only=False)["model"]
    biases = [v for k, v in state.items() if k.endswith("expert_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    losses = [r["loss"] for r in read_metrics(runs / "reference")]
    assert min(losses[1:]) < losses[0] - 0.05


@pytest.mark.parametrize("name, world", [("ep4_to_ep2", 2), ("ep2_to_1", 1)])
def test_resume_at_another_ep_degree(runs, name, world):
    reports = [json.loads(Path(f"{runs / name}_report.json.{r}").read_text()) for r in range(world)]
    state = torch.load(runs / f"{name}.pt", weights_only=False)
    assert all(r["step"] == 3 and r["mismatched"] == [] for r in reports)
    # Together the ranks hold every saved tensor, the experts' and their optimizer state among them.
    assert set().union(*(r["model"] for r in reports)) == set(state["model"])
    assert set().union(*(r["optim"] for r in reports)) == set(state["optimizer"]["state"])
    assert any("experts.w1" in k for k in state["optimizer"]["state"])
    ref, got = read_metrics(runs / "reference"), read_metrics(runs / name)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert max_rel_diff([r["loss"] for r in got[3:]], [r["loss"] for r in ref[3:]]) < TOL


@pytest.mark.parametrize("extra, world, needle", [
    (["--config", TINY, "--parallelism.expert_parallel_degree", "2"], 2,
     "parallelism.expert_parallel_degree=2 needs a Mixture-of-Experts family"),
    (["--config", TINY_MOE, "--parallelism.expert_parallel_degree", "3", "--training.global_batch_size", "6"], 3,
     "parallelism.expert_parallel_degree=3 does not divide the number of experts (8)"),
    (["--config", TINY_MOE, "--parallelism.expert_parallel_degree", "4", "--parallelism.tensor_parallel_degree", "2"],
     4, "parallelism.expert_parallel_degree=4 does not divide the ranks it borrows"),
    (["--config", TINY_MOE, "--compile.enable", "--activation_checkpoint.mode", "selective"], 1,
     "activation_checkpoint.selective_ac_option = op with compile.enable does not work for the Mixture-of-Experts"),
])
def test_bad_moe_config_is_one_line(capsys, extra, world, needle):
    capsys.readouterr()
    assert main(["--check", "--world_size", str(world), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"titan: error: {needle}"), err
