"""``chat_template_kwargs``: more variables for the chat template (Qwen3's ``enable_thinking``), through
``Tokenizer.apply_chat_template``, ``generate`` / ``stream``, ``medusa-run generate --chat-template-kwargs``
and the server's ``/v1/chat/completions`` (vLLM's request field), with the bad values each refuses."""

from __future__ import annotations

import pytest

import runtime
from runtime.errors import ConfigError

# Qwen3's switch, as its template has it: without the variable the model opens its own <think> block
TEMPLATE = (
    "{%- for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
    "{%- if add_generation_prompt %}<assistant>"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}"
    "{%- if style %}[{{ style }}]{% endif %}{% endif %}"
)
CHAT = [{"role": "user", "content": "Tell me about rivers and mountains."}]


@pytest.fixture(scope="module")
def thinking(tiny, tmp_path_factory):
    """The tiny artifact with the template above (its checksum unrecorded, as a user's edit would be)."""
    from conftest import with_chat_template

    gen = runtime.load(with_chat_template(tiny["artifact"], tmp_path_factory.mktemp("thinking") / "art", TEMPLATE),
                       threads=1)  # fmt: skip
    yield gen
    gen.close()


def rendered(gen, **kwargs) -> str:
    return gen.tokenizer.decode(gen.encode(CHAT, **kwargs), skip_special_tokens=False)


def test_the_template_sees_the_variables_and_only_where_given(thinking):
    eos = thinking.tokenizer.config["eos_token"]
    base = f"<user>{CHAT[0]['content']}{eos}<assistant>"
    assert rendered(thinking) == base  # undefined: thinking on, as Qwen3's default
    assert rendered(thinking, chat_template_kwargs={}) == base
    assert rendered(thinking, chat_template_kwargs={"enable_thinking": True}) == base
    assert rendered(thinking, chat_template_kwargs={"enable_thinking": False}) == base + "<think></think>"
    both = {"enable_thinking": False, "style": "terse"}
    assert rendered(thinking, chat_template_kwargs=both) == base + "<think></think>[terse]"
    assert rendered(thinking, chat_template_kwargs={"unread": 1}) == base  # a name the template ignores


@pytest.mark.parametrize(
    "value, words",
    [
        ([("enable_thinking", False)], "must be a mapping"),
        ({"messages": []}, "'messages' is set by the call itself"),
        ({"add_generation_prompt": False}, "'add_generation_prompt' is set by the call itself"),
        ({"enable-thinking": False}, "'enable-thinking' is not a template variable name"),
        ({1: False}, "1 is not a template variable name"),
    ],
)
def test_bad_values_are_config_errors_naming_the_problem(thinking, value, words):
    with pytest.raises(ConfigError, match=words):
        thinking.generate(CHAT, max_new_tokens=2, chat_template_kwargs=value)
    with pytest.raises(ConfigError, match=words):
        thinking.tokenizer.apply_chat_template(CHAT, template_kwargs=value)


def test_a_prompt_that_is_no_chat_refuses_them(thinking):
    for prompt in ("Once upon a time", [5, 6, 7]):
        with pytest.raises(ConfigError, match="chat messages only"):
            thinking.generate(prompt, max_new_tokens=2, chat_template_kwargs={"enable_thinking": False})


def test_generate_and_stream_decode_the_prompt_the_variables_render(thinking):
    kw = {"enable_thinking": False}
    ids = thinking.encode(CHAT, chat_template_kwargs=kw)
    assert len(ids) > len(thinking.encode(CHAT))
    want = thinking.generate(ids, max_new_tokens=12, temperature=0)
    got = thinking.generate(CHAT, max_new_tokens=12, temperature=0, chat_template_kwargs=kw)
    assert got.tokens == want.tokens and got.prompt_tokens == len(ids)
    streamed = [t for c in thinking.stream(CHAT, max_new_tokens=12, temperature=0, chat_template_kwargs=kw)
                for t in c.tokens]  # fmt: skip
    assert streamed == want.tokens


def test_medusa_run_generate_takes_them_as_json(thinking, capsys):
    from runtime.cli import main

    art = str(thinking.folder)
    rc = main(["generate", art, "hi", "--max-new-tokens", "3", "--threads", "1", "--chat-template-kwargs",
               '{"enable_thinking": false}'])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    for bad, words in (("{", "not valid JSON"), ("[1]", "a JSON object is needed, got a list")):
        with pytest.raises(SystemExit) as exit_:
            main(["generate", art, "hi", "--chat-template-kwargs", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--chat-template-kwargs" in err and words in err, err
    rc = main(["generate", art, "hi", "--raw", "--chat-template-kwargs", "{}"])
    err = capsys.readouterr().err
    assert rc == 1 and "no effect with --raw" in err, err


def test_the_server_takes_vllms_field_on_chat_requests_only(thinking):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from test_serve import running

    kw = {"enable_thinking": False}
    want = thinking.generate(CHAT, max_new_tokens=6, temperature=0, chat_template_kwargs=kw)
    body = {"messages": CHAT, "max_tokens": 6, "temperature": 0}
    with running(thinking) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "chat_template_kwargs": kw}, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["usage"]["prompt_tokens"] == want.prompt_tokens
        assert out["choices"][0]["message"]["content"] == want.text
        plain = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        assert plain["usage"]["prompt_tokens"] < want.prompt_tokens  # the variable changed the prompt
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "chat_template_kwargs": {"messages": 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text
        assert "set by the call itself" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "chat_template_kwargs": [1]})
        assert r.status_code == 400, r.text
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "chat_template_kwargs": kw})
        assert r.status_code == 400 and "chat_template_kwargs" in r.text, r.text
