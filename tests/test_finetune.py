"""Fine-tuning recipes end to end on the tiny model (fp32, deterministic): LoRA freezes the base and its export
merges the adapters; SFT, LoRA, QLoRA, preference, GRPO (full, LoRA with a KL term, QLoRA, compiled with activation
checkpointing) and KTO runs on FSDP=2 (and TP=2, PP=2 where they apply) match their single-process runs within 1e-5,
GRPO from the same rollouts; every preference loss starts where its formula says and its reward accuracy rises;
SimPO and ORPO build no reference model; adapter-only checkpoints resume exactly; malformed SFT records of every
format exit 2 naming file and line.

The data-level checks (templates, record formats, loss masking, packing) and the loss formulas are in
tests/test_chat.py; QLoRA's own checks in tests/test_qlora.py.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from dist_utils import REPO, max_rel_diff, read_metrics, rel_error, run_layouts
from torch import nn

import titan.build
import titan.train
from titan import config_io, hf, peft
from titan.build import build
from titan.config import LoRA
from titan.errors import ConfigError
from titan.models import lora
from titan.models.llama import Transformer, model_args
from titan.objectives import preference_loss, sequence_logps
from titan.train import main

TINY_SFT = str(REPO / "tests" / "configs" / "tiny_sft.toml")
TOL = 1e-5
LORA = ["--lora.enable", "--optimizer.lr", "1e-2"]
DPO = ["--training.recipe", "dpo", "--training.dataset", "tiny_preferences", "--validation.enable", "false",
       "--training.global_batch_size", "4", "--training.steps", "10", "--dpo.beta", "0.5"]
# GRPO: 2 prompts x 4 completions per step (1 prompt per rank on FSDP=2), each prompt's group generated in a call of
# its own, so every layout generates the same rollouts; 2 steps per rollout (the old log-probabilities, the clip). A
# length penalty makes every completion's reward differ, so that no step's advantages are all 0.
GRPO = ["--training.recipe", "grpo", "--training.dataset", "tiny_arithmetic", "--validation.enable", "false",
        "--grpo.num_generations", "4", "--grpo.generation_batch_size", "4", "--grpo.max_completion_length", "6",
        "--grpo.reward_functions", "titan.rewards:format_regex,rl_rewards:length_penalty", "--grpo.num_iterations",
        "2", "--grpo.epsilon_high", "0.28", "--optimizer.lr", "3e-3"]
KTO = ["--training.recipe", "kto", "--training.dataset", "tiny_feedback", "--validation.enable", "false",
       "--kto.beta", "0.5"]
# 2 rows x 64 tokens per micro-batch: chunks of 20 tokens a row; fused where it can be, else recomputed
CHUNKED = ["--training.loss_chunk_tokens", "40", "--training.loss_chunk_recompute", "true"]
# The tiny model's weights (64 x 64, 32 x 64, ...) split into whole NF4 scale blocks of 64 x 16 on 2 FSDP ranks.
QLORA = ["--lora.quantize_base", "nf4", "--lora.nf4_scaler_block_size", "16"]


def _error_line(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("titan: error: "), err
    return err[0]


def _argv(folder, *extra):
    return ["--config", TINY_SFT, "--job.dump_folder", str(folder), *extra]


# ---------------------------------------------------------------------------------------------------------------
# LoRA as a model transform


def _tiny(seed=0, **cfg):
    torch.manual_seed(seed)
    model = Transformer(model_args("tiny", vocab_size=128, max_seq_len=16))
    model.init_weights()
    return model


def test_apply_lora_swaps_targets_and_freezes_the_base():
    model = _tiny()
    lora.apply_lora(model, LoRA(enable=True, rank=4, target_modules=["wq", "wv", "w2"]))
    block = model.layers["0"]
    assert type(block.attention.wq) is lora.LoRALinear and type(block.attention.wv) is lora.LoRALinear
    assert type(block.attention.wk) is nn.Linear and type(block.feed_forward.w1) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_adapter(n) for n in trainable)
    assert len(trainable) == 2 * 3 * len(model.layers)
    assert block.attention.wq.lora_a.shape == (4, 64) and block.feed_forward.w2.lora_b.shape == (64, 4)


@pytest.mark.parametrize("cfg, key", [
    (LoRA(target_modules=["wq", "attn"]), "lora.target_modules"),
    (LoRA(rank=0), "lora.rank"),
    (LoRA(dropout=1.0), "lora.dropout"),
])
def test_bad_lora_settings_name_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        lora.apply_lora(_tiny(), cfg)


def test_lora_on_a_tied_output_is_refused():
    with torch.device("meta"):
        model = Transformer(model_args("smollm2-135m"))
    with pytest.raises(ConfigError, match="tied"):
        lora.apply_lora(model, LoRA(target_modules=["wq", "output"]))


def test_fresh_adapters_change_nothing_and_merge_is_exact():
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model = _tiny()
    base_logits = model(tokens)
    lora.apply_lora(model, LoRA(rank=4, alpha=8.0, target_modules=list(lora.TARGETS)))
    lora.init_adapters(model)
    assert torch.equal(model(tokens), base_logits)  # B = 0: the adapted model is the base model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_b.normal_(std=0.1)
    adapted = model(tokens)
    with lora.disabled([model]):
        assert torch.equal(model(tokens), base_logits)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = lora.merge(state, scale=8.0 / 4)
    assert not any(lora.is_adapter(k) for k in merged)
    w = "layers.1.feed_forward.w3"
    expected = state[f"{w}.weight"] + 2.0 * state[f"{w}.lora_b"] @ state[f"{w}.lora_a"]
    assert torch.equal(merged[f"{w}.weight"], expected)
    plain = _tiny()
    plain.load_state_dict(merged)
    assert rel_error(plain(tokens), adapted) < TOL


# ---------------------------------------------------------------------------------------------------------------
# Every recipe on FSDP=2 (and TP=2) against its single-process run

RUNS = {  # name -> (overrides, layouts compared with the single-process run)
    "sft_packed": ([], ["fsdp2", "tp2", "pp2", "cp2", "cp2_ring"]),  # cp2 x tp2: tests/test_parallel.py
    "sft_lora": (LORA, ["fsdp2", "tp2"]),
    "sft_lora_chunked": (LORA + CHUNKED + ["--lora.target_modules", "wq,wv,output"], ["fsdp2"]),
    "sft_qlora_chunked": (LORA + QLORA + CHUNKED + ["--sft.packing", "false"], []),
    "dpo_lora": (DPO + LORA, ["fsdp2", "tp2"]),
    "dpo_lora_chunked": (DPO + LORA + CHUNKED, []),
    "dpo_frozen_reference": (DPO, ["fsdp2"]),
    "sft_qlora": (LORA + QLORA + ["--sft.packing", "false"], ["fsdp2", "pp2"]),
    "dpo_ipo": (DPO + LORA + ["--dpo.loss", "ipo"], []),
    "dpo_simpo": (DPO + ["--dpo.loss", "simpo", "--dpo.beta", "2.0"], []),  # reference-free, full weights
    # ORPO's NLL is pooled over the global batch's tokens (TRL's convention): the count spans ranks.
    "dpo_orpo": (DPO + ["--dpo.loss", "orpo", "--dpo.orpo_lambda", "1.0"], ["fsdp2"]),
    # The reference's log-probabilities computed before training: the same run as dpo_frozen_reference.
    "dpo_precomputed": (DPO + ["--dpo.precompute_reference"], ["fsdp2"]),
    "grpo": (GRPO, ["fsdp2", "tp2"]),
    "grpo_lora_kl": (GRPO + LORA + ["--grpo.beta", "0.1", "--grpo.loss_type", "grpo"], ["fsdp2"]),
    "kto_lora": (KTO + LORA, ["fsdp2", "tp2"]),
    "grpo_qlora": (GRPO + LORA + QLORA, ["fsdp2"]),  # the sampler gathers and dequantizes NF4 shards
    "grpo_compiled_ac": (GRPO + ["--compile.enable", "--activation_checkpoint.mode", "full"], ["fsdp2"]),
}
RL = ("dpo", "grpo", "kto")  # losses of these recipes get small: compared at the run's scale
PREFERENCE_RUNS = {"dpo_lora": "sigmoid", "dpo_frozen_reference": "sigmoid", "dpo_ipo": "ipo", "dpo_simpo": "simpo",
                   "dpo_orpo": "orpo", "dpo_precomputed": "sigmoid"}
LAYOUT_ARGS = {"fsdp2": [], "tp2": ["--parallelism.tensor_parallel_degree", "2"],
               "pp2": ["--parallelism.pipeline_parallel_degree", "2"],
               "cp2": ["--parallelism.context_parallel_degree", "2"],
               "cp2_ring": ["--parallelism.context_parallel_degree", "2",
                            "--parallelism.context_parallel_rotate_method", "ring"]}
# Each chunked run against the same run unchunked (single process): loss and gradient norm within 1e-6 relative.
CHUNKED_PAIRS = {"dpo_lora_chunked": "dpo_lora", "sft_qlora_chunked": "sft_qlora"}
CHUNK_TOL = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_thread: on a busy 2-core machine 2 threads run ~8x slower
    try:
        for name, (extra, _) in RUNS.items():
            assert main(_argv(root / name, *extra)) == 0
    finally:
        torch.set_num_threads(threads)
    run_layouts(2, [_argv(root / f"{name}_{layout}", *extra, *LAYOUT_ARGS[layout])  # one spawn
                    for name, (extra, layouts) in RUNS.items() for layout in layouts])
    return root


@pytest.mark.parametrize("name, layout", [(n, lay) for n, (_, layouts) in RUNS.items() for lay in layouts])
def test_recipe_layout_matches_single_process(runs, name, layout):
    ref, got = read_metrics(runs / name, validation=True), read_metrics(runs / f"{name}_{layout}", validation=True)
    train_ref, train_got = [r for r in ref if "loss" in r], [r for r in got if "loss" in r]
    assert [r["step"] for r in train_got] == [r["step"] for r in train_ref] and len(train_got) >= 6
    got_norms, ref_norms = [r["grad_norm"] for r in train_got], [r["grad_norm"] for r in train_ref]
    if name.startswith(RL):
        # DPO's gradient shrinks as the margins grow (0.012 at step 6 against 0.1-0.4 before it, dpo_lora), GRPO's
        # vanishes in a step whose groups got equal rewards: another layout's summation order leaves errors of the
        # size of the run's gradients, so compare at that scale.
        assert max(abs(a - b) for a, b in zip(got_norms, ref_norms)) < TOL * max(ref_norms)
    else:
        assert max_rel_diff(got_norms, ref_norms) < TOL
    if name.startswith(RL):
        # Late in a DPO run a pair's loss -log sigmoid(m) ~ e^-m is tiny (0.0016 at m = 6.5), and its relative error
        # is the margin's absolute error; GRPO's loss sums advantages of both signs to about 0: compare relatively
        # above 1, absolutely below (the margins are checked next).
        assert all(abs(a["loss"] - b["loss"]) < TOL * max(1.0, abs(b["loss"])) for a, b in zip(train_got, train_ref))
    else:
        assert max_rel_diff([r["loss"] for r in train_got], [r["loss"] for r in train_ref]) < TOL
    if name.startswith("dpo"):
        # A margin is a difference of differences of summed log-probabilities (~ -50 each): relative above 1.
        margins = [(r["reward_margin"], q["reward_margin"]) for r, q in zip(train_got, train_ref)]
        assert all(abs(a - b) < TOL * max(1.0, abs(b)) for a, b in margins), margins  # absolute below 1
        assert [r["reward_accuracy"] for r in train_got] == [r["reward_accuracy"] for r in train_ref]
    if name.startswith("grpo"):  # the same rollouts (sampled per prompt, whatever the layout), then the same step
        for key in ("reward", "reward_std", "completion_length", "completion_length_max"):
            assert [r[key] for r in train_got] == [r[key] for r in train_ref], key
        assert all(abs(a["entropy"] - b["entropy"]) < TOL * b["entropy"] for a, b in zip(train_got, train_ref))
        assert all(abs(a[k] - b[k]) < 1e-9 for a, b in zip(train_got, train_ref) for k in ("clip_ratio_low",
                                                                                           "clip_ratio_high"))
    val_ref, val_got = [r["val_loss"] for r in ref if "val_loss" in r], [r["val_loss"] for r in got if "val_loss" in r]
    assert len(val_got) == len(val_ref)
    if layout != "fsdp2" and val_got:  # dp == 1: the same validation batches as the reference
        assert max_rel_diff(val_got, val_ref) < TOL


def test_grpo_compiled_with_activation_checkpointing_trains_as_eager(runs):
    """compile + full AC change how the training model runs, not what it computes: the same rollouts (generated
    eagerly on the CPU) and the same steps as the eager run, within 1e-5."""
    eager, compiled = read_metrics(runs / "grpo"), read_metrics(runs / "grpo_compiled_ac")
    assert [r["reward"] for r in compiled] == [r["reward"] for r in eager] and len(eager) == 6
    norms = [r["grad_norm"] for r in eager]
    assert max(abs(a["grad_norm"] - b) for a, b in zip(compiled, norms)) < TOL * max(norms)
    assert all(abs(a["loss"] - b["loss"]) < TOL * max(1.0, abs(b["loss"])) for a, b in zip(compiled, eager))


@pytest.mark.parametrize("chunked, plain", list(CHUNKED_PAIRS.items()))
def test_chunked_loss_equals_the_whole_logits_loss(runs, chunked, plain):
    """DPO's per-sequence log-probabilities and QLoRA's NF4 base through the chunked loss: at step 1 (the same
    weights and data) loss and gradient norm within 1e-6 relative; later steps as the layouts compare (their
    rounding grows with training: DPO's late losses are ~1e-3, compared absolutely)."""
    got, ref = read_metrics(runs / chunked), read_metrics(runs / plain)
    for key in ("loss", "grad_norm"):
        assert abs(got[0][key] - ref[0][key]) < CHUNK_TOL * abs(ref[0][key]), key
    assert all(abs(a["loss"] - b["loss"]) < TOL * max(1.0, abs(b["loss"])) for a, b in zip(got, ref))
    norms = [r["grad_norm"] for r in ref]
    assert max(abs(a["grad_norm"] - b) for a, b in zip(got, norms)) < TOL * max(norms)


def test_sft_learns_and_lora_trains_only_adapters(runs):
    full = read_metrics(runs / "sft_packed")
    assert full[-1]["loss"] < full[0]["loss"] - 1.0
    adapted = read_metrics(runs / "sft_lora")
    assert adapted[-1]["loss"] < adapted[0]["loss"] - 0.1
    # The run's first loss is the untouched base model's (adapters start at zero).
    assert adapted[0]["loss"] == full[0]["loss"]


def test_every_preference_loss_raises_reward_accuracy(runs):
    """Over the run's 40 pairs (4 per step, each step new ones), the second half's reward accuracy is above the
    first's, and its mean loss below the first step's. Per step the accuracy is noisy: on tiny_preferences a tiny
    model soon tells "I don't know." from an answer, a wrong sum from the right one barely in 10 steps."""
    for name in PREFERENCE_RUNS:
        records = read_metrics(runs / name)
        accuracy, loss = [r["reward_accuracy"] for r in records], [r["loss"] for r in records]
        assert len(records) == 10
        assert sum(accuracy[5:]) > sum(accuracy[:5]), (name, accuracy)
        assert sum(loss[5:]) / 5 < loss[0] - 0.05, (name, loss)


def test_dpo_and_ipo_start_where_their_formulas_say(runs):
    """Step 1: the policy is its reference, every log-ratio 0: DPO's loss is log 2, IPO's (1 / (2 beta))^2."""
    for name, expected in (("dpo_lora", math.log(2)), ("dpo_frozen_reference", math.log(2)),
                           ("dpo_ipo", (1 / (2 * 0.5)) ** 2)):
        first = read_metrics(runs / name)[0]
        assert abs(first["loss"] - expected) < 1e-6, (name, first["loss"])
        assert first["reward_accuracy"] == 0.0 and first["reward_margin"] == 0.0


def test_precomputed_reference_trains_like_the_live_one(runs):
    """dpo.precompute_reference: the same losses and margins as the frozen reference model run alongside, the table
    is stored beside the run, and the start-up line says so."""
    live, pre = read_metrics(runs / "dpo_frozen_reference"), read_metrics(runs / "dpo_precomputed")
    assert max_rel_diff([r["loss"] for r in pre], [r["loss"] for r in live]) < TOL
    assert all(abs(a["reward_margin"] - b["reward_margin"]) < TOL * max(1.0, abs(b["reward_margin"]))
               for a, b in zip(pre, live))
    table = torch.load(runs / "dpo_precomputed" / "reference_logps.pt")["logps"]
    assert table.shape == (200, 2) and torch.isfinite(table).all() and (table < 0).all()  # every pair, once


def _built_transformers(monkeypatch) -> list:
    """Every Transformer titan builds from here on (the policy, and DPO's frozen reference copy)."""
    built = []

    class Counted(Transformer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    # titan.build (the policy and the reference) calls models.build_model; parallelize.materialize's
    # throw-away init copies hold their own reference to it and are not counted.
    from titan import models

    monkeypatch.setattr(models, "build_model", Counted)
    return built


def _build(argv):
    run = build(config_io.load(argv))
    run.checkpointer.close()
    run.metrics.close()
    return run


def test_simpo_and_orpo_build_no_reference_model(runs, tmp_path, monkeypatch, one_thread):
    """No second model is built (and no reference is ever asked for), and the first logged loss is the formula on
    the initial policy's log-probabilities of the step's pairs."""
    import torch.distributed as dist

    built = _built_transformers(monkeypatch)
    try:  # the contrast: DPO without LoRA builds a frozen copy
        _build(_argv(tmp_path / "sigmoid", *RUNS["dpo_frozen_reference"][0]))
        assert len(built) == 2
    finally:
        dist.destroy_process_group()

    def no_reference(*args):
        raise AssertionError("a reference-free loss asked for a reference model")

    monkeypatch.setattr(titan.build, "reference_model", no_reference)
    for name in ("dpo_simpo", "dpo_orpo"):
        built.clear()
        argv = _argv(tmp_path / name, *RUNS[name][0])
        try:
            run = _build(argv)
            assert len(built) == 1 and run.objective.reference is None
            batches, total, nll, tokens = iter(run.train_loader), 0.0, 0.0, 0
            with torch.no_grad():
                for _ in range(run.grad_accum):
                    batch = next(batches)
                    logits = run.model_parts[0](batch["input"])
                    logps, n = sequence_logps(logits, batch["label"])
                    total += float(preference_loss(run.cfg.dpo, logps, None, n)[0].sum())
                    if name == "dpo_orpo":  # TRL's NLL: a token mean over the chosen rows, prompt included
                        half = len(logits) // 2
                        labels = batch["sequence_label"][:half]
                        nll += float(torch.nn.functional.cross_entropy(logits[:half].flatten(0, 1),
                                                                       labels.flatten(), reduction="sum"))
                        tokens += int((labels != -100).sum())
            expected = total / (run.grad_accum * run.cfg.training.local_batch_size) + (nll / tokens if tokens else 0)
            assert abs(read_metrics(runs / name)[0]["loss"] - expected) < 1e-5 * expected, name
        finally:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# LoRA checkpoints and export


def _dcp_model(path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / (path.name + ".pt")
    dcp_to_torch_save(str(path), str(out))
    return {k.removeprefix("model."): v for k, v in torch.load(out)["model"].items()}


def test_lora_base_stays_frozen_export_merges_and_adapter_only_resume_is_exact(tmp_path, one_thread, capsys):
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "3", "--validation.enable", "false", *LORA]
    # A seed checkpoint of the base model = the weights every run starts from.
    assert main(_argv(tmp_path / "seed", "--checkpoint.create_seed_checkpoint", "--validation.enable", "false")) == 0
    seed = tmp_path / "seed" / "checkpoint" / "step-0"
    start = ["--checkpoint.initial_load_path", str(seed)]
    assert main(_argv(tmp_path / "full", *ckpt, *start, "--checkpoint.last_save_in_hf")) == 0
    base, trained = _dcp_model(seed), _dcp_model(tmp_path / "full" / "checkpoint" / "step-6")
    assert all(torch.equal(trained[k], v) for k, v in base.items())  # every base weight unchanged
    adapters = {k for k in trained if lora.is_adapter(k)}
    assert adapters and not any(torch.all(trained[k] == 0) for k in adapters if k.endswith("lora_b"))
    # The Hugging Face export is the base plus (alpha / rank) B A.
    exported = hf.from_hf(hf.read_safetensors(tmp_path / "full" / "checkpoint" / "step-6-hf"),
                          hf.load(tmp_path / "full" / "checkpoint" / "step-6-hf")[0])
    for name in ("layers.0.attention.wq", "layers.3.feed_forward.w2"):
        expected = trained[f"{name}.weight"] + 2.0 * trained[f"{name}.lora_b"] @ trained[f"{name}.lora_a"]
        assert rel_error(exported[f"{name}.weight"], expected) < 1e-6

    # Every save also holds the adapters as a PEFT folder, as does the export (tests/test_peft.py loads them in PEFT).
    ckpt_folder, args = tmp_path / "full" / "checkpoint", hf.load(tmp_path / "full" / "checkpoint" / "step-6-hf")[0]
    for where in ("step-3/adapter", "step-6/adapter", "step-6-hf/adapter"):
        config, saved = peft.read(ckpt_folder / where, args, where)
        assert saved.keys() == adapters and config["base_model_name_or_path"] is None  # (started from DCP)
    assert all(torch.equal(saved[k], trained[k]) for k in adapters)
    # lora.init_from starts the adapters from such a folder (a vanishing lr keeps them where they started).
    init = ["--lora.init_from", str(ckpt_folder / "step-6" / "adapter"), "--optimizer.lr", "1e-20"]
    assert main(_argv(tmp_path / "init", *ckpt, *start, *init, "--training.steps", "1")) == 0
    _, again = peft.read(tmp_path / "init" / "checkpoint" / "step-1" / "adapter", args, "init")
    assert all(rel_error(again[k], trained[k]) < 1e-6 for k in adapters)

    # scripts/convert_checkpoint.py merges the same way, and refuses to drop adapters silently.
    convert = [sys.executable, "scripts/convert_checkpoint.py", "to-hf",
               str(tmp_path / "full" / "checkpoint" / "step-6"),
               str(tmp_path / "converted"), "--flavor", "tiny", "--tokenizer", "debug_chat", "--dtype", "float32"]
    out = subprocess.run(convert, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "--lora-scale" in out.stderr, out.stderr
    out = subprocess.run(convert + ["--lora-scale", "2.0"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    converted = hf.read_safetensors(tmp_path / "converted")
    assert all(torch.equal(v, converted[k])
               for k, v in hf.read_safetensors(tmp_path / "full" / "checkpoint" / "step-6-hf").items())

    # Adapter-only checkpoints: smaller, and a run resumed from step 3 continues exactly.
    only = [*ckpt, *start, "--lora.save_adapter_only"]
    assert main(_argv(tmp_path / "a", *only, "--training.steps", "3")) == 0
    saved = _dcp_model(tmp_path / "a" / "checkpoint" / "step-3")
    assert saved and all(lora.is_adapter(k) for k in saved)
    # They pin their base (issue 31): a resume on a randomly initialised base, or on another seed's, is refused in
    # one line (before, the adapters trained on silently); checkpoint.allow_base_change is the explicit override.
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoint", b / "checkpoint")
    line = _error_line(capsys, _argv(b, *ckpt, "--lora.save_adapter_only"))
    assert f"holds adapters trained on the base {seed} (sha256" in line and "random initialisation" in line
    assert "checkpoint.allow_base_change" in line
    assert main(_argv(tmp_path / "r", *ckpt, "--lora.save_adapter_only", "--training.steps", "1")) == 0
    line = _error_line(capsys, _argv(tmp_path / "r", *ckpt, "--lora.save_adapter_only", "--training.seed", "1"))
    assert "llama3 tiny with training.seed 0" in line and "training.seed 1" in line
    assert main(_argv(b, *ckpt, "--lora.save_adapter_only", "--training.steps", "4",
                      "--checkpoint.allow_base_change")) == 0
    assert main(_argv(tmp_path / "a", *only)) == 0  # resumes at step 4, base from initial_load_path
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "a")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]


@pytest.mark.parametrize("argv, key", [
    (["--training.recipe", "dpo", "--parallelism.context_parallel_degree", "2"], "training.recipe=dpo"),
    (["--lora.enable", "--float8.enable"], "lora.enable"),
    (["--sft.chat_template", "llama3", "--model.tokenizer_path", ""], "sft.chat_template"),
    (["--training.dataset", "tiny_preferences", "--training.recipe", "sft"], "training.dataset"),
    (["--lora.quantize_base", "nf4"], "lora.quantize_base=nf4"),
    (["--lora.enable", "--lora.quantize_base", "nf4"], "lora.nf4_scaler_block_size=256"),  # tiny shapes misfit
    (["--lora.enable", *QLORA, "--parallelism.tensor_parallel_degree", "2"], "parallelism.tensor_parallel_degree"),
    (["--lora.enable", *QLORA, "--checkpoint.create_seed_checkpoint"], "checkpoint.create_seed_checkpoint"),
])
def test_bad_finetuning_settings_exit_2_with_one_line(tmp_path, capsys, argv, key):
    assert main(_argv(tmp_path, "--training.steps", "1", *argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and err[0].startswith("titan: error:"), err


SFT_RECORDS = {  # format: (a good record, a malformed one)
    "messages": ({"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2."}]},
                 {"messages": [{"role": "user", "content": 3}]}),
    "alpaca": ({"instruction": "1 + 1?", "output": "2."}, {"instruction": "1 + 1?", "output": None}),
    "sharegpt": ({"conversations": [{"from": "human", "value": "1 + 1?"}, {"from": "gpt", "value": "2."}]},
                 {"conversations": [{"from": "human", "value": "1 + 1?"}, {"from": "bard", "value": "2."}]}),
    "prompt_completion": ({"prompt": "1 + 1?", "completion": "2."}, {"prompt": "1 + 1?", "answer": "2."}),
}


@pytest.mark.parametrize("fmt", SFT_RECORDS)
def test_malformed_sft_records_exit_2_naming_file_and_line(tmp_path, capsys, fmt):
    good, bad = SFT_RECORDS[fmt]
    path = tmp_path / "data.jsonl"
    path.write_text(f"{json.dumps(good)}\n{json.dumps(good)}\n{json.dumps(bad)}\n")
    assert main(_argv(tmp_path, "--training.steps", "1", "--validation.enable", "false", "--training.dataset_path",
                      str(path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("titan: error: training.dataset_path:"), err
    assert f"{path} line 3 ({fmt} format, detected from line 1)" in err[0], err
