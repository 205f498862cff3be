"""The RL recipes' parts, each against a reference: GRPO's loss and gradient for every aggregation (grpo, dapo,
dr_grpo; clip-higher, the KL term) against the published formulas written out per token, and its group advantages
against mean/std by hand; KTO's loss and gradient against TRL's formulas; the reward functions (the built-ins, TRL's
calling convention, TRL's own reward functions where TRL is installed, every error a one-line ConfigError); the data
readers (GRPO prompts from JSONL and parquet, KTO rows and their mismatched KL rows). Whole runs: tests/test_grpo.py.
"""

from __future__ import annotations

import json
import math

import pytest
import rl_rewards
import torch

from titan import rewards
from titan.config import KTO, SFT, Training
from titan.data.chat import chat_template
from titan.data.pretrain import IGNORE_INDEX
from titan.data.rl import feedback_rows, read_prompts
from titan.data.tokenizer import load_tokenizer
from titan.errors import ConfigError
from titan.objectives.grpo import GRPOLoss, group_advantages, policy_loss
from titan.objectives.kto import kto_loss

TOL = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# GRPO's loss against its papers


def _completions(seed: int = 0, n: int = 6, longest: int = 7):
    """Per completion: log-probs now, of the sampling policy, of the reference (lists of different lengths), and an
    advantage; ratios spread well beyond both clip bounds."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, longest + 1, (n,), generator=g)]
    out = []
    for n_tokens in lengths:
        old = -torch.rand(n_tokens, generator=g, dtype=torch.float64) * 3
        now = old + (torch.rand(n_tokens, generator=g, dtype=torch.float64) - 0.5) * 1.2  # ratios 0.55 ... 1.8
        ref = old + (torch.rand(n_tokens, generator=g, dtype=torch.float64) - 0.5)
        out.append((now, old, ref))
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    return out, advantages


def _padded(completions, longest: int = 7):
    n = len(completions)
    now, old, ref = (torch.zeros(n, longest, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(n, longest, dtype=torch.bool)
    for i, (a, b, c) in enumerate(completions):
        now[i, :len(a)], old[i, :len(a)], ref[i, :len(a)], mask[i, :len(a)] = a, b, c, True
    return now.requires_grad_(), old, ref, mask


def _objective_by_the_papers(completions, advantages, loss_type, eps_low, eps_high, beta, max_len):
    """The objective J written as the papers write it, term by term (no masks, no padding):
    GRPO (DeepSeekMath, eq. 3): 1/G sum_i 1/|o_i| sum_t [min(r A, clip(r) A) - beta KL];
    DAPO (eq. 8): 1/sum_i |o_i| sum_i sum_t [...]; Dr. GRPO: 1/(G L_max) sum_i sum_t [...] (TRL's constant)."""
    per_completion, n_tokens = [], 0
    for (now, old, ref), a in zip(completions, advantages):
        terms = []
        for t in range(len(now)):
            r = torch.exp(now[t] - old[t])
            surrogate = torch.min(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
            kl = torch.exp(ref[t] - now[t]) - (ref[t] - now[t]) - 1  # Schulman's k3, as GRPO's eq. 4
            terms.append(surrogate - beta * kl)
        per_completion.append(terms)
        n_tokens += len(terms)
    g = len(completions)
    if loss_type == "grpo":
        return sum(sum(terms) / len(terms) for terms in per_completion) / g
    total = sum(sum(terms) for terms in per_completion)
    return total / n_tokens if loss_type == "dapo" else total / (g * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("eps_high, beta", [(0.2, 0.0), (0.28, 0.0), (0.28, 0.04)])
def test_grpo_loss_and_gradient_equal_the_published_formulas(loss_type, eps_high, beta):
    completions, advantages = _completions(seed=len(loss_type))
    leaves = [c[0].clone().requires_grad_() for c in completions]
    expected = -_objective_by_the_papers([(leaf, o, r) for leaf, (_, o, r) in zip(leaves, completions)], advantages,
                                         loss_type, 0.2, eps_high, beta, max_len=7)
    expected_grads = torch.autograd.grad(expected, leaves)
    now, old, ref, mask = _padded(completions)
    terms = policy_loss(now, old, advantages, mask, loss_type=loss_type, epsilon=0.2, epsilon_high=eps_high,
                        max_completion_length=7, beta=beta, ref_logps=ref if beta else None)
    got = terms.loss / terms.count
    (grad,) = torch.autograd.grad(got, now)
    assert abs(got.item() - expected.item()) < TOL
    for i, g in enumerate(expected_grads):
        assert torch.allclose(grad[i, :len(g)], g, atol=TOL, rtol=0), (i, grad[i], g)
        assert not grad[i, len(g):].any()  # padding gets nothing
    # The clips acted (the test covers both sides), and clip-higher leaves more ratios above 1 + epsilon unclipped.
    assert terms.clipped_low > 0 and terms.clipped_high > 0


def test_grpo_loss_sums_over_micro_batches_to_the_whole_batch():
    """The loop divides each micro-batch's summed loss by the step's global count: any split gives the same loss."""
    completions, advantages = _completions(seed=3, n=8)
    now, old, ref, mask = _padded(completions)
    kw = dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.28, max_completion_length=7)
    whole = policy_loss(now, old, advantages, mask, **kw)
    halves = [policy_loss(now[s], old[s], advantages[s], mask[s], **kw) for s in (slice(0, 3), slice(3, 8))]
    split = sum(h.loss for h in halves) / sum(h.count for h in halves)
    assert abs(split.item() - (whole.loss / whole.count).item()) < 1e-12


def test_group_advantages_are_the_groups_standard_scores():
    rewards_ = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, float("nan"), 0.0, 1.0])
    got = group_advantages(rewards_, 4, "group")
    for g in range(3):
        r = [x for x in rewards_[4 * g:4 * g + 4].tolist() if not math.isnan(x)]
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))  # Bessel, as TRL's nanstd
        for j in range(4):
            x = float(rewards_[4 * g + j])
            expected = 0.0 if math.isnan(x) else (x - mean) / (std + 1e-4)
            assert abs(float(got[4 * g + j]) - expected) < 1e-6
    assert group_advantages(rewards_, 4, "none")[:4].tolist() == [0.5, -0.5, -0.5, 0.5]  # Dr. GRPO: no scaling


def test_grpo_objective_counts_what_its_loss_type_divides_by():
    from titan.config import GRPO

    label = torch.full((3, 6), IGNORE_INDEX)
    label[0, 2:5], label[1, 1:2], label[2, 0:6] = 1, 1, 1
    batch = {"label": label}
    assert int(GRPOLoss(GRPO(loss_type="dapo")).count(batch)) == 3 + 1 + 6
    assert int(GRPOLoss(GRPO(loss_type="grpo")).count(batch)) == 3
    assert int(GRPOLoss(GRPO(loss_type="dr_grpo", max_completion_length=9)).count(batch)) == 27


# ---------------------------------------------------------------------------------------------------------------
# KTO against TRL's formulas


def _kto_by_trl(policy, reference, labels, kl, beta, w_d, w_u):
    """TRL's KTOTrainer._compute_loss, the lines that make the loss: chosen and rejected rows apart, each loss
    1 - sigmoid(beta (logratio - KL)) or 1 - sigmoid(beta (KL - logratio)), weighted, concatenated, mean."""
    chosen = [(p, r) for p, r, lab in zip(policy, reference, labels) if lab]
    rejected = [(p, r) for p, r, lab in zip(policy, reference, labels) if not lab]
    losses = [w_d * (1 - torch.sigmoid(beta * ((p - r) - kl))) for p, r in chosen] + \
        [w_u * (1 - torch.sigmoid(beta * (kl - (p - r)))) for p, r in rejected]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33), (0.7, 1.0)])
def test_kto_loss_and_gradient_equal_trls_formulas(weights):
    g = torch.Generator().manual_seed(5)
    policy = (-torch.rand(8, generator=g, dtype=torch.float64) * 40).requires_grad_()
    reference = policy.detach() + torch.randn(8, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    kl = torch.tensor(0.37, dtype=torch.float64)
    cfg = KTO(beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1])
    losses, rewards_ = kto_loss(policy, reference, labels, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    got = losses.mean()
    expected = _kto_by_trl(policy, reference, labels.tolist(), kl, cfg.beta, *weights)
    assert abs(float((got - expected).detach())) < TOL
    (g_got,) = torch.autograd.grad(got, policy)
    (g_expected,) = torch.autograd.grad(expected, policy)
    assert torch.allclose(g_got, g_expected, atol=TOL, rtol=0)
    assert torch.allclose(rewards_, 0.1 * (policy - reference).detach())


# ---------------------------------------------------------------------------------------------------------------
# Reward functions


@pytest.mark.parametrize("text, answer, reward", [
    ("The sum is \\boxed{42}.", "42", 1.0), ("so 3 + 4 = 7", "7", 1.0), ("7 or maybe 8", "7", 0.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0), ("it is 1,000", "1000", 1.0), ("0.50", "1/2", 1.0),
    ("-12", "-12", 1.0), ("no idea", "3", 0.0), ("\\boxed{x+1} and 5", "x+1", 1.0),
])
def test_math_answer(text, answer, reward):
    assert rewards.math_answer([text], [answer]) == [reward]
    assert rewards.math_answer([[{"role": "assistant", "content": text}]], [answer]) == [reward]  # conversational
    assert rewards.math_answer([text], [None]) == [None]


def test_format_regex_takes_the_rows_pattern_or_r1s():
    r1 = "<think>\nadd them\n</think>\n<answer>\n7\n</answer>"
    assert rewards.format_regex([r1, "7"]) == [1.0, 0.0]
    assert rewards.format_regex([r1, " 7 apples"], format_pattern=[r"\d", r"\s*\d+\b.*"]) == [0.0, 1.0]


def test_reward_functions_are_called_as_trl_calls_them():
    functions = rewards.load_reward_functions(["rl_rewards:recording", "titan.rewards:math_answer"], [0.5, 2.0])
    rl_rewards.CALLS.clear()
    prompts = ["1 + 1 =", "1 + 1 =", [{"role": "user", "content": "2 + 2?"}]]
    completions = ["2", "3", [{"role": "assistant", "content": "4"}]]
    columns = {"answer": ["2", "2", "4"], "level": [1, 1, 2]}
    scores = rewards.score(functions, prompts, completions, [[17], [18], [19]], columns, rewards.TrainerState(3, 9))
    (call,) = rl_rewards.CALLS
    assert call["prompts"] == prompts and call["completions"] == completions and call["level"] == [1, 1, 2]
    assert call["completion_ids"] == [[17], [18], [19]] and call["trainer_state"].global_step == 3
    assert scores.tolist() == [[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    assert rewards.combine(scores, functions).tolist() == [2.5, 0.5, 2.5]
    skipped = rewards.score(rewards.load_reward_functions(["rl_rewards:skips_some"], []), prompts, completions,
                            [[1]] * 3, {}, rewards.TrainerState(1, 1))
    assert math.isnan(skipped[1, 0]) and skipped[0, 0] == 1.0  # None is NaN: left out of means and advantages


@pytest.mark.parametrize("path, message", [
    ("rl_rewards:raises", "reward function rl_rewards:raises raised RuntimeError: the grader is down"),
    ("rl_rewards:wrong_length", "reward function rl_rewards:wrong_length returned 1 values for 2 completions"),
    ("rl_rewards:not_numbers", "reward function rl_rewards:not_numbers returned 'good' for completion 0"),
    ("no_such_module:f", "grpo.reward_functions[0]='no_such_module:f': cannot import no_such_module"),
    ("rl_rewards:missing", "grpo.reward_functions[0]='rl_rewards:missing': rl_rewards has no missing"),
    ("rl_rewards", "expected \"package.module:function\""),
])
def test_bad_reward_functions_are_one_line_config_errors(path, message):
    with pytest.raises(ConfigError) as e:
        functions = rewards.load_reward_functions([path], [])
        rewards.score(functions, ["p", "p"], ["a", "b"], [[1], [2]], {}, rewards.TrainerState(1, 1))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_trls_own_reward_functions_work_unchanged():
    """TRL's think-format reward and its soft overlong punishment, loaded by import path and called by titan as by
    TRL's trainer; the punishment equals titan's grpo.overlong_buffer_len penalty."""
    pytest.importorskip("trl")
    from trl.rewards import get_soft_overlong_punishment

    from titan.config import GRPO

    (think,) = rewards.load_reward_functions(["trl.rewards:think_format_reward"], [])
    good = [{"role": "assistant", "content": "<think>\nsum\n</think>\n7"}]
    bad = [{"role": "assistant", "content": "7"}]
    assert rewards.score([think], [[{"role": "user", "content": "?"}]] * 2, [good, bad], [[1], [2]], {},
                         rewards.TrainerState(1, 1)).tolist() == [[1.0], [0.0]]
    ids = [[1] * n for n in (3, 10, 14, 16, 20)]
    trl_penalty = get_soft_overlong_punishment(max_completion_len=16, soft_punish_cache=8)(completion_ids=ids)
    from titan.rollout import overlong_penalty

    ours = overlong_penalty(ids, GRPO(max_completion_length=16, overlong_buffer_len=8))
    assert [round(x, 6) for x in ours.tolist()] == [round(x, 6) for x in trl_penalty]


# ---------------------------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("debug_chat")


def test_grpo_prompts_from_jsonl_and_parquet(tok, tmp_path):
    records = [{"prompt": "What is 2 + 2?", "answer": "4", "level": 1},
               {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 + 3?"}],
                "answer": "6", "level": 2}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    training = Training(dataset_path=str(tmp_path / "p.jsonl"), seq_len=64)
    prompts, template = read_prompts(training, SFT(), tok, 60, "budget")
    expected, _ = template.render([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True)
    assert prompts[0].ids == expected and prompts[0].prompt == "What is 2 + 2?"
    assert prompts[1].prompt == records[1]["prompt"] and prompts[1].columns == {"answer": "6", "level": 2}
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"prompt": "What is 2 + 2?", "answer": "4"}]), tmp_path / "p.parquet")
    (from_parquet,), _ = read_prompts(Training(dataset_path=str(tmp_path / "p.parquet")), SFT(), tok, 60, "budget")
    assert from_parquet.ids == expected and from_parquet.columns == {"answer": "4"}
    with pytest.raises(ConfigError, match=r"p.jsonl line 1: the prompt has \d+ tokens, more than budget = 12 allows"):
        read_prompts(training, SFT(), tok, 12, "budget")


def test_kto_rows_and_their_mismatched_kl_rows(tok, tmp_path):
    records = [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}.", "label": i % 2 == 0} for i in range(3)]
    (tmp_path / "k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = feedback_rows(Training(dataset_path=str(tmp_path / "k.jsonl"), seq_len=48), SFT(), tok)
    template = chat_template(tok)

    def targets(row, key):
        return [int(t) for t in row[key] if t != IGNORE_INDEX]

    for i, row in enumerate(rows):
        assert bool(row["desirable"]) == (i % 2 == 0)
        own = tok.encode(f"{i + 1}.") + [template.end_id]
        previous = tok.encode(f"{(i - 1) % 3 + 1}.") + [template.end_id]  # record i - 1's completion (cyclic)
        assert targets(row, "label") == own and targets(row, "kl_label") == previous
        prompt, _ = template.render([{"role": "user", "content": f"What is {i} + 1?"}])
        assert row["input"][:len(prompt)].tolist() == prompt == row["kl_input"][:len(prompt)].tolist()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y", "label": "yes"}) + "\n")
    with pytest.raises(ConfigError, match="bad.jsonl line 1: needs a boolean \"label\""):
        feedback_rows(Training(dataset_path=str(bad)), SFT(), tok)
