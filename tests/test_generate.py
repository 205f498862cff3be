"""titan.generation and scripts/generate.py on tiny models (no download): greedy decoding against a hand-written
argmax loop, stop ids, sampling (top_k=1 is greedy, a seed reproduces), the RoPE-table limit; the CLI on a Hugging
Face folder written by titan.hf.save, and on DCP checkpoints written by titan.train (a full one, and a LoRA
adapter-only one whose base comes from checkpoint.initial_load_path), each against the same weights read another way.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from dist_utils import REPO, TINY

from titan import hf
from titan.config import LoRA
from titan.data.chat import chat_template
from titan.data.tokenizer import load_tokenizer
from titan.generation import generate
from titan.models import lora
from titan.models.llama import Transformer, model_args

CHAT_TOKENIZER = str(REPO / "titan" / "assets" / "tokenizer" / "debug_chat.tiktoken")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_model(vocab_size: int, max_seq_len: int = 64, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(model_args("tiny", vocab_size=vocab_size, max_seq_len=max_seq_len))
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(CHAT_TOKENIZER)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


def argmax_loop(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def test_greedy_is_the_argmax_loop(model, tok, one_thread):
    prompt = tok.encode("It is a truth universally acknowledged", bos=True)
    assert generate(model, prompt, 12) == argmax_loop(model, prompt, 12)


def test_stop_ids_stop_and_are_included(model, tok, one_thread):
    prompt = tok.encode("Emma Woodhouse", bos=True)
    free = generate(model, prompt, 10)
    stop = free[3]
    first = free.index(stop)  # the first occurrence may come earlier
    assert generate(model, prompt, 10, stop_ids=[stop]) == free[:first + 1]
    assert generate(model, prompt, 0) == []


def test_top_k_1_sampling_is_greedy(model, tok, one_thread):
    prompt = tok.encode("Mr. Darcy", bos=True)
    g = torch.Generator().manual_seed(1)
    assert generate(model, prompt, 10, temperature=0.8, top_k=1, generator=g) == generate(model, prompt, 10)


def test_sampling_is_reproducible_with_a_seed(model, tok, one_thread):
    prompt = tok.encode("Mr. Darcy", bos=True)

    def sample(seed: int, **kw) -> list[int]:
        return generate(model, prompt, 16, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)  # an untrained model's distribution is broad: different seeds differ
    top = sample(5, top_k=5)
    with torch.no_grad():  # every sampled token is among the 5 most likely at its position
        logits = model(torch.tensor([prompt + top]))[0, len(prompt) - 1:-1]
    assert all(t in row.topk(5).indices for t, row in zip(top, logits))


def test_generation_stays_within_the_rope_table(tok, one_thread):
    model = tiny_model(tok.vocab_size, max_seq_len=16)
    prompt = list(range(10, 24))  # 14 tokens: positions 14 and 15 can still be fed, then the table is full
    new = generate(model, prompt, 10)
    assert len(new) == 3 and new == argmax_loop(model, prompt, 3)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        generate(model, list(range(17)), 1)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 1)


# ---------------------------------------------------------------------------------------------------------------
# scripts/generate.py


@pytest.fixture(scope="module")
def gen_script():
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_folder(model, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    return hf.save(model.state_dict(), model.args, folder, bos_id=tok.bos_id, eos_id=tok.eos_id,
                   tokenizer_file=CHAT_TOKENIZER, tokenizer=tok)


def test_cli_hf_chat_matches_in_process(gen_script, hf_folder, model, tok, capsys, one_thread):
    assert gen_script.main(["--hf", str(hf_folder), "--chat", "--system", "Be brief.", "--prompt", "Hello there",
                            "--max_new_tokens", "8"]) == 0
    out = capsys.readouterr().out
    template = chat_template(tok, "auto")
    ids, _ = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
                             add_generation_prompt=True)
    new = generate(model, ids, 8, stop_ids={template.end_id, tok.eos_id})
    if new and new[-1] in (template.end_id, tok.eos_id):
        new = new[:-1]
    assert out == tok.decode(new) + "\n"


def test_cli_hf_plain_prompt_and_sampling(gen_script, hf_folder, model, tok, capsys, one_thread):
    assert gen_script.main(["--hf", str(hf_folder), "--prompt", "Emma", "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out == tok.decode(generate(model, tok.encode("Emma", bos=True), 6)) + "\n"
    argv = ["--hf", str(hf_folder), "--prompt", "Emma", "--max_new_tokens", "6", "--temperature", "1", "--seed", "7"]
    assert gen_script.main(argv) == 0
    first = capsys.readouterr().out
    assert gen_script.main(argv) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("argv, message", [
    (["--hf", "/nonexistent/folder"], "no config.json"),
    (["--checkpoint", "/nonexistent/step-3"], "no such folder"),
])
def test_cli_bad_path_is_one_line_exit_2(gen_script, argv, message, capsys):
    assert gen_script.main([*argv, "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("generate: error: ") and message in err and err.count("\n") == 1


def _train(dump, *extra: str) -> None:
    cmd = [sys.executable, "-m", "titan.train", "--config", TINY, "--training.steps", "2", "--checkpoint.enable",
           "--validation.enable", "false", "--job.dump_folder", str(dump), *extra]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _dcp_model(step) -> dict[str, torch.Tensor]:
    """The checkpoint's "model" entries read independently of scripts/generate.py (DCP -> torch.save format)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = step.parent / (step.name + ".pt")
    dcp_to_torch_save(str(step), str(path))
    return torch.load(path, weights_only=False)["model"]


def test_cli_checkpoint_matches_the_trained_weights(gen_script, tmp_path, capsys, one_thread):
    _train(tmp_path / "run")
    step = tmp_path / "run" / "checkpoint" / "step-2"
    stored = _dcp_model(step)
    model, tok = gen_script.from_checkpoint(step, None, None)
    assert model.state_dict().keys() == stored.keys()
    for name, value in stored.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert gen_script.main(["--checkpoint", str(step), "--prompt", "She was", "--max_new_tokens", "5"]) == 0
    reference = tiny_model(tok.vocab_size, max_seq_len=32)
    reference.load_state_dict(stored)
    assert capsys.readouterr().out == tok.decode(generate(reference, tok.encode("She was", bos=True), 5)) + "\n"


def test_cli_lora_adapter_only_checkpoint_takes_the_base_from_initial_load_path(gen_script, tmp_path, capsys,
                                                                                one_thread):
    tok = load_tokenizer("")  # tiny.toml's tokenizer: the shipped debug one
    base = tiny_model(tok.vocab_size, max_seq_len=32, seed=5)
    hf.save(base.state_dict(), base.args, tmp_path / "base-hf", bos_id=tok.bos_id, eos_id=tok.eos_id)
    _train(tmp_path / "run", "--lora.enable", "--lora.save_adapter_only", "--optimizer.lr", "0.05",
           "--checkpoint.initial_load_path", str(tmp_path / "base-hf"), "--checkpoint.initial_load_in_hf")
    step = tmp_path / "run" / "checkpoint" / "step-2"
    adapters = _dcp_model(step)
    assert adapters and all(lora.is_adapter(k) for k in adapters)  # really adapter-only
    merged = lora.merge({**base.state_dict(), **adapters}, LoRA().alpha / LoRA().rank)  # the run's (default) scale
    reference = tiny_model(tok.vocab_size, max_seq_len=32)
    reference.load_state_dict(merged)
    model, _ = gen_script.from_checkpoint(step, None, None)
    prompt = tok.encode("She was", bos=True)
    with torch.no_grad():
        got, want = model(torch.tensor([prompt])), reference(torch.tensor([prompt]))
        unadapted = base(torch.tensor([prompt]))
    assert (got - want).abs().max() < 1e-5 < (want - unadapted).abs().max()  # the adapters are used, and matter
    assert gen_script.main(["--checkpoint", str(step), "--prompt", "She was", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out == tok.decode(generate(reference, prompt, 5)) + "\n"


def test_cli_hf_generates_from_a_transformers_qwen3_moe_folder(gen_script, tok, tmp_path, capsys, one_thread):
    """Regression: a Qwen3-MoE folder written by transformers has no expert-bias tensors (Qwen3-MoE has none), and
    `generate.py --hf` loads strictly: titan's biases start at zero, and the greedy tokens are transformers' own."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")
    import shutil

    config = transformers.Qwen3MoeConfig(
        vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    theirs = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(std=1.0)  # HF initialises the router to zeros: give it distinct scores
    theirs.save_pretrained(str(tmp_path))
    for source, name in ((CHAT_TOKENIZER, "tokenizer.model"), (CHAT_TOKENIZER.replace(".tiktoken", ".json"),
                                                               "tokenizer_tiktoken.json")):
        shutil.copyfile(source, tmp_path / name)
    assert not any("expert_bias" in k or "bias" in k for k in hf.read_safetensors(tmp_path))
    assert gen_script.main(["--hf", str(tmp_path), "--prompt", "Emma", "--max_new_tokens", "6"]) == 0
    ids = tok.encode("Emma", bos=True)
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(ids):].tolist()
    assert capsys.readouterr().out == tok.decode(expected) + "\n"
