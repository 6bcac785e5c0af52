"""``medusa-run serve`` through a real client (the ``openai`` package and raw HTTP) against a
server started on a free loopback port: answers equal offline ``generate``, streaming and not,
every error code, a full queue, a client that leaves mid-stream, concurrent sampled requests,
metrics, and SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from runtime.serve import create_app  # noqa: E402

CHAT = [{"role": "user", "content": "Tell me about rivers and mountains."}]


@pytest.fixture(params=["interleave", "batch"], scope="module")
def served(request, gen, tiny):
    """The generator a server runs: ``gen`` (one sequence per engine call, steps interleaved) or a
    batched one over the artifact's batch.onnx (runtime.load(max_batch=3)). ``gen`` stays the
    offline reference either way."""
    if request.param == "interleave":
        yield gen
        return
    import runtime

    batched = runtime.load(tiny["artifact"], threads=1, max_batch=3)
    yield batched
    batched.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(gen, **kw):
    """A server for ``gen`` in this process (uvicorn in a thread); yields its base URL."""
    with running_app(create_app(gen, "tiny", **kw)) as url:
        yield url


@contextlib.contextmanager
def running_app(app):
    """``app`` (any ASGI app) on uvicorn in a thread of this process; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


class Slowed:
    """``gen`` whose streams wait for ``gate`` before their first step and then take ``delay``
    seconds a step: holds a worker busy for as long as a test needs."""

    def __init__(self, gen, gate: threading.Event | None = None, delay: float = 0.0):
        self.gen, self.gate, self.delay = gen, gate, delay

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def stream(self, *args, **kw):
        inner = self.gen.stream(*args, **kw)  # arguments checked now, as the real one does

        def slowed():
            if self.gate is not None:
                self.gate.wait(60)
            try:
                for chunk in inner:
                    time.sleep(self.delay)
                    yield chunk
            finally:
                inner.close()

        return slowed()


def test_answers_equal_offline_generate_streaming_and_not(gen, served):
    want = gen.generate(CHAT, max_new_tokens=16)
    want_text = gen.generate("Once upon a time", max_new_tokens=12)
    with running(served, max_batch=2) as url:
        c = client(url)
        r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
        assert r.choices[0].message.content == want.text
        assert r.choices[0].finish_reason == ("length" if want.stats.finish_reason == "length" else "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.tokens))
        assert r.model_extra["medusa"]["steps"] == want.stats.steps
        parts, usage = [], None
        for chunk in c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0, stream=True,
                                               stream_options={"include_usage": True}):  # fmt: skip
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert "".join(parts) == want.text and usage.completion_tokens == len(want.tokens)
        cp = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
        assert cp.choices[0].text == want_text.text and cp.usage.completion_tokens == len(want_text.tokens)
        streamed = "".join(
            ch.choices[0].text
            for ch in c.completions.create(
                model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
            )  # fmt: skip
        )
        assert streamed == want_text.text
        assert [m.id for m in c.models.list()] == ["tiny"]


@pytest.mark.parametrize(
    "body, status, code, words",
    [
        (b"{not json", 400, "json_invalid", "not valid JSON"),
        (json.dumps({"messages": CHAT, "temprature": 0.5}).encode(), 400, "extra_forbidden", "unknown field 'temprature'"),
        (json.dumps({"messages": CHAT, "temperature": -1}).encode(), 400, None, "temperature"),
        (json.dumps({"messages": CHAT, "max_tokens": 0}).encode(), 400, None, "max_tokens"),
        (json.dumps({"messages": CHAT, "n": 0}).encode(), 400, None, "n:"),
        (json.dumps({"messages": CHAT, "n": 18}).encode(), 400, None, "n 18: at most 17 choices a request here"),
        (json.dumps({"messages": CHAT, "temperature": float("nan")}).encode(), 400, None, "finite number"),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
                    ).encode(), 400, None, "messages.0.content"),
        (json.dumps({"messages": []}).encode(), 400, None, "messages"),
        (json.dumps({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, None, "at most 4"),
        (json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}).encode(), 400,
         "context_length_exceeded", "context holds"),
        (json.dumps({"messages": CHAT, "model": "gpt-4"}).encode(), 404, "model_not_found", "does not exist"),
        (json.dumps({"messages": CHAT, "max_tokens": 100000}).encode(), 400, "context_length_exceeded",
         "maximum context length"),
        (json.dumps({"messages": CHAT, "stream_options": {"include_usage": True}}).encode(), 400, None,
         "only allowed with stream: true"),
        (json.dumps({"messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}, *CHAT]}).encode(), 400,
         None, "messages.0.audio"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_style_errors(gen, body, status, code, words):
    with running(gen) as url:
        r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert words in err["message"] and err["type"] and (code is None or err["code"] == code), err
        metrics = httpx.get(f"{url}/metrics").text
        assert f'medusa_requests_total{{endpoint="/v1/chat/completions",status="{status}"}} 1.0' in metrics


def test_logprobs_through_the_openai_client_equal_offline_generate(gen, served):
    """OpenAI's logprobs shapes, streamed and not, carry the offline call's log-probabilities; the
    tokens' bytes rebuild the answer; completions' top_logprobs hold the chosen token too."""
    want = gen.generate(CHAT, max_new_tokens=12, logprobs=2)
    with running(served, max_batch=2) as url:
        c = client(url)
        r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0, logprobs=True,
                                      top_logprobs=2)  # fmt: skip
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens == len(want.tokens)
        # the batch graph's logits differ from the one-sequence graph's in the last bits
        assert [e.logprob for e in content] == pytest.approx([lp.logprob for lp in want.logprobs], abs=2e-3)
        assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
                   for e in content)  # fmt: skip
        assert bytes(b for e in content for b in e.bytes).decode() == r.choices[0].message.content
        streamed = []
        for chunk in c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0,
                                               logprobs=True, top_logprobs=2, stream=True):  # fmt: skip
            if chunk.choices and chunk.choices[0].logprobs:
                streamed.extend(chunk.choices[0].logprobs.content)
        assert [e.token for e in streamed] == [e.token for e in content]
        # the same prompt again: its cache entries are reused (prefix reuse), so the rows differ in the last bits
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
        plain = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0)
        assert plain.choices[0].logprobs is None
        cp = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
        lp = cp.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == cp.usage.completion_tokens
        assert all(t in top and len(top) <= 3 for t, top in zip(lp.tokens, lp.top_logprobs))
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert "".join(lp.tokens) == cp.choices[0].text


def test_completions_echo_scores_the_prompt_as_evaluation_harnesses_ask(gen, served):
    """``echo`` with ``logprobs`` and ``max_tokens: 0`` (lm-eval-harness's loglikelihood request):
    the prompt comes back with the backbone's log-probabilities of its tokens (the first: None)."""
    prompt = "Once upon a time there was a river"
    ids = gen.encode(prompt)
    want = gen.generate(prompt, max_new_tokens=1, logprobs=1, prompt_logprobs=True)
    with running(served, max_batch=2) as url:
        c = client(url)
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text == prompt and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
        assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == prompt
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx([x.logprob for x in want.prompt_logprobs], abs=2e-3)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        special = c.completions.create(model="tiny", prompt="Hello<|im_end|> world and more.", max_tokens=6, echo=True,
                                       logprobs=0, temperature=0)  # fmt: skip
        sl = special.choices[0].logprobs
        assert "<|im_end|>" in sl.tokens  # the prompt's special token, shown in the echoed text
        for token, at in zip(sl.tokens, sl.text_offset):  # every offset points at its token in the returned text
            assert "\ufffd" in token or special.choices[0].text[at : at + len(token)] == token, (token, at)
        both = c.completions.create(model="tiny", prompt=ids, max_tokens=4, echo=True, logprobs=0, temperature=0)
        assert both.choices[0].text.startswith(prompt) and both.usage.completion_tokens == 4
        assert len(both.choices[0].logprobs.tokens) == len(ids) + 4
        plain = c.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, temperature=0)
        assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None
        streamed = [ch.choices[0] for ch in c.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True,
                                                                  logprobs=0, temperature=0, stream=True)]  # fmt: skip
        assert streamed[0].text == prompt and streamed[0].logprobs.token_logprobs[0] is None
        assert "".join(s.text for s in streamed) == plain.choices[0].text
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 0}, timeout=60)
        assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_the_openai_client_raises_its_own_error_types(gen):
    with running(gen) as url:
        c = client(url)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            c.chat.completions.create(model="tiny", messages=CHAT, temperature=3)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            c.chat.completions.create(model="other", messages=CHAT)


EDGE_CASES = [  # (method, path, body, status, code, words): JSON's own types only, every error in OpenAI's body
    ("POST", "/v1/completions", {"prompt": [True, False]}, 400, "int_type", "prompt.0"),  # bools are not token ids
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": True}, 400, "int_type", "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": "8"}, 400, "int_type", "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "stream": "yes"}, 400, "bool_type", "stream"),
    ("POST", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', 400, "json_invalid", "UTF-8"),
    ("GET", "/v1/nosuch", None, 404, "not_found", "unknown path '/v1/nosuch'"),
    ("POST", "/v1/completions", {"prompt": "Hi", "echo": 1}, 400, "bool_type", "echo"),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, None, "give echo: true"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, 400, "greater_than_equal", "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "echo": True}, 400, "extra_forbidden", "unknown field 'echo'"),
    ("POST", "/v1/completions", {"prompt": "Hi", "logprobs": 6}, 400, "less_than_equal", "logprobs"),
    ("POST", "/v1/completions", {"prompt": "Hi", "logprobs": True}, 400, "int_type", "logprobs"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "logprobs": 1}, 400, "bool_type", "logprobs"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, None,
     "top_logprobs needs logprobs: true"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400,
     "less_than_equal", "top_logprobs"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "presence_penalty": 2.5}, 400, "less_than_equal",
     "presence_penalty"),
    ("POST", "/v1/completions", {"prompt": "Hi", "frequency_penalty": "1"}, 400, "float_type", "frequency_penalty"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, None, "the prompt is empty"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": ""}]},
     400, None, "the prompt is empty"),
]  # fmt: skip


def test_http_edge_cases_get_openai_style_errors(gen):
    with running(gen) as url:
        for method, path, body, status, code, words in EDGE_CASES:
            content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
            r = httpx.request(method, f"{url}{path}", content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (path, body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and words in err["message"], (body, err)
            assert err["code"] == code and err["type"] == "invalid_request_error", (body, err)
        # an argument the generator refuses is named as the API names it
        lone = json.dumps({"messages": CHAT, "stop": ["a\ud800"]}).encode()  # JSON's escape of a lone surrogate
        r = httpx.post(f"{url}/v1/chat/completions", content=lone, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
        assert "lone surrogate" in r.json()["error"]["message"], r.text
        # the same fields at their "off" values, and a chat with one non-empty message, are served
        ok = [("/v1/completions", {"prompt": "Hi", "echo": False, "logprobs": None, "presence_penalty": 0}),
              ("/v1/completions", {"prompt": "Hi", "echo": None, "n": None, "frequency_penalty": None}),
              ("/v1/chat/completions", {"messages": [{"role": "system", "content": ""}, *CHAT], "logprobs": False,
                                        "top_logprobs": None, "presence_penalty": None, "n": None})]  # fmt: skip
        for path, body in ok:
            r = httpx.post(f"{url}{path}", json={**body, "max_tokens": 2, "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text


def test_a_bad_server_wide_decode_argument_fails_at_startup_not_per_request(gen):
    from runtime.errors import MedusaError

    with pytest.raises(MedusaError, match="unknown tree 'nosuch'"):
        create_app(gen, "tiny", decode={"medusa": True, "tree": "nosuch"})
    with pytest.raises(MedusaError, match=r"lookup must be an integer in \[0, 1024\]"):
        create_app(gen, "tiny", decode={"medusa": True, "lookup": -1})
    create_app(gen, "tiny", decode={"medusa": False, "tree": None, "lookup": 0})  # a good one serves


def test_a_full_queue_answers_429_at_once_and_the_others_finish(gen, served):
    gate = threading.Event()
    with running(Slowed(served, gate), max_batch=1, max_queue=1) as url:
        c = client(url)
        results = {}

        def call(key):
            results[key] = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)

        first = threading.Thread(target=call, args=("first",))
        first.start()
        _wait(lambda: httpx.get(f"{url}/health").json()["running"] == 1)  # the worker holds the first
        second = threading.Thread(target=call, args=("second",))
        second.start()
        _wait(lambda: httpx.get(f"{url}/health").json()["waiting"] == 1)  # the queue holds the second
        t = time.perf_counter()
        with pytest.raises(openai.RateLimitError, match="queue is full") as refused:
            c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8)
        assert time.perf_counter() - t < 5  # at once, not after the others
        assert refused.value.response.headers["retry-after"] == "1"  # when to try again (OpenAI's clients read it)
        gate.set()
        first.join(60)
        second.join(60)
        want = gen.generate(CHAT, max_new_tokens=8).text
        assert results["first"].choices[0].message.content == results["second"].choices[0].message.content == want


def test_max_queue_0_runs_what_a_worker_takes_and_refuses_the_rest(gen, served):
    """``--max-queue 0``: nothing waits. A request an idle worker takes runs; one more, while the
    worker is busy, is refused 429 at once."""
    gate = threading.Event()
    with running(Slowed(served, gate), max_batch=1, max_queue=0) as url:
        result = {}
        first = threading.Thread(target=lambda: result.setdefault("r", client(url).chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=4, temperature=0)))  # fmt: skip
        first.start()
        _wait(lambda: httpx.get(f"{url}/health").json()["running"] == 1)
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}, timeout=5)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
        gate.set()
        first.join(60)
        assert result["r"].choices[0].message.content == gen.generate(CHAT, max_new_tokens=4).text


def test_a_client_that_leaves_before_a_whole_answer_frees_its_slot(gen, served):
    """Not streamed: the client gives up (a read timeout) while its request decodes 200 slowed steps;
    the request stops at its next step, the next one is served at once, and the metrics count the
    first as 499 (client closed request)."""
    with running(Slowed(served, delay=0.05), max_batch=1, max_queue=4) as url:
        body = {"messages": CHAT, "max_tokens": 200, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)
        t = time.perf_counter()
        r = client(url).chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0)
        assert r.choices[0].message.content == gen.generate(CHAT, max_new_tokens=4).text
        assert time.perf_counter() - t < 5  # the first request's 200 steps at 0.05 s would take 10 s
        _wait(lambda: httpx.get(f"{url}/health").json()["running"] == 0)
        text = httpx.get(f"{url}/metrics").text
        assert _metric(text, "medusa_generated_tokens_total") < 100  # the first one's ~20-30 + 4
        assert 'medusa_requests_total{endpoint="/v1/chat/completions",status="499"} 1.0' in text


def test_openai_request_forms_other_servers_accept(gen, served):
    """Forms OpenAI's API allows that a client may send: null for temperature / top_p / stream (their
    defaults), content as a list of text parts (joined by newlines), the developer role (the
    system role), a negative seed (mod 2**64), a list of prompts (texts or token ids; OpenAI's choice
    order, usage counting each prompt once), GET /v1/models/{id}, a
    JSON body sent without a JSON Content-Type (curl -d); a body over MAX_BODY_BYTES is refused 413
    before it is read."""
    from runtime.serve import MAX_BODY_BYTES

    with running(served, max_batch=2) as url:

        def chat(**kw):
            r = httpx.post(f"{url}/v1/chat/completions", json={"max_tokens": 6, **kw}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        sampled = chat(messages=CHAT, temperature=1.0, top_p=1.0, seed=5)
        assert chat(messages=CHAT, temperature=None, top_p=None, stream=None, seed=5) == sampled
        assert chat(messages=CHAT, seed=-1) == chat(messages=CHAT, seed=2**64 - 1)
        parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me about rivers"},
                                              {"type": "text", "text": "and mountains."}]}]  # fmt: skip
        assert chat(messages=parts, temperature=0) == chat(
            messages=[{"role": "user", "content": "Tell me about rivers\nand mountains."}], temperature=0
        )
        assert chat(messages=[{"role": "developer", "content": "Be brief."}, *CHAT], temperature=0) == chat(
            messages=[{"role": "system", "content": "Be brief."}, *CHAT], temperature=0
        )
        one = httpx.post(f"{url}/v1/completions", json={"prompt": ["Once upon"], "max_tokens": 4, "temperature": 0})
        assert one.json()["choices"][0]["text"] == gen.generate("Once upon", max_new_tokens=4).text
        texts = ["Once upon", "The river"]
        many = client(url).completions.create(model="tiny", prompt=texts, n=2, max_tokens=4, temperature=0)
        want = [gen.generate(t, max_new_tokens=4) for t in texts]
        assert [c.index for c in many.choices] == [0, 1, 2, 3]
        assert [c.text for c in many.choices] == [w.text for w in want for _ in range(2)]
        assert many.usage.prompt_tokens == sum(len(gen.encode(t)) for t in texts)
        assert many.usage.completion_tokens == 2 * sum(len(w.tokens) for w in want)
        ids = [gen.encode(t) for t in texts]
        streamed = client(url).completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, stream=True)
        pieces: dict[int, str] = {}
        for chunk in streamed:
            for c in chunk.choices:
                pieces[c.index] = pieces.get(c.index, "") + c.text
        assert pieces == {0: want[0].text, 1: want[1].text}
        too_many = httpx.post(f"{url}/v1/completions", json={"prompt": ["a"] * 40, "max_tokens": 4})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt", too_many.text
        long = httpx.post(f"{url}/v1/completions", json={"prompt": ["a", "a " * 5000], "max_tokens": 4})
        assert long.json()["error"]["code"] == "context_length_exceeded", long.text
        assert long.json()["error"]["message"].startswith("prompt 1: "), long.text
        assert httpx.get(f"{url}/v1/models/tiny").json()["id"] == "tiny"
        assert httpx.get(f"{url}/v1/models/gpt-4").json()["error"]["code"] == "model_not_found"
        raw = json.dumps({"prompt": "Once upon", "max_tokens": 4, "temperature": 0}).encode()
        for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):  # curl -d's, none
            r = httpx.post(f"{url}/v1/completions", content=raw, headers=headers)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == one.json()["choices"][0]["text"], r.text
        big = httpx.post(f"{url}/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1),
                         headers={"content-type": "application/json"})  # fmt: skip
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

        def chunks(body: bytes, size: int = 1 << 20):  # no Content-Length: sent chunked
            yield from (body[i : i + size] for i in range(0, len(body), size))

        chunked = httpx.post(f"{url}/v1/completions", content=chunks(raw))
        assert chunked.status_code == 200 and chunked.json()["choices"][0]["text"] == one.json()["choices"][0]["text"]
        big = httpx.post(f"{url}/v1/completions", content=chunks(b"x" * (MAX_BODY_BYTES + 1)))
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large", big.text


def test_openai_fields_without_a_use_here_are_taken_at_their_neutral_values_and_refused_otherwise(gen):
    """Fields clients send at values that ask for nothing (logit_bias {}, response_format text,
    tools [], tool_choice "none", metadata, store, service_tier, parallel_tool_calls; completions'
    best_of = n and an empty suffix) are served as if absent; asking for what they control is a
    400 naming the field as unsupported (not as unknown)."""
    base = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
    with running(gen) as url:
        want = httpx.post(f"{url}/v1/chat/completions", json=base, timeout=60).json()["choices"][0]["message"]
        neutral = {
            "logit_bias": {},
            "response_format": {"type": "text"},
            "tools": [],
            "tool_choice": "none",
            "parallel_tool_calls": True,
            "metadata": {"team": "a"},
            "store": False,
            "service_tier": "auto",
        }
        r = httpx.post(f"{url}/v1/chat/completions", json={**base, **neutral}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"] == want, r.text
        r = httpx.post(
            f"{url}/v1/completions",
            json={
                "prompt": "Once upon",
                "max_tokens": 4,
                "temperature": 0,
                "n": 2,
                "best_of": 2,
                "suffix": "",
                "logit_bias": None,
            },
        )
        assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
        asks = [("/v1/chat/completions", {**base, "logit_bias": {"42": 5}}, "logit_bias"),
                ("/v1/chat/completions", {**base, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                ("/v1/completions", {"prompt": "Hi", "best_of": 3}, "best_of"),
                ("/v1/completions", {"prompt": "Hi", "suffix": " the end"}, "suffix")]  # fmt: skip
        for path, body, field in asks:
            r = httpx.post(f"{url}{path}", json=body, timeout=60)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == field and err["code"] == "unsupported_parameter", r.text
            assert "is not supported by this server" in err["message"], err


def test_a_stream_keeps_its_created_stamp_and_carries_usage_null_until_the_last_chunk(gen, served):
    with running(served) as url:
        body = {"messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            frames = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert len(frames) > 3 and len({f["created"] for f in frames}) == 1
        assert all("usage" in f for f in frames) and all(f["usage"] is None for f in frames[:-1])
        assert frames[-1]["usage"]["completion_tokens"] == len(gen.generate(CHAT, max_new_tokens=12).tokens)


def test_shutdown_refuses_the_queued_at_once_and_cuts_the_running_with_an_error(gen):
    """The server's shutdown (what SIGTERM starts): a queued request gets 503 at once; requests still
    running at the end of the graceful period get a 503 in OpenAI's body (a stream: as its last
    event), not a dropped connection."""
    import uvicorn

    from runtime.serve import _uvicorn_server

    gate = threading.Event()
    port = free_port()
    app = create_app(Slowed(gen, gate), "tiny", max_batch=2, max_queue=2)
    server = _uvicorn_server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                            timeout_graceful_shutdown=3), app, graceful=1)  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait(lambda: server.started)
    url = f"http://127.0.0.1:{port}"
    out: dict = {}

    def whole(key):
        out[key] = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8}, timeout=30)

    def streamed():
        body = {"messages": CHAT, "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            out["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    try:
        threads = [threading.Thread(target=whole, args=("running",)), threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        _wait(lambda: httpx.get(f"{url}/health").json()["running"] == 2)  # both held at the gate
        threads.append(threading.Thread(target=whole, args=("queued",)))
        threads[-1].start()
        _wait(lambda: httpx.get(f"{url}/health").json()["waiting"] == 1)
        t0 = time.perf_counter()
        server.should_exit = True
        threads[-1].join(30)
        assert out["queued"].status_code == 503 and time.perf_counter() - t0 < 1, out["queued"].text
        assert "had not started" in out["queued"].json()["error"]["message"]
        for t in threads[:2]:
            t.join(30)
        assert out["running"].status_code == 503, out["running"].text
        assert "cut off" in out["running"].json()["error"]["message"]
        last = json.loads(out["stream"][-1][6:])
        assert last["error"]["code"] == "shutting_down", out["stream"]
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def test_a_client_that_leaves_while_queued_ends_its_request(gen, served):
    """Not streamed, queued behind a running request when its client gives up: once a worker
    reaches it, its handler ends (counted 499) instead of waiting for ever, so nothing is left
    open for a shutdown to wait on."""
    import uvicorn

    gate = threading.Event()
    port = free_port()
    app = create_app(Slowed(served, gate), "tiny", max_batch=1, max_queue=4)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait(lambda: server.started)
    url = f"http://127.0.0.1:{port}"
    try:
        body = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
        first = threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60))
        first.start()
        _wait(lambda: httpx.get(f"{url}/health").json()["running"] == 1)
        gave_up: list = []

        def second():
            try:
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=3.0)
            except httpx.ReadTimeout as e:
                gave_up.append(e)

        leaving = threading.Thread(target=second)
        leaving.start()
        _wait(lambda: httpx.get(f"{url}/health").json()["waiting"] == 1)  # queued behind the held worker
        job = app.state.scheduler._queue.queue[0]
        leaving.join(30)
        assert gave_up, "the second client was answered while the worker was held"
        _wait(lambda: job.cancelled.is_set())  # its handler saw the client leave
        gate.set()
        first.join(60)
        left = 'medusa_requests_total{endpoint="/v1/chat/completions",status="499"} 1.0'
        _wait(lambda: left in httpx.get(f"{url}/metrics").text, timeout=20)
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)


def test_a_client_that_leaves_mid_stream_frees_its_slot(gen, served):
    """One worker, a stream of 200 slowed steps: the client reads two chunks and leaves; the next
    request is served at once, and the first request stopped long before its 200 tokens."""
    with running(Slowed(served, delay=0.05), max_batch=1, max_queue=4) as url:
        body = {"messages": CHAT, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]  # the role frame, a blank line, one token frame
            assert got[0].startswith("data: ")
        t = time.perf_counter()
        r = client(url).chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0)
        assert r.choices[0].message.content == gen.generate(CHAT, max_new_tokens=4).text
        assert time.perf_counter() - t < 5  # 200 steps at 0.05 s would take 10 s
        _wait(lambda: httpx.get(f"{url}/health").json()["running"] == 0)
        tokens = _metric(httpx.get(f"{url}/metrics").text, "medusa_generated_tokens_total")
        assert tokens < 100  # the first stream's tokens (it stopped) + 4
        whole = {**body, "max_tokens": 2}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=whole, timeout=60) as r:
            assert list(r.iter_lines())[-2] == "data: [DONE]"
        # a stream is counted as it ends (its 200 status line went first): the one that was left 499, the
        # finished one 200 (with the request not streamed: 2)
        want = [f'medusa_requests_total{{endpoint="/v1/chat/completions",status="{s}"}} {n}' for s, n in
                (("499", "1.0"), ("200", "2.0"))]  # fmt: skip
        _wait(lambda: all(line in httpx.get(f"{url}/metrics").text for line in want))


def test_concurrent_sampled_requests_reproduce_their_seeds(gen, served):
    """Two sampled requests (different seeds and temperatures) and a greedy one decoded at once:
    interleaved, each answer equals the same request run alone; batched, the greedy one does, and a
    seeded request run alone twice gives the same answer."""
    asks = [dict(temperature=0.7, seed=1), dict(temperature=1.0, seed=2), dict(temperature=0)]
    with running(served, max_batch=3) as url:
        c = client(url)
        together: dict[int, str] = {}

        def call(i):
            r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, **asks[i])
            together[i] = r.choices[0].message.content

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        alone = {i: client(url).chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, **asks[i])
                 .choices[0].message.content for i in range(3)}  # fmt: skip
        again = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, **asks[0])
    assert again.choices[0].message.content == alone[0]  # a seed reproduces a request run alone
    if served is gen:  # one sequence per engine call: every step computes exactly as it does alone
        assert together == alone
    else:  # batched: sampled draws may differ with the last bits' rounding (runtime/batch.py); greedy may not
        assert together[2] == alone[2]
    assert together[2] == gen.generate(CHAT, max_new_tokens=24).text
    assert together[0] != together[1]  # the seeds and temperatures took effect
    # coupled sampling: plain decoding (what `serve --plain` runs) draws the same text for the seed
    assert alone[0] == served.generate(CHAT, max_new_tokens=24, medusa=False, **asks[0]).text


def test_n_choices_are_sequences_of_their_own_seeded_one_apart(gen, served):
    """``n``: one sequence a choice, decoded side by side; choice i takes seed + i (so a seed
    reproduces each), greedy choices are all the greedy answer, streamed choices carry their index."""
    with running(served, max_batch=3) as url:
        c = client(url)
        greedy = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0, n=2)
        want = gen.generate(CHAT, max_new_tokens=12)
        assert [ch.index for ch in greedy.choices] == [0, 1]
        assert [ch.message.content for ch in greedy.choices] == [want.text] * 2
        assert greedy.usage.completion_tokens == 2 * len(want.tokens)
        sampled = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=1.0, seed=7, n=3)
        texts = [ch.message.content for ch in sampled.choices]
        assert len(set(texts)) == 3  # the seeds took effect
        alone = [gen.generate(CHAT, max_new_tokens=16, temperature=1.0, seed=7 + i).text for i in range(3)]
        if served is gen:  # one sequence per engine call: each choice is the request with seed + i run alone
            assert texts == alone
        parts: dict[int, list[str]] = {0: [], 1: []}
        finished = set()
        for chunk in c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, n=2,
                                          stream=True, logprobs=1):  # fmt: skip
            for ch in chunk.choices:
                parts[ch.index].append(ch.text)
                if ch.finish_reason:
                    finished.add(ch.index)
        one = gen.generate("Once upon a time", max_new_tokens=10).text
        assert finished == {0, 1} and ["".join(parts[i]) for i in (0, 1)] == [one, one]
    with running(served, max_batch=1, max_queue=2) as url:  # n beyond what may run and wait: refused whole, at once
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "n": 4, "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and "at most 3 choices" in r.json()["error"]["message"]


def test_penalties_reach_the_decoder(gen, served):
    """presence_penalty / frequency_penalty: the server's answer is offline generate's with them, and
    they change the answer (tests/runtime/test_penalties.py checks the decoding itself)."""
    with running(served, max_batch=2) as url:
        r = client(url).chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0,
                                                presence_penalty=1.5, frequency_penalty=1.0)  # fmt: skip
    want = gen.generate(CHAT, max_new_tokens=24, presence_penalty=1.5, frequency_penalty=1.0)
    assert r.choices[0].message.content == want.text != gen.generate(CHAT, max_new_tokens=24).text


def test_the_text_ends_before_a_stop_string_streamed_or_not(gen, served):
    """As OpenAI's: the returned text stops before the stop string (a stream holds back a tail that
    could begin one, so no piece of it is ever sent); a stop string that never comes holds nothing back."""
    full = gen.generate(CHAT, max_new_tokens=24).text
    stop = full[12:16]
    want = full[: full.find(stop)]
    # a stop string across two streamed pieces: without the hold-back its start would be sent already
    pieces = [ch.text for ch in gen.stream(CHAT, max_new_tokens=24)]
    k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2 and i > 2)
    cut = len("".join(pieces[:k]))
    spanning = full[cut - 2 : cut + 2]
    assert full.find(spanning) == cut - 2, "the spanning stop string occurs earlier"
    with running(served, max_batch=2) as url:
        c = client(url)
        for stops in ([stop], ["zzqq", stop], "zzqq", [spanning]):
            want = full if stops == "zzqq" else full[: min(full.find(x) for x in stops if x in full)]
            r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0, stop=stops)
            streamed, finish = [], None
            for chunk in c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0,
                                                   stop=stops, stream=True):  # fmt: skip
                if chunk.choices:
                    streamed.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            assert r.choices[0].message.content == "".join(streamed) == want, (stops, r.choices[0].message.content)
            assert r.choices[0].finish_reason == finish == ("length" if stops == "zzqq" else "stop")


def test_engine_faults_are_server_errors_and_a_cache_write_failure_stops_the_engine(gen, tiny, monkeypatch):
    """A failed engine call is the server's fault (500 engine_error, not a 400 that tells the
    client not to retry) and the server goes on; a failed KV-cache write stops the batch engine for
    good (fail-stop: 503 engine_stopped for that request and every later one, /health 503 for an
    orchestrator to restart it), never a sequence decoding over a cache that lacks entries."""
    import runtime

    batched = runtime.load(tiny["artifact"], threads=1, max_batch=2)
    engine = batched.engine
    want = gen.generate(CHAT, max_new_tokens=4).text
    try:
        with running(batched, max_batch=2) as url:
            body = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
            forward = engine._run_forward

            def boom(run):
                raise RuntimeError("simulated: ONNX Runtime ran out of memory")

            monkeypatch.setattr(engine, "_run_forward", boom)
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error", r.text
            assert r.json()["error"]["type"] == "server_error"
            monkeypatch.setattr(engine, "_run_forward", forward)
            assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"][
                "content"] == want  # fmt: skip
            apply = engine._apply

            def cannot_grow(commits):
                if any(rows is not None for _, _, rows in commits):
                    raise MemoryError("simulated: the cache buffer could not grow")
                apply(commits)

            monkeypatch.setattr(engine, "_apply", cannot_grow)
            for _ in range(2):  # the request whose call met the failure, then a later one
                r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
                assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped", r.text
            health = httpx.get(f"{url}/health")
            assert health.status_code == 503 and health.json()["status"] == "engine failed", health.text
            assert "writing the KV cache failed (MemoryError" in health.json()["error"]
    finally:
        batched.close()


def test_closing_the_scheduler_twice_still_lets_every_worker_exit():
    """uvicorn's shutdown closes the scheduler and the app's lifespan closes it again: the second
    call must not take the stop signals the first left for workers still busy."""
    import asyncio

    from runtime.serve import Job, Metrics, Scheduler

    release = threading.Event()

    def slow():
        release.wait(30)
        yield from ()

    loop = asyncio.new_event_loop()
    try:
        sched = Scheduler(None, 2, 4, Metrics())
        sched.submit(Job([1], slow(), loop, asyncio.Queue()))
        _wait(lambda: sched.active == 1)
        sched.close()
        sched.close()
        release.set()
        for t in sched._threads:
            t.join(10)
        assert not any(t.is_alive() for t in sched._threads)
    finally:
        loop.close()


def test_metrics_count_steps_with_tokens_and_what_failed_or_left_requests_decoded():
    """``medusa_step_seconds`` observes the chunks of a step, not a stream's closing chunk that carries
    only the decoder's held-back text; the token, step and decode-time counters take what a request
    decoded however it ended (failed, left); the gauges follow the last *finished* request."""
    import asyncio
    from types import SimpleNamespace

    from runtime.api import TextChunk
    from runtime.errors import EngineError
    from runtime.serve import Job, Metrics, Scheduler

    def stats(tokens, steps):
        return SimpleNamespace(new_tokens=tokens, steps=steps, total_s=0.5, tokens_per_s=2 * tokens,
                               mean_accepted=tokens / max(1, steps))  # fmt: skip

    def finished():  # prefill's token, two steps, then the decoder's held-back text alone
        done = stats(5, 2)
        yield TextChunk("a", [1], stats(1, 0))
        yield TextChunk("b", [2, 3], stats(3, 1))
        yield TextChunk("c", [4, 5], done)
        yield TextChunk("\u20ac", [], done)

    def failing():
        yield TextChunk("a", [1], stats(1, 0))
        yield TextChunk("b", [2, 3], stats(3, 1))
        raise EngineError("simulated: the call failed")

    loop = asyncio.new_event_loop()
    m = Metrics()
    sched = Scheduler(None, 1, 4, m)
    try:
        value = m.registry.get_sample_value
        for stream in (finished(), failing()):
            sched.submit(Job([1], stream, loop, asyncio.Queue()))
            _wait(lambda: sched.active == 0 and sched.waiting == 0)
        assert value("medusa_time_to_first_token_seconds_count") == 2.0
        assert value("medusa_generated_tokens_total") == 8.0  # 5 + the failed request's 3
        assert value("medusa_step_seconds_count") == 3.0  # 2 steps + 1 before the failure, no closing chunk
        assert value("medusa_decode_steps_total") == 3.0 and value("medusa_decode_seconds_total") == 1.0
        assert value("medusa_tokens_per_second") == 10.0 and value("medusa_mean_accepted") == 2.5  # the finished one
    finally:
        sched.close()
        loop.close()


def test_health_and_metrics(gen, served):
    with running(served, max_batch=2, max_queue=3) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": "tiny", "running": 0, "waiting": 0,
                                                     "backend": served.backend_name, "pid": os.getpid()}  # fmt: skip
        client(url).chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0)
        text = httpx.get(f"{url}/metrics").text
        for name in ("medusa_queue_depth 0.0", "medusa_batch_size 0.0", "medusa_generated_tokens_total 5.0",
                     "medusa_mean_accepted", "medusa_tokens_per_second", "medusa_step_seconds_bucket",
                     "medusa_time_to_first_token_seconds_count 1.0"):  # fmt: skip
            assert name in text, name


def test_api_keys_cors_and_head_as_openai_clients_browsers_and_load_balancers_use_them(gen):
    from runtime.serve import Access

    access = Access(api_keys=("k-one", "k-two"), allowed_origins=("https://app.example",))
    with running(gen, access=access) as url:
        # OpenAI's client: a wrong key is its AuthenticationError; either right key is served
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="k-wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
            bad.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
        for key in ("k-one", "k-two"):
            good = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
            out = good.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, temperature=0)
            assert out.usage.completion_tokens == 2
        # no key at all, on every /v1 path (an unknown one too), in OpenAI's body with RFC 6750's header
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/v1/nosuch")):
            r = httpx.request(method, f"{url}{path}", json={"prompt": "Hi"} if method == "POST" else None)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key" and "didn't provide" in r.json()["error"]["message"]
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Basic k-one"})  # another scheme: refused
        assert r.status_code == 401, r.text
        # orchestrators and Prometheus need no key; a 401 on a served path is counted
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'medusa_requests_total{endpoint="/v1/completions",status="401"} 1.0' in metrics, metrics
        assert 'endpoint="/v1/nosuch"' not in metrics
        # a browser page of the allowed origin: its preflight passes without a key, and the answers
        # (a 401 too, so that the page can read why) carry the CORS header; another origin gets none
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
        r = httpx.options(f"{url}/v1/chat/completions", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example", r.headers
        r = httpx.options(f"{url}/v1/chat/completions", headers={**pre, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k-one"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
        assert "retry-after" in r.headers["access-control-expose-headers"].lower()
        # fail closed: every path but /health and /metrics wants the key, FastAPI's own pages too
        for path in ("/docs", "/openapi.json", "/", "/nosuch"):
            assert httpx.get(f"{url}{path}").status_code == 401, path
        # HEAD, as load balancers probe: the GET's status and headers, no body on the wire
        for path, key in (("/health", ""), ("/v1/models", "Authorization: Bearer k-two\r\n")):
            head = _raw(url, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n{key}Connection: close\r\n\r\n")
            status, _, rest = head.partition(b"\r\n")
            headers, _, body = rest.partition(b"\r\n\r\n")
            assert status == b"HTTP/1.1 200 OK" and body == b"", (path, head)
            assert b"content-length: " in headers.lower(), head
    with running(gen) as url:  # without Access: open, and no CORS headers
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def _raw(url: str, request: str) -> bytes:
    """What the server sends back to ``request`` on a plain socket, until it closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_key_is_checked_on_the_path_the_router_sees_under_a_prefix(gen):
    """Mounted under a prefix (a proxy's root_path, Ray Serve's route_prefix), /llm/v1/... is still
    /v1/... to the key check, and /llm/health still open."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from runtime.serve import Access

    outer = Starlette(routes=[Mount("/llm", app=create_app(gen, "tiny", access=Access(api_keys=("k",))))])
    with running_app(outer) as base:
        url = f"{base}/llm"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"}).json()["data"][0]["id"] == "tiny"
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_serve_access_reads_the_flags_then_the_environment():
    from runtime.errors import ConfigError
    from runtime.serve import Access, serve_access

    assert serve_access(None, None, None) == Access()
    assert serve_access(None, None, "env-key").api_keys == ("env-key",)
    assert serve_access(["a", "b"], None, "env-key").api_keys == ("a", "b")  # the flags win
    got = serve_access(None, ["https://a.example, https://b.example:8443", "https://a.example"], None)
    assert got.allowed_origins == ("https://a.example", "https://b.example:8443")
    assert serve_access(None, ["*"], None).allowed_origins == ("*",)
    assert Access(api_keys=("k",)).allows(b"bearer k") and not Access(api_keys=("k",)).allows(None)
    assert Access().allows(None)
    for bad in (["http://a.example/path"], ["ftp://a.example"]):
        with pytest.raises(ConfigError, match="give scheme://host"):
            serve_access(None, bad, None)
    with pytest.raises(ConfigError, match="API key"):
        serve_access([""], None, None)
    with pytest.raises(ConfigError, match="MEDUSA_API_KEY is set but blank"):  # not silently open
        serve_access(None, None, " ")
    with pytest.raises(ConfigError, match="visible ASCII"):  # a header carries no other characters reliably
        serve_access(["clé"], None, None)
    with pytest.raises(ConfigError, match="not one string"):  # not the keys "s", "e", "c", ...
        Access(api_keys="secret")  # type: ignore[arg-type]
    assert Access(allowed_origins=["HTTPS://App.Example"]).allowed_origins == ("https://app.example",)  # type: ignore[arg-type]
    assert not Access(api_keys=("k",)).allows(b"Bearer k2") and not Access(api_keys=("k2",)).allows(b"Bearer k")


def test_sigterm_lets_the_running_request_finish_and_exits(tiny, repo_root):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", str(tiny["artifact"]), "--port", str(port), "--threads", "1"],
        cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _up(url), timeout=60)
        body = {"messages": CHAT, "max_tokens": 60, "temperature": 0, "stream": True}
        frames = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    frames.append(line)
                    if len(frames) == 2:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
        assert frames[-1] == "data: [DONE]"  # the running request finished: all of it, not cut short
        last = json.loads(frames[-2][len("data: ") :])
        assert last["choices"][0]["finish_reason"] in ("length", "stop"), last
        assert len(frames) > 3  # its tokens came after the signal
        # uvicorn shuts down, then re-raises SIGTERM so that the parent sees how it ended
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        out = proc.stdout.read()
        assert out.startswith("serving tiny on http://127.0.0.1:") and "Traceback" not in out, out
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--port", "70000"], "--port must be an integer in [0, 65535]"),  # not 70000 % 65536
        (["--port", "-1"], "--port must be an integer in [0, 65535]"),
        (["--port", "{busy}"], "Address already in use"),
        (["--host", "nosuchhost.invalid"], "cannot serve on host 'nosuchhost.invalid'"),
        (["--max-queue", "-1"], "--max-queue must be an integer >= 0"),
        (["--graceful-timeout", "-5"], "--graceful-timeout must be an integer >= 0"),
        (["--tree", "nosuch"], "unknown tree 'nosuch'"),  # not a 400 on every request
        (["--tree", "nosuch", "--ray-replicas", "2"], "unknown tree 'nosuch'"),  # before Ray starts
        (["--lookup", "-1"], "lookup must be an integer in [0, 1024]"),
        (["--batching", "batch", "--backend", "tensorrt"], "--batching batch runs the artifact's batch.onnx"),
        (["--batching", "batch", "--device", "cuda"], "not with --device cuda"),
        (["--allowed-origins", "example.com"], "allowed origin 'example.com': give scheme://host[:port]"),
        (["--allowed-origins", " , "], "--allowed-origins names no origin"),
        (["--api-key", " key"], "an API key must be a non-empty string of visible ASCII characters"),
    ],
)
def test_startup_mistakes_are_one_line_errors_without_the_banner(tiny, repo_root, flags, words):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        flags = [f.format(busy=busy.getsockname()[1]) for f in flags]
        if "--port" not in flags:
            flags += ["--port", str(free_port())]
        env = {**os.environ, "PYTHONPATH": str(repo_root)}
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "runtime.cli", "serve", str(tiny["artifact"]), "--threads", "1", *flags],
                cwd=repo_root, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"serve {' '.join(flags)} started serving: {e.stdout!r}")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and proc.stderr.startswith("medusa-run: error: ") and words in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_cache_memory_cannot_hold_is_refused_at_startup_naming_what_fits(tiny, monkeypatch, capsys):
    """The server's KV caches at their peak, every request a whole context (batched: the slots'
    buffer while it grows, the buffer it is copied from still held; interleaved: the live buffer
    so, plus each paused request's copy of its cache), are checked against the memory free after
    loading: more is one line at startup naming the largest --max-context and --max-batch that
    fit, not an out-of-memory kill once the requests run long."""
    import runtime
    import runtime.serve
    from runtime.batch import MIN_CAPACITY
    from runtime.cli import main
    from runtime.onnxrt import START_CAPACITY
    from runtime.serve import CACHE_MEMORY_SHARE, cache_peak, grown_positions

    assert [grown_positions(c, 256) for c in (100, 256, 257, 512, 5000)] == [100, 256, 513, 768, 5000 + 4096]
    small = runtime.load(tiny["artifact"], threads=1, max_batch=3, max_context=64)
    try:  # a context below the starting capacity: the buffer is whole from the start, its size the peak
        assert small.engine.capacity == 64 and small.engine.full_cache_bytes == small.engine.kv.nbytes
        peak, n, context = cache_peak(small, 3)
        assert (n, context) == (3, 64) and peak(3, 64) == small.engine.kv.nbytes
        per_token = small.engine.full_cache_bytes // (3 * 64)
    finally:
        small.close()
    one = runtime.load(tiny["artifact"], threads=1)
    context = one.backend.max_context
    peak, _, _ = cache_peak(one, 3)  # interleaved: two paused copies and the live buffer
    assert peak(3, context) == per_token * (2 * context + grown_positions(context, START_CAPACITY))
    one.close()
    for batching, whole in (("batch", 3 * grown_positions(context, MIN_CAPACITY)),
                            ("interleave", 2 * context + grown_positions(context, START_CAPACITY))):  # fmt: skip
        free = int(whole * per_token / 2 / CACHE_MEMORY_SHARE)  # half the peak
        monkeypatch.setattr(runtime.serve, "available_memory", lambda free=free: free)
        argv = ["serve", str(tiny["artifact"]), "--max-batch", "3", "--port", "0", "--threads", "1",
                "--batching", batching]  # fmt: skip
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 1 and "serving" not in out, (out, err)
        assert f"--max-batch 3 x --max-context {context}: the KV cache reaches" in err, err
        fits = int(err.split("use --max-context ")[1].split()[0])
        room = free * CACHE_MEMORY_SHARE
        rows = (lambda c: 3 * grown_positions(c, MIN_CAPACITY)) if batching == "batch" else (
            lambda c: 2 * c + grown_positions(c, START_CAPACITY))  # fmt: skip
        assert rows(fits) * per_token <= room < rows(fits + 1) * per_token, (batching, fits, err)
        assert "--max-batch 1 or less" in err, err  # one request's peak fits in half of three's


def test_a_batched_cache_that_cannot_fit_is_refused_before_the_engine_loads(tiny, monkeypatch, capsys):
    """--max-batch 256 loaded the batch engine first (it times its graph at every batch size up to
    256: minutes) and only then found that the cache could not fit; the cache's peak is known from
    the config, so it is refused before anything loads. A cache that fits still loads."""
    import runtime
    import runtime.serve
    from runtime.batch import MIN_CAPACITY
    from runtime.cli import main
    from runtime.serve import CACHE_MEMORY_SHARE, grown_positions

    spec = runtime.artifact.read_artifact(tiny["artifact"]).model
    per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4  # float32
    peak = 256 * grown_positions(spec.max_context, MIN_CAPACITY) * per_token
    monkeypatch.setattr(runtime.serve, "available_memory", lambda: int(peak / 3 / CACHE_MEMORY_SHARE))
    loads = []
    from runtime.errors import MedusaError

    def load_for_serving(*a, **k):
        loads.append(a)
        raise MedusaError("the load began")

    monkeypatch.setattr(runtime.serve, "load_for_serving", load_for_serving)
    argv = ["serve", str(tiny["artifact"]), "--max-batch", "256", "--port", "0", "--threads", "1"]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 1 and not loads and "serving" not in out, (out, err)
    fits = int(err.split("--max-batch ")[2].split()[0])
    assert f"--max-batch 256 x --max-context {spec.max_context}: the KV cache reaches" in err
    assert 80 <= fits <= 85, err  # a third of 256
    assert main([*argv[:2], "--max-batch", str(fits), *argv[4:]]) == 1 and len(loads) == 1  # checked, then loaded
    assert "the load began" in capsys.readouterr().err
    # an artifact without batch.onnx: the load says that (or serves one sequence a call), not a cache size
    no_batch = runtime.artifact.read_artifact(tiny["artifact"])
    no_batch.batch = None
    monkeypatch.setattr(runtime.artifact, "read_artifact", lambda *a, **k: no_batch)
    runtime.serve.check_cache_memory_early(tiny["artifact"], 256, "batch", {}, 1)


def test_ray_replicas_share_the_memory_each_checks_its_cache_against(tiny):
    """Ray Serve replicas on one node share its memory: each replica's cache peak is checked
    against its share, and the error names the most replicas that fit as well."""
    import runtime
    from runtime.errors import ConfigError
    from runtime.serve import CACHE_MEMORY_SHARE, cache_peak, check_cache_memory

    small = runtime.load(tiny["artifact"], threads=1, max_batch=2, max_context=64)
    try:
        peak, n, context = cache_peak(small, 2)
        need = peak(n, context)
        free = int(need * 2.5 / CACHE_MEMORY_SHARE)  # two replicas' caches fit, three do not
        assert "KV cache up to" in check_cache_memory(small, 2, free, replicas=2)
        with pytest.raises(ConfigError) as e:
            check_cache_memory(small, 2, free, replicas=3)
        assert "shared by 3 replicas" in str(e.value) and "--ray-replicas 2 or fewer" in str(e.value), e.value
        assert "--max-batch 1 or less" in str(e.value), e.value  # one slot's peak fits in a third of 2.5 caches
        with pytest.raises(ConfigError) as e:  # one replica never fits: no --ray-replicas advice
            check_cache_memory(small, 2, int(need / 2 / CACHE_MEMORY_SHARE), replicas=4)
        assert "--ray-replicas" not in str(e.value), e.value
    finally:
        small.close()


def test_a_failed_replicas_own_error_is_read_from_ray_serves_status():
    """Ray Serve's ``run`` says only that the deployment failed; the replica's exception is the
    last line of the traceback in the deployment's status message."""
    from types import SimpleNamespace as NS

    from runtime.serve import replica_error

    def status(message):
        return NS(applications={"medusa": NS(deployments={"medusa": NS(message=message)})})

    trace = ("The deployment failed to start 3 times in a row.\nRuntimeError: Traceback (most recent call last):\n"
             '  File "x.py", line 8, in build\n    raise ConfigError("a: b")\n')  # fmt: skip
    assert replica_error(status(trace + "runtime.errors.ConfigError: --max-batch 8: use b")) == "--max-batch 8: use b"
    assert replica_error(status(trace + "onnxruntime.capi.InvalidProtobuf: bad file")) == "InvalidProtobuf: bad file"
    assert replica_error(status("")) is None and replica_error(status(None)) is None


@pytest.mark.parametrize(
    "files, want",
    [
        ({"/proc/meminfo": "MemTotal: 9 kB\nMemAvailable: 8388608 kB\n"}, 8 << 30),  # no cgroup files
        ({"/proc/meminfo": "MemAvailable: 8388608 kB\n", "/sys/fs/cgroup/memory.max": "max\n",
          "/sys/fs/cgroup/memory.current": "1073741824\n"}, 8 << 30),  # cgroup v2 without a limit
        ({"/proc/meminfo": "MemAvailable: 8388608 kB\n", "/sys/fs/cgroup/memory.max": str(4 << 30),
          "/sys/fs/cgroup/memory.current": str(1 << 30)}, 3 << 30),  # a container's limit: less than the host's
        ({"/proc/meminfo": "MemAvailable: 8388608 kB\n", "/sys/fs/cgroup/memory/memory.limit_in_bytes": str(2 << 30),
          "/sys/fs/cgroup/memory/memory.usage_in_bytes": str(1 << 30)}, 1 << 30),  # cgroup v1
        ({"/sys/fs/cgroup/memory.max": str(4 << 30), "/sys/fs/cgroup/memory.current": str(5 << 30)}, 0),  # over it
        ({}, None),  # nothing readable (not Linux)
    ],
)  # fmt: skip
def test_available_memory_is_the_least_of_memavailable_and_a_cgroup_limit(monkeypatch, files, want):
    import io

    import runtime.serve

    def fake_open(path, *args, **kwargs):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(runtime.serve, "open", fake_open, raising=False)
    assert runtime.serve.available_memory() == want


def test_port_0_serves_on_a_free_port_the_banner_names(tiny, repo_root):
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", str(tiny["artifact"]), "--port", "0", "--threads", "1"],
        cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("serving tiny on http://127.0.0.1:"), banner
        assert "batched engine calls; KV cache up to " in banner, banner
        port = int(banner.split("http://127.0.0.1:")[1].split("/")[0])
        assert port > 0
        # from the banner on the port takes connections (they wait for uvicorn), none refused: one try
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=60).status_code == 200
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _up(url) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(cond, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_the_next_turn_of_a_chat_reports_the_prompt_tokens_it_reused(gen, served, tiny):
    """Both servers keep the cache of a request's prompt and answer (the interleaving server's
    generator its one cache, the batching server the slot): the next turn of the chat prefills only
    what is new (``usage.prompt_tokens_details.cached_tokens``) and answers as a generator that
    never reuses does."""
    import runtime

    fresh = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1, reuse_prefix=False)
    with running(served, max_batch=2) as url:
        c = client(url)
        first = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
        chat = [*CHAT, {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And the sea?"}]  # fmt: skip
        r = c.chat.completions.create(model="tiny", messages=chat, max_tokens=12, temperature=0)
    want = fresh.generate(chat, max_new_tokens=12)
    assert r.choices[0].message.content == want.text
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert len(gen.encode(CHAT)) <= r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    assert r.usage.prompt_tokens == want.prompt_tokens


def test_what_openai_clients_send_back_and_what_a_template_or_the_server_fails_on(gen, tiny, tmp_path):
    """An assistant message as OpenAI's client dumps it (refusal, annotations, audio, function_call: null)
    is taken; /v1/completions without max_tokens generates OpenAI's default 16; a chat template that
    fails on the messages (SmolLM2's adds a null content to a string) is a 400 naming messages; an
    unexpected fault is a 500 in OpenAI's error body, not a text page."""
    from conftest import with_chat_template

    import runtime

    history = [CHAT[0], {"role": "assistant", "content": "Rivers.", "refusal": None, "annotations": [], "audio": None,
                         "function_call": None, "tool_calls": None}, {"role": "user", "content": "More?"}]  # fmt: skip
    want = gen.generate("Once upon a time", max_new_tokens=16)
    with running(gen) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": history, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Once upon a time", "temperature": 0}).json()
        assert r["choices"][0]["text"] == want.text and r["usage"]["completion_tokens"] == len(want.tokens) <= 16
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [CHAT[0], {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c", "content": "1"}]  # fmt: skip
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}"
    strict = runtime.load(with_chat_template(tiny["artifact"], tmp_path / "art", template), threads=1)

    class Broken(Slowed):
        def encode(self, *args, **kw):
            raise RuntimeError("a fault nobody expected")

    try:
        for served_, status, words in ((strict, 400, "cannot render these messages: TypeError"),
                                       (Broken(gen), 500, "internal error (RuntimeError)")):  # fmt: skip
            with running(served_) as url:
                r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 3})
                assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
                err = r.json()["error"]
                assert words in err["message"] and err["type"] == ("server_error" if status == 500 else
                                                                   "invalid_request_error")  # fmt: skip
                metrics = httpx.get(f"{url}/metrics").text
                assert f'medusa_requests_total{{endpoint="/v1/chat/completions",status="{status}"}} 1.0' in metrics
    finally:
        strict.close()


@pytest.mark.parametrize("batched", [False, True])
def test_a_stream_cancelled_during_its_prefill_stops_at_the_next_chunk(tiny, batched):
    """``stream(cancel=event)`` (what the server passes: its client left): set during a long prompt's
    prefill, the stream raises Cancelled before the next chunk's engine call, and the generator (a batch
    engine's slot too) serves the next request."""
    import runtime
    from runtime.errors import Cancelled

    g = runtime.load(tiny["artifact"], threads=1, prefill_chunk=4, **({"max_batch": 1} if batched else {}))
    try:
        event, chunks = threading.Event(), []
        backend = g.engine if batched else g.backend
        name = "_run_forward" if batched else "forward"
        real = getattr(backend, name)

        def counted(*a, **kw):
            chunks.append(1)
            event.set()  # the client leaves while the first chunk runs
            return real(*a, **kw)

        setattr(backend, name, counted)
        prompt = list(range(5, 45))  # ten chunks of 4
        stream = g.stream(prompt, max_new_tokens=4, cancel=event)
        with pytest.raises(Cancelled):
            next(stream)
        assert len(chunks) == 1  # the other nine chunks never ran
        setattr(backend, name, real)
        done = []
        worker = threading.Thread(target=lambda: done.append(g.generate(prompt, max_new_tokens=4)))
        worker.start()
        worker.join(timeout=60)
        assert done and len(done[0].tokens) == 4  # (a batch engine's one slot was given back)
    finally:
        g.close()
