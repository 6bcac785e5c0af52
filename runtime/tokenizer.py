"""A torch-free tokenizer for artifact folders: `tokenizers` plus the chat template (jinja2)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError, ConfigError, MedusaError

# tokenizer_config.json's special tokens, each passed to the chat template under its name (as transformers does)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as _Tok

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"{folder}: tokenizer.json is missing")
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:
            raise ArtifactError(
                f"{path}: not a readable tokenizer ({str(e)[:160]}): the file is damaged; copy the "
                "artifact again or re-export"
            ) from None
        cfg_path = folder / "tokenizer_config.json"
        try:
            self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{cfg_path} is not valid JSON ({e}): copy the artifact again or re-export") from None
        if not isinstance(self.config, dict):
            raise ArtifactError(f"{cfg_path} must hold a JSON object, found a {type(self.config).__name__}")
        template_path = folder / "chat_template.jinja"
        try:
            self.chat_template = (
                template_path.read_text() if template_path.is_file() else self.config.get("chat_template")
            )
        except UnicodeDecodeError as e:
            raise ArtifactError(f"{template_path} is not UTF-8 text ({e})") from None
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ArtifactError(f"{cfg_path}: chat_template must be a string, got {type(self.chat_template).__name__}")
        self._byte_level = type(self._tok.decoder).__name__ == "ByteLevel"  # GPT-2-style byte-level BPE
        self._bytes: dict[int, bytes] = {}  # token_bytes, computed once per token
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._template: Any = None  # a compiled jinja2 Template
        self.template_variables: frozenset[str] = frozenset()  # the names the chat template reads (``tools``, ...)
        self._template_file = template_path if template_path.is_file() else cfg_path
        if self.chat_template:
            self._compile_template()  # a broken template is the artifact's fault: say so at load

    def _compile_template(self):
        import jinja2
        import jinja2.ext
        import jinja2.meta
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise MedusaError(f"chat template: {msg}")

        def strftime_now(fmt):
            import datetime

            return datetime.datetime.now().strftime(fmt)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' own filter: jinja2's escapes <, >, & and ' for HTML, which no prompt wants
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        class Generation(jinja2.ext.Extension):
            """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's tokens with it
            (for training masks); rendering, it is its body."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        # the environment transformers renders chat templates in (its apply_chat_template): an undefined
        # name is empty, not an error (templates test `if tools`), {% break %} / {% continue %} work
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation]
        )
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        env.filters["tojson"] = tojson
        specials = {k: self._special(k) for k in SPECIAL_TOKEN_KEYS}
        self._template_specials = {
            "bos_token": "",
            "eos_token": "",
            **{k: v for k, v in specials.items() if v is not None},
        }
        try:
            self._template = env.from_string(self.chat_template)
            self.template_variables = frozenset(jinja2.meta.find_undeclared_variables(env.parse(self.chat_template)))
        except jinja2.TemplateError as e:
            raise ArtifactError(
                f"{self._template_file}: the chat template does not parse ({e}); fix it or re-export"
            ) from None

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce (added tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special(self, key: str) -> str | None:
        v = self.config.get(key)
        return v.get("content") if isinstance(v, dict) else v

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (OpenAI's logprobs ``bytes``; a token may end inside a UTF-8
        character): a byte-level BPE piece mapped back through GPT-2's byte alphabet, a byte-fallback
        piece ``<0xNN>`` as that byte, SentencePiece's ``\u2581`` as a space, else the piece's UTF-8
        (special tokens: their text)."""
        cached = self._bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self._tok.id_to_token(int(token_id)) or ""
        table = _byte_alphabet()
        if self._byte_level and all(c in table for c in piece):
            out = bytes(table[c] for c in piece)
        elif m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
            out = bytes([int(m.group(1), 16)])
        else:
            out = piece.replace("\u2581", " ").encode()
        self._bytes[token_id] = out
        return out

    def is_special(self, token_id: int) -> bool:
        """A special token (an added token marked special: ``decode`` leaves it out of the text)."""
        return int(token_id) in self._special_ids

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Render ``messages`` with the model's chat template and encode the result. ``template_kwargs``:
        more variables for the template, as transformers' ``apply_chat_template(**kwargs)`` and vLLM's
        ``chat_template_kwargs`` pass them (Qwen3's ``enable_thinking``, for one); a name the template
        does not read changes nothing. ``tools``: the functions the model may call, as JSON schemas in
        OpenAI's shape (``{"type": "function", "function": {"name", "description", "parameters"}}``,
        what transformers' ``tools`` takes); a template that does not read ``tools`` is refused."""
        if not self.chat_template:
            raise MedusaError("this model has no chat template: pass a prompt string or token ids instead of messages")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise MedusaError(f"chat messages must be dicts with 'role' and 'content', got {m!r:.80}")
        extra = check_template_kwargs(template_kwargs)
        if tools is not None:
            tools = check_tools(tools)
            if tools and "tools" not in self.template_variables:
                raise ConfigError(
                    f"tools: this model's chat template ({self._template_file.name}) does not render tools, "
                    "so the model would never see them: use a model trained for function calling"
                )
        if self._template is None:
            self._compile_template()
        import jinja2

        try:
            # what transformers passes: the tools, no documents, and every special token the config names
            text = self._template.render(
                **self._template_specials,
                **extra,
                messages=messages,
                tools=None if tools is None else list(tools),  # [] stays []: transformers passes it so
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            # a message field the template needs is missing, or is of a type it does not take (SmolLM2's adds
            # content to a string: an assistant's null content with tool calls fails there)
            what = str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
            raise MedusaError(
                f"chat template ({self._template_file.name}) cannot render these messages: {what}"
            ) from None
        return self.encode(text)


# the variables apply_chat_template sets itself: template_kwargs may not name them
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "tools", "documents")


def check_template_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``chat_template_kwargs`` as a dict, or a ConfigError naming what is wrong with it: a mapping whose
    keys are identifiers other than :data:`RESERVED_TEMPLATE_KWARGS`."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"chat_template_kwargs must be a mapping of names to values, got a {type(kwargs).__name__}")
    for k in kwargs:
        if not isinstance(k, str) or not k.isidentifier():
            raise ConfigError(f"chat_template_kwargs: {k!r} is not a template variable name")
        if k in RESERVED_TEMPLATE_KWARGS:
            raise ConfigError(f"chat_template_kwargs: {k!r} is set by the call itself, not by chat_template_kwargs")
    return dict(kwargs)


def check_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``tools`` as a list of dicts, or a ConfigError naming the first that is not a function in OpenAI's
    shape: ``{"type": "function", "function": {"name": <non-empty string>, ...}}``."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ConfigError(f"tools must be a list of function definitions, got a {type(tools).__name__}")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type") != "function" or not isinstance(fn, Mapping):
            raise ConfigError(f'tools[{i}]: expected {{"type": "function", "function": {{...}}}}, got {t!r:.80}')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ConfigError(f"tools[{i}]: the function needs a non-empty string name, got {fn.get('name')!r:.40}")
    return [dict(t) for t in tools]


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted (character -> byte): printable Latin-1 bytes stand for
    themselves, the other 68 for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]  # fmt: skip
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


class StreamDecoder:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8 sequences.

    Each push decodes a window, not the whole answer (whose decode grows with it: 1.6 ms at 8,000
    tokens): the tokens from ``prefix`` on, against the same window without the new tokens
    (``prefix .. read``), so that what a decoder does at a window's start (SentencePiece drops a
    leading space) cancels out; the delta is the difference. The offsets move on only once the
    text ends in a whole character (the incremental detokenization of TGI and vLLM)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # the window's first token
        self.read = 0  # tokens up to here have been sent as text

    def push(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(tokens)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix : self.read])
        text = decode(self.tokens[self.prefix :])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""  # nothing new, or a character cut in the middle: wait for its other bytes
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before) :]
