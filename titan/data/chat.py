"""Fine-tuning data: chat conversations (SFT) and preference pairs (DPO) from JSONL, rendered with a chat template
into token ids plus "is this a target" flags, then batched by the same resumable, layout-independent loaders as
pre-training.

Owns the chat templates (ChatML, Qwen3, Llama 3), the JSONL record formats, loss masking, and packing. A batch is
{"input", "label"} of [local_batch_size, seq_len] with label = IGNORE_INDEX wherever no loss is wanted (prompt
tokens, padding); packed batches add "document_ids" for the block-diagonal attention mask (see
`titan.models.llama.document_mask`) and "positions" that restart with every conversation. Preference batches hold
2 x local_batch_size rows: the chosen replies first, then the rejected ones, pair i in rows i and B + i.

Formats (one JSON object per line; `sft.format`, detected per file by default):
  SFT messages:          {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
  SFT alpaca:            {"instruction": "...", "output": "...", "input": "...", "system": "..."}, the last two optional
  SFT sharegpt:          {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}
  SFT prompt_completion: {"prompt": "..." or [messages], "completion": "..." or [messages]}
  preference:            {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}
Every SFT format becomes the same list of messages, so a conversation renders to the same tokens in any of them.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from titan.data.chat_template import JinjaTemplate, tokenizer_template
from titan.data.documents import jsonl_records, locate
from titan.data.order import GlobalOrderSampler, SequentialBlocks, collate_rows, make_loader
from titan.data.pretrain import IGNORE_INDEX, document_positions
from titan.errors import ConfigError

if TYPE_CHECKING:
    from titan.config import SFT, Training, Validation
    from titan.data.tokenizer import Tokenizer

logger = logging.getLogger("titan")

ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------------------------------------------
# Chat templates


@dataclass
class ChatTemplate:
    """How a conversation becomes tokens. Each message is header + content + end (+ separator); for assistant
    messages the content and the end token are targets (the model learns to say them and to stop). `think` (Qwen3):
    the replies after the last user message open with their reasoning in a <think> block (empty when the message
    has none), earlier replies lose theirs, and the generation prompt carries an empty block (thinking off)."""

    name: str
    tokenizer: Tokenizer
    begin: list[int]  # once, at the start of a conversation
    header_special: tuple[int, ...]  # special ids around the role name: (before,) or (before, after)
    header_suffix: str  # text after the role (and the closing special, if any)
    end_id: int  # ends a message; generation stops at it
    separator: str  # text after the end token
    think: bool = False

    def _header(self, role: str) -> list[int]:
        ids = [self.header_special[0]] + self.tokenizer.encode(role)
        if len(self.header_special) > 1:
            ids.append(self.header_special[1])
        return ids + self.tokenizer.encode(self.header_suffix)

    def _content(self, messages: list[dict], i: int) -> str:
        content = messages[i]["content"]
        if not (self.think and messages[i]["role"] == "assistant"):
            return content
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        last_user = max((j for j, m in enumerate(messages) if m["role"] == "user"), default=-1)
        if i > last_user and (i == len(messages) - 1 or reasoning):
            return f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
        return content

    def render(self, messages: list[dict], train_on_prompt: bool = False,
               add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(token ids, target flags): flag i says token i is something the loss should teach."""
        ids, targets = list(self.begin), [train_on_prompt] * len(self.begin)
        sep = self.tokenizer.encode(self.separator)
        for i, m in enumerate(messages):
            header = self._header(m["role"])
            body = self.tokenizer.encode(self._content(messages, i)) + [self.end_id]
            learn = m["role"] == "assistant"
            ids += header + body + sep
            targets += [train_on_prompt] * len(header) + [learn or train_on_prompt] * len(body) \
                + [train_on_prompt] * len(sep)
        if add_generation_prompt:
            header = self._header("assistant") + (self.tokenizer.encode("<think>\n\n</think>\n\n") if self.think
                                                  else [])
            ids += header
            targets += [False] * len(header)
        return ids, targets


def chat_template(tokenizer: Tokenizer, name: str = "auto") -> ChatTemplate | JinjaTemplate:
    """The template `name` (sft.chat_template); "tokenizer" = the tokenizer folder's own Jinja template
    (titan/data/chat_template.py); "auto" = that if the folder has one, else Qwen3's if the tokenizer has <|im_start|>
    and <think>, else ChatML if it has <|im_start|>, else Llama 3 if it has <|start_header_id|>."""
    if name in ("auto", "tokenizer"):
        own = tokenizer_template(tokenizer, required=name == "tokenizer")
        if own is not None:
            return own
    sp = tokenizer.special_tokens
    if name == "auto":
        name = ("qwen3" if "<think>" in sp else "chatml") if "<|im_start|>" in sp else \
            "llama3" if "<|start_header_id|>" in sp else ""
        if not name:
            raise ConfigError("sft.chat_template=auto: the tokenizer (model.tokenizer_path) has neither ChatML "
                              "(<|im_start|>) nor Llama 3 (<|start_header_id|>) special tokens; use a chat "
                              "tokenizer such as titan/assets/tokenizer/debug_chat.tiktoken")
    chatml = ("<|im_start|>", "<|im_end|>")
    needed = {"chatml": chatml, "qwen3": chatml,
              "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}[name]
    missing = [t for t in needed if t not in sp]
    if missing:
        raise ConfigError(f"sft.chat_template={name}: the tokenizer (model.tokenizer_path) has no {missing[0]} token")
    if name in ("chatml", "qwen3"):
        return ChatTemplate(name, tokenizer, [], (sp["<|im_start|>"],), "\n", sp["<|im_end|>"], "\n",
                            think=name == "qwen3")
    return ChatTemplate("llama3", tokenizer, [sp["<|begin_of_text|>"]],
                        (sp["<|start_header_id|>"], sp["<|end_header_id|>"]), "\n\n", sp["<|eot_id|>"], "")


# ---------------------------------------------------------------------------------------------------------------
# JSONL files


def _records(path: Path, key: str) -> list[tuple[Path, int, dict]]:
    """(file, line number, object) for each non-empty line of a .jsonl file or of a folder's .jsonl files."""
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl") if path.is_dir() else [path]
    if not files or any(f.suffix != ".jsonl" for f in files):
        raise ConfigError(f"{key}: {path} is not a .jsonl file or a folder of them")
    out = []
    for f in files:
        for lineno, record in jsonl_records(f, key):
            if not isinstance(record, dict):
                raise ConfigError(f"{key}: {f} line {lineno} is not a JSON object")
            out.append((f, lineno, record))
    if not out:
        raise ConfigError(f"{key}: {path} holds no records")
    return out


def _messages(value, where: str, field: str) -> list[dict]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise ConfigError(f"{where}: \"{field}\" must be a non-empty list of {{\"role\": system|user|assistant, "
                          f"\"content\": str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(record: dict, field: str, where: str, optional: bool = False) -> str | None:
    value = record.get(field)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: \"{field}\" must be a string{' if present' if optional else ''}")
    return value


def as_messages(value, where: str, field: str, role: str) -> list[dict]:
    """A text field as one message of `role`, or a list of {"role", "content"} messages as they are."""
    return [{"role": role, "content": value}] if isinstance(value, str) else _messages(value, where, field)


# SFT record formats: each turns one JSON object into a list of messages (sft.format; docs/fine_tuning.md).


def _from_messages(record: dict, where: str) -> list[dict]:
    """{"messages": [{"role", "content"}, ...]} (OpenAI-style)."""
    return _messages(record.get("messages"), where, "messages")


def _from_alpaca(record: dict, where: str) -> list[dict]:
    """{"instruction", "input" (optional), "output", "system" (optional)}: the user message is the instruction,
    followed by a blank line and the input when there is one."""
    instruction, output = _text(record, "instruction", where), _text(record, "output", where)
    extra, system = _text(record, "input", where, optional=True), _text(record, "system", where, optional=True)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _from_sharegpt(record: dict, where: str) -> list[dict]:
    """{"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}."""
    turns = record.get("conversations")
    ok = isinstance(turns, list) and turns and all(
        isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES and isinstance(t.get("value"), str) for t in turns)
    if not ok:
        raise ConfigError(f"{where}: \"conversations\" must be a non-empty list of {{\"from\": system|human|gpt, "
                          f"\"value\": str}}")
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def _from_prompt_completion(record: dict, where: str) -> list[dict]:
    """{"prompt": str or [messages], "completion": str or [messages]}: a string prompt is one user message, a
    string completion one assistant reply."""
    if "prompt" not in record or "completion" not in record:
        raise ConfigError(f"{where}: needs a \"prompt\" and a \"completion\"")
    return as_messages(record.get("prompt"), where, "prompt", "user") + \
        as_messages(record.get("completion"), where, "completion", "assistant")


SFT_FORMATS = {"messages": _from_messages, "alpaca": _from_alpaca, "sharegpt": _from_sharegpt,
               "prompt_completion": _from_prompt_completion}


def detect_format(record: dict) -> str | None:
    """The SFT format a record is in, by its fields (sft.format = auto); None if none fits."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def read_conversations(path: Path, key: str, fmt: str = "auto") -> list[list[dict]]:
    """Every record as a list of messages. `fmt` (sft.format) names the record format; "auto" takes each file's
    format from its first record, and every later record of the file must be in it too."""
    conversations, formats = [], {}
    for f, lineno, record in _records(path, key):
        where = f"{key}: {f} line {lineno}"
        if f not in formats:
            found = detect_format(record) if fmt == "auto" else fmt
            if found is None:
                raise ConfigError(f"{where}: sft.format=auto: no \"messages\", \"conversations\", \"instruction\" "
                                  f"or \"prompt\" + \"completion\" field, so no known SFT format (see "
                                  f"docs/fine_tuning.md)")
            formats[f] = (found, f"{found} format, " + (f"detected from line {lineno}" if fmt == "auto" else
                                                        "sft.format"))
        name, origin = formats[f]
        messages = SFT_FORMATS[name](record, f"{where} ({origin})")
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where} has no assistant message (nothing to learn)")
        conversations.append(messages)
    return conversations


def read_preferences(path: Path, key: str) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, chosen reply, rejected reply) per line."""
    pairs = []
    for f, lineno, record in _records(path, key):
        where = f"{key}: {f} line {lineno}"
        prompt = as_messages(record.get("prompt"), where, "prompt", "user")
        replies = [record.get(k) for k in ("chosen", "rejected")]
        if not all(isinstance(r, str) for r in replies):
            raise ConfigError(f"{where} needs string \"chosen\" and \"rejected\" replies")
        pairs.append((prompt, *replies))
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# Examples -> rows of seq_len


def example(ids: list[int], targets: list[bool], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, label) of one rendered conversation, cut to seq_len + 1 tokens: label i = ids[i + 1] where that
    token is a target, else IGNORE_INDEX."""
    ids, targets = ids[: seq_len + 1], targets[: seq_len + 1]
    inp = torch.tensor(ids[:-1], dtype=torch.long)
    label = torch.tensor(ids[1:], dtype=torch.long)
    label[~torch.tensor(targets[1:], dtype=torch.bool)] = IGNORE_INDEX
    return inp, label


def pad_rows(examples: list[tuple[torch.Tensor, torch.Tensor]], seq_len: int, pad_id: int) -> list[dict]:
    """One example per row, padded at the end (pads are never attended to by real tokens: attention is causal)."""
    rows = []
    for inp, label in examples:
        row = {"input": torch.full((seq_len,), pad_id), "label": torch.full((seq_len,), IGNORE_INDEX)}
        row["input"][: len(inp)], row["label"][: len(label)] = inp, label
        rows.append(row)
    return rows


def pack_rows(examples: list[tuple[torch.Tensor, torch.Tensor]], seq_len: int, pad_id: int) -> list[dict]:
    """Several examples per row, best-fit decreasing: the longest first (ties in file order), each into the open
    row whose free space it fills best (the fullest that has room; of equally full rows, the earliest), or a new
    row. Rows come in the order they were opened, examples within a row in the order they were placed, so the rows
    are the same on every rank and in every run. "document_ids" number the examples within the row (padding is one
    more document, so it attends only to itself) and "positions" restart at 0 with each, so every example is trained
    as if it were alone."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    members: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted: the best fit is the first with enough space
    for i in order:
        n = len(examples[i][0])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            members.append([i])
            bisect.insort(free, (seq_len - n, len(members) - 1))
        else:
            space, row = free.pop(at)
            members[row].append(i)
            bisect.insort(free, (space - n, row))
    return [_packed_row([examples[i] for i in row], seq_len, pad_id) for row in members]


def _packed_row(parts: list[tuple[torch.Tensor, torch.Tensor]], seq_len: int, pad_id: int) -> dict:
    inp, label = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n_pad = seq_len - len(inp)
    docs = torch.cat([torch.full((len(p[0]),), d) for d, p in enumerate(parts)] + [torch.full((n_pad,), len(parts))])
    return {"input": torch.cat([inp, torch.full((n_pad,), pad_id)]),
            "label": torch.cat([label, torch.full((n_pad,), IGNORE_INDEX)]),
            "document_ids": docs, "positions": document_positions(docs)}


class Rows(Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def collate_pairs(pairs: list[dict]) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows."""
    return {k: torch.stack([p["chosen"][k] for p in pairs] + [p["rejected"][k] for p in pairs])
            for k in pairs[0]["chosen"]}


def _truncation_note(n_cut: int, n: int, what: str, seq_len: int) -> None:
    if n_cut:
        logger.warning(f"data: {n_cut} of {n} {what} are longer than training.seq_len={seq_len} + 1 tokens and were "
                       f"cut")


# ---------------------------------------------------------------------------------------------------------------
# Loaders


def sft_rows(section: str, data_cfg, sft: SFT, tokenizer: Tokenizer, seq_len: int, split: str) -> list[dict]:
    path, key = locate(section, data_cfg.dataset, data_cfg.dataset_path, split, data_cfg.dataset_columns)
    template = chat_template(tokenizer, sft.chat_template)
    rendered = [template.render(c, sft.train_on_prompt) for c in read_conversations(path, key, sft.format)]
    _truncation_note(sum(len(ids) > seq_len + 1 for ids, _ in rendered), len(rendered), "conversations", seq_len)
    examples = [example(ids, targets, seq_len) for ids, targets in rendered]
    # A conversation cut before its first reply has nothing to learn: a batch of only such rows would divide 0 by 0.
    kept = [e for e in examples if (e[1] != IGNORE_INDEX).any()]
    if not kept:
        raise ConfigError(f"{key}: no conversation in {path} has an assistant token within training.seq_len="
                          f"{seq_len} + 1 tokens")
    if len(kept) < len(examples):
        logger.warning(f"data: dropped {len(examples) - len(kept)} conversations cut before their first reply")
    if not sft.packing:
        return pad_rows(kept, seq_len, tokenizer.eos_id)
    rows = pack_rows(kept, seq_len, tokenizer.eos_id)
    fill = sum(len(e[0]) for e in kept) / (len(rows) * seq_len)
    logger.info(f"data: {section} packs {len(kept)} conversations into {len(rows)} rows of {seq_len} tokens, "
                f"{fill:.1%} full (best-fit decreasing)")
    return rows


def build_sft_dataloader(cfg: Training, sft: SFT, tokenizer: Tokenizer, dp_rank: int, dp_size: int):
    """Infinite, shuffled SFT batches for this dp rank (the same global order for any dp layout)."""
    rows = Rows(sft_rows("training", cfg, sft, tokenizer, cfg.seq_len, "train"))
    sampler = GlobalOrderSampler(len(rows), cfg.local_batch_size, cfg.seed, dp_rank, dp_size)
    return make_loader(rows, sampler, collate_rows)


def build_sft_validation_dataloader(cfg: Validation, sft: SFT, tokenizer: Tokenizer, seq_len: int, dp_rank: int,
                                    dp_size: int):
    rows = Rows(sft_rows("validation", cfg, sft, tokenizer, seq_len, "validation"))
    sampler = SequentialBlocks(len(rows), cfg.local_batch_size, dp_rank, dp_size)
    if len(sampler) == 0:
        raise ConfigError(f"validation: {len(rows)} validation rows, fewer than validation.local_batch_size x dp = "
                          f"{cfg.local_batch_size * dp_size}")
    return make_loader(rows, sampler, collate_rows)


def preference_rows(cfg: Training, sft: SFT, tokenizer: Tokenizer) -> list[dict]:
    """Each pair as {"chosen": row, "rejected": row}: prompt then reply, loss flags on the reply only."""
    path, key = locate("training", cfg.dataset, cfg.dataset_path, "train", cfg.dataset_columns)
    template = chat_template(tokenizer, sft.chat_template)
    pairs, n_cut = [], 0
    for prompt, chosen, rejected in read_preferences(path, key):
        pair = {}
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            ids, targets = template.render(prompt + [{"role": "assistant", "content": reply}])
            n_cut += len(ids) > cfg.seq_len + 1
            pair[name] = pad_rows([example(ids, targets, cfg.seq_len)], cfg.seq_len, tokenizer.eos_id)[0]
            # Every token's label, prompt included: ORPO's NLL as TRL and the ORPO authors take it (dpo.orpo_nll).
            pair[name]["sequence_label"] = pad_rows([example(ids, [True] * len(ids), cfg.seq_len)], cfg.seq_len,
                                                    tokenizer.eos_id)[0]["label"]
        if all((row["label"] != IGNORE_INDEX).any() for row in pair.values()):  # else nothing to compare
            pairs.append(pair)
    if not pairs:
        raise ConfigError(f"{key}: no preference pair in {path} has both replies within training.seq_len="
                          f"{cfg.seq_len} + 1 tokens")
    _truncation_note(n_cut, 2 * len(pairs), "replies with their prompts", cfg.seq_len)
    return pairs


def build_preference_dataloader(cfg: Training, sft: SFT, tokenizer: Tokenizer, dp_rank: int, dp_size: int):
    """Infinite, shuffled batches of local_batch_size preference pairs (2 x local_batch_size rows)."""
    pairs = Rows(preference_rows(cfg, sft, tokenizer))
    sampler = GlobalOrderSampler(len(pairs), cfg.local_batch_size, cfg.seed, dp_rank, dp_size)
    return make_loader(pairs, sampler, collate_pairs)
