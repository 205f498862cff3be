"""Data of the RL recipes: GRPO's prompts and KTO's labelled completions, from JSONL or parquet (a file, or a folder
of them), rendered with the chat template as SFT renders conversations (titan/data/chat.py).

  GRPO  {"prompt": "..." or [messages], <any other columns, e.g. "answer">}: the prompt ends in the template's
        generation prompt (the model's reply comes next); the other columns go to the reward functions as they are.
  KTO   {"prompt": "..." or [messages], "completion": "..." or [messages], "label": true | false}: loss flags on the
        completion only (as a DPO reply), plus the KL row KTO's reference point is estimated on: this prompt with
        the previous record's completion (TRL pairs them the same way: a mismatched pair from the same data).

A string prompt is one user message; a string completion one assistant reply. Who samples, scores or trains on them
is titan/rollout.py's and titan/objectives/'s business.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from titan.data.chat import ChatTemplate, Rows, as_messages, chat_template, example, pad_rows
from titan.data.documents import jsonl_records, locate, parquet_file
from titan.data.order import GlobalOrderSampler, collate_rows, make_loader
from titan.data.pretrain import IGNORE_INDEX
from titan.errors import ConfigError

if TYPE_CHECKING:
    from titan.config import GRPO, SFT, Training
    from titan.data.tokenizer import Tokenizer

logger = logging.getLogger("titan")


def read_records(path: Path, key: str) -> list[tuple[str, dict]]:
    """(where, record) for every record of a .jsonl or .parquet file, or of a folder of them (sorted); `where` names
    the file and line (or row) for error messages."""
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet")) if path.is_dir() else [path]
    if not files or any(f.suffix not in (".jsonl", ".parquet") for f in files):
        raise ConfigError(f"{key}: {path} is not a .jsonl or .parquet file or a folder of them")
    out = []
    for f in files:
        if f.suffix == ".parquet":
            rows = parquet_file(f, key).read().to_pylist()
            out += [(f"{key}: {f} row {i}", r) for i, r in enumerate(rows)]
            continue
        for lineno, record in jsonl_records(f, key):
            if not isinstance(record, dict):
                raise ConfigError(f"{key}: {f} line {lineno} is not a JSON object")
            out.append((f"{key}: {f} line {lineno}", record))
    if not out:
        raise ConfigError(f"{key}: {path} holds no records")
    return out


# ---------------------------------------------------------------------------------------------------------------
# GRPO


@dataclass
class Prompt:
    ids: list[int]  # the rendered prompt, ending in the generation prompt
    prompt: str | list  # the record's "prompt" as it is (what reward functions get as `prompts`)
    columns: dict = field(default_factory=dict)  # every other field of the record


def read_prompts(training: Training, sft: SFT, tokenizer: Tokenizer, max_prompt_tokens: int,
                 budget_key: str) -> tuple[list[Prompt], ChatTemplate]:
    """Every record of training.dataset(_path) as a `Prompt`, and the template that rendered them. A prompt longer
    than `max_prompt_tokens` is a ConfigError naming its file and line and `budget_key` (nothing is cut: a
    completion must follow the whole prompt)."""
    path, key = locate("training", training.dataset, training.dataset_path, "train", training.dataset_columns)
    template = chat_template(tokenizer, sft.chat_template)
    prompts, names = [], None
    for where, record in read_records(path, key):
        if "prompt" not in record:
            raise ConfigError(f"{where}: no \"prompt\" field (GRPO data is {{\"prompt\": text or messages, ...}})")
        ids, _ = template.render(as_messages(record["prompt"], where, "prompt", "user"), add_generation_prompt=True)
        if len(ids) > max_prompt_tokens:
            raise ConfigError(f"{where}: the prompt has {len(ids)} tokens, more than {budget_key} = "
                              f"{max_prompt_tokens} allows")
        columns = {k: v for k, v in record.items() if k != "prompt"}
        if names is None:
            names = set(columns)
        elif set(columns) != names:  # the reward functions get one list per column: every record needs them all
            raise ConfigError(f"{where}: has the columns {sorted(columns)}, the first record {sorted(names)}")
        prompts.append(Prompt(ids, record["prompt"], columns))
    return prompts, template


def grpo_prompts(training: Training, sft: SFT, grpo: GRPO, tokenizer: Tokenizer,
                 dp_size: int) -> tuple[list[Prompt], ChatTemplate]:
    """GRPO's prompts for a run on `dp_size` data-parallel ranks, each short enough to leave room for a whole
    completion (`read_prompts`); titan/rollout.py turns them into the loader."""
    per_rank = training.local_batch_size if training.global_batch_size == -1 else \
        training.global_batch_size // dp_size  # completions per step on each rank
    if per_rank % grpo.num_generations:
        raise ConfigError(f"grpo.num_generations={grpo.num_generations} does not divide the {per_rank} "
                          f"completions each rank trains on per step (training.global_batch_size / data-parallel "
                          f"degree, or local_batch_size): a prompt's group must be whole on one rank")
    budget = training.seq_len + 1 - grpo.max_completion_length
    return read_prompts(training, sft, tokenizer, budget, "training.seq_len + 1 - grpo.max_completion_length")


# ---------------------------------------------------------------------------------------------------------------
# KTO


def read_feedback(path: Path, key: str) -> list[tuple[list[dict], list[dict], bool]]:
    """(prompt messages, completion messages, label) per record."""
    out = []
    for where, record in read_records(path, key):
        if not isinstance(record.get("label"), bool):
            raise ConfigError(f"{where}: needs a boolean \"label\" (true = desirable completion)")
        for name in ("prompt", "completion"):
            if name not in record:
                raise ConfigError(f"{where}: no \"{name}\" field (KTO data is {{\"prompt\", \"completion\", "
                                  f"\"label\"}})")
        out.append((as_messages(record["prompt"], where, "prompt", "user"),
                    as_messages(record["completion"], where, "completion", "assistant"), record["label"]))
    return out


def feedback_rows(cfg: Training, sft: SFT, tokenizer: Tokenizer) -> list[dict]:
    """Each record as {"input", "label"} (prompt + completion, loss flags on the completion), {"kl_input",
    "kl_label"} (the prompt with the previous record's completion) and "desirable" (its label, 0-d bool)."""
    path, key = locate("training", cfg.dataset, cfg.dataset_path, "train", cfg.dataset_columns)
    template = chat_template(tokenizer, sft.chat_template)
    records = read_feedback(path, key)
    if len(records) < 2:
        raise ConfigError(f"{key}: {path} has {len(records)} record; KTO's reference point needs at least 2")
    rows = []
    for i, (prompt, completion, label) in enumerate(records):
        matched = _row(template, prompt, completion, cfg.seq_len, tokenizer.eos_id)
        mismatched = _row(template, prompt, records[i - 1][1], cfg.seq_len, tokenizer.eos_id)
        if (matched["label"] != IGNORE_INDEX).any() and (mismatched["label"] != IGNORE_INDEX).any():
            rows.append({**matched, "kl_input": mismatched["input"], "kl_label": mismatched["label"],
                         "desirable": torch.tensor(label)})
    if not rows:
        raise ConfigError(f"{key}: no record in {path} has a completion within training.seq_len={cfg.seq_len} + 1 "
                          f"tokens")
    if len(rows) < len(records):
        logger.warning(f"data: dropped {len(records) - len(rows)} KTO records cut before their completion")
    return rows


def _row(template: ChatTemplate, prompt: list[dict], completion: list[dict], seq_len: int, pad_id: int) -> dict:
    ids, targets = template.render(prompt + completion)
    n_prompt = len(template.render(prompt)[0])  # a prefix of the whole: its replies (if any) are not targets
    targets = [False] * n_prompt + targets[n_prompt:]
    return pad_rows([example(ids, targets, seq_len)], seq_len, pad_id)[0]


def build_feedback_dataloader(cfg: Training, sft: SFT, tokenizer: Tokenizer, dp_rank: int, dp_size: int):
    """Infinite, shuffled KTO batches for this dp rank (the same global order for any dp layout)."""
    rows = Rows(feedback_rows(cfg, sft, tokenizer))
    sampler = GlobalOrderSampler(len(rows), cfg.local_batch_size, cfg.seed, dp_rank, dp_size)
    return make_loader(rows, sampler, collate_rows)
