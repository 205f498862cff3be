"""Fine-tuning data and objectives: chat templates (exact text, target flags), JSONL errors, the SFT record formats
(the same conversation in each renders to the same tokens and loss mask; bad records name file, line and field),
label masking, padding and packing, the SFT/preference loaders, and two acceptance checks on a tiny fp32 model:
prompt and padding tokens get exactly zero gradient, and packed rows (with document ids) give the same
per-conversation losses and gradients as one conversation per row. Then every preference loss (DPO, IPO, SimPO,
ORPO) and its statistics against a re-computation from its paper's formula."""

import copy
import json
import logging
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from dist_utils import REPO, rel_error

from titan.config import DPO, SFT, Training, Validation
from titan.data.chat import (
    build_preference_dataloader,
    build_sft_dataloader,
    build_sft_validation_dataloader,
    chat_template,
    collate_rows,
    detect_format,
    example,
    pack_rows,
    pad_rows,
    read_conversations,
    read_preferences,
    sft_rows,
)
from titan.data.documents import DATASETS
from titan.data.pretrain import IGNORE_INDEX, document_positions
from titan.data.tokenizer import load_tokenizer
from titan.errors import ConfigError
from titan.models.llama import Transformer, document_mask, model_args
from titan.objectives import DPOLoss, TokenLoss, preference_loss
from titan.objectives.token import token_logps

CHAT_TOKENIZER = REPO / "titan" / "assets" / "tokenizer" / "debug_chat.tiktoken"
KEY = "training.dataset_path"

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6."},
]
CHATML_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    "<|im_start|>assistant\n2 + 2 = 4.<|im_end|>\n<|im_start|>user\nAnd 3 + 3?<|im_end|>\n"
    "<|im_start|>assistant\n6.<|im_end|>\n"
)
LLAMA3_TEXT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 2 = 4.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 3 + 3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n6.<|eot_id|>"
)
TEMPLATES = {  # name: (rendered text, end token, assistant header text)
    "chatml": (CHATML_TEXT, "<|im_end|>", "<|im_start|>assistant\n"),
    "llama3": (LLAMA3_TEXT, "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(CHAT_TOKENIZER))


@pytest.fixture(scope="module")
def tiny_chat():
    return read_conversations(DATASETS["tiny_chat"]["train"], "training.dataset")


def ce_sum(logits, labels):
    """titan.objectives.cross_entropy_sum without its DTensor branch (importing titan.build costs seconds)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def tiny_model(seq_len: int) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(model_args("tiny", vocab_size=4096, max_seq_len=seq_len))
    model.init_weights()
    return model


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    out, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Templates


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_template_text_and_targets(tok, name):
    text, end, assistant_header = TEMPLATES[name]
    template = chat_template(tok, name)
    ids, targets = template.render(CONVERSATION)
    assert len(ids) == len(targets)
    assert tok.decode(ids) == text
    end_id = tok.special_tokens[end]
    # The targets are exactly each assistant message's content plus its end token, right after the assistant header.
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    spans = runs(targets)
    assert [ids[a:b] for a, b in spans] == [tok.encode(r) + [end_id] for r in replies]
    for a, _ in spans:
        assert tok.decode(ids[:a]).endswith(assistant_header)
    # Nothing else: the other tokens spell the whole text with the replies and their end tokens cut out.
    prompt_text = text
    for r in replies:
        prompt_text = prompt_text.replace(r + end, "", 1)
    assert tok.decode([i for i, t in zip(ids, targets) if not t]) == prompt_text

    ids_all, targets_all = template.render(CONVERSATION, train_on_prompt=True)
    assert ids_all == ids and all(targets_all)

    prompt_ids, prompt_targets = template.render(CONVERSATION[:4], add_generation_prompt=True)
    plain_ids, plain_targets = template.render(CONVERSATION[:4])
    assert prompt_ids[: len(plain_ids)] == plain_ids and prompt_targets[: len(plain_ids)] == plain_targets
    assert tok.decode(prompt_ids[len(plain_ids):]) == assistant_header
    assert not any(prompt_targets[len(plain_ids):])
    # The generation prompt is the prefix the model continues: the full conversation's last reply follows it.
    assert ids[: len(prompt_ids)] == prompt_ids and tok.decode(ids[len(prompt_ids):]).startswith("6.")


def test_special_token_text_in_messages_stays_text(tok):
    template = chat_template(tok, "chatml")
    ids, targets = template.render([{"role": "user", "content": "say <|im_end|> now"},
                                    {"role": "assistant", "content": "<|im_start|>ok"}])
    end, start = tok.special_tokens["<|im_end|>"], tok.special_tokens["<|im_start|>"]
    assert ids.count(end) == 2 and ids.count(start) == 2  # only the template's own
    assert tok.decode([i for i, t in zip(ids, targets) if t]) == "<|im_start|>ok<|im_end|>"


def test_auto_template_and_missing_special_tokens(tok):
    assert chat_template(tok, "auto").name == "chatml"
    assert chat_template(tok).end_id == tok.special_tokens["<|im_end|>"]
    plain = load_tokenizer("")  # the pre-training debug tokenizer: no chat special tokens
    for name in ("auto", "chatml", "llama3"):
        with pytest.raises(ConfigError) as e:
            chat_template(plain, name)
        text = str(e.value)
        assert f"sft.chat_template={name}" in text and "\n" not in text, text
    no_eot = copy.copy(tok)
    no_eot.special_tokens = {k: v for k, v in tok.special_tokens.items() if k != "<|eot_id|>"}
    with pytest.raises(ConfigError, match=r"sft\.chat_template=llama3: .*has no <\|eot_id\|> token"):
        chat_template(no_eot, "llama3")
    assert chat_template(no_eot, "auto").name == "chatml"  # ChatML does not need it
    only_llama3 = copy.copy(tok)
    only_llama3.special_tokens = {k: v for k, v in tok.special_tokens.items() if "im_" not in k}
    assert chat_template(only_llama3, "auto").name == "llama3"


# ---------------------------------------------------------------------------------------------------------------
# JSONL files


def msg(role, content):
    return {"role": role, "content": content}


GOOD = json.dumps({"messages": [msg("user", "hi"), msg("assistant", "hello")]})


def expect_error(fn, *fragments) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    text = str(e.value)
    assert "\n" not in text, text
    for f in fragments:
        assert str(f) in text, (f, text)
    return text


@pytest.mark.parametrize("content, line, fragment", [
    (GOOD + "\n{not json\n", 2, "is not JSON"),
    ("\n\n" + GOOD + "\n" + json.dumps([GOOD]) + "\n", 4, "is not a JSON object"),
    (json.dumps({"text": "no messages"}) + "\n", 1, "no known SFT format"),
    (GOOD + "\n" + json.dumps({"messages": []}), 2, '"messages" must be a non-empty list'),
    (GOOD + "\n" + json.dumps({"messages": [msg("user", "hi"), msg("bot", "hello")]}), 2, "system|user|assistant"),
    (json.dumps({"messages": [msg("user", "hi"), {"role": "assistant", "content": 5}]}), 1, "must be a non-empty"),
    (GOOD + "\n" + GOOD + "\n" + json.dumps({"messages": [msg("system", "s"), msg("user", "hi")]}), 3,
     "has no assistant message"),
])
def test_bad_conversation_files(tmp_path, tok, content, line, fragment):
    path = tmp_path / "chat.jsonl"
    path.write_text(content)
    expect_error(lambda: read_conversations(path, KEY), KEY, path, f"line {line}", fragment)
    cfg = Training(dataset_path=str(path), seq_len=32, local_batch_size=1)
    expect_error(lambda: build_sft_dataloader(cfg, SFT(), tok, 0, 1), KEY, path, f"line {line}", fragment)
    val = Validation(dataset_path=str(path), local_batch_size=1)
    expect_error(lambda: build_sft_validation_dataloader(val, SFT(), tok, 32, 0, 1), "validation.dataset_path", path,
                 f"line {line}", fragment)


@pytest.mark.parametrize("record, fragment", [
    ({"prompt": "hi", "chosen": "hello"}, 'needs string "chosen" and "rejected"'),
    ({"prompt": "hi", "chosen": "hello", "rejected": 3}, 'needs string "chosen" and "rejected"'),
    ({"chosen": "a", "rejected": "b"}, '"prompt" must be a non-empty list'),
    ({"prompt": [msg("narrator", "x")], "chosen": "a", "rejected": "b"}, '"prompt" must be a non-empty list'),
])
def test_bad_preference_files(tmp_path, tok, record, fragment):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    expect_error(lambda: read_preferences(path, KEY), KEY, path, "line 2", fragment)
    cfg = Training(dataset_path=str(path), seq_len=32, local_batch_size=1)
    expect_error(lambda: build_preference_dataloader(cfg, SFT(), tok, 0, 1), KEY, path, "line 2", fragment)


def test_empty_missing_and_wrong_kind_of_path(tmp_path, tok):
    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"
    empty.write_text("")
    blank.write_text("\n   \n")
    for path in (empty, blank):
        expect_error(lambda path=path: read_conversations(path, KEY), KEY, path, "holds no records")
        expect_error(lambda path=path: read_preferences(path, KEY), KEY, path, "holds no records")
    missing = tmp_path / "nope.jsonl"
    expect_error(lambda: read_conversations(missing, KEY), KEY, missing, "does not exist")
    cfg = Training(dataset_path=str(missing), seq_len=32)
    expect_error(lambda: build_sft_dataloader(cfg, SFT(), tok, 0, 1), KEY, missing, "does not exist")
    expect_error(lambda: build_preference_dataloader(cfg, SFT(), tok, 0, 1), KEY, missing, "does not exist")
    txt = tmp_path / "chat.txt"
    txt.write_text(GOOD)
    expect_error(lambda: read_conversations(txt, KEY), KEY, txt, "is not a .jsonl file")
    folder = tmp_path / "no_jsonl"
    folder.mkdir()
    (folder / "notes.md").write_text("nothing")
    expect_error(lambda: read_conversations(folder, KEY), KEY, folder, "is not a .jsonl file or a folder")
    # The default dataset of a section that is not a chat dataset (austen is .txt) is named by its key.
    expect_error(lambda: build_sft_dataloader(Training(seq_len=32), SFT(), tok, 0, 1), "training.dataset",
                 "is not a .jsonl file")


def test_folder_of_files_in_order_and_errors_name_the_file(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [msg("user", "2"), msg("assistant", "two")]}) + "\n")
    (tmp_path / "a.jsonl").write_text(GOOD + "\n\n")
    (tmp_path / "readme.md").write_text("ignored")
    assert [c[0]["content"] for c in read_conversations(tmp_path, KEY)] == ["hi", "2"]
    (tmp_path / "c.jsonl").write_text(GOOD + "\n" + GOOD + "\n{oops}\n")
    expect_error(lambda: read_conversations(tmp_path, KEY), tmp_path / "c.jsonl", "line 3 is not JSON")


def test_conversation_fields_are_kept_exactly(tmp_path):
    path = tmp_path / "chat.jsonl"
    messages = [msg("system", "Be kind."), msg("user", "line one\nline two\u2028same line"), msg("assistant", "ok")]
    path.write_text(json.dumps({"messages": [{**m, "name": "x"} for m in messages], "id": 7}, ensure_ascii=False))
    assert read_conversations(path, KEY) == [messages]  # U+2028 inside a string does not split the line


def test_prompt_as_string_or_as_messages(tmp_path, tok):
    as_text, as_list = tmp_path / "text.jsonl", tmp_path / "list.jsonl"
    as_text.write_text(json.dumps({"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "3."}) + "\n")
    as_list.write_text(json.dumps({"prompt": [msg("user", "What is 1 + 1?")], "chosen": "2.", "rejected": "3."}))
    expected = [([msg("user", "What is 1 + 1?")], "2.", "3.")]
    assert read_preferences(as_text, KEY) == read_preferences(as_list, KEY) == expected
    rows = [build_preference_dataloader(Training(dataset_path=str(p), seq_len=32, local_batch_size=1), SFT(), tok, 0,
                                        1).dataset.rows for p in (as_text, as_list)]
    assert all(torch.equal(a[k][key], b[k][key]) for a, b in zip(*rows) for k in ("chosen", "rejected")
               for key in ("input", "label"))
    system = tmp_path / "system.jsonl"
    system.write_text(json.dumps({"prompt": [msg("system", "Terse."), msg("user", "1 + 1?")], "chosen": "2",
                                  "rejected": "two"}))
    assert read_preferences(system, KEY) == [([msg("system", "Terse."), msg("user", "1 + 1?")], "2", "two")]


# ---------------------------------------------------------------------------------------------------------------
# SFT record formats


def as_format(fmt: str, messages: list[dict]) -> dict:
    """A conversation (optional system, one user turn, one reply) as a record of `fmt`, written by hand here."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    user, reply = (m["content"] for m in messages if m["role"] != "system")
    if fmt == "messages":
        return {"messages": messages}
    if fmt == "alpaca":
        instruction, _, extra = user.partition("\n\n")
        return {"instruction": instruction, **({"input": extra} if extra else {}), "output": reply,
                **({"system": system[0]} if system else {})}
    if fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
    return {"prompt": messages[:-1] if system else user, "completion": reply}


SFT_FORMAT_NAMES = ("messages", "alpaca", "sharegpt", "prompt_completion")
SAME_CONVERSATIONS = [
    [msg("user", "What is 2 + 2?"), msg("assistant", "2 + 2 = 4.")],
    [msg("system", "Be brief."), msg("user", "Compute this.\n\n17 - 5"), msg("assistant", "12.")],
    [msg("user", "Add them.\n\n3 and 4"), msg("assistant", "3 + 4 = 7.")],
]


@pytest.mark.parametrize("packing", [False, True])
def test_the_same_conversations_in_every_format_give_the_same_rows(tmp_path, tok, packing):
    rows = {}
    for fmt in SFT_FORMAT_NAMES:
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(as_format(fmt, c)) + "\n" for c in SAME_CONVERSATIONS))
        assert read_conversations(path, KEY) == SAME_CONVERSATIONS  # auto-detected
        assert read_conversations(path, KEY, fmt) == SAME_CONVERSATIONS
        cfg = Training(dataset_path=str(path), seq_len=48, local_batch_size=1)
        rows[fmt] = build_sft_dataloader(cfg, SFT(packing=packing), tok, 0, 1).dataset.rows
    reference = rows.pop("messages")
    assert reference and any((r["label"] != IGNORE_INDEX).any() for r in reference)
    for fmt, got in rows.items():
        assert same(got, reference), fmt  # token ids, loss mask (labels), document ids and positions


def test_shipped_format_fixtures_hold_the_same_conversations(tok):
    """tiny_alpaca, tiny_sharegpt and tiny_prompt_completion (scripts/make_chat_fixtures.py) are one set of
    conversations in three formats: each split loads to identical rows."""
    for split, section in (("train", "training"), ("validation", "validation")):
        loaded = {}
        for name in ("tiny_alpaca", "tiny_sharegpt", "tiny_prompt_completion"):
            conversations = read_conversations(DATASETS[name][split], f"{section}.dataset")
            assert {detect_format(json.loads(line)) for line in DATASETS[name][split].read_text().splitlines()} \
                == {name.removeprefix("tiny_")}
            loaded[name] = conversations
        first = loaded.pop("tiny_alpaca")
        assert len(first) >= 20 and any(c[0]["role"] == "system" for c in first)
        assert any("\n\n" in c[-2]["content"] for c in first)  # some records have an Alpaca "input"
        assert all(c == first for c in loaded.values())
    cfg = Training(dataset="tiny_sharegpt", seq_len=64, local_batch_size=2)
    shared = build_sft_dataloader(cfg, SFT(packing=True), tok, 0, 1).dataset.rows
    alpaca = build_sft_dataloader(replace(cfg, dataset="tiny_alpaca"), SFT(packing=True), tok, 0, 1).dataset.rows
    assert same(shared, alpaca)


BAD_RECORDS = {  # format: [(record after a good first one, the field the error names)]
    "messages": [({"messages": [msg("user", "hi"), {"role": "bot", "content": "x"}]}, '"messages"'),
                 ({"conversations": [{"from": "human", "value": "hi"}]}, '"messages"')],  # mixed formats
    "alpaca": [({"instruction": "hi"}, '"output"'), ({"instruction": 3, "output": "x"}, '"instruction"'),
               ({"instruction": "hi", "input": ["x"], "output": "y"}, '"input"'),
               ({"instruction": "hi", "output": "y", "system": 1}, '"system"'),
               ({"messages": [msg("user", "hi"), msg("assistant", "x")]}, '"instruction"')],
    "sharegpt": [({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
                  '"conversations"'),
                 ({"conversations": [{"from": "human", "value": "hi"}]}, "has no assistant message"),
                 ({"conversations": []}, '"conversations"')],
    "prompt_completion": [({"prompt": "hi"}, '"completion"'), ({"prompt": "hi", "completion": 5}, '"completion"'),
                          ({"prompt": [msg("narrator", "x")], "completion": "y"}, '"prompt"')],
}


@pytest.mark.parametrize("fmt, record, field", [(f, r, k) for f, cases in BAD_RECORDS.items() for r, k in cases])
@pytest.mark.parametrize("explicit", [False, True])
def test_bad_records_of_every_format_name_file_line_and_field(tmp_path, fmt, record, field, explicit):
    path = tmp_path / "data.jsonl"
    good = as_format(fmt, SAME_CONVERSATIONS[1])
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    origin = "sft.format" if explicit else "detected from line 1"
    expect_error(lambda: read_conversations(path, KEY, fmt if explicit else "auto"), KEY, path, "line 3", field,
                 *([] if "assistant" in field else [f"{fmt} format", origin]))


def test_each_file_of_a_folder_has_its_own_format(tmp_path):
    for i, fmt in enumerate(SFT_FORMAT_NAMES):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps(as_format(fmt, SAME_CONVERSATIONS[i % 3])) + "\n")
    assert read_conversations(tmp_path, KEY) == [SAME_CONVERSATIONS[i % 3] for i in range(4)]
    # With the format set, every file must be in it.
    expect_error(lambda: read_conversations(tmp_path, KEY, "sharegpt"), tmp_path / "0.jsonl", "line 1",
                 '"conversations"', "sft.format")


# ---------------------------------------------------------------------------------------------------------------
# Examples, padding, packing


def test_example_labels_and_truncation():
    ids = list(range(100, 110))
    targets = [False, False, True, True, False, False, True, True, True, False]
    inp, label = example(ids, targets, seq_len=32)
    assert inp.dtype == label.dtype == torch.long
    assert inp.tolist() == ids[:-1]
    assert label.tolist() == [ids[i + 1] if targets[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)]
    assert label.tolist() == [-100, 102, 103, -100, -100, 106, 107, 108, -100]
    inp, label = example(ids, targets, seq_len=5)  # seq_len + 1 tokens kept: 5 inputs, 5 labels
    assert inp.tolist() == ids[:5] and label.tolist() == [-100, 102, 103, -100, -100]
    inp, label = example(ids, targets, seq_len=9)  # exactly seq_len + 1 tokens: nothing cut
    assert inp.tolist() == ids[:-1] and label[-1] == IGNORE_INDEX


def test_pad_rows():
    a = (torch.tensor([1, 2, 3]), torch.tensor([-100, 3, 4]))
    b = (torch.tensor([5, 6, 7, 8]), torch.tensor([6, 7, -100, 9]))
    rows = pad_rows([a, b], 6, pad_id=0)
    assert set(rows[0]) == {"input", "label"}
    assert rows[0]["input"].tolist() == [1, 2, 3, 0, 0, 0] and rows[0]["label"].tolist() == [-100, 3, 4] + [-100] * 3
    assert rows[1]["input"].tolist() == [5, 6, 7, 8, 0, 0] and rows[1]["label"].tolist() == [6, 7, -100, 9, -100, -100]
    full = pad_rows([b], 4, pad_id=0)[0]
    assert torch.equal(full["input"], b[0]) and torch.equal(full["label"], b[1])


def check_packed(rows, examples, seq_len, pad_id):
    """Every row holds whole examples, then padding, document ids 0, 1, ... then one more for padding; every example
    is in exactly one row; rows follow best-fit decreasing: no example would have fitted in the free space of a row
    opened before its own (its free space when the example was placed)."""
    remaining = {(tuple(e[0].tolist()), tuple(e[1].tolist())): 0 for e in examples}
    for e in examples:
        remaining[(tuple(e[0].tolist()), tuple(e[1].tolist()))] += 1
    for row in rows:
        assert set(row) == {"input", "label", "document_ids", "positions"}
        assert all(row[k].shape == (seq_len,) for k in row)
        docs = row["document_ids"]
        assert docs[0] == 0 and ((docs[1:] - docs[:-1]) >= 0).all() and ((docs[1:] - docs[:-1]) <= 1).all()
        used = 0
        for d in range(int(docs.max()) + 1):
            seg = (docs == d).nonzero().flatten()
            a, b = int(seg[0]), int(seg[-1]) + 1
            assert a == used and b - a == len(seg)
            key = (tuple(row["input"][a:b].tolist()), tuple(row["label"][a:b].tolist()))
            if remaining.get(key, 0):
                remaining[key] -= 1
                used = b
                continue
            assert d == int(docs.max()) and b == seq_len, f"document {d} of a row is not an example"
            assert (row["input"][a:b] == pad_id).all() and (row["label"][a:b] == IGNORE_INDEX).all()
    assert not any(remaining.values()), "examples left over"


def test_pack_rows_synthetic():
    lengths = [3, 4, 2, 6, 1, 5, 8, 2]
    examples, t = [], 0
    for n in lengths:
        inp = torch.arange(t, t + n) + 10
        examples.append((inp, torch.where(inp % 3 == 0, IGNORE_INDEX, inp + 1)))
        t += n
    rows = pack_rows(examples, 8, pad_id=99)
    check_packed(rows, examples, 8, 99)
    # Longest first: 8 | 6 + 2 (the first 2) | 5 + 3 | 4 + 2 + 1 (best fit: the 2 fills 4's row, not a new one)
    sizes = [torch.bincount(r["document_ids"]).tolist() for r in rows]
    assert sizes == [[8], [6, 2], [5, 3], [4, 2, 1, 1]]
    assert rows[1]["input"][6:].tolist() == examples[2][0].tolist()  # of equal lengths, file order
    valid = sum(int((r["label"] != IGNORE_INDEX).sum()) for r in rows)
    assert valid == sum(int((e[1] != IGNORE_INDEX).sum()) for e in examples)


def test_packing_logs_its_fill_ratio(tok, caplog):
    """The line docs/fine_tuning.md shows, from train_configs/debug_sft.toml's data."""
    cfg = Training(dataset="tiny_chat", seq_len=256)
    with caplog.at_level(logging.INFO, logger="titan"):
        sft_rows("training", cfg, SFT(packing=True), tok, 256, "train")
    line = "data: training packs 400 conversations into 69 rows of 256 tokens, 94.7% full (best-fit decreasing)"
    assert line in caplog.text and line in (REPO / "docs" / "fine_tuning.md").read_text()


def test_pack_rows_fills_best_fit_decreasing_rows():
    """Lognormal lengths: at least 95 % of the tokens are examples, and packing is deterministic."""
    torch.manual_seed(0)
    lengths = torch.distributions.LogNormal(torch.tensor(5.0), 0.8).sample((400,)).clamp(8, 512).long().tolist()
    examples = [(torch.arange(n), torch.arange(n)) for n in lengths]
    rows = pack_rows(examples, 1024, pad_id=0)
    fill = sum(lengths) / (len(rows) * 1024)
    assert fill >= 0.95, fill
    again = pack_rows(examples, 1024, pad_id=0)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(rows, again) for k in a)


def test_pack_rows_real_conversations(tok, tiny_chat):
    template = chat_template(tok, "chatml")
    seq_len = 96
    examples = [example(*template.render(c), seq_len) for c in tiny_chat[:60]]
    rows = pack_rows(examples, seq_len, tok.eos_id)
    check_packed(rows, examples, seq_len, tok.eos_id)
    assert len(rows) < len(examples) and any(r["document_ids"].max() >= 3 for r in rows)  # 3+ in some rows
    valid = sum(int((r["label"] != IGNORE_INDEX).sum()) for r in rows)
    assert valid == sum(int((e[1] != IGNORE_INDEX).sum()) for e in examples)


# ---------------------------------------------------------------------------------------------------------------
# Acceptance: loss masking


class KeepLogits(torch.nn.Module):
    """The model, keeping its logits' gradient for inspection."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, **kw):
        self.logits = self.model(tokens, **kw)
        self.logits.retain_grad()
        return self.logits


def sft_batch(tok, conversations, seq_len, pad_id=None, train_on_prompt=False):
    template = chat_template(tok, "chatml")
    examples = [example(*template.render(c, train_on_prompt), seq_len) for c in conversations]
    return collate_rows(pad_rows(examples, seq_len, tok.eos_id if pad_id is None else pad_id))


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = TokenLoss(ce_sum)(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_prompt_and_padding_tokens_get_zero_gradient(tok, tiny_chat, one_thread):
    seq_len = 64
    # A system prompt, a two-turn conversation and two single-turn ones from tiny_chat.
    conversations = [tiny_chat[7], tiny_chat[8], tiny_chat[0], tiny_chat[1]]
    assert [m["role"] for m in conversations[0]][0] == "system"
    assert sum(m["role"] == "assistant" for m in conversations[1]) == 2
    batch = sft_batch(tok, conversations, seq_len)
    model = KeepLogits(tiny_model(seq_len))
    loss = TokenLoss(ce_sum)(model, batch)
    loss.backward()
    grad, logits = model.logits.grad, model.logits.detach()

    # Expected supervision from the template alone: position p is trained iff token p + 1 is an assistant token.
    template = chat_template(tok, "chatml")
    expected = torch.zeros(batch["label"].shape, dtype=torch.bool)
    next_ids = torch.zeros(batch["label"].shape, dtype=torch.long)
    for row, c in enumerate(conversations):
        ids, flags = template.render(c)
        assert len(ids) <= seq_len + 1  # nothing cut
        for p in range(len(ids) - 1):
            expected[row, p], next_ids[row, p] = flags[p + 1], ids[p + 1]
    n_reply = sum(len(tok.encode(m["content"])) + 1 for c in conversations for m in c if m["role"] == "assistant")
    assert int(expected.sum()) == n_reply == int(TokenLoss(ce_sum).count(batch))
    assert torch.equal(batch["label"] != IGNORE_INDEX, expected)

    touched = (grad != 0).any(dim=-1)
    assert torch.equal(touched, expected)  # exactly zero at every prompt and padding position, non-zero elsewhere
    assert (grad[~expected] == 0).all()
    # The loss is the summed next-token loss on the assistant tokens, computed by hand.
    logp = torch.log_softmax(logits, dim=-1)
    by_hand = -logp.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)[expected].sum()
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-6, atol=0)


def test_prompt_after_the_replies_and_padding_change_nothing(tok, tiny_chat, one_thread):
    """Prompt tokens after the last reply (another user turn) and padding ids are pure -100 positions: whatever they
    are, the loss and every parameter gradient are bitwise the same. With train_on_prompt they are learned, so the
    same change shows (the check depends on the mask, not on causality alone)."""
    seq_len = 64
    conversations = [tiny_chat[7], tiny_chat[0], tiny_chat[1], tiny_chat[2]]
    extra = [[msg("user", f"Thanks {i}! One more, please?")] if i % 2 else [msg("user", "Why?" * (i + 1))]
             for i in range(len(conversations))]
    model = tiny_model(seq_len)
    base = sft_batch(tok, conversations, seq_len)
    other = sft_batch(tok, [c + e for c, e in zip(conversations, extra)], seq_len, pad_id=17)
    assert not torch.equal(base["input"], other["input"])
    assert torch.equal(base["label"], other["label"])
    loss_a, grads_a = loss_and_grads(model, base)
    loss_b, grads_b = loss_and_grads(model, other)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))

    loss_c, _ = loss_and_grads(model, sft_batch(tok, conversations, seq_len, train_on_prompt=True))
    loss_d, _ = loss_and_grads(model, sft_batch(tok, [c + e for c, e in zip(conversations, extra)], seq_len,
                                                train_on_prompt=True))
    assert loss_d > loss_c > loss_a  # more tokens learned


# ---------------------------------------------------------------------------------------------------------------
# Acceptance: packing


def token_losses(model, batch, document_ids=True):
    with torch.no_grad():
        docs = {k: batch[k] for k in ("document_ids", "positions")} if document_ids and "document_ids" in batch \
            else {}
        logits = model(batch["input"], **docs)
    losses = F.cross_entropy(logits.flatten(0, 1), batch["label"].flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")
    return logits, losses.view(batch["label"].shape)


def per_document(batch):
    """(row, mask) of each packed conversation, in order (the padding documents left out)."""
    out = []
    for row, docs in enumerate(batch["document_ids"]):
        for d in range(int(docs.max()) + 1):
            mask = docs == d
            if (batch["label"][row][mask] != IGNORE_INDEX).any():  # skip the padding document
                out.append((row, mask))
    return out


def test_packed_rows_match_unpacked(tok, tiny_chat, one_thread):
    seq_len = 96
    conversations = tiny_chat[:8]
    template = chat_template(tok, "chatml")
    examples = [example(*template.render(c), seq_len) for c in conversations]
    packed = collate_rows(pack_rows(examples, seq_len, tok.eos_id))
    padded = collate_rows(pad_rows(examples, seq_len, tok.eos_id))
    assert packed["input"].shape[0] < len(examples)
    model = tiny_model(seq_len)

    logits_p, tok_p = token_losses(model, packed)
    logits_n, tok_n = token_losses(model, packed, document_ids=False)
    logits_u, tok_u = token_losses(model, padded)
    docs = per_document(packed)
    assert len(docs) == len(examples)
    assert max([row for row, _ in docs].count(r) for r in range(len(packed["input"]))) >= 3  # a row of 3+
    per_ex = {"packed": [], "no_ids": [], "unpacked": []}
    logit_err = {"packed": [], "no_ids": []}
    which = {tuple(e[0].tolist()): i for i, e in enumerate(examples)}  # packing reorders: find each example
    for row, mask in docs:
        i = which[tuple(packed["input"][row][mask].tolist())]
        n = len(examples[i][0])
        assert torch.equal(packed["input"][row][mask], padded["input"][i][:n])
        count = (padded["label"][i] != IGNORE_INDEX).sum()
        assert count > 0 and count == (packed["label"][row][mask] != IGNORE_INDEX).sum()
        per_ex["packed"].append(tok_p[row][mask].sum() / count)
        per_ex["no_ids"].append(tok_n[row][mask].sum() / count)
        per_ex["unpacked"].append(tok_u[i].sum() / count)
        logit_err["packed"].append(rel_error(logits_p[row][mask], logits_u[i][:n]))
        logit_err["no_ids"].append(rel_error(logits_n[row][mask], logits_u[i][:n]))
    got, ref, broken = (torch.stack(per_ex[k]) for k in ("packed", "unpacked", "no_ids"))  # in packed order
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    assert max(logit_err["packed"]) <= 1e-5, logit_err
    # Without document ids every conversation after the first in its row sees the ones before it.
    later = [i for i, (_, mask) in enumerate(docs) if mask.nonzero()[0] > 0]
    assert later and all(logit_err["no_ids"][i] > 1e-3 for i in later), logit_err
    assert ((broken - ref).abs() / ref).max() > 1e-4
    assert all(logit_err["no_ids"][i] <= 1e-5 for i in range(len(docs)) if i not in later)  # first ones unaffected

    # The summed loss (TokenLoss passes the document ids) and its gradients.
    loss_p, grads_p = loss_and_grads(model, packed)
    loss_u, grads_u = loss_and_grads(model, padded)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss_p, tok_u.sum(), rtol=1e-5, atol=0)
    for (name, _), a, b in zip(model.named_parameters(), grads_p, grads_u):
        assert rel_error(a, b) <= 1e-5, name


def test_packed_positions_restart_and_mask_is_block_diagonal():
    """RoPE scores depend only on relative positions, so a missing position reset would not change the losses
    above; check the positions and the mask themselves."""
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 2]])
    positions, mask = document_positions(docs), document_mask(docs)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 0]]
    i, j = torch.arange(8).view(8, 1), torch.arange(8).view(1, 8)
    for r in range(2):
        assert torch.equal(mask[r], (docs[r].view(8, 1) == docs[r].view(1, 8)) & (j <= i))


# ---------------------------------------------------------------------------------------------------------------
# Loaders


def take(it, k):
    return [next(it) for _ in range(k)]


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def sft_loader(tok, dp_rank=0, dp_size=1, packing=False, **kw):
    cfg = Training(dataset="tiny_chat", **{"seq_len": 64, "local_batch_size": 2, "seed": 0, **kw})
    return build_sft_dataloader(cfg, SFT(packing=packing), tok, dp_rank, dp_size)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_loader_global_order_and_resume(tok, tiny_chat, packing):
    steps = 5
    one = take(iter(sft_loader(tok, packing=packing, local_batch_size=4)), steps)
    ranks = [take(iter(sft_loader(tok, r, 2, packing=packing)), steps) for r in range(2)]
    for k in range(steps):
        assert same([{key: torch.cat([ranks[0][k][key], ranks[1][k][key]]) for key in one[k]}], [one[k]])
    keys = {"input", "label"} | ({"document_ids", "positions"} if packing else set())
    assert set(one[0]) == keys and all(one[0][k].shape == (4, 64) for k in keys)

    # The rows are the rendered conversations, in file order (then shuffled by the sampler).
    dl = sft_loader(tok, 1, 2, packing=packing)
    template = chat_template(tok, "chatml")
    examples = [example(*template.render(c), 64) for c in tiny_chat]
    rows = (pack_rows if packing else pad_rows)(examples, 64, tok.eos_id)
    assert same(dl.dataset.rows, rows)

    it = iter(dl)
    take(it, 3)
    state = copy.deepcopy(dl.state_dict())
    expected = take(it, 4)
    fresh = sft_loader(tok, 1, 2, packing=packing)
    fresh.load_state_dict(state)
    assert same(take(iter(fresh), 4), expected)
    single = sft_loader(tok, packing=packing, local_batch_size=4)  # a dp=2 checkpoint resumed on one rank
    single.load_state_dict(state)
    more = take(iter(sft_loader(tok, packing=packing, local_batch_size=4)), 7)
    assert same(take(iter(single), 4), more[3:])


def test_sft_loader_truncates_long_conversations_with_a_warning(tok, caplog):
    with caplog.at_level("WARNING", logger="titan"):
        dl = sft_loader(tok, seq_len=40)
    assert any("training.seq_len=40" in r.getMessage() and "were cut" in r.getMessage() for r in caplog.records)
    assert all(r["input"].shape == (40,) for r in dl.dataset.rows)


def test_sft_loader_llama3_template(tok, tiny_chat):
    cfg = Training(dataset="tiny_chat", seq_len=96, local_batch_size=2)
    dl = build_sft_dataloader(cfg, SFT(chat_template="llama3", train_on_prompt=True), tok, 0, 1)
    first = dl.dataset.rows[0]
    ids, _ = chat_template(tok, "llama3").render(tiny_chat[0])
    assert first["input"][: len(ids) - 1].tolist() == ids[:-1] and first["input"][0] == tok.bos_id
    assert first["label"][: len(ids) - 1].tolist() == ids[1:]  # train_on_prompt: every token is a target


def test_sft_validation_loader(tok):
    cfg = Validation(dataset="tiny_chat", local_batch_size=4)
    dl = build_sft_validation_dataloader(cfg, SFT(), tok, 96, 0, 1)
    conversations = read_conversations(DATASETS["tiny_chat"]["validation"], "validation.dataset")
    template = chat_template(tok, "chatml")
    rows = pad_rows([example(*template.render(c), 96) for c in conversations], 96, tok.eos_id)
    batches = list(dl)
    assert len(batches) == len(rows) // 4
    assert same(batches, [collate_rows(rows[i : i + 4]) for i in range(0, len(rows) // 4 * 4, 4)])  # in order
    ranks = [list(build_sft_validation_dataloader(cfg, SFT(), tok, 96, r, 2)) for r in range(2)]
    n = len(rows) // 8
    assert same(ranks[0], batches[0 : 2 * n : 2]) and same(ranks[1], batches[1 : 2 * n : 2])
    too_big = Validation(dataset="tiny_chat", local_batch_size=len(rows))
    expect_error(lambda: build_sft_validation_dataloader(too_big, SFT(), tok, 96, 0, 2), "validation.local_batch_size")


def test_preference_loader(tok):
    seq_len, b = 64, 3
    cfg = Training(dataset="tiny_preferences", seq_len=seq_len, local_batch_size=b, seed=0)
    dl = build_preference_dataloader(cfg, SFT(), tok, 0, 1)
    pairs = read_preferences(DATASETS["tiny_preferences"]["train"], "training.dataset")
    template = chat_template(tok, "chatml")
    end_id = tok.special_tokens["<|im_end|>"]
    sampler = dl.batch_sampler
    order = [sampler.sample_at(g) for g in range(2 * b)]
    batches = take(iter(dl), 2)
    for k, batch in enumerate(batches):
        assert set(batch) == {"input", "label", "sequence_label"}

        assert batch["input"].shape == batch["label"].shape == (2 * b, seq_len)
        for i in range(b):
            prompt, chosen, rejected = pairs[order[k * b + i]]
            assert chosen != rejected
            head, _ = template.render(prompt, add_generation_prompt=True)
            n = len(head)
            assert not torch.equal(batch["input"][i], batch["input"][b + i])
            for row, reply in ((i, chosen), (b + i, rejected)):  # chosen rows first, then rejected
                inp, label = batch["input"][row], batch["label"][row]
                body = tok.encode(reply) + [end_id]
                assert inp[:n].tolist() == head  # the same prompt tokens
                assert inp[n : n + len(body)].tolist() == body  # then the reply
                assert (label[: n - 1] == IGNORE_INDEX).all()  # no loss on the prompt
                assert label[n - 1 : n - 1 + len(body)].tolist() == body  # the reply and its end are learned
                assert (label[n - 1 + len(body):] == IGNORE_INDEX).all()
                # sequence_label (ORPO's NLL, dpo.orpo_nll): the prompt's next tokens are labels too
                full = batch["sequence_label"][row]
                assert full[: n - 1].tolist() == head[1:] and full[n - 1 : n - 1 + len(body)].tolist() == body
    # dp=2 splits the pairs like any other batch, and each rank keeps its chosen rows before its rejected ones.
    ranks = [next(iter(build_preference_dataloader(replace(cfg, local_batch_size=1), SFT(), tok, r, 2)))
             for r in range(2)]
    whole = next(iter(build_preference_dataloader(replace(cfg, local_batch_size=2), SFT(), tok, 0, 1)))
    for key in ("input", "label"):
        assert torch.equal(torch.stack([ranks[0][key][0], ranks[1][key][0]]), whole[key][:2])  # chosen
        assert torch.equal(torch.stack([ranks[0][key][1], ranks[1][key][1]]), whole[key][2:])  # rejected


# ---------------------------------------------------------------------------------------------------------------
# DPO


class FixedLogits(torch.nn.Module):
    """A "model" whose rows of logits are looked up by the row number written in its input tokens."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, tokens):
        return self.logits[tokens[:, 0]]


def dpo_batch(pairs=3, seq=7, vocab=11):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (2 * pairs, seq), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.3] = IGNORE_INDEX
    labels[:, 0] = IGNORE_INDEX
    labels[:, -1] = 3  # every row has a labelled token
    rows = torch.arange(2 * pairs).view(-1, 1).expand(-1, seq).contiguous()  # see FixedLogits
    batch = {"input": rows, "label": labels}
    policy = torch.randn(2 * pairs, seq, vocab, generator=gen)
    reference = torch.randn(2 * pairs, seq, vocab, generator=gen)
    return batch, policy, reference


def logps_by_hand(logits, labels):
    lp = torch.log_softmax(logits.double(), dim=-1)
    valid = labels != IGNORE_INDEX
    picked = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(dim=1)


def test_dpo_loss_matches_hand_computation(mesh):
    beta, pairs = 0.3, 3
    batch, policy_logits, ref_logits = dpo_batch(pairs)
    ref_logits.requires_grad_(True)
    model = FixedLogits(policy_logits)
    objective = DPOLoss(DPO(beta=beta), reference=lambda b: token_logps(ref_logits[b["input"][:, 0]], b["label"]))
    assert int(objective.count(batch)) == pairs
    loss = objective(model, batch)
    loss.backward()

    leaf = policy_logits.double().requires_grad_(True)
    pi, ref = logps_by_hand(leaf, batch["label"]), logps_by_hand(ref_logits.detach(), batch["label"])
    (pc, pr), (rc, rr) = pi.chunk(2), ref.chunk(2)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    margin = chosen - rejected
    by_hand = -F.logsigmoid(margin).sum()
    by_hand.backward()
    chosen, rejected, margin = chosen.detach(), rejected.detach(), margin.detach()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), by_hand.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(model.logits.grad.double(), leaf.grad, rtol=1e-5, atol=1e-7)
    assert ref_logits.grad is None  # the reference is evaluated without autograd
    assert (margin > 0).any() and (margin < 0).any()  # the accuracy below is neither 0 nor 1

    stats = objective.metrics(mesh)
    assert set(stats) == set(DPOLoss.STATS)
    assert stats["reward_accuracy"] == pytest.approx(float((margin > 0).float().mean()), abs=1e-7)
    assert stats["reward_margin"] == pytest.approx(float(margin.mean()), rel=1e-5)
    assert stats["chosen_reward"] == pytest.approx(float(chosen.mean()), rel=1e-5)
    assert stats["rejected_reward"] == pytest.approx(float(rejected.mean()), rel=1e-5)
    assert objective.metrics(mesh) == {}  # reset after reading

    # Two micro-batches, the second with chosen and rejected swapped (margins -m), make one set of statistics.
    swapped = {k: torch.cat([v[pairs:], v[:pairs]]) for k, v in batch.items()}
    torch.testing.assert_close(objective(model, swapped).double(), -F.logsigmoid(-margin).sum(), rtol=1e-6, atol=0)
    objective(model, batch)
    stats = objective.metrics(mesh)
    assert stats["reward_accuracy"] == pytest.approx(0.5, abs=1e-7)  # no margin is exactly 0
    assert stats["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    both = float((chosen.sum() + rejected.sum()) / (2 * pairs))
    assert stats["chosen_reward"] == pytest.approx(both, rel=1e-5)
    assert stats["rejected_reward"] == pytest.approx(both, rel=1e-5)


def test_dpo_against_itself_is_log2(mesh):
    pairs = 3
    batch, policy_logits, _ = dpo_batch(pairs)
    model = FixedLogits(policy_logits)
    objective = DPOLoss(DPO(beta=0.1), reference=lambda b: token_logps(model(b["input"]), b["label"]))
    loss = objective(model, batch)
    assert torch.equal(loss, -F.logsigmoid(torch.zeros(pairs)).sum())  # every margin exactly 0
    torch.testing.assert_close(loss, torch.tensor(pairs * math.log(2)), rtol=1e-6, atol=0)
    assert objective.metrics(mesh) == {"reward_margin": 0.0, "reward_accuracy": 0.0, "chosen_reward": 0.0,
                                       "rejected_reward": 0.0}


def paper_loss(name: str, cfg: DPO, pi, ref, n):
    """Each loss as its paper writes it, in float64, from summed log-probs pi / ref and reply lengths n (chosen
    rows first): (per-pair losses, chosen rewards, rejected rewards)."""
    (pc, pr), (nc, nr) = pi.chunk(2), n.double().chunk(2)
    if name in ("sigmoid", "ipo"):
        (rc, rr) = ref.chunk(2)
        h = torch.log(torch.exp(pc) * torch.exp(rr) / (torch.exp(pr) * torch.exp(rc)))  # IPO's h, DPO's ratio
        if name == "sigmoid":  # Rafailov et al. 2023, eq. 7
            return -torch.log(torch.sigmoid(cfg.beta * h)), cfg.beta * (pc - rc), cfg.beta * (pr - rr)
        return (h - 1 / (2 * cfg.beta)) ** 2, cfg.beta * (pc - rc), cfg.beta * (pr - rr)  # Azar et al. 2023, eq. 17
    if name == "simpo":  # Meng et al. 2024, eq. 6
        rc, rr = cfg.beta / nc * pc, cfg.beta / nr * pr
        return -torch.log(torch.sigmoid(rc - rr - cfg.simpo_gamma)), rc, rr
    p_c, p_r = torch.exp(pc / nc), torch.exp(pr / nr)  # Hong et al. 2024, eqs. 3-7
    odds_c, odds_r = p_c / (1 - p_c), p_r / (1 - p_r)
    l_or = -torch.log(torch.sigmoid(torch.log(odds_c / odds_r)))
    return -pc / nc + cfg.orpo_lambda * l_or, torch.log(odds_c), torch.log(odds_r)


# The papers' conventions (TRL's, the defaults, are checked against TRL's formulas below).
LOSS_CFGS = {"sigmoid": DPO(loss="sigmoid", beta=0.3), "ipo": DPO(loss="ipo", beta=0.3, ipo_normalize=False),
             "simpo": DPO(loss="simpo", beta=2.0, simpo_gamma=0.7),
             "orpo": DPO(loss="orpo", orpo_lambda=0.4, orpo_nll="reply")}


def make_objective(cfg, ref_logits):
    reference = None if cfg.loss in DPOLoss.REFERENCE_FREE else \
        (lambda b: token_logps(ref_logits[b["input"][:, 0]], b["label"]))
    return DPOLoss(cfg, reference=reference)


@pytest.mark.parametrize("name", list(LOSS_CFGS))
def test_preference_loss_equals_its_papers_formula(mesh, name):
    cfg, pairs = LOSS_CFGS[name], 6
    batch, policy_logits, ref_logits = dpo_batch(pairs, seq=9)
    # Short rows: log-probs of a few tokens, so that ORPO's per-token probabilities are not ~0.
    batch["label"][:, :5] = IGNORE_INDEX
    policy_logits = policy_logits * 0.2
    model = FixedLogits(policy_logits)
    objective = make_objective(cfg, ref_logits)
    loss = objective(model, batch)
    loss.backward()

    leaf = policy_logits.double().requires_grad_(True)
    n = (batch["label"] != IGNORE_INDEX).sum(dim=1)
    pi, ref = logps_by_hand(leaf, batch["label"]), logps_by_hand(ref_logits, batch["label"])
    losses, chosen, rejected = paper_loss(name, cfg, pi, ref, n)
    losses.sum().backward()
    torch.testing.assert_close(loss.double(), losses.sum().detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(model.logits.grad.double(), leaf.grad, rtol=1e-5, atol=1e-7)
    chosen, rejected = chosen.detach(), rejected.detach()
    margin = chosen - rejected
    assert (margin > 0).any() and (margin < 0).any()
    stats = objective.metrics(mesh)
    assert stats["reward_accuracy"] == pytest.approx(float((margin > 0).double().mean()), abs=1e-7)
    assert stats["reward_margin"] == pytest.approx(float(margin.mean()), rel=1e-5)
    assert stats["chosen_reward"] == pytest.approx(float(chosen.mean()), rel=1e-5)
    assert stats["rejected_reward"] == pytest.approx(float(rejected.mean()), rel=1e-5)
    # The function the objective uses, on the same fixed log-probs.
    got = preference_loss(cfg, pi.detach().float(), ref.float(), n)[0]
    torch.testing.assert_close(got.double(), losses.detach(), rtol=1e-5, atol=0)


def test_preference_losses_at_the_start(mesh):
    """A policy equal to its reference (DPO, IPO), or a pair whose two replies it cannot tell apart (the
    reference-free SimPO and ORPO): the value each formula gives there."""
    pairs = 3
    batch, policy_logits, _ = dpo_batch(pairs)
    model = FixedLogits(policy_logits)
    twins = {k: torch.cat([v[:pairs], v[:pairs]]) for k, v in batch.items()}  # rejected rows = chosen rows
    nll = -(logps_by_hand(policy_logits, batch["label"]) / (batch["label"] != IGNORE_INDEX).sum(1))[:pairs]
    expected = {"sigmoid": torch.full((pairs,), math.log(2)),
                "ipo": torch.full((pairs,), (1 / (2 * 0.3)) ** 2),
                "simpo": torch.full((pairs,), math.log1p(math.exp(0.7))),
                "orpo": nll + 0.4 * math.log(2)}
    for name, cfg in LOSS_CFGS.items():
        reference = None if cfg.loss in DPOLoss.REFERENCE_FREE else \
            (lambda b: token_logps(model(b["input"]), b["label"]))
        objective = DPOLoss(cfg, reference=reference)
        data = batch if reference is not None else twins
        torch.testing.assert_close(objective(model, data).double(), expected[name].double().sum(), rtol=1e-6,
                                   atol=0, msg=name)
        stats = objective.metrics(mesh)
        assert stats["reward_margin"] == 0.0 and stats["reward_accuracy"] == 0.0, (name, stats)


def test_reference_free_losses_take_no_reference_model():
    with pytest.raises(ValueError, match="takes no reference"):
        DPOLoss(DPO(loss="simpo"), reference=lambda b: b)
    with pytest.raises(ValueError, match="needs"):
        DPOLoss(DPO(loss="ipo"))


def test_trl_conventions_equal_trls_formulas(mesh):
    """The defaults follow TRL (1.16): IPO on per-token log-ratios; ORPO's NLL a mean over every token (prompt and
    reply) of the chosen rows, pooled over the batch, minus the mean of lambda log sigmoid(log odds ratio); and
    label_smoothing is conservative DPO. Each against its formula written out here in float64, on fixed
    log-probabilities (1e-6)."""
    pairs, beta = 6, 0.3
    batch, policy_logits, ref_logits = dpo_batch(pairs, seq=9)
    batch["label"][:, :5] = IGNORE_INDEX  # the reply: the last 4 positions; the prompt before it
    batch["sequence_label"] = batch["label"].clone()
    batch["sequence_label"][:, 1:5] = 5  # prompt tokens too (not the first position, which nothing predicts)
    policy_logits = policy_logits * 0.2
    n = (batch["label"] != IGNORE_INDEX).sum(dim=1).double()
    pi, ref = logps_by_hand(policy_logits, batch["label"]), logps_by_hand(ref_logits, batch["label"])
    (pc, pr), (rc, rr), (nc, nr) = pi.chunk(2), ref.chunk(2), n.chunk(2)

    ipo = DPO(loss="ipo", beta=beta)
    assert ipo.ipo_normalize
    trl_ipo = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    got = preference_loss(ipo, pi.float(), ref.float(), n.long())[0]
    torch.testing.assert_close(got.double(), trl_ipo, rtol=1e-6, atol=0)

    eps = 0.2
    margin = beta * ((pc - rc) - (pr - rr))
    cdpo = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    got = preference_loss(DPO(beta=beta, label_smoothing=eps), pi.float(), ref.float(), n.long())[0]
    torch.testing.assert_close(got.double(), cdpo, rtol=1e-6, atol=0)

    orpo = DPO(loss="orpo", orpo_lambda=0.4)
    assert orpo.orpo_nll == "prompt_and_reply"
    avg_c, avg_r = pc / nc, pr / nr
    log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
    full = batch["sequence_label"][:pairs]
    token_lp = torch.log_softmax(policy_logits[:pairs].double(), -1).gather(-1, full.clamp(min=0).unsqueeze(-1))
    nll = -(token_lp.squeeze(-1) * (full != IGNORE_INDEX)).sum() / (full != IGNORE_INDEX).sum()
    trl_orpo = nll - (0.4 * F.logsigmoid(log_odds)).mean()
    objective = DPOLoss(orpo)
    got = objective(FixedLogits(policy_logits), batch) / pairs  # the loop divides by the global pair count
    torch.testing.assert_close(got.double(), trl_orpo, rtol=1e-6, atol=0)
    assert objective.metrics(mesh)["chosen_reward"] == pytest.approx(float(log_odds.new_tensor(0) + (
        avg_c - torch.log1p(-torch.exp(avg_c))).mean()), rel=1e-5)


def test_benchmark_packing_gives_the_figures_docs_quote():
    """scripts/benchmark_packing.py's default mix (seeded, so exact) recomputed here equals its record
    (tests/assets/benchmarks/packing.json): best-fit decreasing fills >= 95 % of the rows, and docs/performance.md and
    docs/fine_tuning.md quote those figures."""
    from dist_utils import load_script

    r = load_script("benchmark_packing").measure(20000, 4096, 400.0, 1.0)
    recorded = json.loads((REPO / "tests" / "assets" / "benchmarks" / "packing.json").read_text())
    exact = [k for k in r if k not in ("seconds", "commit", "date")]  # what the seed fixes
    assert {k: recorded[k] for k in exact} == {k: r[k] for k in exact}
    assert r["best_fit_fill"] >= 0.95 > r["in_order_fill"]
    perf = (REPO / "docs" / "performance.md").read_text()
    row = (f"| best-fit decreasing (titan) | {r['best_fit_rows']:,} | {r['best_fit_fill']:.2%} |\n"
           f"| in file order (before) | {r['in_order_rows']:,} | {r['in_order_fill']:.2%} |")
    assert row in perf and f"{r['tokens']:,} tokens" in perf
    fine = (REPO / "docs" / "fine_tuning.md").read_text()
    assert f"{r['best_fit_fill']:.2%} full, against {r['in_order_fill']:.1%}".replace("%", " %") in fine
