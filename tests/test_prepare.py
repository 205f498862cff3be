"""Pre-training data at scale: scripts/prepare_data.py (titan/data/prepare.py) and training from prepared folders
(memory-mapped shards), the computed sample order, mixing sources by weight, and document masking.

- Preparing is deterministic: 1 and 2 workers, a rerun, and K parts written by K jobs give byte-identical folders.
- A prepared folder trains exactly like the raw files it came from (same stream, windows and order).
- Resume: same layout bitwise; dp2 -> dp1 and dp1 -> dp2 continue the global order with no sample repeated or
  skipped (compared by sample index).
- Mixing 0.7 / 0.3 honours the weights within 2 points and resumes every source where it stopped.
- Document masking: a packed window's loss equals the sum of its documents' losses computed alone.
- Bad input: exit code 2, one line naming the file (and line), nothing of the user's changed.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import REPO, TINY, children, losses, rel_error
from torch.utils.data import Dataset

from titan.config import Training, Validation
from titan.data import documents, tokens
from titan.data.documents import DATASETS
from titan.data.order import GlobalOrderSampler, make_loader
from titan.data.prepare import prepare
from titan.data.pretrain import (
    IGNORE_INDEX,
    Windows,
    build_pretrain_dataloader,
    build_validation_dataloader,
    token_stream,
    tokens_per_source,
)
from titan.data.tokenizer import load_tokenizer
from titan.errors import ConfigError
from titan.models.llama import Transformer, model_args
from titan.train import main

SCRIPT = REPO / "scripts" / "prepare_data.py"
AUSTEN = DATASETS["austen"]["train"]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of Austen paragraphs in every format: a .jsonl big enough to be cut into pieces, a .jsonl.gz, a
    .jsonl.zst, a .parquet and a .txt (one document)."""
    root = tmp_path_factory.mktemp("corpus")
    paragraphs = [p for p in AUSTEN.read_text()[:900_000].split("\n\n") if p.strip()]
    lines = [json.dumps({"text": p, "n": i}) + "\n" for i, p in enumerate(paragraphs)]
    (root / "a.jsonl").write_text("".join(lines[:1500]))
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write("".join(lines[1500:1800]))
    zstandard = pytest.importorskip("zstandard")
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(lines[1800:2000]).encode()))
    pq, pa = pytest.importorskip("pyarrow.parquet"), pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"text": paragraphs[2000:2300]}), root / "d.parquet", row_group_size=50)
    (root / "e.txt").write_text("\n\n".join(paragraphs[2300:2350]))
    return root


def folder_bytes(path: Path, skip_parts: bool = False) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())
            if not (skip_parts and f.name.startswith("part-"))}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "one"
    assert prepare([str(corpus)], str(out), workers=1, shard_mb=0.05, log=quiet)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Preparing


def test_every_format_reads_the_same_documents(corpus):
    texts = {f.name: list(documents.documents(f, "k")) for f in sorted(corpus.iterdir())}
    paragraphs = [p for p in AUSTEN.read_text()[:900_000].split("\n\n") if p.strip()]
    assert texts["a.jsonl"] == paragraphs[:1500] and texts["b.jsonl.gz"] == paragraphs[1500:1800]
    assert texts["c.jsonl.zst"] == paragraphs[1800:2000] and texts["d.parquet"] == paragraphs[2000:2300]
    assert texts["e.txt"] == ["\n\n".join(paragraphs[2300:2350])]
    # A .jsonl cut at arbitrary byte offsets: every line belongs to exactly one piece.
    a = corpus / "a.jsonl"
    cuts = [0, 1, 777, 778, 5000, a.stat().st_size // 2, a.stat().st_size]
    pieces = [t for lo, hi in zip(cuts, cuts[1:]) for t in documents.jsonl_documents(a, "k", start=lo, end=hi)]
    assert pieces == texts["a.jsonl"]


def test_prepare_is_byte_identical_for_any_worker_count(corpus, prepared, tmp_path, tok, capsys):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 4 and manifest["dtype"] == "uint16"  # 4k vocabulary
    assert manifest["tokenizer"]["sha256"] == tok.identity and manifest["tokenizer"]["vocab_size"] == 4096
    assert [i["path"] for i in manifest["inputs"]] == [str(f) for f in sorted(corpus.iterdir())]
    assert all(isinstance(s["bin_crc32"], int) and isinstance(s["idx_crc32"], int) for s in manifest["shards"])
    capsys.readouterr()
    assert prepare([str(corpus)], str(tmp_path / "two"), workers=2, shard_mb=0.05, log=quiet)
    assert folder_bytes(tmp_path / "two") == folder_bytes(prepared)
    # Progress counts bytes on disk for every format: it read "18.6/3.3 MB (557%) ... ETA 23:59:34" for .parquet
    # and .jsonl.gz inputs (decoded bytes against file sizes, and a negative ETA wrapping round).
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare: ") and "MB/s" in line]
    done, total = re.match(r"prepare: ([\d.,]+)/([\d.,]+) MB \(100%\)", lines[-1]).groups()
    assert done == total and float(total) <= sum(f.stat().st_size for f in corpus.iterdir()) / 1e6 + 0.05, lines
    assert all(int(re.search(r"\((\d+)%\)", line).group(1)) <= 100 and "ETA -" not in line for line in lines)
    # The stream is the raw path's: every document, in order, BOS text EOS.
    raw = token_stream(corpus, "k", tok)
    stream = tokens.open_prepared(prepared, "k", tok)
    assert len(stream) == len(raw) == manifest["num_tokens"] and stream.num_documents == manifest["num_documents"]
    assert np.array_equal(stream.read(0, len(stream)), raw.read(0, len(raw)))
    assert np.array_equal(stream.document_index(0, len(stream)), raw.document_index(0, len(raw)))
    # Its own documented layout, readable without titan:
    first = manifest["shards"][0]
    ids = np.fromfile(prepared / f"{first['name']}.bin", dtype="<u2")
    starts = np.fromfile(prepared / f"{first['name']}.idx", dtype="<u8")
    assert len(ids) == first["num_tokens"] == starts[-1] and len(starts) == first["num_documents"] + 1
    assert ids[starts[0]] == tok.bos_id and ids[starts[1] - 1] == tok.eos_id


def test_shards_find_documents_like_memory(prepared, corpus, tok, monkeypatch):
    monkeypatch.setattr(tokens.FilePiece, "SPARSE", 3)  # many blocks per shard, so the block search is exercised
    stream, raw = tokens.open_prepared(prepared, "k", tok), token_stream(corpus, "k", tok)
    rng = np.random.default_rng(0)
    for start in [0, len(raw) - 300, *rng.integers(0, len(raw) - 300, 200)]:  # straddling shards too
        n = int(rng.integers(1, 300))
        assert np.array_equal(stream.document_index(int(start), n), raw.document_index(int(start), n)), start
        assert np.array_equal(stream.read(int(start), n), raw.read(int(start), n))


def test_parts_written_by_separate_jobs_equal_one_run(corpus, prepared, tmp_path, tok):
    out = tmp_path / "parts"
    for i in (2, 0):
        assert not prepare([str(corpus)], str(out), workers=1, shard_mb=0.05, num_shards=3, shard_index=i, log=quiet)
    with pytest.raises(ConfigError, match="unfinished prepared dataset"):
        token_stream(out, "training.dataset_path", tok)  # two of three parts: no manifest, not trainable
    assert prepare([str(corpus)], str(out), workers=1, shard_mb=0.05, num_shards=3, shard_index=1, log=quiet)
    assert folder_bytes(out, skip_parts=True) == folder_bytes(prepared, skip_parts=True)


def test_slurm_array_example_prepares_in_parts(corpus, prepared, tmp_path):
    """scripts/prepare_data.sbatch, run as its array tasks would run it (Slurm's variables set by hand)."""
    out = tmp_path / "array"
    env = {**os.environ, "INPUT": f"{corpus}/*", "OUTPUT": str(out), "SLURM_ARRAY_TASK_COUNT": "2",
           "SLURM_CPUS_PER_TASK": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for task in ("1", "0"):
        done = subprocess.run(["bash", "scripts/prepare_data.sbatch", "--shard_mb", "0.05"], cwd=REPO, text=True,
                              env={**env, "SLURM_ARRAY_TASK_ID": task}, capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert folder_bytes(out, skip_parts=True) == folder_bytes(prepared, skip_parts=True)


def test_interrupted_preparation_resumes_keeping_finished_shards(corpus, tmp_path, prepared):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT), "--input", str(corpus), "--output", str(out), "--workers", "1",
           "--shard_mb", "0.05"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "shard-000001.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "manifest.json").exists(), "finished before the kill: make the corpus bigger"
    kept = {f.name: f.stat().st_mtime_ns for f in out.glob("shard-00000[01].*")}
    assert len(kept) == 6
    out_text = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out_text.returncode == 0 and "already done" in out_text.stderr, out_text.stderr
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("shard-00000[01].*")} == kept  # not redone
    assert folder_bytes(out) == folder_bytes(prepared)


def run_script(capsys, *args) -> tuple[int, list[str]]:
    from importlib import util

    spec = util.spec_from_file_location("prepare_data", SCRIPT)
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(list(map(str, args)))
    return code, [line for line in capsys.readouterr().err.splitlines() if "error" in line]


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3000)))
    cases = {  # file content -> what the message says
        "bad.jsonl": (b'{"text": "a"}\n' * 2000 + b'{"text": oops}\n', "line 2001 is not JSON"),  # in a later piece
        "nokey.jsonl": (b'{"text": "a"}\n{"body": "b"}\n', "line 2 has no string 'text' field"),
        "empty.jsonl": (b"", "is empty"),
        "blank.jsonl": (b"\n \n", "holds no documents"),
        "latin1.jsonl": ('{"text": "caf\xe9"}\n'.encode("latin-1"), "line 1 is not UTF-8"),
        "broken.jsonl.gz": (b"not gzip at all", "cannot be read"),
        "data.csv": (b"text\n", "is not one of"),
    }
    for name, (content, expect) in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        out = tmp_path / f"out-{name}"
        workers = "2" if name == "bad.jsonl" else "1"  # one case through worker processes (they cost ~3 s each)
        code, errors = run_script(capsys, "--input", good, bad, "--output", out, "--workers", workers, "--shard_mb",
                                  "0.01")
        assert code == 2 and len(errors) == 1 and str(bad) in errors[0] and expect in errors[0], (name, errors)
        assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp*"))
        assert bad.read_bytes() == content  # the input is untouched
    code, errors = run_script(capsys, "--input", tmp_path / "nothing*.jsonl", "--output", tmp_path / "o")
    assert code == 2 and "matches no" in errors[0]
    code, errors = run_script(capsys, "--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o")
    assert code == 2 and "does not exist" in errors[0]
    # An output folder holding something else is refused and left as it was.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, errors = run_script(capsys, "--input", good, "--output", taken)
    assert code == 2 and "notes.txt" in errors[0] and [f.name for f in taken.iterdir()] == ["notes.txt"]
    # A finished dataset is never overwritten by other inputs.
    code, _ = run_script(capsys, "--input", good, "--output", tmp_path / "done")
    assert code == 0
    before = folder_bytes(tmp_path / "done")
    code, errors = run_script(capsys, "--input", good, tmp_path / "nokey.jsonl", "--output", tmp_path / "done")
    assert code == 2 and "already holds a prepared dataset" in errors[0]
    assert folder_bytes(tmp_path / "done") == before


# ---------------------------------------------------------------------------------------------------------------
# Training from a prepared folder


@pytest.fixture(scope="module")
def austen(tmp_path_factory):
    out = tmp_path_factory.mktemp("austen") / "prepared"
    assert prepare([str(AUSTEN)], str(out), log=quiet)
    return out


def take(loader, k) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(k)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_prepared_austen_trains_on_the_raw_paths_batches(austen, tok):
    raw = build_pretrain_dataloader(Training(seq_len=64, local_batch_size=4), tok, 0, 1)
    mapped = build_pretrain_dataloader(Training(dataset_path=str(austen), seq_len=64, local_batch_size=4), tok, 0, 1)
    assert isinstance(mapped.dataset.stream.pieces[0], tokens.FilePiece)  # read from disk on demand, not loaded
    assert same(take(raw, 20), take(mapped, 20))
    val = build_validation_dataloader(Validation(dataset_path=str(austen), local_batch_size=4), Training(seq_len=64),
                                      tok, 0, 1)
    assert len(val) == len(mapped.dataset) // 4


def test_prepared_resume_same_layout_is_bitwise(austen, tmp_path, capsys):
    base = ["--config", TINY, "--training.dataset_path", str(austen), "--validation.enable", "false",
            "--training.steps", "4", "--checkpoint.enable", "--checkpoint.interval", "2"]
    capsys.readouterr()
    assert main([*base, "--job.dump_folder", str(tmp_path / "straight")]) == 0
    n_tokens = json.loads((austen / "manifest.json").read_text())["num_tokens"]
    assert f"data: {austen} (prepared, {n_tokens:,} tokens, " in capsys.readouterr().out  # the log names the data
    assert main([*base, "--job.dump_folder", str(tmp_path / "resumed"), "--training.steps", "2"]) == 0
    assert main([*base, "--job.dump_folder", str(tmp_path / "resumed")]) == 0
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    # Resuming onto other data (here: other windows) is refused, not continued at a meaningless position.
    capsys.readouterr()
    assert main([*base, "--job.dump_folder", str(tmp_path / "resumed"), "--training.steps", "6",
                 "--training.seq_len", "16"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("titan: error:")]
    assert len(errors) == 1 and "exclude_from_loading" in errors[0], errors


class Tagged(Dataset):
    """The windows with each row's global sample index, so the test compares indices, not just tokens."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {**self.windows[i], "index": torch.tensor(i)}


def tagged_loader(austen, tok, dp_rank, dp_size, lbs=2):
    windows = Windows(tokens.open_prepared(austen, "k", tok), 64)
    return make_loader(Tagged(windows), GlobalOrderSampler(len(windows), lbs, 0, dp_rank, dp_size))


def indices(batches) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def test_prepared_resume_at_another_dp_degree_continues_the_order(austen, tok):
    straight = indices(take(tagged_loader(austen, tok, 0, 1), 12))  # positions 0..23 on one rank
    assert len(set(straight)) == 24
    # dp2 -> dp1: two ranks take 3 batches each (positions 0..11), then one rank continues from position 12.
    ranks = [tagged_loader(austen, tok, r, 2) for r in range(2)]
    seen = [indices(take(dl, 3)) for dl in ranks]
    state = copy.deepcopy(ranks[0].state_dict())
    assert state == ranks[1].state_dict()  # the state is global: the same on every rank
    assert sorted(seen[0] + seen[1]) == sorted(straight[:12])
    single = tagged_loader(austen, tok, 0, 1)
    single.load_state_dict(state)
    assert indices(take(single, 6)) == straight[12:]  # no sample repeated or skipped
    # dp1 -> dp2: one rank takes 4 batches (positions 0..7), two ranks continue, splitting positions 8.. by blocks.
    one = tagged_loader(austen, tok, 0, 1)
    assert indices(take(one, 4)) == straight[:8]
    halves = []
    for r in range(2):
        rank = tagged_loader(austen, tok, r, 2)
        rank.load_state_dict(one.state_dict())
        halves.append(indices(take(rank, 2)))
    assert halves[0] == straight[8:10] + straight[12:14] and halves[1] == straight[10:12] + straight[14:16]


def test_the_order_is_a_fresh_permutation_every_epoch():
    n = 1_003
    sampler = GlobalOrderSampler(n, 17, seed=5, dp_rank=0, dp_size=1)
    ids, _ = sampler.plan(0, [0], 3 * n)
    epochs = ids.reshape(3, n)
    assert all(sorted(e) == list(range(n)) for e in epochs.tolist())  # each epoch sees every sample once
    assert len({tuple(e) for e in epochs.tolist()}) == 3 and epochs[0].tolist() != list(range(n))
    other = GlobalOrderSampler(n, 17, seed=6, dp_rank=0, dp_size=1).plan(0, [0], n)[0]
    assert other.tolist() != epochs[0].tolist()
    # Computed, not stored: a corpus of 10^10 windows costs nothing to order.
    big = GlobalOrderSampler(10**10, 4, seed=0, dp_rank=0, dp_size=1)
    far = big.plan(10**12, [10**12], 64)[0]
    assert len(set(far.tolist())) == 64 and 0 <= far.min() and far.max() < 10**10


# ---------------------------------------------------------------------------------------------------------------
# Mixing


def test_mixing_honours_the_weights_and_resumes_every_source(austen, tmp_path, tok):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"Chapter {i}. " * 20}) + "\n" for i in range(40)))
    cfg = Training(dataset_paths=[str(austen), str(small)], dataset_weights=[0.7, 0.3], seq_len=32,
                   local_batch_size=5)
    dl = build_pretrain_dataloader(cfg, tok, 0, 1)
    sizes = dl.batch_sampler.sizes
    assert sizes[0] > 20 * sizes[1]  # the small source runs out many times and starts a new epoch each time
    it = iter(dl)
    rows = [next(it) for _ in range(600)]  # 3,000 samples
    counts = dl.batch_sampler.counts
    assert sum(counts) == 3000 and abs(counts[0] / 3000 - 0.7) <= 0.02 and abs(counts[1] / 3000 - 0.3) <= 0.02
    assert counts == [2100, 900]  # the deficit rule keeps every prefix within one sample of the weights
    assert tokens_per_source(dl, 32) == {"tokens_prepared": counts[0] * 32, "tokens_small": counts[1] * 32}
    # Every epoch of the small source is a whole permutation of it.
    plan, _ = dl.batch_sampler.plan(0, [0, 0], 3000)
    drawn_small = np.cumsum(plan >= sizes[0])
    assert np.abs(drawn_small - 0.3 * np.arange(1, 3001)).max() <= 1  # every prefix within one sample
    from_small = [i - sizes[0] for i in plan.tolist() if i >= sizes[0]]
    assert sorted(from_small[: sizes[1]]) == list(range(sizes[1]))
    assert sorted(from_small[sizes[1]: 2 * sizes[1]]) == list(range(sizes[1]))
    # Rows are what the plan says: window i of the concatenated sources.
    first = plan[:5].tolist()
    assert all(torch.equal(rows[0]["input"][r], dl.dataset[first[r]]["input"]) for r in range(5))
    # Resume: a fresh loader continues both sources exactly where they stopped.
    state = copy.deepcopy(dl.state_dict())
    expected = [next(it) for _ in range(20)]
    fresh = build_pretrain_dataloader(cfg, tok, 0, 1)
    fresh.load_state_dict(state)  # applied when iteration starts
    assert same(take(fresh, 20), expected)
    assert fresh.state_dict()["_index_sampler_state"] == dl.state_dict()["_index_sampler_state"]
    assert state["_index_sampler_state"]["counts"] == counts
    # The mix of other data cannot silently continue another mix's position.
    other = build_pretrain_dataloader(Training(dataset_path=str(austen), seq_len=32, local_batch_size=5), tok, 0, 1)
    other.load_state_dict(state)
    with pytest.raises(ConfigError, match="exclude_from_loading"):
        take(other, 1)  # the loader applies a loaded state when iteration starts


def test_mixing_config_errors_name_the_keys(tmp_path):
    from titan.config_io import load

    base = ["--config", TINY, "--job.dump_folder", str(tmp_path)]
    for extra, key in [
        (["--training.dataset_paths", "a,b", "--training.dataset_weights", "1"], "training.dataset_weights"),
        (["--training.dataset_paths", "a,b", "--training.dataset_weights", "1,-1"], "training.dataset_weights"),
        (["--training.dataset_paths", "a", "--training.dataset_path", "b"], "training.dataset_paths"),
        (["--training.dataset_weights", "1"], "training.dataset_weights"),
        (["--training.reset_positions"], "training.document_masking"),
        (["--training.document_masking", "--training.recipe", "sft"], "training.document_masking"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load([*base, *extra])


# ---------------------------------------------------------------------------------------------------------------
# Document masking


def test_document_masking_equals_each_document_alone(tmp_path, tok, one_thread):
    docs = [" ".join(["word"] * n) + f" end {n}." for n in (5, 9, 3, 14, 7, 11, 4, 8)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    seq_len = 48
    masked = Windows(token_stream(src, "k", tok), seq_len, document_masking=True, reset_positions=True)
    plain = Windows(token_stream(src, "k", tok), seq_len)
    torch.manual_seed(0)
    model = Transformer(model_args("tiny", vocab_size=tok.vocab_size, max_seq_len=seq_len))
    model.init_weights()
    checked = 0
    for i in range(len(masked)):
        row = masked[i]
        assert row["document_ids"].max() >= 1  # every window packs several documents
        with torch.no_grad():
            logits = model(row["input"][None], row["document_ids"][None], row["positions"][None])[0]
            unmasked = model(plain[i]["input"][None])[0]
        window_loss = F.cross_entropy(logits, row["label"], ignore_index=IGNORE_INDEX, reduction="sum")
        plain_loss = F.cross_entropy(unmasked, row["label"], ignore_index=IGNORE_INDEX, reduction="sum")
        per_document, alone_logits = 0.0, []
        for d in row["document_ids"].unique():
            sel = row["document_ids"] == d
            alone_input, alone_label = row["input"][sel], row["label"][sel]
            with torch.no_grad():
                alone = model(alone_input[None])[0]  # the document's tokens in this window, by themselves
            per_document += F.cross_entropy(alone, alone_label, ignore_index=IGNORE_INDEX, reduction="sum")
            alone_logits.append(alone)
        alone_logits = torch.cat(alone_logits)
        assert abs(window_loss - per_document) / per_document < 1e-5, (i, window_loss, per_document)
        assert rel_error(logits, alone_logits) < 1e-5
        # Without the mask, later documents attend to earlier ones: their logits move (and the loss with them).
        assert rel_error(unmasked, alone_logits) > 1e-3 and plain_loss != window_loss
        # The one label per boundary that crosses into the next document is not trained on.
        crossings = (row["document_ids"][1:] != row["document_ids"][:-1]).sum()
        assert (row["label"] == IGNORE_INDEX).sum() == crossings + (row["label"][-1] == IGNORE_INDEX)
        checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------------------------------------------
# Training-side errors


def test_prepared_folder_errors_name_the_file(austen, tmp_path, tok):
    def expect(path, match, tokenizer=tok):
        with pytest.raises(ConfigError, match=match) as e:
            build_pretrain_dataloader(Training(dataset_path=str(path), seq_len=64), tokenizer, 0, 1)
        assert "training.dataset_path" in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    msg = expect(austen, "prepared with tokenizer", load_tokenizer("debug_chat"))
    assert "'debug'" in msg and "debug_chat" in msg  # names both
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for f in austen.iterdir():
        (copy_dir / f.name).write_bytes(f.read_bytes())
    shard = copy_dir / "shard-000000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    assert str(shard) in expect(copy_dir, "truncated")
    shard.unlink()
    assert str(shard) in expect(copy_dir, "missing")
    (copy_dir / "manifest.json").write_text("{not json")
    expect(copy_dir, "cannot read")
    (copy_dir / "manifest.json").write_text(json.dumps({"format": "other"}))
    expect(copy_dir, "not a titan.tokens manifest")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_every_shard_corruption_is_named_in_one_line(prepared, tmp_path, tok, capsys):
    """Issue 31: shards were checked for size only. In-range garbage trained silently (now: --verify names the
    shard by its CRC-32), out-of-range ids crashed in the embedding with an IndexError naming no file, a scrambled
    .idx silently turned document masking off, and a manifest listing 12 of its 13 shards trained on less data."""
    names = [s["name"] for s in json.loads((prepared / "manifest.json").read_text())["shards"]]
    assert run_script(capsys, "--verify", prepared) == (0, [])

    garbage = _copy(prepared, tmp_path / "garbage")  # in-range ids: only the checksum can tell
    ids = np.fromfile(garbage / f"{names[1]}.bin", dtype="<u2")
    ids[10:110] = 7
    ids.tofile(garbage / f"{names[1]}.bin")
    tokens.open_prepared(garbage, "k", tok).read(0, 10)  # the cheap start-up check passes
    code, errors = run_script(capsys, "--verify", garbage)
    assert code == 2 and len(errors) == 1 and f"{garbage / names[1]}.bin has CRC-32" in errors[0], errors

    wild = _copy(prepared, tmp_path / "wild")  # ids outside the vocabulary
    ids = np.fromfile(wild / f"{names[2]}.bin", dtype="<u2")
    ids[:] = 4096
    ids.tofile(wild / f"{names[2]}.bin")
    stream = tokens.open_prepared(wild, "training.dataset_path", tok)
    with pytest.raises(ConfigError, match=f"{wild / names[2]}.bin holds token id 4096 at position 0") as e:
        stream.read(stream._offsets[2], 8)
    assert "\n" not in str(e.value) and "--verify" in str(e.value)
    code, errors = run_script(capsys, "--verify", wild)
    assert code == 2 and len(errors) == 1 and f"{names[2]}.bin holds token id 4096" in errors[0], errors

    scrambled = _copy(prepared, tmp_path / "scrambled")  # two offsets swapped: the same size, first and last
    offsets = np.fromfile(scrambled / f"{names[0]}.idx", dtype="<u8")
    offsets[[3, 5]] = offsets[[5, 3]]
    offsets.tofile(scrambled / f"{names[0]}.idx")
    with pytest.raises(ConfigError, match=f"{scrambled / names[0]}.idx has offsets out of order"):
        tokens.open_prepared(scrambled, "k", tok).document_index(0, 64)
    code, errors = run_script(capsys, "--verify", scrambled)
    assert code == 2 and len(errors) == 1 and f"{names[0]}.idx has offsets out of order" in errors[0], errors

    short = _copy(prepared, tmp_path / "short")  # the manifest lists one shard fewer than the folder holds
    manifest = json.loads((short / "manifest.json").read_text())
    manifest["shards"].pop()
    (short / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="shards add up to") as e:
        tokens.open_prepared(short, "training.dataset_path", tok)
    assert "\n" not in str(e.value)
    code, errors = run_script(capsys, "--verify", short)
    assert code == 2 and any(f"{names[-1]}.bin" in line and "not once" in line for line in errors), errors

    # Through training: one line naming the shard and exit code 2, not an IndexError traceback.
    for name in names:
        np.full(len(np.fromfile(wild / f"{name}.bin", dtype="<u2")), 4096, dtype="<u2").tofile(wild / f"{name}.bin")
    assert main(["--config", TINY, "--job.dump_folder", str(tmp_path / "run"), "--training.dataset_path", str(wild),
                 "--training.steps", "1", "--validation.enable", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds token id 4096" in err[0] and str(wild) in err[0], err


def test_tokenizer_identity_is_content_and_prepared_data_has_the_override(prepared, tmp_path, tok, capsys):
    """A re-indented sidecar with a chat_template added is the same tokenizer (it was refused: identity was the
    files' bytes); two swapped ranks are another, refused for prepared data unless checkpoint.allow_tokenizer_change
    (which prepared data lacked)."""
    shipped = Path(tok.name)
    same = tmp_path / "same"
    same.mkdir()
    (same / "debug.tiktoken").write_bytes(shipped.read_bytes())
    sidecar = json.loads(shipped.with_suffix(".json").read_text())
    (same / "debug.json").write_text(json.dumps({**sidecar, "chat_template": "{{ messages }}"}, indent=7))
    reindented = load_tokenizer(str(same / "debug.tiktoken"))
    assert reindented.identity == tok.identity and reindented.file_identity != tok.file_identity
    tokens.open_prepared(prepared, "k", reindented)
    # A folder recorded with the files' sha256 (titan before content identity) still opens.
    legacy = _copy(prepared, tmp_path / "legacy")
    manifest = json.loads((legacy / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = tok.file_identity
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    tokens.open_prepared(legacy, "k", tok)

    lines = shipped.read_text().splitlines()
    (a, rank_a), (b, rank_b) = lines[300].split(), lines[301].split()
    lines[300], lines[301] = f"{a} {rank_b}", f"{b} {rank_a}"
    (same / "other.tiktoken").write_text("\n".join(lines) + "\n")
    (same / "other.json").write_text(json.dumps(sidecar))
    other = load_tokenizer(str(same / "other.tiktoken"))
    assert other.identity != tok.identity
    with pytest.raises(ConfigError, match="checkpoint.allow_tokenizer_change"):
        tokens.open_prepared(prepared, "training.dataset_path", other)
    tokens.open_prepared(prepared, "training.dataset_path", other, allow_tokenizer_change=True)


def test_a_dead_worker_fails_the_preparation_within_seconds(tmp_path):
    """Issue 31: multiprocessing.Pool replaced a SIGKILLed worker (what the OOM killer does) but never delivered its
    unit, and the driver waited forever at 0 % CPU. Now the run stops within 10 s, with one line."""
    big = tmp_path / "big.jsonl"
    paragraphs = [json.dumps({"text": p}) + "\n" for p in AUSTEN.read_text().split("\n\n") if p.strip()]
    with open(big, "w") as f:
        # Eight chunks of 16 MiB: each worker still has chunks to come when the kill lands, even on a fast machine (at
        # three, a worker that finished its last one was killed idle once, and the run rightly finished without it).
        while f.tell() < 128 * 2**20:
            f.write("".join(paragraphs))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--input", str(big), "--output", str(tmp_path / "out"),
                             "--workers", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    def workers() -> list[int]:  # the tokenizing processes (not multiprocessing's resource tracker)
        return [c for c in children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

    try:
        deadline = time.time() + 120
        while len(workers()) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.1)
        time.sleep(2)  # at work on their first chunks
        victim = workers()[0]
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=30)
        assert time.time() - killed < 10
    finally:
        proc.kill()
    errors = [line for line in err.splitlines() if "error" in line]
    assert proc.returncode == 1 and len(errors) == 1 and f"worker process {victim} died (killed by SIGKILL" in \
        errors[0], err
    assert "Traceback" not in err and not (tmp_path / "out" / "manifest.json").exists()


def test_one_run_per_output_part_and_edited_inputs_are_prepared_again(tmp_path, capsys):
    from titan.data.prepare import part_lock

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a", "b"):
        (docs / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(900)))
    out = tmp_path / "out"
    out.mkdir()
    with part_lock(out, 0, 1):  # another run holds the folder: refused, naming it
        code, errors = run_script(capsys, "--input", docs, "--output", out, "--shard_mb", "0.01", "--workers", "1")
    assert code == 2 and f"being prepared by another run (host {socket.gethostname()}, pid {os.getpid()})" in \
        errors[0], errors
    assert prepare([str(docs)], str(out), shard_mb=0.01, log=quiet)
    (out / "manifest.json").unlink()  # as if interrupted before the end
    records = {f.name: f.read_bytes() for f in out.glob("shard-*.json")}
    with open(docs / "b.jsonl", "a") as f:  # an input edited before the resume
        f.write(json.dumps({"text": "b, one more"}) + "\n")
    lines = []
    assert prepare([str(docs)], str(out), shard_mb=0.01, log=lines.append)
    assert any("resuming, 1 of 3 shards already done" in line for line in lines), lines
    assert (out / "shard-000000.json").read_bytes() == records["shard-000000.json"]
    assert prepare([str(docs)], str(tmp_path / "fresh"), shard_mb=0.01, log=quiet)
    assert folder_bytes(out) == folder_bytes(tmp_path / "fresh")


def test_prepare_command_line_runs_in_a_fresh_process(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--input", str(DATASETS["austen"]["validation"]), "--output",
                          str(tmp_path / "val"), "--workers", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stderr and "MB/s" in out.stderr and "tokens/s" in out.stderr and "ETA" in out.stderr


def test_progress_counts_tokens_as_chunks_are_written_not_as_shards_end(corpus, tmp_path, monkeypatch):
    """The progress line's tokens/s read 0.00 through a whole first shard (256 MB by default), then jumped: tokens
    were counted when a shard ended. Counted per written chunk, the running count rises before any shard ends and ends
    at the manifest's total."""
    from titan.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 4096)  # many chunks in one shard
    seen = []
    monkeypatch.setattr(prepare_module.Progress, "update",
                        lambda self, done_bytes, force=False: seen.append((self.units, self.tokens)))
    out = tmp_path / "one_shard"
    assert prepare([str(corpus / "a.jsonl")], str(out), workers=1, shard_mb=1024, log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and seen[-1] == (1, manifest["num_tokens"])
    before_the_end = [tokens for units, tokens in seen if units == 0]
    assert len(before_the_end) > 3 and before_the_end == sorted(before_the_end) and 0 < before_the_end[-1]
