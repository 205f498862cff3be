"""Write the shipped fine-tuning fixtures: a 4k-token chat tokenizer (the debug tokenizer with ChatML and Llama 3
special tokens) and tiny synthetic datasets about arithmetic: tiny_chat (SFT, "messages" records), tiny_preferences
(DPO), and one more SFT set written in each of the other record formats titan reads: tiny_alpaca, tiny_sharegpt and
tiny_prompt_completion hold the same single-turn conversations, so they render to the same tokens. For the RL
recipes: tiny_feedback (KTO: a reply labelled desirable or not), tiny_arithmetic (GRPO prompts of single-digit sums
for the debug model, with their answer and a format pattern) and arithmetic (GRPO prompts for SmolLM2-135M: a
two-digit number plus or minus a one-digit one, train and validation).

    python scripts/make_chat_fixtures.py        # rewrites titan/assets/...; the output is deterministic

The data is made up here (no licence questions): small sums and differences, asked in a few phrasings, some with a
system message or a second turn. Preference pairs prefer the correct answer over a wrong or evasive one.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flags.py, however this file is loaded
from flags import Parser  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "titan" / "assets"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
VOCAB = 4096

QUESTIONS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
             "Please tell me {a} {op} {b}."]
SYSTEMS = ["You are a helpful assistant.", "You are a careful calculator. Answer briefly."]


def chat_tokenizer() -> None:
    """debug_chat.tiktoken: the first VOCAB - len(SPECIALS) ranks of the debug tokenizer (a prefix of a byte-level
    BPE rank list is itself a valid BPE vocabulary), then the special tokens, so the vocabulary stays 4096."""
    src = ASSETS / "tokenizer" / "debug.tiktoken"
    n = VOCAB - len(SPECIALS)
    lines = [line for line in src.read_text().splitlines() if line.strip()][:n]
    (ASSETS / "tokenizer" / "debug_chat.tiktoken").write_text("\n".join(lines) + "\n")
    pattern = json.loads((ASSETS / "tokenizer" / "debug.json").read_text())["pattern"]
    meta = {"pattern": pattern, "special_tokens": {s: n + i for i, s in enumerate(SPECIALS)},
            "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (ASSETS / "tokenizer" / "debug_chat.json").write_text(json.dumps(meta, indent=2) + "\n")


def problem(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    op = rng.choice("+-")
    question = rng.choice(QUESTIONS).format(a=a, op=op, b=b)
    return question, (a + b if op == "+" else a - b), f"{a} {op} {b}"


def conversation(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    for _ in range(2 if rng.random() < 0.25 else 1):
        question, answer, expr = problem(rng)
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": f"{expr} = {answer}."}]
    return {"messages": messages}


def preference(rng: random.Random) -> dict:
    question, answer, expr = problem(rng)
    wrong = answer + rng.choice([-2, -1, 1, 2, 10])
    rejected = f"{expr} = {wrong}." if rng.random() < 0.7 else "I don't know."
    return {"prompt": question, "chosen": f"{expr} = {answer}.", "rejected": rejected}


def feedback(rng: random.Random) -> dict:
    """KTO: one reply, labelled desirable when it is right (about half of them)."""
    pair = preference(rng)
    good = rng.random() < 0.5
    return {"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good}


# What tiny_arithmetic's format reward asks of a completion (titan.rewards:format_regex reads the column): a number
# first. A randomly initialised debug model says one about 4 % of the time, so GRPO has something to reinforce.
NUMBER_FIRST = r"\s*\d+\b.*"


def tiny_arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"prompt": f"{a} + {b} =", "answer": str(a + b), "format_pattern": NUMBER_FIRST}


def arithmetic(rng: random.Random) -> dict:
    """GRPO for SmolLM2-135M: a two-digit number plus or minus a one-digit one; the reward checks the last number of
    the reply (docs/rl.md has the model's accuracy before and after)."""
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    op = rng.choice("+-")
    return {"prompt": f"What is {a} {op} {b}? Answer with the number only.", "answer": str(a + b if op == "+"
                                                                                          else a - b)}


INSTRUCTIONS = ["Compute the following.", "Work this out.", "Give the result."]


def alpaca(rng: random.Random) -> dict:
    """One single-turn exchange as an Alpaca record: the sum in the instruction, or in the optional input."""
    question, answer, expr = problem(rng)
    record = {"instruction": question, "output": f"{expr} = {answer}."}
    if rng.random() < 0.4:
        record = {"instruction": rng.choice(INSTRUCTIONS), "input": expr, "output": record["output"]}
    if rng.random() < 0.3:
        record["system"] = rng.choice(SYSTEMS)
    return record


def as_messages(record: dict) -> list[dict]:
    """The messages an Alpaca record stands for (titan's reading: instruction, a blank line, the input)."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def as_sharegpt(record: dict) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in as_messages(record)]}


def as_prompt_completion(record: dict) -> dict:
    """A string prompt when there is no system message, else the prompt as messages."""
    messages = as_messages(record)
    prompt = messages[0]["content"] if len(messages) == 2 else messages[:-1]
    return {"prompt": prompt, "completion": messages[-1]["content"]}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> int:
    # No flags, parsed all the same: --help prints the docstring, and a stray argument is refused before the shipped
    # fixtures are rewritten.
    Parser(prog="make_chat_fixtures.py", description=__doc__.split("\n\n")[0]).parse_args(argv)
    chat_tokenizer()
    rng = random.Random(0)
    data = ASSETS / "data"
    write_jsonl(data / "tiny_chat" / "train.jsonl", [conversation(rng) for _ in range(400)])
    write_jsonl(data / "tiny_chat" / "validation.jsonl", [conversation(rng) for _ in range(40)])
    write_jsonl(data / "tiny_preferences" / "train.jsonl", [preference(rng) for _ in range(200)])
    rng = random.Random(1)  # a stream of its own: the sets above stay as they were
    splits = {"train": [alpaca(rng) for _ in range(200)], "validation": [alpaca(rng) for _ in range(20)]}
    for name, convert in (("tiny_alpaca", dict), ("tiny_sharegpt", as_sharegpt),
                          ("tiny_prompt_completion", as_prompt_completion)):
        for split, records in splits.items():
            write_jsonl(data / name / f"{split}.jsonl", [convert(r) for r in records])
    rng = random.Random(2)  # the RL sets, each from the same stream after the ones above
    write_jsonl(data / "tiny_feedback" / "train.jsonl", [feedback(rng) for _ in range(200)])
    write_jsonl(data / "tiny_arithmetic" / "train.jsonl", [tiny_arithmetic(rng) for _ in range(200)])
    write_jsonl(data / "arithmetic" / "train.jsonl", [arithmetic(rng) for _ in range(1000)])
    write_jsonl(data / "arithmetic" / "validation.jsonl", [arithmetic(rng) for _ in range(200)])
    print(f"wrote fixtures under {ASSETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
