"""Write the shipped fine-tuning fixtures: a 4k-token chat tokenizer (the debug tokenizer with ChatML and Llama 3
special tokens) and two tiny synthetic datasets, tiny_chat (SFT) and tiny_preferences (DPO), about arithmetic.

    python scripts/make_chat_fixtures.py        # rewrites titan/assets/...; the output is deterministic

The data is made up here (no licence questions): small sums and differences, asked in a few phrasings, some with a
system message or a second turn. Preference pairs prefer the correct answer over a wrong or evasive one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    chat_tokenizer()
    rng = random.Random(0)
    data = ASSETS / "data"
    write_jsonl(data / "tiny_chat" / "train.jsonl", [conversation(rng) for _ in range(400)])
    write_jsonl(data / "tiny_chat" / "validation.jsonl", [conversation(rng) for _ in range(40)])
    write_jsonl(data / "tiny_preferences" / "train.jsonl", [preference(rng) for _ in range(200)])
    print(f"wrote fixtures under {ASSETS}")


if __name__ == "__main__":
    main()
