"""Hugging Face export under pipeline parallelism: with checkpoint.last_save_in_hf, a PP=2 run on 2 gloo processes
writes step-N-hf through DCP's HuggingFaceStorageWriter (each rank its stage's tensors, consolidated into one file)
and it holds the same weights as the single-process run's export (training agrees to fp32 rounding: 1e-5 relative);
transformers (optional: skipped without it) loads it and its logits match the single-process export's. The files are
group/world-readable like the folder's others (mode 0666 less the umask). DeepSeek-V3 (with MTP) and gpt-oss train
from a converted folder exactly as from the seed it came from, and generate.py --hf runs them; the same weights
re-saved by transformers (optional) train and generate alike."""

from __future__ import annotations

import json
import os

import pytest
import torch
from dist_utils import TINY, rel_error, run_layouts

from titan import hf

STEPS = 1
BASE = ["--config", TINY, "--training.steps", str(STEPS), "--validation.enable", "false", "--checkpoint.enable",
        "--checkpoint.interval", "100", "--checkpoint.last_save_in_hf", "--checkpoint.model_only"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{"single": folder, "pp2": folder}: the step-N-hf folders of a single-process and a PP=2 run."""
    from titan.train import main

    root = tmp_path_factory.mktemp("hf_export")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*BASE, "--job.dump_folder", str(root / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    run_layouts(2, [[*BASE, "--job.dump_folder", str(root / "pp2"), "--parallelism.pipeline_parallel_degree", "2"]])
    return {name: root / name / "checkpoint" / f"step-{STEPS}-hf" for name in ("single", "pp2")}


def test_pp_export_holds_the_single_process_weights(exports):
    single, pp = hf.read_safetensors(exports["single"]), hf.read_safetensors(exports["pp2"])
    assert set(pp) == set(single)
    worst = max(rel_error(pp[k], single[k]) for k in single)
    assert worst < 1e-5, worst
    assert not (exports["pp2"] / "sharded").exists()  # the per-rank files are gone after consolidation
    assert json.loads((exports["pp2"] / "config.json").read_text()) == \
        json.loads((exports["single"] / "config.json").read_text())
    umask = os.umask(0)
    os.umask(umask)
    for folder in exports.values():
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
        assert set(modes.values()) == {0o666 & ~umask}, modes


def test_transformers_loads_the_pp_export(exports):
    transformers = pytest.importorskip("transformers")
    ids = torch.arange(1, 30).unsqueeze(0)
    logits = {}
    for name, folder in exports.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert rel_error(logits["pp2"], logits["single"]) < 1e-5


@pytest.mark.parametrize("family, extra", [("deepseek_v3", ["--model.mtp_layers", "1"]), ("gpt_oss", [])])
def test_new_families_train_and_generate_from_a_hugging_face_folder(tmp_path, capsys, family, extra):
    """DeepSeek-V3 (with its MTP depth) and gpt-oss: a seed checkpoint converted to a Hugging Face folder
    (scripts/convert_checkpoint.py) starts a run that takes the same steps as the run from the seed itself (the
    weights came through whole), and `scripts/generate.py --hf` continues a prompt as the model in this process."""
    from dist_utils import REPO, load_script, read_metrics

    from titan.data.tokenizer import load_tokenizer
    from titan.generation import generate
    from titan.train import main

    config = str(REPO / "tests" / "configs" / f"tiny_{family}.toml")
    base = ["--config", config, "--moe.grouped_mm", "false", "--training.steps", "2", "--validation.enable", "false",
            *extra]
    assert main([*base, "--job.dump_folder", str(tmp_path / "seed"), "--checkpoint.enable",
                 "--checkpoint.create_seed_checkpoint"]) == 0
    convert = ["to-hf", str(tmp_path / "seed" / "checkpoint" / "step-0"), str(tmp_path / "hf"), "--model", family,
               "--flavor", "tiny", "--max-seq-len", "32", "--dtype", "float32"]
    assert load_script("convert_checkpoint").main([*convert, *(["--mtp-layers", "1"] if extra else [])]) == 0
    if extra:
        assert "model.layers.4.eh_proj.weight" in hf.read_safetensors(tmp_path / "hf")
    assert main([*base, "--job.dump_folder", str(tmp_path / "plain")]) == 0
    assert main([*base, "--job.dump_folder", str(tmp_path / "from_hf"), "--checkpoint.initial_load_path",
                 str(tmp_path / "hf"), "--checkpoint.initial_load_in_hf"]) == 0
    plain, from_hf = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "from_hf")
    for key in ("loss", "grad_norm", "aux_loss"):
        assert max(abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(from_hf, plain)) < 1e-6, key
    capsys.readouterr()
    assert load_script("generate").main(["--hf", str(tmp_path / "hf"), "--prompt", "Emma", "--max_new_tokens",
                                         "4"]) == 0
    args, state = hf.load(tmp_path / "hf")
    from titan import models

    model = models.build_model(args)
    model.init_buffers()
    model.load_state_dict(state)
    tok = load_tokenizer(str(tmp_path / "hf"))
    expected = tok.decode(generate(model, [tok.encode("Emma", bos=True)], 4)[0]) + "\n"
    assert capsys.readouterr().out == expected
    _from_a_transformers_folder(tmp_path, capsys, base, extra, expected)


def _from_a_transformers_folder(tmp_path, capsys, base: list[str], extra: list[str], expected: str) -> None:
    """The same weights in a folder as transformers writes it (its own tensor names, order and files; no MTP layer,
    which DeepseekV3ForCausalLM drops; no titan-only buffers): a run starts from it as from the seed, and
    `generate.py --hf` continues the prompt alike. Skipped without transformers (optional)."""
    import shutil

    from dist_utils import load_script, read_metrics

    from titan.train import main

    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    theirs.save_pretrained(str(tmp_path / "hf_tf"))
    for f in (tmp_path / "hf").iterdir():
        if "token" in f.name and not (tmp_path / "hf_tf" / f.name).exists():
            shutil.copyfile(f, tmp_path / "hf_tf" / f.name)
    assert not any(k.startswith("model.layers.4.") for k in hf.read_safetensors(tmp_path / "hf_tf"))
    base = [a for a in base if a not in extra]  # its config.json may keep the MTP count; the folder has no MTP layer
    if extra:  # the run to compare with: the seed without its MTP depth
        assert main([*base, "--job.dump_folder", str(tmp_path / "plain_no_mtp"), "--checkpoint.initial_load_path",
                     str(tmp_path / "hf"), "--checkpoint.initial_load_in_hf"]) == 0
    plain = read_metrics(tmp_path / ("plain_no_mtp" if extra else "plain"))
    assert main([*base, "--job.dump_folder", str(tmp_path / "from_tf"), "--checkpoint.initial_load_path",
                 str(tmp_path / "hf_tf"), "--checkpoint.initial_load_in_hf"]) == 0
    for key in ("loss", "grad_norm", "aux_loss"):
        assert max(abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(read_metrics(tmp_path / "from_tf"), plain)) \
            < 1e-6, key
    capsys.readouterr()
    assert load_script("generate").main(["--hf", str(tmp_path / "hf_tf"), "--prompt", "Emma", "--max_new_tokens",
                                         "4"]) == 0
    assert capsys.readouterr().out == expected
