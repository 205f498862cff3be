"""The tokenizer's own chat template (`sft.chat_template = "tokenizer"`, and what `auto` picks when the tokenizer's
folder has one): the Jinja `chat_template` of tokenizer_config.json (or chat_template.jinja) rendered in a sandboxed
Jinja environment, the way `transformers`' `apply_chat_template` renders it, then tokenized the way it tokenizes:
every added/special token's text becomes that token, the text between is encoded plainly.

Which tokens the loss learns (the assistant replies): a template with `{% generation %}` ... `{% endgeneration %}`
markers says so itself (as `return_assistant_tokens_mask` reads them); for any other template each reply's span is
found by rendering prefixes: the conversation up to the reply with the generation prompt, and up to and including
the reply. The span is the reply as the template writes it (for Qwen3, its think block) and what closes it (the
end-of-turn token), without the whitespace after that. `jinja2` comes with torch; the `chat` extra names it.

Differences from the built-in templates (titan/data/chat.py), on purpose, to match apply_chat_template: special-token
text typed inside a message becomes the special token, and the template may add text of its own (SmolLM2's adds a
default system prompt when a conversation has none).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from titan.errors import ConfigError


# titan's built-in templates (titan/data/chat.py) as Jinja, for the Hugging Face export: a model trained with one of
# them is served with the same text (tests/test_chat_template.py checks each against its built-in, token for token).
def _builtin(begin: str, header: str, body: str, end: str, sep: str, prompt: str, setup: str = "") -> str:
    """A built-in template as Jinja: `begin`, then per message `header`, its content (`body` may rewrite it), `end`
    and `sep`; a reply's content and end inside {% generation %} markers; `prompt` after add_generation_prompt."""
    return (f"{setup}{{{{- '{begin}' }}}}{{%- for m in messages %}}{{%- set content = m['content'] %}}{body}"
            f"{{{{- {header} }}}}{{%- if m['role'] == 'assistant' %}}{{%- generation %}}{{{{- content + '{end}' }}}}"
            f"{{%- endgeneration %}}{{%- else %}}{{{{- content + '{end}' }}}}{{%- endif %}}{{{{- '{sep}' }}}}"
            f"{{%- endfor %}}{{%- if add_generation_prompt %}}{{{{- {prompt} }}}}{{%- endif %}}")


_QWEN3_LAST_USER = ("{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
                    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}")
# A reply after the last user message opens with its reasoning in a think block (empty if none); earlier ones lose it.
_QWEN3_THINK = ("{%- if m['role'] == 'assistant' %}{%- set reasoning = '' %}{%- if '</think>' in content %}"
                "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
                "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
                "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
                "{%- set content = '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + "
                "content.lstrip('\\n') %}{%- endif %}{%- endif %}")
# titan's built-in templates (titan/data/chat.py) as Jinja, for the Hugging Face export: a model trained with one of
# them is served with the same text (tests/test_chat_template.py checks each against its built-in, flag for flag).
BUILTIN_SOURCES = {
    "chatml": _builtin("", "'<|im_start|>' + m['role'] + '\\n'", "", "<|im_end|>", "\\n",
                       "'<|im_start|>assistant\\n'"),
    "qwen3": _builtin("", "'<|im_start|>' + m['role'] + '\\n'", _QWEN3_THINK, "<|im_end|>", "\\n",
                      "'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'", _QWEN3_LAST_USER),
    "llama3": _builtin("<|begin_of_text|>", "'<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'", "",
                       "<|eot_id|>", "", "'<|start_header_id|>assistant<|end_header_id|>\\n\\n'"),
}

# Private-use code points around what a {% generation %} block renders; removed before tokenizing.
OPEN, CLOSE = "\ue000", "\ue001"
TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def template_file(folder: Path) -> tuple[str, Path] | None:
    """(the chat template's text, the file it came from) of a tokenizer folder, or None if it has none:
    chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or a list of {"name", "template"},
    of which "default" is used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ConfigError(f"sft.chat_template: cannot read {config} ({e})".replace("\n", " ")) from None
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return (value, config) if isinstance(value, str) and value.strip() else None


def token_names(folder: Path) -> dict[str, str]:
    """bos_token, eos_token, ... as the template sees them (tokenizer_config.json's; a name or {"content": name})."""
    config = folder / "tokenizer_config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        data = {}
    names = {}
    for key in TOKEN_NAMES:
        value = data.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names[key] = value
    return names


def _environment():
    """A sandboxed Jinja environment like transformers': whitespace control as HF templates expect, loop controls,
    tojson without HTML escaping, raise_exception, strftime_now, and the {% generation %} tag."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConfigError('sft.chat_template=tokenizer needs jinja2: pip install -e ".[chat]"') from None

    class Generation(Extension):
        """{% generation %}body{% endgeneration %}: renders the body between OPEN and CLOSE."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return OPEN + caller() + CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env, jinja2.exceptions.TemplateError


class JinjaTemplate:
    """A Jinja chat template over a titan tokenizer, with the interface of the built-in `ChatTemplate`: `render`
    gives (ids, target flags), `end_id` ends a reply (generation stops there)."""

    def __init__(self, tokenizer, source: str, where: str, **variables):
        self.name, self.tokenizer, self.where, self.source = "tokenizer", tokenizer, where, source
        env, self._error = _environment()
        try:
            self._template = env.from_string(source)
        except self._error as e:
            raise ConfigError(f"sft.chat_template=tokenizer: {where}: not a valid Jinja template ({e})") from None
        self.variables = variables
        self.markers = re.search(r"{%-?\s*generation\s*-?%}", source) is not None
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)  # longest first: "<|a|>b" before "<|a|>"
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self.end_id = self._end_token()

    def _text(self, messages: list[dict], add_generation_prompt: bool, strip: bool = False) -> str:
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.variables)
        except self._error as e:
            raise ConfigError(f"sft.chat_template=tokenizer: {self.where}: {e}".replace("\n", " ")) from None
        return text.replace(OPEN, "").replace(CLOSE, "") if strip else text

    def _end_token(self) -> int:
        """The token that closes a reply: the first special token the template writes after a probe reply's text
        (<|im_end|>, <|eot_id|>, ...); the tokenizer's EOS if it writes none."""
        text = self._text([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], False, True)
        after = text[text.rfind("y") + 1:]
        for piece in self._split.split(after) if self._split else []:
            if piece in self.tokenizer.special_tokens:
                return self.tokenizer.special_tokens[piece]
        return self.tokenizer.eos_id

    def text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The rendered conversation, as apply_chat_template(..., tokenize=False) gives it."""
        return self._text(messages, add_generation_prompt, strip=True)

    def render(self, messages: list[dict], train_on_prompt: bool = False,
               add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(token ids, target flags), as the built-in templates give them."""
        if self.markers:
            text, spans = _marked_spans(self._text(messages, add_generation_prompt))
        else:
            text = self.text(messages, add_generation_prompt)
            spans = self._prefix_spans(messages, text)
        return self._tokens(text, spans, train_on_prompt)

    def _prefix_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Each reply's (start, end) in `text`, from renders of the conversation up to it (see the module doc)."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self.text(messages[:i], True), self.text(messages[: i + 1]).rstrip()
            if not text.startswith(before):
                raise ConfigError(f"sft.chat_template=tokenizer: {self.where}: the template renders a conversation "
                                  f"differently from its start up to reply {i} with add_generation_prompt, so the "
                                  f"reply's tokens cannot be found; use a template with {{% generation %}} markers "
                                  f"or a built-in one (sft.chat_template = chatml, qwen3, llama3)")
            if text.startswith(upto):
                end = len(upto)
            else:  # a later turn rewrites this reply (Qwen3 drops earlier think blocks): it ends at its end token
                close = self.tokenizer.decode([self.end_id])
                end = text.find(close, len(before))
                if end < 0:
                    raise ConfigError(f"sft.chat_template=tokenizer: {self.where}: reply {i} has no {close} after it")
                end += len(close)
            spans.append((len(before), end))
        return spans

    def _tokens(self, text: str, spans: list[tuple[int, int]], train_on_prompt: bool):
        """Tokenize `text` as apply_chat_template does (added tokens by their text, the rest plainly), cutting also at
        the span edges; a token is a target inside a span (or everywhere with train_on_prompt)."""
        cuts = sorted({0, len(text), *(p for span in spans for p in span)})
        ids, targets = [], []
        for a, b in zip(cuts, cuts[1:]):
            inside = train_on_prompt or any(s <= a and b <= e for s, e in spans)
            for piece in self._split.split(text[a:b]) if self._split else [text[a:b]]:
                if not piece:
                    continue
                new = [self.tokenizer.special_tokens[piece]] if piece in self.tokenizer.special_tokens else \
                    self.tokenizer.encode(piece)
                ids += new
                targets += [inside] * len(new)
        return ids, targets


def _marked_spans(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Text rendered with {% generation %} blocks -> (the text without the markers, each block's (start, end))."""
    spans, out, start = [], [], None
    for piece in re.split(f"([{OPEN}{CLOSE}])", text):
        if piece == OPEN:
            start = sum(map(len, out))
        elif piece == CLOSE:
            spans.append((start, sum(map(len, out))))
        else:
            out.append(piece)
    return "".join(out), [(s, e) for s, e in spans if e > s]


def tokenizer_template(tokenizer, folder: Path | None = None, required: bool = True) -> JinjaTemplate | None:
    """The tokenizer folder's chat template (by default the folder of the file the tokenizer was read from); None if
    it has none and not `required`, else a ConfigError naming sft.chat_template."""
    folder = folder or (Path(tokenizer.name).parent if getattr(tokenizer, "name", "") else None)
    found = template_file(folder) if folder is not None else None
    if found is None:
        if not required:
            return None
        raise ConfigError(f"sft.chat_template=tokenizer: the tokenizer's folder {folder} has no chat_template.jinja "
                          f"and no chat_template in tokenizer_config.json; use auto, chatml, qwen3 or llama3")
    source, where = found
    return JinjaTemplate(tokenizer, source, str(where), **token_names(folder))


def template_source(template) -> str:
    """The Jinja text of a chat template (a JinjaTemplate's own, a built-in's equivalent): what the Hugging Face
    export writes as tokenizer_config.json's chat_template, so the export is served as it was trained."""
    return template.source if isinstance(template, JinjaTemplate) else BUILTIN_SOURCES[template.name]
