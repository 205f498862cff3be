"""Pre-training data: packing, the layout-independent global order, dp split, exact resume, validation, errors."""

import copy
import json

import pytest
import torch

from titan.config import Training, Validation
from titan.data.documents import DATASETS
from titan.data.pretrain import IGNORE_INDEX, build_pretrain_dataloader, build_validation_dataloader
from titan.data.tokenizer import load_tokenizer
from titan.errors import ConfigError

SEQ = 8


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok):
    """A jsonl of Austen paragraphs: (path, expected token stream, {window tokens: window index})."""
    paragraphs = [p for p in DATASETS["austen"]["validation"].read_text()[:2500].split("\n\n") if p.strip()]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paragraphs)))
    stream = [t for p in paragraphs for t in tok.encode(p, bos=True, eos=True)]
    n = (len(stream) - 1) // SEQ
    index = {tuple(stream[i * SEQ : i * SEQ + SEQ + 1]): i for i in range(n)}
    assert len(index) == n, "fixture windows must be distinct to identify them"
    return path, stream, index


def train_cfg(corpus, **kw) -> Training:
    return Training(dataset_path=str(corpus[0]), seq_len=SEQ, **{"local_batch_size": 2, "seed": 0, **kw})


def loader(corpus, tok, dp_rank=0, dp_size=1, **kw):
    return build_pretrain_dataloader(train_cfg(corpus, **kw), tok, dp_rank, dp_size)


def take(it, k) -> list[dict]:
    return [next(it) for _ in range(k)]


def window_ids(batches, index) -> list[int]:
    """Window index of every row, read back from the tokens (input + last label = the window)."""
    return [
        index[tuple(torch.cat([inp, lab[-1:]]).tolist())]
        for b in batches for inp, lab in zip(b["input"], b["label"])
    ]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("input", "label"))


def test_windows_are_stream_slices(corpus, tok):
    path, stream, index = corpus
    dl = loader(corpus, tok)
    n = len(index)
    assert dl.dataset.stream.read(0, len(stream)).tolist() == stream
    assert len(dl.dataset) == n == (len(stream) - 1) // SEQ
    sampler = dl.batch_sampler
    order = [sampler.sample_at(g) for g in range(4 * 2)]
    for k, batch in enumerate(take(iter(dl), 4)):
        assert batch["input"].dtype == batch["label"].dtype == torch.long
        assert batch["input"].shape == batch["label"].shape == (2, SEQ)
        for row, s in enumerate(order[2 * k : 2 * k + 2]):
            assert batch["input"][row].tolist() == stream[s * SEQ : s * SEQ + SEQ]
            assert batch["label"][row].tolist() == stream[s * SEQ + 1 : s * SEQ + SEQ + 1]
        assert torch.equal(batch["label"][:, :-1], batch["input"][:, 1:])
        assert (batch["label"] != IGNORE_INDEX).all()  # pre-training masks nothing


def test_documents_get_bos_and_eos(corpus, tok):
    stream = torch.from_numpy(loader(corpus, tok).dataset.stream.read(0, len(corpus[1])))
    n_docs = len(corpus[0].read_text().splitlines())
    assert stream[0] == tok.bos_id and stream[-1] == tok.eos_id
    assert (stream == tok.bos_id).sum() == (stream == tok.eos_id).sum() == n_docs


def test_seed_determinism(corpus, tok):
    a, b = take(iter(loader(corpus, tok)), 5), take(iter(loader(corpus, tok)), 5)
    c = take(iter(loader(corpus, tok, seed=1)), 5)
    assert same(a, b)
    assert not same(a, c)


def test_epochs_wrap_with_a_new_permutation(corpus, tok):
    _, _, index = corpus
    n = len(index)
    # batch size 4 with n not a multiple of 4: a batch straddles the epoch boundary.
    assert n % 4 != 0
    ids = window_ids(take(iter(loader(corpus, tok, local_batch_size=4)), (2 * n) // 4 + 1), index)
    first, second = ids[:n], ids[n : 2 * n]
    assert sorted(first) == sorted(second) == list(range(n))  # each epoch sees every window exactly once
    assert first != second
    assert first != list(range(n))  # shuffled


def test_dp_ranks_split_the_global_stream(corpus, tok):
    _, _, index = corpus
    k = 6
    one = take(iter(loader(corpus, tok)), 2 * k)
    r0 = take(iter(loader(corpus, tok, 0, 2)), k)
    r1 = take(iter(loader(corpus, tok, 1, 2)), k)
    assert same(r0, one[0::2]) and same(r1, one[1::2])  # rank r takes blocks r, r + 2, ...
    ids0, ids1 = window_ids(r0, index), window_ids(r1, index)
    assert 2 * 2 * k <= len(index)  # all within one epoch, so the split must be disjoint
    assert not set(ids0) & set(ids1)
    assert sorted(ids0 + ids1) == sorted(window_ids(one, index))


def test_resume_same_layout(corpus, tok):
    dl = loader(corpus, tok, 1, 2)
    it = iter(dl)
    take(it, 3)
    state = copy.deepcopy(dl.state_dict())
    expected = take(it, 4)
    fresh = loader(corpus, tok, 1, 2)
    fresh.load_state_dict(state)
    assert same(take(iter(fresh), 4), expected)


def test_resume_before_iterating(corpus, tok):
    # state_dict() before any batch must resume at the very beginning (no skip).
    dl = loader(corpus, tok)
    state = dl.state_dict()
    fresh = loader(corpus, tok)
    fresh.load_state_dict(state)
    assert same(take(iter(fresh), 2), take(iter(dl), 2))


def test_resume_dp2_into_dp1(corpus, tok):
    k, m = 3, 5
    reference = take(iter(loader(corpus, tok)), 2 * k + m)
    ranks = [loader(corpus, tok, r, 2) for r in range(2)]
    its = [iter(dl) for dl in ranks]
    for it in its:
        take(it, k)
    s0, s1 = ranks[0].state_dict(), ranks[1].state_dict()
    assert s0["_index_sampler_state"] == s1["_index_sampler_state"]
    assert s0["_index_sampler_state"]["position"] == 2 * k * 2
    single = loader(corpus, tok)
    single.load_state_dict(s0)
    assert same(take(iter(single), m), reference[2 * k :])  # blocks 2k, 2k+1, ... exactly once


def test_resume_dp1_into_dp2(corpus, tok):
    k = 4
    reference = take(iter(loader(corpus, tok)), 2 * k + 4)
    dl = loader(corpus, tok)
    take(iter(dl), 2 * k)
    state = dl.state_dict()
    for r in range(2):
        rank = loader(corpus, tok, r, 2)
        rank.load_state_dict(state)
        assert same(take(iter(rank), 2), reference[2 * k + r :: 2])


def test_austen_train_split(tok):
    dl = build_pretrain_dataloader(Training(seq_len=512, local_batch_size=2), tok, 0, 1)
    head = DATASETS["austen"]["train"].read_text()[:1000]
    expected = tok.encode(head, bos=True)[:100]
    assert dl.dataset.stream.read(0, 100).tolist() == expected
    assert len(dl.dataset) > 1500  # ~1.2 M tokens / 512


def test_validation_finite_unshuffled(corpus, tok):
    _, stream, index = corpus
    n = len(index)
    cfg = Validation(dataset_path=str(corpus[0]), local_batch_size=3)
    dl = build_validation_dataloader(cfg, Training(seq_len=SEQ), tok, 0, 1)
    batches = list(dl)
    assert len(batches) == len(dl) == n // 3
    assert window_ids(batches, index) == list(range(n // 3 * 3))  # in order; the partial last batch is dropped
    assert same(list(dl), batches)  # every iter() is the same full pass
    ranks = [list(build_validation_dataloader(cfg, Training(seq_len=SEQ), tok, r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == n // 6  # whole rounds only, so ranks stay in step
    assert same(ranks[0], batches[0 : 2 * (n // 6) : 2]) and same(ranks[1], batches[1 : 2 * (n // 6) : 2])


def test_validation_uses_the_named_split(tok):
    dl = build_validation_dataloader(Validation(local_batch_size=2), Training(seq_len=256), tok, 0, 1)
    text = DATASETS["austen"]["validation"].read_text()
    expected = tok.encode(text, bos=True, eos=True)
    assert dl.dataset.stream.read(0, len(dl.dataset.stream)).tolist() == expected
    assert len(list(dl)) == len(dl) > 0


def test_folder_reads_sorted_files(tmp_path, tok):
    (tmp_path / "b.txt").write_text("Second file, one document.\n\nEven with blank lines.")
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n\n{"text": "second"}\n')
    (tmp_path / "notes.md").write_text("ignored")
    dl = build_pretrain_dataloader(Training(dataset_path=str(tmp_path), seq_len=4, local_batch_size=1), tok, 0, 1)
    docs = ["first", "second", "Second file, one document.\n\nEven with blank lines."]
    expected = [t for d in docs for t in tok.encode(d, bos=True, eos=True)]
    assert dl.dataset.stream.read(0, len(expected)).tolist() == expected


def _expect_error(build, key, where):
    with pytest.raises(ConfigError) as e:
        build()
    msg = str(e.value)
    assert key in msg and str(where) in msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "name, content, expect",
    [
        ("empty.txt", "", "empty"),
        ("blank.jsonl", "\n  \n", "empty"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "line 2 is not JSON"),
        ("notext.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', "line 3 has no string"),
        ("number.jsonl", '{"text": 5}\n', "line 1 has no string"),
        ("list.jsonl", '["text"]\n', "line 1 has no string"),
        ("data.csv", "text\nhello\n", "is not one of .txt, .jsonl"),
        ("short.txt", "Too short.", "fewer than training.seq_len + 1"),
    ],
)
def test_bad_training_file(tmp_path, tok, name, content, expect):
    path = tmp_path / name
    path.write_text(content)
    cfg = Training(dataset_path=str(path), seq_len=64, local_batch_size=1)
    assert expect in _expect_error(lambda: build_pretrain_dataloader(cfg, tok, 0, 1), "training.dataset_path", path)


def test_undecodable_file(tmp_path, tok):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    cfg = Training(dataset_path=str(path), seq_len=4)
    assert "cannot be read" in _expect_error(lambda: build_pretrain_dataloader(cfg, tok, 0, 1), "training.dataset_path",
                                          path)


def test_missing_path_and_empty_folder(tmp_path, tok):
    missing = tmp_path / "nope.jsonl"
    cfg = Training(dataset_path=str(missing), seq_len=4)
    assert "does not exist" in _expect_error(
        lambda: build_pretrain_dataloader(cfg, tok, 0, 1), "training.dataset_path", missing
    )
    (tmp_path / "readme.md").write_text("no data here")
    cfg = Training(dataset_path=str(tmp_path), seq_len=4)
    assert "has no .txt, .jsonl" in _expect_error(
        lambda: build_pretrain_dataloader(cfg, tok, 0, 1), "training.dataset_path", tmp_path
    )


def test_unknown_dataset_names(tok):
    _expect_error(lambda: build_pretrain_dataloader(Training(dataset="wiki"), tok, 0, 1), "training.dataset", "wiki")
    _expect_error(
        lambda: build_validation_dataloader(Validation(dataset="wiki"), Training(seq_len=8), tok, 0, 1),
        "validation.dataset", "wiki"
    )


def test_validation_errors(tmp_path, tok, corpus):
    missing = tmp_path / "gone.txt"
    cfg = Validation(dataset_path=str(missing))
    _expect_error(lambda: build_validation_dataloader(cfg, Training(seq_len=8), tok, 0, 1), "validation.dataset_path",
                  missing)
    # Enough tokens for windows, but fewer windows than one batch on each of 2 ranks.
    n = len(corpus[2])
    cfg = Validation(dataset_path=str(corpus[0]), local_batch_size=n // 2 + 1)
    msg = _expect_error(lambda: build_validation_dataloader(cfg, Training(seq_len=SEQ), tok, 0, 2),
                        "validation.dataset_path", corpus[0])
    assert "validation.local_batch_size" in msg


def test_token_stream_is_reused_until_the_files_change(tmp_path):
    from titan.data.pretrain import token_stream

    def ids(stream):
        return stream.read(0, len(stream)).tolist()

    tok = load_tokenizer("")
    corpus = tmp_path / "c.txt"
    corpus.write_text("It is a truth universally acknowledged.")
    first = token_stream(corpus, "training.dataset_path", tok)
    assert token_stream(corpus, "training.dataset_path", load_tokenizer("")) is first  # same files: reused
    assert token_stream(corpus, "training.dataset_path", load_tokenizer("debug_chat")) is not first
    corpus.write_text("It is a truth universally acknowledged, that a single man.")
    second = token_stream(corpus, "training.dataset_path", tok)
    assert len(second) > len(first) and ids(second) == tok.encode(corpus.read_text(), bos=True, eos=True)
