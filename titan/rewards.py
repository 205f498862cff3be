"""Reward functions for GRPO: loading them by import path, calling them as TRL's GRPOTrainer does, and the
built-ins.

A reward function is any callable named in the config as "package.module:attribute"
(`grpo.reward_functions`), weighted by `grpo.reward_weights`. It is called with keyword arguments only, as TRL calls
it, so functions written for TRL work unchanged:

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], <every other dataset column>=[...],
       trainer_state=..., log_extra=..., log_metric=...)

one list entry per completion (a prompt's entries repeated for each of its completions). `prompts` holds the
dataset's `prompt` values as they are (a string, or a list of messages); `completions` the decoded completions, as a
string for a string prompt and as `[{"role": "assistant", "content": text}]` for a conversation. `trainer_state` has
`global_step` and `max_steps`; `log_extra` and `log_metric` are accepted and ignored. The function returns one
float (or None: "does not apply"; NaN here) per completion. One that raises, or returns a list of another length or
something that is not a number, stops the run with one line naming it (a ConfigError).

Built-ins: `math_answer` (the completion's final answer, the last \\boxed{...} or else the last number, equals the
`answer` column) and `format_regex` (the completion matches a regular expression: R1's <think>/<answer> layout by
default, or the row's `format_pattern` column). Nothing here knows about models or processes.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from titan.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# Built-ins

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
R1_FORMAT = r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$"  # DeepSeek-R1's layout (TRL's format reward)


def _text(completion) -> str:
    """A completion as text: TRL passes a string, or a list of messages whose last one is the reply."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str) -> str | None:
    """What a completion answers: the last \\boxed{...}, else the last number in it; None if neither."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", "").replace(" ", "").removeprefix("$").removesuffix("$"))
    except (ValueError, ZeroDivisionError):
        return None


def math_answer(completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 where the completion's final answer (`final_answer`) equals the row's `answer`, else 0.0; compared as
    exact numbers where both parse as one ("1,000", "0.50" and "1/2" are numbers), else as stripped strings. None
    where the row has no answer."""
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        if gold is None:
            rewards.append(None)
            continue
        got = final_answer(_text(completion))
        a, b = (_number(got) if got is not None else None), _number(str(gold))
        same = a == b if a is not None and b is not None else got is not None and got.strip() == str(gold).strip()
        rewards.append(1.0 if same else 0.0)
    return rewards


def format_regex(completions: list, format_pattern: list | None = None, **kwargs) -> list[float]:
    """1.0 where the whole completion matches the pattern (re.fullmatch, DOTALL): the row's `format_pattern` column
    if the dataset has one, else DeepSeek-R1's "<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>"."""
    patterns = format_pattern if format_pattern is not None else [R1_FORMAT] * len(completions)
    return [1.0 if re.fullmatch(p or R1_FORMAT, _text(c), re.DOTALL) else 0.0
            for c, p in zip(completions, patterns, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# Loading and calling


@dataclass
class TrainerState:
    """What TRL's `trainer_state` offers that reward functions use for schedules."""

    global_step: int
    max_steps: int


def _ignore(*args, **kwargs) -> None:
    return None


@dataclass
class RewardFunction:
    path: str  # as configured: "module:attribute"
    fn: Callable
    weight: float

    @property
    def name(self) -> str:
        """For the metrics: the attribute's name."""
        return self.path.rsplit(":", 1)[-1]


def load_reward_functions(paths: Sequence[str], weights: Sequence[float]) -> list[RewardFunction]:
    """Import every "module:attribute" of `grpo.reward_functions`; any that cannot be found is a ConfigError naming
    it. `weights` empty means 1.0 each."""
    if not paths:
        raise ConfigError("grpo.reward_functions is empty: name at least one, e.g. [\"titan.rewards:math_answer\"]")
    if weights and len(weights) != len(paths):
        raise ConfigError(f"grpo.reward_weights has {len(weights)} entries for {len(paths)} grpo.reward_functions")
    out = []
    for i, path in enumerate(paths):
        key = f"grpo.reward_functions[{i}]={path!r}"
        module_name, _, attr = path.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"{key}: expected \"package.module:function\"")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - any import failure of user code is the config's problem
            raise ConfigError(f"{key}: cannot import {module_name} ({type(e).__name__}: {e})") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ConfigError(f"{key}: {module_name} has no {'callable ' if hasattr(module, attr) else ''}{attr}")
        out.append(RewardFunction(path, fn, float(weights[i]) if weights else 1.0))
    return out


def score(functions: list[RewardFunction], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list], state: TrainerState) -> torch.Tensor:
    """(completions, functions) fp32 rewards, NaN where a function returned None. `columns`: the dataset's other
    columns, one entry per completion."""
    out = torch.full((len(completions), len(functions)), math.nan)
    for j, f in enumerate(functions):
        try:
            values = f.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns,
                          trainer_state=state, log_extra=_ignore, log_metric=_ignore)
        except Exception as e:  # noqa: BLE001 - user code: any failure stops the run with its name
            raise ConfigError(f"reward function {f.path} raised {type(e).__name__}: {e}"[:400]) from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise ConfigError(f"reward function {f.path} returned {got} for {len(completions)} completions (it must "
                              f"return one float or None per completion)")
        for i, v in enumerate(values):
            if v is not None:
                try:
                    out[i, j] = float(v)  # also numpy and 0-d torch numbers, and bools, as torch.tensor takes them
                except (TypeError, ValueError):
                    raise ConfigError(f"reward function {f.path} returned {v!r} for completion {i} (a float or "
                                      f"None is expected)") from None
    return out


def combine(rewards: torch.Tensor, functions: list[RewardFunction]) -> torch.Tensor:
    """Each completion's reward: the weighted sum over the functions that gave one (TRL's nansum); NaN where none
    did."""
    weights = torch.tensor([f.weight for f in functions], dtype=rewards.dtype)
    total = (rewards * weights).nansum(dim=1)
    return total.masked_fill(rewards.isnan().all(dim=1), math.nan)
