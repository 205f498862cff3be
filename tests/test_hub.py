"""Datasets by Hugging Face name (titan/data/hub.py): a DatasetDict saved with `save_to_disk` and a dataset in the
local datasets cache load by name with the network off, give the same SFT / preference rows and the same prepared
tokens as the same records in a local JSONL file (columns renamed with dataset_columns); a dataset that is not cached
is one line naming it, exit code 2. Skipped without the `datasets` package (the datasets extra)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from dist_utils import REPO

from titan.config import SFT, Training
from titan.data.chat import preference_rows, sft_rows
from titan.data.documents import DATASETS
from titan.data.tokenizer import load_tokenizer

datasets = pytest.importorskip("datasets")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _records(name: str, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in DATASETS[name][split].read_text().splitlines() if line.strip()]


def _equal_rows(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def test_save_to_disk_folder_gives_the_jsonl_rows(tmp_path, cache):
    tok = load_tokenizer("debug_chat")
    chats = [{"conversation": r["messages"]} for r in _records("tiny_chat")]  # another column name
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats),
                          "test": datasets.Dataset.from_list(chats[:4])}).save_to_disk(str(folder))
    named = Training(dataset=f"hf:{folder}", dataset_columns=["messages=conversation"], seq_len=64)
    local = Training(dataset="tiny_chat", seq_len=64)
    rows = sft_rows("training", named, SFT(), tok, 64, "train")
    assert _equal_rows(rows, sft_rows("training", local, SFT(), tok, 64, "train"))
    assert list(cache.glob("titan-jsonl/*.jsonl"))  # written once, then reused
    from titan.data.hub import materialize  # streamed record by record: the same file content

    streamed = materialize("training.dataset", f"hf:{folder}", "train", ["messages=conversation"], streaming=True)
    assert [json.loads(line) for line in streamed.read_text().splitlines()] == _records("tiny_chat")
    assert _equal_rows(sft_rows("training", named, SFT(), tok, 64, "train"), rows)
    assert len(sft_rows("training", Training(dataset=f"hf:{folder}:test", dataset_columns=["messages=conversation"]),
                        SFT(), tok, 64, "train")) == 4
    pairs = tmp_path / "pairs"
    datasets.Dataset.from_list(_records("tiny_preferences")).save_to_disk(str(pairs))
    got = preference_rows(Training(dataset=f"hf:{pairs}", seq_len=64), SFT(), tok)
    want = preference_rows(Training(dataset="tiny_preferences", seq_len=64), SFT(), tok)
    assert all(_equal_rows([g["chosen"], g["rejected"]], [w["chosen"], w["rejected"]]) for g, w in zip(got, want))
    with pytest.raises(Exception, match=r"training.dataset=hf:.*saved:nope: no split 'nope'"):
        sft_rows("training", Training(dataset=f"hf:{folder}:nope"), SFT(), tok, 64, "train")


def test_prepare_data_reads_a_dataset_by_name(tmp_path, cache):
    docs = [{"content": p} for p in (REPO / "titan/assets/data/austen/validation.txt").read_text().split("\n\n")[:200]]
    datasets.Dataset.from_list(docs).save_to_disk(str(tmp_path / "austen"))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d["content"]}) + "\n" for d in docs))
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(cache)}
    for source, extra, out in ((f"hf:{tmp_path / 'austen'}", ["--text_key", "content"], "a"),
                               (str(tmp_path / "docs.jsonl"), [], "b")):
        run = subprocess.run([sys.executable, "scripts/prepare_data.py", "--input", source, "--output",
                              str(tmp_path / out), "--workers", "1", *extra], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    tokens = [sorted(p.name for p in (tmp_path / out).iterdir() if p.suffix == ".bin") for out in "ab"]
    assert tokens[0] == tokens[1] and tokens[0]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in tokens[0])


def test_cached_hub_dataset_loads_offline_and_a_missing_one_is_one_line(tmp_path):
    """A dataset in the datasets cache as a Hub download leaves it (<cache>/<org>___<name>/...; made here from local
    files, with no network), read by name with HF_DATASETS_OFFLINE=1; then a name that is not cached."""
    cache = tmp_path / "cache"
    (tmp_path / "train.jsonl").write_text(DATASETS["tiny_chat"]["train"].read_text())
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), **OFFLINE}
    make = ("import datasets, glob, os, shutil; datasets.load_dataset('json', data_files={'train': 'train.jsonl'}); "
            f"src = glob.glob('{cache}/json/*/*/*')[0]; dst = '{cache}/titan-test___tiny_chat/default/0.0.0/' + "
            "os.path.basename(src); shutil.copytree(src, dst); "
            "os.rename(dst + '/json-train.arrow', dst + '/tiny_chat-train.arrow')")
    assert subprocess.run([sys.executable, "-c", make], cwd=tmp_path, env=env, timeout=300).returncode == 0
    shutil.rmtree(cache / "json")
    check = ("from titan.data.documents import locate; import sys; "
             "print(locate('training', sys.argv[1], '', 'train')[0])")
    out = subprocess.run([sys.executable, "-c", check, "hf:titan-test/tiny_chat"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip().splitlines()[-1]
    assert [json.loads(line) for line in open(path)] == _records("tiny_chat")
    missing = subprocess.run([sys.executable, "-m", "titan.train", "--config", "tests/configs/tiny_sft.toml",
                              "--training.dataset", "hf:titan-test/missing", "--validation.enable", "false",
                              "--job.dump_folder", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2, missing.stderr
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "training.dataset=hf:titan-test/missing" in lines[0] and "HF_DATASETS_OFFLINE" in \
        lines[0] and "save_to_disk" in lines[0], lines
    assert not glob.glob(str(cache / "titan-jsonl" / "*missing*"))
