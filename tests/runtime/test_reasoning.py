"""``runtime.reasoning.ThinkSplit`` (the server's ``--reasoning-parser think``): the reasoning block apart
from the answer, the same whether the answer comes whole or in any pieces; and through the server, streamed
and not."""

from __future__ import annotations

import dataclasses
import json

import pytest

from runtime.reasoning import CLOSE, OPEN, ThinkSplit

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CASES = [
    # (the prompt's end, the answer, reasoning, content)
    ("<|im_start|>assistant\n", "<think>\nTwo and two.\n</think>\n\nFour.", "\nTwo and two.\n", "Four."),
    ("<|im_start|>assistant\n", "  <think>a</think>b", "a", "b"),  # blanks before the tag
    ("<|im_start|>assistant\n", "Four.", "", "Four."),  # no block: all content
    ("<|im_start|>assistant\n", "<thinking is fun", "", "<thinking is fun"),  # not the tag
    ("<|im_start|>assistant\n", "Four. <think>x</think>", "", "Four. <think>x</think>"),  # a tag later is text
    ("<|im_start|>assistant\n", "<think>never closed", "never closed", ""),  # max_tokens inside the block
    ("<|im_start|>assistant\n", "<think>a</think>\n\n\nb\n\nc", "a", "b\n\nc"),  # only the newlines after it go
    ("<|im_start|>assistant\n", "<think>", "", ""),
    ("<|im_start|>assistant\n", "<thi", "", "<thi"),  # the answer ended inside what looked like the tag
    ("<|im_start|>assistant\n", "", "", ""),
    ("<|im_start|>assistant\n<think>\n", "Hmm.</think>Four.", "Hmm.", "Four."),  # the template opened the block
    ("<|im_start|>assistant\n<think>\n", "Hmm </thin", "Hmm </thin", ""),  # a partial close at the end is reasoning
    ("<think>\n\n</think>\n\n", "Four.", "", "Four."),  # enable_thinking false: the template closed an empty block
    ("<think>\n\n</think>\n\n", "<think>x</think>y", "", "<think>x</think>y"),  # ... so a tag after it is content
]


def split_whole(prompt: str, answer: str) -> tuple[str, str]:
    return ThinkSplit(prompt).push(answer, final=True)


def split_pieces(prompt: str, pieces: list[str]) -> tuple[str, str]:
    s, reasoning, content = ThinkSplit(prompt), [], []
    for i, p in enumerate(pieces):
        r, c = s.push(p, final=i == len(pieces) - 1)
        reasoning.append(r)
        content.append(c)
    if not pieces:
        r, c = s.push("", final=True)
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content)


@pytest.mark.parametrize("prompt, answer, reasoning, content", CASES)
def test_the_answer_splits_as_stated_whole_and_at_every_cut(prompt, answer, reasoning, content):
    assert split_whole(prompt, answer) == (reasoning, content)
    for i in range(len(answer) + 1):
        for j in range(i, len(answer) + 1):
            assert split_pieces(prompt, [answer[:i], answer[i:j], answer[j:]]) == (reasoning, content), (i, j)


def test_nothing_is_released_that_a_later_piece_could_take_back():
    s = ThinkSplit("")
    assert s.push("<th") == ("", "")  # could open the block
    assert s.push("ink>Let me see </th") == ("Let me see ", "")  # "</th" could close it
    assert s.push("ink>") == ("", "")
    assert s.push("\n\nIt is ") == ("", "It is ")
    assert s.push("four.", final=True) == ("", "four.")


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.sampled_from(["", "x\n", "<think>\n", "<think></think>\n"]),
    answer=st.lists(st.sampled_from(["<", "think", ">", "</", "/", "\n", " ", "a", OPEN, CLOSE]), max_size=12).map(
        "".join
    ),
    cuts=st.lists(st.integers(0, 60), max_size=5),
)
def test_any_pieces_join_to_the_whole_split(prompt, answer, cuts):
    """Property: however a stream cuts the answer, the pieces' reasoning and content join to the split of the
    whole answer; and reasoning + content never holds more than the answer."""
    points = sorted({min(c, len(answer)) for c in cuts})
    pieces = [answer[a:b] for a, b in zip([0, *points], [*points, len(answer)])]
    whole = split_whole(prompt, answer)
    assert split_pieces(prompt, pieces) == whole
    assert len(whole[0]) + len(whole[1]) <= len(answer)


# ---------------------------------------------------------------------------- through the server


class Thinking:
    """``gen`` whose streams decode as usual and then say ``pieces`` (the statistics and token count of the
    real answer): a thinking model's text from a tiny random one."""

    def __init__(self, gen, pieces: list[str]):
        self.gen, self.pieces = gen, pieces

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def stream(self, *args, **kw):
        inner = list(self.gen.stream(*args, **kw))
        tokens = [t for c in inner for t in c.tokens]
        last = inner[-1]
        for i, piece in enumerate(self.pieces):
            yield dataclasses.replace(last, text=piece, tokens=tokens if i == 0 else [])


PIECES = ["<th", "ink>\nTwo and", " two.</th", "ink>\n", "\nFour."]


@pytest.mark.parametrize("parser", [None, "think"])
def test_the_server_returns_the_reasoning_apart_streamed_and_not(gen, parser):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from test_serve import running

    body = {"messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": 8, "temperature": 0}
    with running(Thinking(gen, PIECES), reasoning_parser=parser) as url:
        whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    message = whole["choices"][0]["message"]
    deltas = [e["choices"][0]["delta"] for e in events]
    streamed_content = "".join(d.get("content") or "" for d in deltas)
    streamed_reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    if parser is None:  # the text as the model wrote it, no reasoning fields
        assert message["content"] == "".join(PIECES) == streamed_content
        assert "reasoning" not in message and streamed_reasoning == ""
        return
    assert message["content"] == "Four." == streamed_content
    assert message["reasoning"] == message["reasoning_content"] == "\nTwo and two." == streamed_reasoning
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert whole["usage"]["completion_tokens"] > 0


def test_an_answer_without_a_block_has_reasoning_null(gen):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from test_serve import running

    body = {"messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": 8, "temperature": 0}
    with running(Thinking(gen, ["Four", "."]), reasoning_parser="think") as url:
        message = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        completion = httpx.post(f"{url}/v1/completions", json={"prompt": "<think>x</think>", "max_tokens": 4}).json()
    assert message["content"] == "Four." and message["reasoning"] is None and message["reasoning_content"] is None
    assert completion["choices"][0]["text"] == "Four."  # /v1/completions returns the text as it is


def test_medusa_run_serve_takes_the_parser_by_name(capsys):
    from runtime.cli import build_parser

    assert build_parser().parse_args(["serve", "ART", "--reasoning-parser", "think"]).reasoning_parser == "think"
    assert build_parser().parse_args(["serve", "ART"]).reasoning_parser is None
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "ART", "--reasoning-parser", "qwen3"])
    assert exit_.value.code == 2 and "invalid choice: 'qwen3'" in capsys.readouterr().err


def test_create_app_refuses_a_parser_it_does_not_know(gen):
    pytest.importorskip("fastapi")
    from runtime.errors import ConfigError
    from runtime.serve import create_app

    with pytest.raises(ConfigError, match="reasoning_parser 'qwen3': use one of think, or None"):
        create_app(gen, "tiny", reasoning_parser="qwen3")
