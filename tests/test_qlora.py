"""QLoRA (lora.quantize_base = "nf4"): on the debug model, every adapted linear's base weight is torchao's NF4
round trip of the weight it replaces, it stays bitwise the same through training, gradients reach only the adapters,
the log states the base weights' bytes, and the loss tracks the unquantized LoRA run's. On the tiny model:
checkpoints hold the adapters only, the Hugging Face export is the dequantized base plus the merged adapters, a
resumed run continues exactly, and generate.py reads both. FSDP=2 and PP=2 against one process: tests/test_finetune.py.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil

import pytest
import torch
import torch.distributed as dist
from dist_utils import REPO, read_metrics, rel_error

from titan import config_io, hf
from titan.build import build
from titan.models import lora
from titan.train import main, train

DEBUG_SFT = str(REPO / "train_configs" / "debug_sft.toml")
TINY_SFT = str(REPO / "tests" / "configs" / "tiny_sft.toml")
SCALER = 16  # NF4 scale blocks of 64 x 16 weights: the tiny model's shapes need it (the debug model's fit 256)
# 20 short steps of the debug model, fp32, at an lr where LoRA trains smoothly.
DEBUG = ["--config", DEBUG_SFT, "--training.steps", "20", "--training.seq_len", "64", "--training.local_batch_size",
         "2", "--validation.enable", "false", "--training.deterministic", "--metrics.log_freq", "1",
         "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "2", "--lora.enable",
         "--optimizer.lr", "3e-3"]
TRACKING = 0.02  # QLoRA's per-step loss within 2% of LoRA's (measured: 0.5% at lr 3e-3, 1% at 5e-3)


def adapted(run) -> dict[str, lora.LoRALinear]:
    return {name: m for name, m in run.model_parts[0].named_modules() if isinstance(m, lora.LoRALinear)}


def codes(weight) -> dict[str, torch.Tensor]:
    """The tensors an NF4 weight is made of (codes, scales, scale factors, lookup table)."""
    return {name: getattr(weight, name).clone() for name in weight.__tensor_flatten__()[0]}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_in_process(argv: list[str], inspect=None):
    """titan.train's build + train in this process, calling `inspect(run)` between them; returns (its result, the
    log lines)."""
    logger, handler = logging.getLogger("titan"), Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run = build(config_io.load(argv))
        seen = inspect(run) if inspect else None
        train(run)
        run.checkpointer.close()
        run.metrics.close()
        return run, seen, handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def debug_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/conftest.py's one_thread: a shared 2-core machine runs 8x slower with 2
    try:
        return _debug_runs(root)
    finally:
        torch.set_num_threads(threads)


def _debug_runs(root):
    def originals(run):
        return {name: m.weight.detach().clone() for name, m in adapted(run).items()}

    _, weights, lora_log = run_in_process(DEBUG + ["--job.dump_folder", str(root / "lora")], originals)

    def before_training(run):
        model = run.model_parts[0]
        state = {"codes": {name: codes(m.weight) for name, m in adapted(run).items()},
                 "dequantized": {name: lora.dequantize(m.weight) for name, m in adapted(run).items()},
                 "adapters": {n: p.detach().clone() for n, p in model.named_parameters() if lora.is_adapter(n)}}
        # One forward and backward as the loop does it: which parameters get a gradient? (The loader is put back:
        # the run then trains on the same batches as the LoRA run.)
        position = run.train_loader.state_dict()
        batch = next(iter(run.train_loader))
        run.train_loader.load_state_dict(position)
        (run.objective(model, batch) / run.objective.count(batch)).backward()
        state["with_grad"] = {n for n, p in model.named_parameters() if p.grad is not None}
        run.optimizer.zero_grad(set_to_none=True)
        state["weight_bytes"] = sum(lora.nbytes(m.weight) for m in adapted(run).values())
        return state

    run, before, qlora_log = run_in_process(DEBUG + ["--job.dump_folder", str(root / "qlora"), "--lora.quantize_base",
                                                     "nf4"], before_training)
    after = {"codes": {name: codes(m.weight) for name, m in adapted(run).items()},
             "adapters": {n: p.detach().clone() for n, p in run.model_parts[0].named_parameters()
                          if lora.is_adapter(n)}}
    return {"root": root, "weights": weights, "before": before, "after": after, "lora_log": lora_log,
            "qlora_log": qlora_log, "params": dict(run.model_parts[0].named_parameters())}


def test_nf4_base_is_torchaos_round_trip_of_the_original(debug_runs):
    weights, before = debug_runs["weights"], debug_runs["before"]
    assert len(weights) == 6 * 7  # every linear of every block
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    for name, w in weights.items():
        ours = before["codes"][name]
        theirs = to_nf4(w, block_size=64, scaler_block_size=256)  # torchao's own, of the original fp32 weight
        assert all(torch.equal(ours[k], v) for k, v in codes(theirs).items()), name
        assert torch.equal(before["dequantized"][name], theirs.get_original_weight()), name
        assert before["dequantized"][name].dtype == torch.float32
        assert 0 < rel_error(before["dequantized"][name], w) < 0.2  # rounded, by about NF4's step


def test_base_never_changes_and_only_adapters_get_gradients(debug_runs):
    before, after, params = debug_runs["before"], debug_runs["after"], debug_runs["params"]
    assert before["with_grad"] == {n for n in params if lora.is_adapter(n)}
    assert all(not p.requires_grad for n, p in params.items() if not lora.is_adapter(n))
    for name, parts in before["codes"].items():
        assert all(torch.equal(parts[k], after["codes"][name][k]) for k in parts), name  # bitwise, after 20 steps
    changed = [n for n, a in before["adapters"].items() if not torch.equal(a, after["adapters"][n])]
    assert len(changed) == len(before["adapters"])  # every adapter trained


def test_log_states_the_base_weight_bytes(debug_runs):
    line = next(x for x in debug_runs["qlora_log"] if "quantize_base=nf4" in x)
    n_weights = sum(w.numel() for w in debug_runs["weights"].values())
    nf4_mib, fp32_mib = debug_runs["before"]["weight_bytes"] / 2**20, 4 * n_weights / 2**20
    assert "42 base weights quantized" in line and f"take {nf4_mib:,.2f} MiB" in line, line
    assert f"instead of {fp32_mib:,.2f} MiB" in line, line
    assert 7.5 < fp32_mib / nf4_mib < 8  # 4 bits per weight plus the scales: about 0.52 bytes instead of 4
    lora_total, qlora_total = (float(next(x for x in debug_runs[k] if "all weights take" in x).split(
        "all weights take ")[1].split(" MiB")[0].replace(",", "")) for k in ("lora_log", "qlora_log"))
    assert abs((lora_total - qlora_total) - (fp32_mib - nf4_mib)) < 0.02


def test_qlora_loss_tracks_lora(debug_runs):
    ref, got = (read_metrics(debug_runs["root"] / k) for k in ("lora", "qlora"))
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 21))
    diffs = [abs(g["loss"] - r["loss"]) / r["loss"] for g, r in zip(got, ref)]
    assert max(diffs) < TRACKING, diffs
    assert got[0]["loss"] != ref[0]["loss"]  # the base really is rounded
    assert got[-1]["loss"] < got[0]["loss"] - 3 and ref[-1]["loss"] < ref[0]["loss"] - 3


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, export, resume and generation (tiny model)


def _dcp_model(path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / (path.name + ".pt")
    dcp_to_torch_save(str(path), str(out))
    return {k.removeprefix("model."): v for k, v in torch.load(out)["model"].items()}


def test_qlora_checkpoints_hold_adapters_export_merges_and_resume_is_exact(tmp_path, capsys, one_thread):
    def argv(folder, *extra):
        return ["--config", TINY_SFT, "--job.dump_folder", str(tmp_path / folder), "--validation.enable", "false",
                *extra]

    assert main(argv("seed", "--checkpoint.create_seed_checkpoint")) == 0
    seed = tmp_path / "seed" / "checkpoint" / "step-0"
    run = ["--lora.enable", "--optimizer.lr", "1e-2", "--lora.quantize_base", "nf4", "--lora.nf4_scaler_block_size",
           str(SCALER), "--checkpoint.enable", "--checkpoint.interval", "3", "--checkpoint.initial_load_path",
           str(seed), "--checkpoint.last_save_in_hf"]
    assert main(argv("q", *run)) == 0
    assert "the merged model carries NF4's rounding" in capsys.readouterr().out  # the log, on stdout
    ckpt = tmp_path / "q" / "checkpoint"
    trained = _dcp_model(ckpt / "step-6")
    assert trained and all(lora.is_adapter(k) for k in trained)  # adapters only: the base is the seed's

    # The export: torchao's NF4 round trip of the seed weight plus (alpha / rank) B A.
    base = _dcp_model(seed)
    exported = hf.from_hf(hf.read_safetensors(ckpt / "step-6-hf"), hf.load(ckpt / "step-6-hf")[0])
    for name in ("layers.0.attention.wq", "layers.2.attention.wk", "layers.3.feed_forward.w2"):
        dense = lora.to_nf4(base[f"{name}.weight"], SCALER).get_original_weight()
        expected = dense + 2.0 * trained[f"{name}.lora_b"] @ trained[f"{name}.lora_a"]
        assert rel_error(exported[f"{name}.weight"], expected) < 1e-6, name
        assert rel_error(exported[f"{name}.weight"], base[f"{name}.weight"]) > 1e-3  # not the unrounded base
    assert torch.equal(exported["tok_embeddings.weight"], base["tok_embeddings.weight"])  # not quantized

    # generate.py from the checkpoint (seed base quantized again + adapters) and from the merged export agree.
    spec = importlib.util.spec_from_file_location("generate", REPO / "scripts" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    replies = []
    for source in (["--checkpoint", str(ckpt / "step-6")], ["--hf", str(ckpt / "step-6-hf")]):
        assert generate.main([*source, "--chat", "--prompt", "What is 2 + 3?", "--max_new_tokens", "8"]) == 0
        replies.append(capsys.readouterr())
    assert "base weights quantized as in training" in replies[0].err
    # The completion is stdout's last line (titan's logger, set up by main above, prints there too).
    texts = [r.out.strip().splitlines()[-1] for r in replies]
    assert texts[0] == texts[1] and texts[0].strip(), replies

    # Resume from step 3: the base is read from the seed and quantized again, then the adapters: exactly the same.
    full = read_metrics(tmp_path / "q")
    shutil.rmtree(ckpt / "step-6")
    assert main(argv("q", *run)) == 0
    resumed = read_metrics(tmp_path / "q")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    assert [r["loss"] for r in resumed[6:]] == [r["loss"] for r in full[3:]]
