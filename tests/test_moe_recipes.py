"""Fine-tuning recipes on a Mixture-of-Experts model (tests/configs/tiny_sft.toml with the tiny qwen3_moe, one
process, fp32, the per-expert loop): SFT adds the balance loss as a mean over the routed tokens (its step-1 gradient
norm and aux loss equal a hand computation) and updates the expert bias from the step's load; DPO's frozen reference
neither counts its tokens, nor adds to the balance loss, nor moves its bias, and the policy's aux loss is logged apart
from the DPO loss; LoRA adapts the attention projections and leaves the experts and the routing frozen.

Multi-process layouts of the same model are tested in tests/test_expert_parallel.py, the recipes themselves on the
dense tiny model in tests/test_finetune.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import REPO, read_metrics

import titan.build
import titan.data.loaders
import titan.objectives
import titan.train
from titan.data.tokenizer import load_tokenizer
from titan.models import lora, moe
from titan.models.moe import MoE, Router

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_SFT = str(REPO / "tests" / "configs" / "tiny_sft.toml")
COEF, RATE = 0.1, 0.01
MOE = ["--model.name", "qwen3_moe", "--moe.grouped_mm", "false", "--moe.aux_loss_coef", str(COEF),
       "--training.steps", "3", "--validation.enable", "false"]
DPO = ["--training.recipe", "dpo", "--training.dataset", "tiny_preferences", "--training.global_batch_size", "4",
       "--dpo.beta", "0.5"]


def _argv(folder, *extra) -> list[str]:
    return ["--config", TINY_SFT, "--job.dump_folder", str(folder), *MOE, *extra]


def _train(monkeypatch, argv) -> tuple[titan.build.Run, dict[str, torch.Tensor]]:
    """Train through `main`; (the run, with its model after the last step; the model's state before the first)."""
    runs, initial = [], {}

    def build(cfg):
        runs.append(real_build(cfg))
        initial.update({k: v.clone() for k, v in runs[-1].model_parts[0].state_dict().items()})
        return runs[-1]

    real_build = titan.train.build
    monkeypatch.setattr(titan.train, "build", build)
    assert titan.train.main(argv) == 0
    monkeypatch.setattr(titan.train, "build", real_build)
    return runs[0], initial


def _layers(model) -> list[MoE]:
    return [m for _, m in moe.moe_layers([model])]


def _bias_from_logged_loads(records, layer: str) -> torch.Tensor:
    """DeepSeek-V3's update replayed from metrics.jsonl: rate * the sum over steps of sign(mean load - load)."""
    total = 0
    for r in records:
        load = torch.tensor(r["expert_load"][layer]["tokens"])
        total = total + RATE * torch.sign(load.mean() - load)
    return total


def _check_policy_bias(model, records) -> None:
    for i, m in enumerate(_layers(model)):
        expected = _bias_from_logged_loads(records, f"layers.{i}")
        assert expected.abs().sum() > 0 and torch.allclose(m.router.expert_bias, expected, atol=1e-7), i


def _hand_aux(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed LM loss, the summed balance loss written out from docs/moe.md: coef * sum over rows b of S * L_b,
    L_b = sum_i f_i P_i with f_i = E / (K S) * b's tokens choosing i, P_i = b's mean score of i), one forward."""
    captured = []
    hooks = [r.register_forward_hook(lambda mod, args, out: captured.append(out)) for r in model.modules()
             if isinstance(r, Router)]
    try:
        lm = titan.objectives.TokenLoss(titan.objectives.cross_entropy_sum)(model, batch)
    finally:
        for h in hooks:
            h.remove()
    rows, seq = batch["input"].shape
    aux = lm.new_zeros(())
    for _, experts, scores in captured:
        n_experts, k = scores.shape[-1], experts.shape[-1]
        counts = torch.stack([torch.bincount(e, minlength=n_experts) for e in experts.view(rows, -1)]).float()
        f = n_experts / (k * seq) * counts
        p = scores.view(rows, seq, n_experts).mean(dim=1)
        aux = aux + COEF * seq * (f * p).sum()
    return lm, aux


def test_sft_adds_the_balance_loss_per_routed_token_and_moves_the_bias(tmp_path, monkeypatch):
    """Step 1's gradient norm and aux loss are those of LM loss / assistant tokens + balance loss / routed tokens on
    the initial model (a coefficient meaning what it means in pre-training, not scaled by prompt length); the bias
    after 3 steps is the update replayed from the logged loads; the loss falls."""
    run, initial = _train(monkeypatch, _argv(tmp_path / "sft", "--moe.bias_update_rate", str(RATE)))
    records = read_metrics(tmp_path / "sft")
    assert len(records) == 3 and records[-1]["loss"] < records[0]["loss"]
    model, cfg = run.model_parts[0], run.cfg
    _check_policy_bias(model, records)

    # Step 1 again by hand: the initial weights, the step's micro-batches from a fresh loader.
    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    loader, _ = titan.data.loaders.build_dataloaders(cfg.training, cfg.sft, cfg.validation,
                                              load_tokenizer(cfg.model.tokenizer_path), 0, 1)
    batches = iter(loader)
    micro = [next(batches) for _ in range(run.grad_accum)]
    n_items = sum(int((b["label"] != -100).sum()) for b in micro)
    n_tokens = sum(b["input"].numel() for b in micro)
    assert n_items < n_tokens / 2  # SFT: most tokens are prompt and padding, not items
    aux_total = 0.0
    for b in micro:
        lm, aux = _hand_aux(model, b)
        (lm / n_items + aux / n_tokens).backward()
        aux_total += float(aux.detach()) / n_tokens
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    assert abs(records[0]["aux_loss"] - aux_total) < 1e-5 * aux_total, (records[0]["aux_loss"], aux_total)
    assert abs(records[0]["grad_norm"] - grad_norm) < 1e-5 * grad_norm, (records[0]["grad_norm"], grad_norm)


def test_dpo_reference_neither_routes_into_the_statistics_nor_moves_its_bias(tmp_path, monkeypatch):
    """The frozen copy counts no tokens, adds no balance loss, gets no gradient and keeps its (initial, zero) bias,
    while the policy's moves as its logged loads say; step 1's DPO loss is exactly log 2 (the balance loss is logged
    apart as aux_loss) and the loads count the policy's rows only."""
    references = []

    def frozen_reference(*args):
        references.append(real(*args))
        return references[-1]

    real = titan.build.frozen_reference
    monkeypatch.setattr(titan.build, "frozen_reference", frozen_reference)
    run, _ = _train(monkeypatch, _argv(tmp_path / "dpo", *DPO, "--moe.bias_update_rate", str(RATE)))
    records = read_metrics(tmp_path / "dpo")
    (reference,) = references
    assert abs(records[0]["loss"] - math.log(2)) < 1e-6
    # Per routed token: coef x about 1 per layer near balance (per pair it would be 2 x seq_len times that).
    assert all(0.5 * COEF * 4 < r["aux_loss"] < 2 * COEF * 4 for r in records), [r["aux_loss"] for r in records]
    seq, k = run.cfg.training.seq_len, _layers(reference)[0].top_k
    for r in records:  # 4 pairs, chosen and rejected rows, each token k times: the reference's rows are not counted
        assert all(sum(layer["tokens"]) == 4 * 2 * seq * k for layer in r["expert_load"].values())
    _check_policy_bias(run.model_parts[0], records)
    for m in _layers(reference):
        assert not m.router.expert_bias.any() and not m.tokens_per_expert.any() and not m.aux_loss_sum.any()
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())


def test_lora_on_moe_adapts_attention_and_keeps_experts_and_routing_frozen(tmp_path, monkeypatch, capsys):
    """DPO with LoRA on an all-MoE model: the adapters are the attention projections' (the routed experts are no
    linear layers, the router is not a target); experts, router and bias are unchanged after training, the
    reference is the base (step 1: log 2); a bias update under LoRA is one line naming the key."""
    run, initial = _train(monkeypatch, _argv(tmp_path / "lora", *DPO, "--lora.enable", "--optimizer.lr", "1e-2"))
    model = run.model_parts[0]
    adapted = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, lora.LoRALinear)})
    assert adapted == ["wk", "wo", "wq", "wv"] and lora.adapted([model]) == ["wq", "wk", "wv", "wo"]  # the log line's
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_adapter(name) and ".attention." in name for name in trainable)
    records = read_metrics(tmp_path / "lora")
    assert abs(records[0]["loss"] - math.log(2)) < 1e-6 and records[-1]["loss"] < records[0]["loss"]
    frozen = [k for k in initial if ".feed_forward." in k]  # every layer is MoE: experts, router, expert bias
    assert any(k.endswith("experts.w1") for k in frozen) and any(k.endswith("expert_bias") for k in frozen)
    state = model.state_dict()
    assert all(torch.equal(state[k], initial[k]) for k in frozen)
    assert not any(torch.equal(state[k], initial[k]) for k in initial if k.endswith("lora_b"))
    capsys.readouterr()
    assert titan.train.main(_argv(tmp_path / "bias", *DPO, "--lora.enable", "--moe.bias_update_rate", "0.001")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("titan: error: moe.bias_update_rate=0.001"), err
