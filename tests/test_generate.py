"""titan.generation and scripts/generate.py on tiny models (no download): KV-cache decoding against a hand-written
argmax loop and against whole-sequence recomputation on every family's debug model (batched prompts of different
lengths), stop ids, sampling (top_k=1 is greedy, top-p keeps the nucleus, a row's samples depend on its own generator
only), the RoPE-table limit, the compiled decoding step; the CLI on a Hugging
Face folder written by titan.hf.save, and on DCP checkpoints written by titan.train (a full one, and a LoRA
adapter-only one whose base comes from checkpoint.initial_load_path), each against the same weights read another way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from dist_utils import REPO, TINY, load_script

from titan import hf
from titan.config import LoRA
from titan.data.chat import chat_template
from titan.data.tokenizer import load_tokenizer
from titan.generation import Sampling, generate, generate_without_cache
from titan.models import FAMILIES, build_model, lora
from titan.models import model_args as family_args
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


def gen1(model, prompt, n, sampling=None, **kw) -> list[int]:
    """One prompt through the KV-cache generator."""
    gens = kw.pop("generator", None)
    return generate(model, [prompt], n, sampling or Sampling(), generators=None if gens is None else [gens], **kw)[0]


def test_greedy_is_the_argmax_loop(model, tok, one_thread):
    prompt = tok.encode("It is a truth universally acknowledged", bos=True)
    assert gen1(model, prompt, 12) == argmax_loop(model, prompt, 12) == generate_without_cache(model, prompt, 12)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_equals_recomputation_on_every_family(family, one_thread):
    """Each family's debug model (GQA; Qwen3's QK-norm; Qwen3-MoE's experts): a batch of prompts of different
    lengths (left padding) decoded greedily with the cache gives, row for row, the tokens of the whole-sequence
    recomputation of each prompt alone."""
    torch.manual_seed(0)
    model = build_model(family_args(family, "debugmodel", max_seq_len=96))
    model.init_weights()
    prompts = [[(7 * i + 3 * j) % 4000 + 10 for j in range(n)] for i, n in enumerate((1, 5, 13, 30))]
    got = generate(model, prompts, 24)
    assert got == [generate_without_cache(model, p, 24) for p in prompts]
    assert all(len(row) == 24 for row in got)


def test_sampling_rows_depend_only_on_their_own_generator(model, one_thread):
    """A row's samples are the same alone, in a batch with other prompts, and in the recomputing reference."""
    prompts = [[5, 6, 7], list(range(20, 40)), [9]]
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9)

    def gens(*seeds):
        return [torch.Generator().manual_seed(x) for x in seeds]

    together = generate(model, prompts, 16, s, generators=gens(1, 2, 3))
    alone = [generate(model, [p], 16, s, generators=gens(seed))[0] for p, seed in zip(prompts, (1, 2, 3))]
    reference = [generate_without_cache(model, p, 16, s, generator=g) for p, g in zip(prompts, gens(1, 2, 3))]
    assert together == alone == reference
    assert generate(model, prompts[:1] * 2, 16, s, generators=gens(1, 4)) != [together[0]] * 2  # seeds matter


def test_top_p_keeps_the_nucleus(model, one_thread):
    prompt = [11, 12, 13]
    greedy = gen1(model, prompt, 8)
    assert gen1(model, prompt, 8, Sampling(temperature=1.0, top_p=1e-6), generator=torch.Generator()) == greedy
    sampled = gen1(model, prompt, 10, Sampling(temperature=1.0, top_p=0.5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        probs = model(torch.tensor([prompt + sampled]))[0, len(prompt) - 1:-1].softmax(-1)
    for t, row in zip(sampled, probs):  # every token lies in the smallest set reaching probability 0.5
        ranked = row.sort(descending=True)
        n_kept = int((ranked.values.cumsum(0) - ranked.values < 0.5).sum())
        assert t in ranked.indices[:n_kept]


def test_stop_ids_stop_and_are_included(model, tok, one_thread):
    prompt = tok.encode("Emma Woodhouse", bos=True)
    free = gen1(model, prompt, 10)
    stop = free[3]
    first = free.index(stop)  # the first occurrence may come earlier
    assert gen1(model, prompt, 10, stop_ids=[stop]) == free[:first + 1]
    assert gen1(model, prompt, 0) == []
    other = tok.encode("Mr. Knightley said", bos=True)
    rows = generate(model, [prompt, other], 10, stop_ids=[stop])  # one row stops, the other goes on
    assert rows == [free[:first + 1], gen1(model, other, 10, stop_ids=[stop])]


def test_top_k_1_sampling_is_greedy(model, tok, one_thread):
    prompt = tok.encode("Mr. Darcy", bos=True)
    g = torch.Generator().manual_seed(1)
    assert gen1(model, prompt, 10, Sampling(temperature=0.8, top_k=1), generator=g) == gen1(model, prompt, 10)


def test_sampling_is_reproducible_with_a_seed(model, tok, one_thread):
    prompt = tok.encode("Mr. Darcy", bos=True)

    def sample(seed: int, **kw) -> list[int]:
        return gen1(model, prompt, 16, Sampling(temperature=1.0, **kw), generator=torch.Generator().manual_seed(seed))

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)  # an untrained model's distribution is broad: different seeds differ
    top = sample(5, top_k=5)
    with torch.no_grad():  # every sampled token is among the 5 most likely at its position
        logits = model(torch.tensor([prompt + top]))[0, len(prompt) - 1:-1]
    assert all(t in row.topk(5).indices for t, row in zip(top, logits))


def test_generation_stays_within_the_rope_table(tok, one_thread):
    model = tiny_model(tok.vocab_size, max_seq_len=16)
    prompt = list(range(10, 24))  # 14 tokens: positions 14 and 15 can still be fed, then the table is full
    new = gen1(model, prompt, 10)
    assert len(new) == 3 and new == argmax_loop(model, prompt, 3) == generate_without_cache(model, prompt, 10)
    short = list(range(30, 36))  # in one batch, each row stops at its own end of the table
    assert generate(model, [prompt, short], 20) == [new, argmax_loop(model, short, 11)]
    with pytest.raises(ValueError, match="max_seq_len=16"):
        gen1(model, list(range(17)), 1)
    with pytest.raises(ValueError, match="empty"):
        gen1(model, [], 1)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_compiled_decoding_step_gives_the_same_tokens(model, one_thread):
    """The compiled step decodes as the eager one, and prompts of other lengths (the next rollout's) reuse it: the
    cache's length is bucketed, so no new graph is compiled."""
    from torch._dynamo.utils import counters

    prompts = [[3, 4, 5, 6], [8]]
    assert generate(model, prompts, 6, compiled=True) == generate(model, prompts, 6)
    graphs = counters["stats"]["unique_graphs"]
    other = [[9, 10], [11, 12, 13, 14, 15]]
    assert generate(model, other, 6, compiled=True) == generate(model, other, 6)
    assert counters["stats"]["unique_graphs"] == graphs


# ---------------------------------------------------------------------------------------------------------------
# Speed: scripts/benchmark_generate.py --record -> tests/assets/benchmarks/generation.json, as docs/performance.md
# quotes it (measured by the script, never timed here)

GENERATION_BENCHMARK = REPO / "tests" / "assets" / "benchmarks" / "generation.json"
MIN_SPEEDUP = 5.0  # issue 28: the KV cache at least 5x faster than recomputation at 256 new tokens on CPU


def test_docs_quote_the_generation_benchmark():
    """Every recorded run is a row of docs/performance.md's generation-speed table, its date, torch and commit are
    named there; and the recorded CPU runs at 256 new tokens (one prompt, and a left-padded batch) decode at least
    MIN_SPEEDUP times faster with the cache, having given the same tokens both ways (the script exits 1 otherwise)."""
    script = load_script("benchmark_generate")
    runs = json.loads(GENERATION_BENCHMARK.read_text())
    section = (REPO / "docs" / "performance.md").read_text().split("### Generation speed", 1)[1].split("\n## ")[0]
    section = section.split("\n### ")[0]
    for name, r in runs.items():
        assert name == script.key(r)
        assert script.row(r) in section, f"docs/performance.md should show: {script.row(r)}"
        assert r["date"] in section and r["torch"] in section and f"commit {r['commit']}" in section, name
    measured = [runs[k] for k in ("llama3_debugmodel_1x256", "llama3_debugmodel_4x256")]
    assert all(r["torch"].endswith("+cpu") and r["generated"] == 256 * r["batch"] for r in measured)
    assert all(r["speedup"] >= MIN_SPEEDUP for r in measured), [r["speedup"] for r in measured]


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
    new = gen1(model, ids, 8, stop_ids={template.end_id, tok.eos_id})
    if new and new[-1] in (template.end_id, tok.eos_id):
        new = new[:-1]
    assert out == tok.decode(new) + "\n"


def test_cli_hf_plain_prompt_and_sampling(gen_script, hf_folder, model, tok, capsys, one_thread):
    assert gen_script.main(["--hf", str(hf_folder), "--prompt", "Emma", "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out == tok.decode(gen1(model, tok.encode("Emma", bos=True), 6)) + "\n"
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
    assert capsys.readouterr().out == tok.decode(gen1(reference, tok.encode("She was", bos=True), 5)) + "\n"


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
    assert capsys.readouterr().out == tok.decode(gen1(reference, prompt, 5)) + "\n"


def test_cli_scores_a_prompt_set_with_reward_functions(gen_script, hf_folder, model, tok, tmp_path, capsys,
                                                       one_thread):
    """--prompts: greedy replies to every prompt in the chat template, batched, scored as GRPO scores them; the mean
    is that of the same replies generated one by one and scored by hand."""
    template = chat_template(tok, "auto")
    questions = ["1 + 1 =", "What is 2 + 5?", "Say 3.", "9 - 4 ="]
    replies = [gen1(model, template.render([{"role": "user", "content": q}], add_generation_prompt=True)[0], 6,
                    stop_ids={template.end_id, tok.eos_id}) for q in questions]
    texts = [tok.decode(r[:-1] if r and r[-1] in (template.end_id, tok.eos_id) else r) for r in replies]
    # The first two replies' own text as their format pattern (a match), the other two a pattern that fails.
    patterns = [re.escape(t) for t in texts[:2]] + ["x", "y"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "format_pattern": f}) + "\n" for q, f in zip(questions, patterns)))
    assert gen_script.main(["--hf", str(hf_folder), "--prompts", str(path), "--max_new_tokens", "6", "--batch_size",
                            "3", "--rewards", "titan.rewards:format_regex,rl_rewards:length_penalty"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "titan.rewards:format_regex: mean reward 0.5000 over 4 prompts"
    penalty = sum(-0.01 * len(t) for t in texts) / 4
    assert lines[1] == f"rl_rewards:length_penalty: mean reward {penalty:.4f} over 4 prompts"


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
