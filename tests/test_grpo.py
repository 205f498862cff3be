"""GRPO and KTO runs end to end on CPU (fp32, one process; the FSDP=2 and TP=2 comparisons are in
tests/test_finetune.py's spawn): the debug preset raises its mean reward by the margin docs/rl.md states; a run
resumed from a checkpoint taken between the steps of one rollout continues bitwise; the logged figures are what the
rollout made; bad input (an unknown reward function, one that raises, num_generations < 2, a prompt longer than the
budget, pipeline parallelism) is one line and exit code 2; KTO starts where its formula says and learns.
"""

from __future__ import annotations

import re
import shutil

import pytest
from dist_utils import REPO, read_metrics

from titan.train import main

PRESET = str(REPO / "train_configs" / "debug_grpo.toml")
TINY_SFT = str(REPO / "tests" / "configs" / "tiny_sft.toml")
QUIET = ["--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false"]


def _grpo(folder, *extra):
    return ["--config", PRESET, "--job.dump_folder", str(folder), *QUIET, *extra]


def _doc_figures() -> tuple[float, float]:
    """The preset's mean reward over its first and last 5 steps, as docs/rl.md states them."""
    text = (REPO / "docs" / "rl.md").read_text()
    m = re.search(r"mean reward rises from ([\d.]+) \(steps 1-5\) to ([\d.]+) \(steps 36-40\)", text)
    assert m, "docs/rl.md must state the debug preset's first and last mean reward"
    return float(m[1]), float(m[2])


def test_debug_preset_raises_the_mean_reward(tmp_path, one_thread):
    assert main(_grpo(tmp_path / "run")) == 0
    records = read_metrics(tmp_path / "run")
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert len(rewards) == 40 and last > first + 0.6, rewards
    doc_first, doc_last = _doc_figures()
    assert abs(first - doc_first) < 0.05 and abs(last - doc_last) < 0.05, (first, last)
    r = records[-1]  # every figure the rollout promises is logged
    for key in ("reward_std", "reward/format_regex", "reward/math_answer_std", "completion_length",
                "completion_length_max", "truncated_ratio", "entropy", "clip_ratio_low", "clip_ratio_high",
                "generation_s", "training_s"):
        assert key in r, key
    assert r["completion_length_max"] <= 4 and 0 <= r["truncated_ratio"] <= 1


def test_resume_between_the_steps_of_one_rollout_is_bitwise(tmp_path, one_thread):
    """num_iterations = 2: steps 3 and 4 train on one rollout; a run resumed from step 3's checkpoint restores that
    rollout (and the prompt order) and logs exactly what the uninterrupted run logged."""
    argv = ["--training.steps", "6", "--grpo.num_iterations", "2", "--grpo.epsilon_high", "0.28",
            "--checkpoint.enable", "--checkpoint.interval", "3"]
    assert main(_grpo(tmp_path / "straight", *argv)) == 0
    resumed = tmp_path / "resumed"
    (resumed / "checkpoint").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    assert main(_grpo(resumed, *argv)) == 0
    keys = ("loss", "grad_norm", "reward", "reward_std", "entropy", "completion_length", "clip_ratio_high")
    records = read_metrics(tmp_path / "straight")
    straight = {r["step"]: [r[k] for k in keys] for r in records}
    again = {r["step"]: [r[k] for k in keys] for r in read_metrics(resumed)}
    assert sorted(again) == [4, 5, 6] and all(again[s] == straight[s] for s in again), (again, straight)
    # A rollout's first step trains at ratio 1 (nothing clipped); its second against the sampling policy's
    # log-probabilities, from which one update has moved the policy.
    clipped = [r["clip_ratio_low"] + r["clip_ratio_high"] for r in records]
    assert clipped[0::2] == [0.0, 0.0, 0.0] and any(c > 0 for c in clipped[1::2]), clipped


@pytest.mark.parametrize("extra, message", [
    (["--grpo.reward_functions", "titan.rewards:math_answer,no_such_module:score"],
     "grpo.reward_functions[1]='no_such_module:score': cannot import no_such_module"),
    (["--grpo.reward_functions", "rl_rewards:raises"],
     "reward function rl_rewards:raises raised RuntimeError: the grader is down"),
    (["--grpo.num_generations", "1"], "grpo.num_generations must be >= 2"),
    (["--grpo.max_completion_length", "24"], "the prompt has"),
    (["--parallelism.pipeline_parallel_degree", "2"], "training.recipe=grpo does not support parallelism."
                                                      "pipeline_parallel_degree=2"),
    (["--grpo.num_generations", "3"], "grpo.num_generations=3 does not divide the 32 completions each rank"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message, one_thread):
    assert main(_grpo(tmp_path / "run", "--training.steps", "1", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("titan: error: ") and message in err[0], err


def test_kto_starts_at_its_formula_and_learns(tmp_path, one_thread):
    """Step 1: the policy is its reference and z = 0, so every completion's loss is 1 - sigmoid(0) = 0.5; the
    margin between desirable and undesirable rewards then opens up (LoRA: the reference is the base)."""
    argv = ["--config", TINY_SFT, "--job.dump_folder", str(tmp_path / "kto"), "--training.recipe", "kto",
            "--training.dataset", "tiny_feedback", "--validation.enable", "false", "--lora.enable",
            "--optimizer.lr", "1e-2", "--training.steps", "20", "--kto.beta", "0.5"]
    assert main(argv) == 0
    records = read_metrics(tmp_path / "kto")
    assert abs(records[0]["loss"] - 0.5) < 1e-6 and records[0]["kl"] == 0.0
    margins = [r["reward_margin"] for r in records if "reward_margin" in r]  # steps with both labels
    assert sum(margins[-5:]) / 5 > sum(margins[:5]) / 5 + 0.2, margins
    assert sum(r["loss"] for r in records[-5:]) / 5 < 0.5 - 0.03, [r["loss"] for r in records]
