"""scripts/benchmark_model.py: on a tiny shape it times titan's Transformer against the plain reference and
reports their logits parity; its parity check refuses a model that computes something else (RoPE left out), so a
speed ratio is never reported for two different models. Not a timing test: the ratio's value is not checked. What is
checked is the load-independent part: titan's forward + backward dispatches no more aten ops, and saves no more bytes
for the backward, than the reference's."""

from __future__ import annotations

import json

import pytest
import torch
from dist_utils import load_script

ARGS = ["--shapes", "tiny", "--modes", "eager", "--steps", "2", "--warmup", "1", "--reference", "plain"]


def test_model_only_reports_parity_and_ratio(one_thread, tmp_path, capsys):
    bench = load_script("benchmark_model")
    assert bench.main([*ARGS, "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    (row,) = r["results"]
    assert row["shape"] == "tiny" and row["mode"] == "eager" and len(row["ratios"]) == 2
    assert 0 <= row["logits_max_rel_diff"] <= 1e-6 and row["ratio_median"] > 0
    lo, hi = row["ratio_ci95"]
    assert lo <= row["ratio_median"] <= hi and 0 <= row["titan_faster_share"] <= 1
    assert row["work"]["titan"]["aten_ops"] == sum(row["work"]["titan"]["ops"].values()) > 0
    assert r["reference"].startswith("the plain Llama") and r["torch_version"] == torch.__version__
    assert "titan / reference =" in capsys.readouterr().out


def test_model_only_parity_check_refuses_a_different_model(one_thread, monkeypatch, capsys):
    import titan.models.layers as layers

    bench = load_script("benchmark_model")
    monkeypatch.setattr(layers, "apply_rotary_emb", lambda q, k, freqs_cis: (q, k))  # titan without RoPE
    assert bench.main(ARGS) == 1
    err = capsys.readouterr().err
    assert "benchmark: error: tiny (eager): logits differ from the reference by" in err and "not the same model" in err


def test_plain_reference_grads_match_titan(one_thread):
    """The plain reference is the same function as titan's model in its gradients too (GQA, RoPE, norms)."""
    bench = load_script("benchmark_model")
    model, ref, _ = bench.build_model_pair("tiny", "plain", "")
    tokens = torch.randint(model.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    for m in (model, ref):
        torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    ref_params = dict(ref.named_parameters())
    assert ref_params.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_titan_does_no_more_work_than_the_references(one_thread):
    """Counted, not timed: the aten ops one forward + backward dispatches (views included) and the bytes autograd
    saves for the backward, titan's model against the plain reference (always) and torchtitan's (where it imports)."""
    bench = load_script("benchmark_model")
    tokens = torch.randint(256, (2, 33), generator=torch.Generator().manual_seed(0))
    for reference in ("plain", "torchtitan"):
        try:
            model, ref, _ = bench.build_model_pair("tiny", reference, "")
        except bench.ParityError:  # torchtitan not importable: the plain case stands
            continue
        titan, other = bench.count_work(model, tokens), bench.count_work(ref, tokens)
        assert titan["ops"]["aten.mm"] == other["ops"]["aten.mm"], reference  # the same matmuls: like for like
        assert titan["aten_ops"] <= other["aten_ops"], (reference, bench.work_differences(titan, other))
        assert titan["saved_bytes"] <= other["saved_bytes"], reference


def test_benchmark_py_points_model_only_here(capsys):
    """`--model_only` on scripts/benchmark.py, its old home: one line naming this script and exit code 2."""
    with pytest.raises(SystemExit) as e:
        load_script("benchmark").parse_args(["--model_only", "--shapes", "tiny"])
    assert e.value.code == 2 and "python scripts/benchmark_model.py" in capsys.readouterr().err
