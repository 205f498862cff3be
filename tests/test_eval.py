"""Downstream evaluation through lm-evaluation-harness (titan/evaluation.py, scripts/eval.py): a tiny multiple-choice
task from a local JSONL file (offline) scored through titan's lm-eval model class gives lm-eval's own `hf` model's
log-likelihoods on titan's Hugging Face export of the same model (within 1e-4) and the same accuracy; scripts/eval.py
prints the same scores; unknown tasks are one line. Skipped without lm_eval (the eval extra)."""

from __future__ import annotations

import json

import pytest
import torch
from dist_utils import load_script

from titan import hf
from titan.data.tokenizer import load_tokenizer
from titan.models.llama import Transformer, model_args
from titan.parallel.parallelize import materialize

pytest.importorskip("lm_eval")

QUESTIONS = [("What is the capital of France?", ["Paris", "London", "Rome"], 0),
             ("Which of these is a colour?", ["blue", "seven", "under"], 0),
             ("Mr. Darcy was proud and", ["rich", "poor", "tall"], 1)]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "tiny_mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                                for q, c, a in QUESTIONS))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_mc.yaml").write_text(TASK.format(data=root / "tiny_mc.jsonl"))
    tok = load_tokenizer("")
    args = model_args("tiny", vocab_size=tok.vocab_size, max_seq_len=128)
    model = Transformer(args)
    materialize(model, torch.device("cpu"), 0)
    folder = hf.save(model.state_dict(), args, root / "export", bos_id=tok.bos_id, eos_id=tok.eos_id, tokenizer=tok)
    return root, model.eval(), tok, folder


def _loglikelihoods(results) -> list[float]:
    return [resp[0][0] for sample in results["samples"]["tiny_mc"] for resp in sample["resps"]]


def test_titan_lm_equals_lm_evals_hf_model_on_the_export(setup, one_thread):
    from lm_eval.models.huggingface import HFLM

    from titan.evaluation import run_tasks, scores, titan_lm

    root, model, tok, folder = setup
    hf_lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=1)
    ours = run_tasks(titan_lm(model, tok), ["tiny_mc"], str(root / "tasks"), log_samples=True)
    theirs = run_tasks(hf_lm, ["tiny_mc"], str(root / "tasks"), log_samples=True)
    a, b = _loglikelihoods(ours), _loglikelihoods(theirs)
    assert len(a) == 9 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert scores(ours)["tiny_mc_acc"] == scores(theirs)["tiny_mc_acc"]

    # A rolling (perplexity) request too; and a generation request stops at its `until`.
    from lm_eval.api.instance import Instance

    lm = titan_lm(model, tok)
    rolling = [Instance("loglikelihood_rolling", {}, ("It is a truth universally acknowledged",), 0)]
    assert abs(lm.loglikelihood_rolling(rolling)[0] - hf_lm.loglikelihood_rolling(rolling)[0]) < 1e-4
    [reply] = lm.generate_until([Instance("generate_until", {}, ("Hello", {"until": ["\n"], "max_gen_toks": 5}),
                                          0)])
    assert isinstance(reply, str) and "\n" not in reply


@pytest.fixture()
def local_tasks_only(monkeypatch):
    """lm-eval's own ~15,000 task files take ~20 s to index: the error paths look only at the local YAMLs here."""
    from titan import evaluation

    local = evaluation._manager.__wrapped__
    monkeypatch.setattr(evaluation, "_manager", lambda path, defaults: local(path, False))


def test_eval_script_prints_the_scores_and_bad_tasks_are_one_line(setup, capsys, local_tasks_only, one_thread):
    root, _, _, folder = setup
    script = load_script("eval")
    out = root / "results.json"
    assert script.main(["--hf", str(folder), "--tasks", "tiny_mc", "--include_path", str(root / "tasks"),
                        "--output", str(out)]) == 0
    printed = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines() if line.startswith("tiny_mc"))
    saved = json.loads(out.read_text())["results"]["tiny_mc"]["acc,none"]
    assert float(printed["tiny_mc_acc"]) == pytest.approx(saved, rel=1e-5)
    assert script.main(["--hf", str(folder), "--tasks", "no_such_task", "--include_path", str(root / "tasks")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval:")]
    assert err == ["eval: error: --tasks: unknown lm-eval task 'no_such_task' (no YAML under "
                   f"{root / 'tasks'} names it)"]


def test_in_loop_scores_are_logged_beside_validation(setup, tmp_path, local_tasks_only, one_thread):
    """validation.lm_eval_tasks: the task is scored at every validation on the training model; the logged accuracy is
    what scoring the run's export gives."""
    from dist_utils import TINY, read_metrics

    from titan.evaluation import run_tasks, scores, titan_lm
    from titan.train import main

    root = setup[0]
    dump = tmp_path / "run"
    assert main(["--config", TINY, "--job.dump_folder", str(dump), "--training.steps", "2", "--validation.enable",
                 "--validation.freq", "2", "--validation.steps", "1", "--validation.lm_eval_tasks", "tiny_mc",
                 "--validation.lm_eval_include", str(root / "tasks"), "--checkpoint.enable",
                 "--checkpoint.last_save_in_hf"]) == 0
    [logged] = [r for r in read_metrics(dump, validation=True) if "val_loss" in r]
    assert logged["step"] == 2 and "val_tiny_mc_acc" in logged
    model, tok = hf_model(dump / "checkpoint" / "step-2-hf")
    assert scores(run_tasks(titan_lm(model, tok), ["tiny_mc"], str(root / "tasks")))["tiny_mc_acc"] == \
        logged["val_tiny_mc_acc"]
    assert main(["--config", TINY, "--job.dump_folder", str(tmp_path / "bad"), "--validation.enable",
                 "--validation.lm_eval_tasks", "nope", "--validation.lm_eval_include", str(root / "tasks")]) == 2


def hf_model(folder):
    args, state = hf.load(folder)
    model = Transformer(args)
    model.load_state_dict(state)
    return model.eval(), load_tokenizer(str(folder))
