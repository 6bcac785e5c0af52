"""Tool calls apart from the answer: the server's ``--tool-call-parser hermes``.

Models trained for function calling in the Hermes format (Qwen2.5, Qwen3, QwQ, Hermes 2/3 and the
many fine-tunes of them) answer a chat whose template listed ``tools`` with one or more blocks

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

OpenAI-compatible servers return each block as an entry of the message's ``tool_calls``
(``{"id", "type": "function", "function": {"name", "arguments"}}``, ``arguments`` as JSON text) with
``finish_reason`` ``"tool_calls"``, and the rest of the text as ``content`` (null where nothing is
left), as vLLM's ``hermes`` parser does. :class:`ToolCallSplit` does that for one answer, a piece
at a time as a stream delivers it, and :func:`split_tool_calls` for a whole text:

* a block is the text between ``<tool_call>`` and ``</tool_call>`` (in Qwen's tokenizers both are
  tokens that decode as text); its JSON object gives the name (``name``) and the arguments
  (``arguments``, or ``parameters`` as some fine-tunes write it; an object becomes its JSON text,
  a string is taken as the JSON text it already is); a JSON list of such objects in one block
  (SmolLM2's and SmolLM3's format) gives a call each;
* a block whose text is not such an object is left in the content as the model wrote it (tags
  included): nothing the model said is lost; so is a block the answer ends inside of, unless
  what it holds is already a whole call (an answer cut by ``max_tokens`` or a stop string just
  before the closing tag);
* the blanks next to a call's block (before its opening tag, after its closing one) are dropped:
  the newlines between calls are not content.

The pieces of a stream join to what the whole answer splits into: a tail that could begin the
opening tag, or a run of blanks that could precede it, is held until the next piece tells, and a
block is released once closed, as one call.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import ConfigError
from runtime.reasoning import partial_tail

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PARSERS = ("hermes",)


@dataclass(frozen=True)
class ToolCall:
    """One call as OpenAI's API returns it: ``arguments`` is JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def body(self, index: int | None = None) -> dict[str, Any]:
        """The entry of a message's ``tool_calls`` (with ``index``: of a streamed delta's)."""
        entry: dict[str, Any] = {} if index is None else {"index": index}
        entry.update(id=self.id, type="function", function={"name": self.name, "arguments": self.arguments})
        return entry


def parse_calls(text: str) -> list[ToolCall] | None:
    """The calls a block's text states: one JSON object with a non-empty string ``name``, or a list of
    them (SmolLM2's and SmolLM3's format: ``<tool_call>[{...}, {...}]</tool_call>``); None where it
    states no call (anything else, an empty list included)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    objs = obj if isinstance(obj, list) else [obj]
    if not objs or not all(isinstance(o, dict) and isinstance(o.get("name"), str) and o["name"] for o in objs):
        return None
    calls = []
    for o in objs:
        args = o.get("arguments", o.get("parameters", {}))
        calls.append(ToolCall(o["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return calls


class ToolCallSplit:
    """One answer's text split into (content, calls) as it arrives (see the module doc)."""

    def __init__(self) -> None:
        self.state = "text"  # "text", "call" (inside a block), "after" (the blanks after a block)
        self._held = ""
        self._gap = ""  # the blanks before the open block: content again if it turns out no call

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """The content and the calls that ``text`` (the answer's next piece) releases; ``final``: the
        answer ends here, nothing is held."""
        buf, self._held = self._held + text, ""
        content: list[str] = []
        calls: list[ToolCall] = []
        while buf or final and self.state == "call":  # (an answer may end just after an opening tag)
            if self.state == "after":
                buf = buf.lstrip()
                if buf:
                    self.state = "text"
            elif self.state == "text":
                at = buf.find(OPEN)
                if at >= 0:
                    before = buf[:at].rstrip()
                    content.append(before)
                    self._gap = buf[len(before) : at]
                    self.state, buf = "call", buf[at + len(OPEN) :]
                    continue
                if final:
                    content.append(buf)
                    break
                # hold a tail that could begin the tag, and the blanks before it (they go if a block follows)
                keep = partial_tail(buf, OPEN)
                body = buf[: len(buf) - keep]
                stripped = body.rstrip()
                content.append(stripped)
                self._held = body[len(stripped) :] + buf[len(buf) - keep :]
                break
            else:  # inside a block
                at = buf.find(CLOSE)
                if at < 0:
                    if final:  # the answer ended inside the block: calls if it already holds whole ones
                        found = parse_calls(buf)
                        if found is None:
                            content.append(self._gap + OPEN + buf)
                        else:
                            calls += found
                        self.state = "text"
                    else:
                        self._held = buf
                    break
                found = parse_calls(buf[:at])
                if found is None:  # not a call: the block stays text, as written
                    content.append(self._gap + OPEN + buf[: at + len(CLOSE)])
                    self.state = "text"
                else:
                    calls += found
                    self.state = "after"
                buf = buf[at + len(CLOSE) :]
        return "".join(content), calls


# a forced call is written as Qwen's templates write calls: {"name": "f", "arguments": {...}}, one space after
# each colon and comma, nothing else free (no whitespace to loop in)
FORCED_JSON = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def forced_call_grammar(tools: Sequence[Mapping[str, Any]], name: str | None = None, single: bool = False) -> str:
    """OpenAI's ``tool_choice`` ``"required"`` (``name`` None: one or more calls of any of ``tools``, one
    where ``single``: ``parallel_tool_calls`` false) or a named function (one call of it) as a Lark grammar
    for llguidance: Hermes blocks whose JSON is
    ``{"name": <the function>, "arguments": <its parameters' schema>}``, and nothing else. The answer
    is then a call by construction, as vLLM forces one with guided decoding."""
    variants = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        arguments = fn.get("parameters") or {"type": "object"}
        variants.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": arguments},
                         "required": ["name", "arguments"], "additionalProperties": False})  # fmt: skip
    if not variants:
        raise ConfigError(f"tool_choice names {name!r}, which is not among the tools")
    schema = {**(variants[0] if len(variants) == 1 else {"anyOf": variants}), "x-guidance": FORCED_JSON}
    start = "start: block" if name is not None or single else 'start: block ("\\n" block)*'
    return f'{start}\nblock: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json {json.dumps(schema)}\n'


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A whole answer's (content, calls): what ``--tool-call-parser hermes`` returns for it (offline
    callers of ``generate`` with ``tools``)."""
    return ToolCallSplit().push(text, final=True)
