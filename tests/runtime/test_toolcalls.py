"""Function calling: ``runtime.toolcalls`` (the server's ``--tool-call-parser hermes``) splits an answer's
``<tool_call>`` blocks from its content, the same whether the answer comes whole or in any pieces;
``tools`` reach the chat template as transformers renders them (``generate(tools=...)`` and the server);
and through the server, streamed and not, with the openai client, the calls come back as
``tool_calls`` and a conversation's earlier calls and results go back to the template."""

from __future__ import annotations

import dataclasses
import json

import pytest

import runtime
from runtime.errors import ConfigError
from runtime.toolcalls import CLOSE, OPEN, ToolCallSplit, parse_calls, split_tool_calls

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME = '{"name": "get_time", "arguments": {"zone": "CET", "24h": true}}'
CASES = [
    # (the answer, content, [(name, arguments)])
    (f"<tool_call>\n{WEATHER}\n</tool_call>", "", [("get_weather", '{"city": "Paris"}')]),
    (
        f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>\n",
        "Let me look.",
        [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET", "24h": true}')],
    ),
    ("It is sunny.", "It is sunny.", []),  # no block: all content, blanks included
    ("  Sunny. \n", "  Sunny. \n", []),
    (f"<tool_call>{WEATHER}</tool_call> Done.", "Done.", [("get_weather", '{"city": "Paris"}')]),
    ("Use the <tool_call> tag", "Use the <tool_call> tag", []),  # never closed, no call: text as written
    ("a <tool_call>not json</tool_call> b", "a <tool_call>not json</tool_call> b", []),  # not a call: text
    ('x <tool_call>{"arguments": {}}</tool_call>', 'x <tool_call>{"arguments": {}}</tool_call>', []),  # no name
    (f"<tool_call>\n{WEATHER}\n", "", [("get_weather", '{"city": "Paris"}')]),  # cut before the closing tag
    ('<tool_call>\n{"name": "get_weath', '<tool_call>\n{"name": "get_weath', []),  # cut inside the call
    ("ok <tool_call>", "ok <tool_call>", []),
    ("<tool_c", "<tool_c", []),  # the answer ended inside what looked like the tag
    ('<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>', "", [("f", '{"x": 1}')]),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', "", [("f", '{"x": 1}')]),  # as text
    ('<tool_call>{"name": "f"}</tool_call>', "", [("f", "{}")]),
    ('<tool_call>{"name": "f", "arguments": {"s": "é<>"}}</tool_call>', "", [("f", '{"s": "é<>"}')]),
    (
        f"<tool_call>[{WEATHER}, {TIME}]</tool_call>",
        "",
        [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET", "24h": true}')],
    ),  # SmolLM2's
    ("<tool_call>[]</tool_call>", "<tool_call>[]</tool_call>", []),  # calls nothing: text
    ("", "", []),
]


def calls_of(calls) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


def split_pieces(pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    s, content, calls = ToolCallSplit(), [], []
    for i, p in enumerate(pieces):
        c, k = s.push(p, final=i == len(pieces) - 1)
        content.append(c)
        calls += k
    return "".join(content), calls_of(calls)


@pytest.mark.parametrize("answer, content, calls", CASES)
def test_the_answer_splits_as_stated_whole_and_at_every_cut(answer, content, calls):
    whole_content, whole_calls = split_tool_calls(answer)
    assert (whole_content, calls_of(whole_calls)) == (content, calls)
    for i in range(len(answer) + 1):
        for j in range(i, len(answer) + 1):
            assert split_pieces([answer[:i], answer[i:j], answer[j:]]) == (content, calls), (i, j)


def test_nothing_is_released_that_a_later_piece_could_take_back():
    s = ToolCallSplit()
    assert s.push("Checking. <tool") == ("Checking.", [])  # " <tool" could open a block
    assert s.push('_call>\n{"name": "f", ') == ("", [])  # inside the block: nothing until it closes
    content, calls = s.push('"arguments": {}}\n</tool_call>\n\n')
    assert content == "" and calls_of(calls) == [("f", "{}")]
    assert s.push("Then ") == ("Then", [])  # the blanks after the block went; a blank that may precede one waits
    assert s.push("done.", final=True) == (" done.", [])


def test_each_call_has_its_own_id_in_openai_shape():
    _, calls = split_tool_calls(f"{OPEN}{WEATHER}{CLOSE}{OPEN}{WEATHER}{CLOSE}")
    assert calls[0].id != calls[1].id and all(c.id.startswith("call_") for c in calls)
    assert calls[0].body(3) == {"index": 3, "id": calls[0].id, "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    assert "index" not in calls[0].body()
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    for text in ("[1, 2]", "[]", '{"name": ""}', '{"name": 3}', f"[{WEATHER}, 3]", "null"):
        assert parse_calls(text) is None, text


@settings(max_examples=300, deadline=None)
@given(
    answer=st.lists(
        st.sampled_from(["<", "tool_call", ">", "</", "/", "\n", " ", "a", OPEN, CLOSE, '{"name": "f"}', "{", "}"]),
        max_size=12,
    ).map("".join),
    cuts=st.lists(st.integers(0, 80), max_size=5),
)
def test_any_pieces_join_to_the_whole_split(answer, cuts):
    """Property: however a stream cuts the answer, its pieces' content and calls join to the split of
    the whole answer; the content never holds more than the answer."""
    whole_content, whole_calls = split_tool_calls(answer)
    bounds = sorted({min(c, len(answer)) for c in cuts} | {0, len(answer)})
    pieces = [answer[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    assert split_pieces(pieces) == (whole_content, calls_of(whole_calls))
    assert len(whole_content) <= len(answer)


# ---------------------------------------------------------------------------- tools in the chat template

# a Hermes-style template, as Qwen2.5's lists tools and renders calls and their results (shortened)
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    'Call one as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call><|im_end|>\n{%- endif %}'
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m.content or '' }}"
    "{%- for tc in m.tool_calls or [] %}{%- set f = tc.function %}\n<tool_call>\n"
    '{"name": "{{ f.name }}", "arguments": {{ f.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}{% endgeneration %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, <now> & 'today'",  # tojson must not escape these
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CHAT = [{"role": "user", "content": "Weather in Paris?"}]
ROUND_TRIP = [  # the call made and its result: the next request of a function-calling client
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
]  # fmt: skip


@pytest.fixture(scope="module")
def calling(tiny, tmp_path_factory):
    """The tiny artifact with the template above (its checksum unrecorded, as a user's edit would be)."""
    from conftest import with_chat_template

    gen = runtime.load(with_chat_template(tiny["artifact"], tmp_path_factory.mktemp("calling") / "art", TEMPLATE),
                       threads=1)  # fmt: skip
    yield gen
    gen.close()


def transformers_text(messages, tools) -> str:
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = chat_utils.render_jinja_template([messages], tools=tools, chat_template=TEMPLATE,
                                                   add_generation_prompt=True)  # fmt: skip
    return rendered[0]


def ours(gen, messages, **kw) -> str:
    return gen.tokenizer.decode(gen.encode(messages, **kw), skip_special_tokens=False)


@pytest.mark.parametrize("messages", [CHAT, ROUND_TRIP], ids=["question", "call and result"])
@pytest.mark.parametrize("tools", [TOOLS, None])
def test_tools_and_calls_render_as_transformers_renders_them(calling, messages, tools):
    text = ours(calling, messages, tools=tools)
    assert text == transformers_text(messages, tools)
    assert ("<tools>" in text) == bool(tools)
    assert "<now> & 'today'" in text or not tools  # transformers' tojson, not jinja2's HTML-escaping one


def test_generate_takes_tools(calling):
    out = calling.generate(CHAT, max_new_tokens=4, temperature=0, tools=TOOLS)
    assert out.prompt_tokens == len(calling.encode(CHAT, tools=TOOLS)) > len(calling.encode(CHAT))


@pytest.mark.parametrize(
    "tools, words",
    [
        ({"type": "function"}, "tools must be a list"),
        ([{"type": "function"}], r'tools\[0\]: expected \{"type": "function"'),
        ([{"type": "retrieval", "function": {"name": "f"}}], r"tools\[0\]: expected"),
        ([{"type": "function", "function": {"name": ""}}], r"tools\[0\]: the function needs a non-empty string name"),
    ],
)
def test_bad_tools_are_config_errors_naming_the_problem(calling, tools, words):
    with pytest.raises(ConfigError, match=words):
        calling.generate(CHAT, max_new_tokens=2, tools=tools)


def test_a_template_that_does_not_render_tools_refuses_them(gen, calling):
    with pytest.raises(ConfigError, match="does not render tools"):
        gen.generate(CHAT, max_new_tokens=2, tools=TOOLS)
    assert gen.encode(CHAT, tools=[]) == gen.encode(CHAT)  # none offered: nothing to render
    with pytest.raises(ConfigError, match="tools applies to chat messages only"):
        calling.generate("Weather in Paris?", max_new_tokens=2, tools=TOOLS)


# ---------------------------------------------------------------------------- through the server


class Calling:
    """``gen`` whose streams decode as usual and then say ``pieces`` (the statistics and token count of
    the real answer): a function-calling model's answer from a tiny random one. Keeps the prompts'
    ids it was given."""

    def __init__(self, gen, pieces: list[str]):
        self.gen, self.pieces, self.prompts = gen, pieces, []

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def stream(self, ids, *args, **kw):
        self.prompts.append(list(ids))
        inner = list(self.gen.stream(ids, *args, **kw))
        tokens = [t for c in inner for t in c.tokens]
        last = inner[-1]
        for i, piece in enumerate(self.pieces):
            yield dataclasses.replace(last, text=piece, tokens=tokens if i == 0 else [])


ANSWER = f"Checking.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>"
PIECES = [ANSWER[:12], ANSWER[12:15], ANSWER[15:40], ANSWER[40:70], ANSWER[70:]]  # cuts inside tags and calls
CALLS = [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET", "24h": true}')]


def post_both(url: str, body: dict) -> tuple[dict, list[dict]]:
    """The response to ``body`` not streamed, and the streamed one's chunks."""
    httpx = pytest.importorskip("httpx")
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return whole, events


def streamed_calls(events: list[dict]) -> list[tuple[str, str]]:
    """The calls of a stream's deltas joined by index, as OpenAI's clients join them."""
    joined: dict[int, list[str]] = {}
    for e in events:
        for d in e["choices"][0]["delta"].get("tool_calls") or []:
            entry = joined.setdefault(d["index"], ["", ""])
            entry[0] += d["function"].get("name") or ""
            entry[1] += d["function"].get("arguments") or ""
    return [tuple(joined[k]) for k in sorted(joined)]  # type: ignore[misc]


@pytest.mark.parametrize("parser", ["hermes", None])
def test_the_server_returns_the_calls_streamed_and_not(calling, parser):
    pytest.importorskip("fastapi")
    from test_serve import running

    body = {"messages": CHAT, "tools": TOOLS, "max_tokens": 8, "temperature": 0}
    with running(Calling(calling, PIECES), tool_call_parser=parser) as url:
        whole, events = post_both(url, body)
    if parser is None:  # tools need the parser: refused, naming the flag
        assert whole["error"]["param"] == "tools" and "--tool-call-parser hermes" in whole["error"]["message"]
        return
    choice = whole["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" == events[-1]["choices"][0]["finish_reason"]
    assert message["content"] == "Checking." == "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == CALLS
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in message["tool_calls"])
    assert streamed_calls(events) == CALLS
    assert whole["usage"]["completion_tokens"] > 0


def test_the_openai_client_reads_the_calls(calling):
    pytest.importorskip("fastapi")
    from test_serve import client, running

    with running(Calling(calling, PIECES), tool_call_parser="hermes") as url:
        c = client(url)
        out = c.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, max_tokens=8, temperature=0)
        calls = [(t.function.name, t.function.arguments) for t in out.choices[0].message.tool_calls]
        with c.chat.completions.stream(model="tiny", messages=CHAT, tools=TOOLS, max_tokens=8) as s:
            final = s.get_final_completion()
    assert calls == CALLS and out.choices[0].finish_reason == "tool_calls"
    assert [(t.function.name, t.function.arguments) for t in final.choices[0].message.tool_calls] == CALLS


def test_a_conversation_s_calls_and_results_go_back_to_the_template(calling):
    """The request after a call: the assistant's call (its arguments as JSON text, as OpenAI's clients
    send them) and the tool's result reach the template as transformers renders them (arguments as
    the object), and an answer without a block is content, finishing for its own reason."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from test_serve import running

    sent = json.loads(json.dumps(ROUND_TRIP))
    sent[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Paris"})
    wrapped = Calling(calling, ["It is ", "sunny."])
    with running(wrapped, tool_call_parser="hermes") as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": sent, "tools": TOOLS, "max_tokens": 4},
                       timeout=60).json()  # fmt: skip
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny."}
    assert r["choices"][0]["finish_reason"] == "length"  # the real answer's (max_tokens), not tool_calls
    prompt = calling.tokenizer.decode(wrapped.prompts[0], skip_special_tokens=False)
    assert prompt == transformers_text(ROUND_TRIP, TOOLS)


def test_tool_choice_none_lists_the_tools_but_parses_no_call(calling):
    pytest.importorskip("fastapi")
    from test_serve import running

    wrapped = Calling(calling, PIECES)
    with running(wrapped, tool_call_parser="hermes") as url:
        whole, events = post_both(url, {"messages": CHAT, "tools": TOOLS, "tool_choice": "none", "max_tokens": 8})
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert whole["choices"][0]["finish_reason"] != "tool_calls" and streamed_calls(events) == []
    assert "<tools>" in calling.tokenizer.decode(wrapped.prompts[0], skip_special_tokens=False)


def test_reasoning_then_calls(calling):
    """Qwen3's way: a <think> block, then the calls; both parsers on."""
    pytest.importorskip("fastapi")
    from test_serve import running

    answer = "<think>\nThe user wants weather.\n</think>\n\n" + ANSWER
    pieces = [answer[i : i + 7] for i in range(0, len(answer), 7)]
    with running(Calling(calling, pieces), tool_call_parser="hermes", reasoning_parser="think") as url:
        whole, events = post_both(url, {"messages": CHAT, "tools": TOOLS, "max_tokens": 8})
    message = whole["choices"][0]["message"]
    assert message["reasoning"] == "\nThe user wants weather.\n" and message["content"] == "Checking."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == CALLS
    assert streamed_calls(events) == CALLS
    assert "".join(e["choices"][0]["delta"].get("reasoning") or "" for e in events) == message["reasoning"]


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"tool_choice": "sometimes"}, "tool_choice", 'expected "none", "auto", "required" or a function'),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
        ({"tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice", 'expected "none", "auto"'),
        ({"tool_choice": "required", "tools": []}, "tool_choice", "offers no tools"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", "give one"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools", "at least 1 character"),
        ({"tools": [{"type": "function"}]}, "tools", "function"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools", "function"),
        ({"messages": [{"role": "tool", "tool_call_id": "c"}]}, "messages", "content is required"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages", "content is required"),
        ({"messages": [*CHAT, {"role": "assistant", "content": None,
                               "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}]},
         "messages", "arguments"),
    ],
)  # fmt: skip
def test_bad_function_calling_requests_are_400_naming_the_field(calling, change, param, words):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from test_serve import running

    body = {"messages": CHAT, "tools": TOOLS, "max_tokens": 4, **change}
    with running(calling, tool_call_parser="hermes") as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].split(".")[0] == param and words in error["message"], error


def test_a_model_whose_template_lists_no_tools_refuses_them(gen):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from test_serve import running

    with running(gen, tool_call_parser="hermes") as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS, "max_tokens": 4})
        empty = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "tools": [], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "does not render tools" in r.json()["error"]["message"]
    assert empty.status_code == 200  # no tools offered: an ordinary chat


def test_medusa_run_serve_takes_the_parser_by_name(capsys, gen):
    from runtime.cli import build_parser

    assert build_parser().parse_args(["serve", "ART", "--tool-call-parser", "hermes"]).tool_call_parser == "hermes"
    assert build_parser().parse_args(["serve", "ART"]).tool_call_parser is None
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "ART", "--tool-call-parser", "llama3"])
    assert exit_.value.code == 2 and "invalid choice: 'llama3'" in capsys.readouterr().err
    pytest.importorskip("fastapi")
    from runtime.serve import create_app

    with pytest.raises(ConfigError, match="tool_call_parser 'llama3': use one of hermes, or None"):
        create_app(gen, "tiny", tool_call_parser="llama3")


# ---------------------------------------------------------------------------- forced calls (tool_choice)

UNITS = [  # tools whose arguments are bounded, so that a tiny random model's forced call ends
    {"type": "function", "function": {"name": "set_unit", "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "set_level", "parameters": {
        "type": "object", "properties": {"level": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["level"], "additionalProperties": False}}},
]  # fmt: skip


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_level"}}],
                         ids=["required", "named"])  # fmt: skip
def test_tool_choice_forces_a_call_that_medusa_and_plain_write_alike(calling, choice):
    """tool_choice "required" / a named function: the answer is a call by construction (a grammar of
    Hermes blocks holding the tools' schemas), returned as tool_calls; the server's Medusa answer is
    what plain decoding under the same grammar writes, token for token."""
    pytest.importorskip("fastapi")
    pytest.importorskip("llguidance")
    httpx = pytest.importorskip("httpx")
    from test_serve import running

    from runtime.toolcalls import forced_call_grammar

    body = {"messages": CHAT, "tools": UNITS, "tool_choice": choice, "max_tokens": 64, "temperature": 0}
    with running(calling, tool_call_parser="hermes") as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    choice_ = r["choices"][0]
    assert choice_["finish_reason"] == "tool_calls", r
    calls = choice_["message"]["tool_calls"]
    names = [c["function"]["name"] for c in calls]
    if isinstance(choice, dict):
        assert names == ["set_level"]
    assert calls and set(names) <= {"set_unit", "set_level"}
    for c in calls:
        args = json.loads(c["function"]["arguments"])
        assert args in ({"unit": "celsius"}, {"unit": "fahrenheit"}) or (
            set(args) == {"level"} and 1 <= args["level"] <= 5
        )
    grammar = {"type": "grammar", "grammar": forced_call_grammar(UNITS, None if choice == "required" else "set_level")}
    ids = calling.encode(CHAT, tools=UNITS)
    plain = calling.generate(ids, max_new_tokens=64, temperature=0, medusa=False, response_format=grammar)
    medusa = calling.generate(ids, max_new_tokens=64, temperature=0, response_format=grammar)
    assert medusa.tokens == plain.tokens and r["usage"]["completion_tokens"] == len(plain.tokens)
    assert calls_of(split_tool_calls(plain.text)[1]) == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]
    assert medusa.stats.forced_steps > 0  # the call's fixed text was drafted whole


def test_parallel_tool_calls_false_keeps_one_call(calling):
    """``parallel_tool_calls: false``: the answer's first call only (streamed and not), and a forced call
    (``tool_choice: "required"``) is one block by the grammar; true or absent: every call."""
    pytest.importorskip("fastapi")
    from test_serve import running

    from runtime.toolcalls import forced_call_grammar

    body = {"messages": CHAT, "tools": TOOLS, "max_tokens": 8, "temperature": 0}
    with running(Calling(calling, PIECES), tool_call_parser="hermes") as url:
        whole, events = post_both(url, {**body, "parallel_tool_calls": False})
        both, _ = post_both(url, {**body, "parallel_tool_calls": True})
    message = whole["choices"][0]["message"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == CALLS[:1]
    assert streamed_calls(events) == CALLS[:1] and whole["choices"][0]["finish_reason"] == "tool_calls"
    assert len(both["choices"][0]["message"]["tool_calls"]) == 2
    one, many = forced_call_grammar(UNITS, single=True), forced_call_grammar(UNITS)
    assert one.startswith("start: block\n") and many.startswith('start: block ("\\n" block)*\n')


def test_an_empty_tools_list_reaches_the_template_as_transformers_passes_it(tiny, tmp_path):
    """``tools=[]`` is rendered as transformers renders it (an empty list, not None: a template that tests
    ``tools is not none`` sees the difference)."""
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    from conftest import with_chat_template

    from runtime.tokenizer import Tokenizer

    template = "{% if tools is not none %}tools: {{ tools | length }}\n{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    tok = Tokenizer(with_chat_template(tiny["artifact"], tmp_path / "art", template))
    for tools in ([], None):
        want, _ = chat_utils.render_jinja_template([CHAT], tools=tools, chat_template=template)
        got = tok.decode(
            tok.apply_chat_template(CHAT, add_generation_prompt=False, tools=tools), skip_special_tokens=False
        )
        assert got == want[0]
    assert got != tok.decode(
        tok.apply_chat_template(CHAT, add_generation_prompt=False, tools=[]), skip_special_tokens=False
    )
