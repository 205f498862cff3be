"""The tokenizer's own chat template (titan/data/chat_template.py): rendered in a sandboxed Jinja environment and
tokenized as `transformers`' `apply_chat_template` does. Where transformers is installed, tokens (and, for templates
with {% generation %} markers, the assistant masks of `return_assistant_tokens_mask=True`) equal its own on SmolLM2's
template (from the downloaded model, tests/test_assets.py) and Qwen3's (the copies TRL ships, with and without
markers), with and without a system message, multi-turn, with reasoning, with add_generation_prompt. Without it,
the same templates are checked against titan's built-in ChatML / Qwen3 templates, which they must then equal token
for token and flag for flag (SmolLM2's adds its default system prompt when a conversation has none)."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
from dist_utils import REPO

from titan.data.chat import chat_template
from titan.data.chat_template import BUILTIN_SOURCES, JinjaTemplate, template_source
from titan.data.tokenizer import load_tokenizer
from titan.data.tokenizer_formats import write_tokenizer_json
from titan.errors import ConfigError

pytest.importorskip("tokenizers")  # the test tokenizer is a tokenizer.json (the hf extra; CI has it)

SMOLLM2 = Path.home() / ".cache" / "titan" / "test-assets" / "smollm2"  # what tests/test_assets.py downloads
TRL = Path(find_spec("trl").origin).parent / "chat_templates" if find_spec("trl") else None

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."},
         {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "<think>\nAdd.\n</think>\n\n6."}]
CONVERSATIONS = {"single": TURNS[:2], "system": [SYSTEM, *TURNS[:2]], "multi": TURNS, "multi_system": [SYSTEM, *TURNS]}
# A template written for these tests: markers around each reply and its end token (not the newline after it).
MARKED = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
          "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
          "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _template(name: str) -> str:
    if name == "marked":
        return MARKED
    if name.startswith("builtin_"):  # what the export writes for a run trained with a built-in template
        return BUILTIN_SOURCES[name.removeprefix("builtin_")]
    if name == "smollm2":
        if not (SMOLLM2 / "tokenizer_config.json").is_file():
            pytest.skip("needs the SmolLM2 asset (tests/test_assets.py downloads it)")
        return json.loads((SMOLLM2 / "tokenizer_config.json").read_text())["chat_template"]
    if TRL is None:
        pytest.skip("Qwen3's template comes from the copy TRL ships (pip install trl)")
    return (TRL / f"{name}.jinja").read_text()


def _folder(tmp_path: Path, template: str) -> Path:
    """A Qwen-like tokenizer folder: the shipped debug_chat vocabulary as tokenizer.json, plus <think> and </think>
    as added (not special) tokens, EOS <|im_end|>, and `template` as tokenizer_config.json's chat_template."""
    import tokenizers

    write_tokenizer_json(load_tokenizer("debug_chat"), tmp_path, 256)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.add_tokens([tokenizers.AddedToken("<think>", special=False), tokenizers.AddedToken("</think>", special=False)])
    tok.save(str(tmp_path / "tokenizer.json"))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=template)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("name", ["smollm2", "qwen3", "qwen3_training", "marked", "builtin_chatml", "builtin_qwen3"])
def test_tokens_and_masks_equal_apply_chat_template(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    folder = _folder(tmp_path, _template(name))
    ours = chat_template(load_tokenizer(str(folder)), "auto")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(ours, JinjaTemplate) and ours.end_id == theirs.convert_tokens_to_ids("<|im_end|>")
    assert ours.markers == ("generation %}" in _template(name))
    for conversation in CONVERSATIONS.values():
        for prompt in (False, True):
            messages = conversation[:-1] if prompt else conversation
            ref = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=ours.markers)
            ids, targets = ours.render(messages, add_generation_prompt=prompt)
            assert ours.text(messages, prompt) == theirs.apply_chat_template(messages, add_generation_prompt=prompt,
                                                                             tokenize=False)
            assert ids == list(ref["input_ids"]), (name, messages)
            if ours.markers:
                assert targets == [bool(m) for m in ref["assistant_masks"]], (name, messages)


@pytest.mark.parametrize("name, builtin", [("smollm2", "chatml"), ("qwen3", "qwen3"), ("marked", "chatml")])
def test_real_templates_equal_the_built_in_ones(tmp_path, name, builtin):
    """Independent of transformers: where a real template writes what a built-in one writes, the tokens and the
    loss flags (reply, its think block, its end token) are the same."""
    tok = load_tokenizer(str(_folder(tmp_path, _template(name))))
    ours, reference = chat_template(tok, "tokenizer"), chat_template(tok, builtin)
    for key, conversation in CONVERSATIONS.items():
        if name == "smollm2" and not key.endswith("system"):  # SmolLM2's own default system prompt comes first
            conversation = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by "
                             "Hugging Face"}, *conversation]
        assert ours.render(conversation) == reference.render(conversation), key
        assert ours.render(conversation, train_on_prompt=True) == reference.render(conversation, True)
        assert ours.render(conversation[:-1], add_generation_prompt=True)[0] == \
            reference.render(conversation[:-1], add_generation_prompt=True)[0] or name == "qwen3"  # see below
    if name == "qwen3":  # Qwen3's generation prompt opens no think block; titan's built-in closes an empty one
        assert tok.decode(ours.render(TURNS[:1], add_generation_prompt=True)[0]).endswith("assistant\n")


def test_template_files_and_errors(tmp_path):
    tok = load_tokenizer(str(_folder(tmp_path, MARKED)))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")  # preferred over the config's
    assert chat_template(tok, "auto").text(TURNS[:1]) == "What is 2 + 2?!"
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ConfigError, match="sft.chat_template=tokenizer: .*chat_template.jinja: not a valid Jinja"):
        chat_template(tok, "auto")
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system messages') }}")
    with pytest.raises(ConfigError, match="no system messages"):
        chat_template(tok, "auto").render(TURNS[:2])
    (tmp_path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")  # the sandbox refuses
    with pytest.raises(ConfigError, match="sft.chat_template=tokenizer"):
        chat_template(tok, "auto").render(TURNS[:2])
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_template(tok, "auto").name == "qwen3"  # no template: auto falls back to the built-ins (<think>)
    with pytest.raises(ConfigError, match="sft.chat_template=tokenizer: the tokenizer's folder .* has no"):
        chat_template(tok, "tokenizer")
    shipped = load_tokenizer(str(REPO / "titan" / "assets" / "tokenizer" / "debug_chat.tiktoken"))
    assert chat_template(shipped, "auto").name == "chatml"


@pytest.mark.parametrize("name", ["chatml", "qwen3", "llama3"])
def test_built_in_templates_as_jinja_render_the_same(tmp_path, name):
    """What the Hugging Face export writes for a run trained with a built-in template renders exactly like it."""
    tok = load_tokenizer(str(_folder(tmp_path, MARKED)))
    builtin = chat_template(tok, name)
    jinja = JinjaTemplate(tok, template_source(builtin), name)
    assert template_source(jinja) == jinja.source and jinja.end_id == builtin.end_id
    for conversation in CONVERSATIONS.values():
        for prompt in (False, True):
            messages = conversation[:-1] if prompt else conversation
            assert jinja.render(messages, add_generation_prompt=prompt) == \
                builtin.render(messages, add_generation_prompt=prompt), (name, messages)
