"""Reward functions the RL tests name by import path (tests/ is on sys.path under pytest): written the way TRL's
documentation writes them (keyword arguments, **kwargs for the rest), and broken ones for the error paths."""

from __future__ import annotations

CALLS: list[dict] = []  # what `recording` was called with


def recording(prompts, completions, completion_ids, answer, **kwargs) -> list[float]:
    """Records its arguments; 1.0 per completion."""
    CALLS.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                  "answer": answer, **kwargs})
    return [1.0] * len(completions)


def length_penalty(completions, **kwargs) -> list[float]:
    """-0.01 per character (a TRL-style shaping reward)."""
    return [-0.01 * len(c if isinstance(c, str) else c[0]["content"]) for c in completions]


def raises(completions, **kwargs) -> list[float]:
    raise RuntimeError("the grader is down")


def wrong_length(completions, **kwargs) -> list[float]:
    return [0.0] * (len(completions) - 1)


def not_numbers(completions, **kwargs) -> list:
    return ["good"] * len(completions)


def skips_some(completions, **kwargs) -> list[float | None]:
    """None ("does not apply") for every other completion."""
    return [None if i % 2 else 1.0 for i in range(len(completions))]
