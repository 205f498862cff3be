"""LoRA adapters as PEFT folders (titan/peft.py): titan's adapters written in PEFT's format load with
`peft.PeftModel.from_pretrained` on the Hugging Face base model and give titan's logits; an adapter PEFT made loads
into titan and gives PEFT's logits (both within 1e-4, fp32; Llama and Qwen3, whose q/k rows are permuted). Without
`peft` the format itself is checked: names, the round trip, and the one-line errors. Every checkpoint save of a LoRA
run writing adapter/ is checked on the existing LoRA run in tests/test_finetune.py."""

from __future__ import annotations

import json

import pytest
import torch
from dist_utils import rel_error

from titan import hf, peft
from titan.config import LoRA
from titan.errors import ConfigError
from titan.models import build_model, lora
from titan.models.llama import ModelArgs
from titan.models.qwen3 import Qwen3Args

ARGS = {
    "llama": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=32,
                       rope_theta=10000.0),
    "qwen3": Qwen3Args(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden_dim=80, vocab_size=300,
                       max_seq_len=32),
}
CFG = LoRA(enable=True, rank=4, alpha=8.0, target_modules=["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"])
TOKENS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def _lora_model(args, seed=0, random_b=True):
    torch.manual_seed(seed)
    model = build_model(args)
    model.init_weights()
    lora.apply_lora(model, CFG)
    lora.init_adapters(model)
    if random_b:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, lora.LoRALinear):
                    m.lora_b.normal_(std=0.2)
    return model.eval()


def _base_folder(model, args, folder):
    base = {k: v for k, v in model.state_dict().items() if not lora.is_adapter(k)}
    return hf.save(base, args, folder, bos_id=None, eos_id=0)


@pytest.mark.parametrize("family", list(ARGS))
def test_format_round_trip_names_and_config(tmp_path, family):
    args = ARGS[family]
    model = _lora_model(args)
    state = model.state_dict()
    folder = peft.save(state, args, CFG, tmp_path / "adapter", base="/models/base")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["base_model_name_or_path"]) == \
        (4, 8.0, 0.0, "/models/base")
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj",
                                        "v_proj"]
    _, back = peft.read(folder, args, "lora.init_from")
    adapters = {k: v for k, v in state.items() if lora.is_adapter(k)}
    assert back.keys() == adapters.keys() and all(torch.equal(back[k], v) for k, v in adapters.items())
    names = set(peft.to_peft(state, args))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.lm_head.lora_B.weight" in names


def test_bad_adapter_folders_are_one_line(tmp_path):
    args = ARGS["llama"]
    model = _lora_model(args)
    folder = peft.save(model.state_dict(), args, CFG, tmp_path / "adapter")
    other = _lora_model(args)
    with pytest.raises(ConfigError, match=r"lora.init_from: .* has r=4, lora_alpha=8.0; the run has lora.rank=8"):
        small = build_model(args)
        lora.apply_lora(small, LoRA(rank=8, alpha=8.0))
        peft.load_into([small], folder, "lora.init_from")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora=True is not supported"):
        peft.load_into([other], folder, "lora.init_from")
    with pytest.raises(ConfigError, match="not a readable PEFT adapter folder"):
        peft.load_into([other], tmp_path, "lora.init_from")
    with pytest.raises(ConfigError, match="set lora.enable = true"):
        peft.load_into([build_model(args)], folder, "checkpoint.initial_load_path")


@pytest.mark.parametrize("family", list(ARGS))
def test_peft_loads_titan_adapters_and_titan_loads_peft_adapters(tmp_path, family, one_thread):
    transformers = pytest.importorskip("transformers")
    peft_lib = pytest.importorskip("peft")
    args = ARGS[family]
    model = _lora_model(args)
    base = _base_folder(model, args, tmp_path / "base")
    adapter = peft.save(model.state_dict(), args, CFG, tmp_path / "adapter", base=str(base))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    theirs = peft_lib.PeftModel.from_pretrained(hf_base, str(adapter)).eval()
    with torch.no_grad():
        assert rel_error(theirs(TOKENS).logits, model(TOKENS)) < 1e-4

    # The other way: an adapter PEFT initialised (random A and B) and saved, loaded into a titan model.
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj", "lm_head"],
                                 init_lora_weights=False)
    made = peft_lib.get_peft_model(hf_base, config).eval()
    made.save_pretrained(str(tmp_path / "made"))
    ours = _lora_model(args, seed=1, random_b=False)
    hf.load_into([ours], base)
    peft.load_into([ours], tmp_path / "made", "lora.init_from")
    with torch.no_grad():
        assert rel_error(ours(TOKENS), made(TOKENS).logits) < 1e-4
    # checkpoint.initial_load_path naming the adapter folder: the base it names, then the adapters.
    config = json.loads((tmp_path / "made" / "adapter_config.json").read_text())
    (tmp_path / "made" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    again = _lora_model(args, seed=2, random_b=False)
    peft.load_with_base([again], tmp_path / "made", "checkpoint.initial_load_path")
    with torch.no_grad():
        assert torch.equal(again(TOKENS), ours(TOKENS))
