"""Log-probabilities (``generate(..., logprobs=k)``, the server's ``logprobs`` / ``top_logprobs``):
each emitted token's log-probability under the backbone and its k likeliest alternatives, read from
the logits Medusa's verification computes anyway. They must be the backbone's own (a direct forward
over the whole answer), the same with and without Medusa, one per token however a step is trimmed,
and the token bytes must rebuild the text."""

from __future__ import annotations

import re

import numpy as np
import pytest

from runtime.decode import TokenLogprob, token_logprobs
from runtime.errors import ConfigError

CHAT = [{"role": "user", "content": "Tell me about rivers and mountains."}]


def direct_logprobs(gen, ids: list[int], tokens: list[int]) -> np.ndarray:
    """log-softmax rows of one causal forward over prompt + answer: row i is the distribution the
    backbone gives answer token i (float64)."""
    full = np.array(ids + tokens[:-1], dtype=np.int64)
    backend = gen.backend
    backend.reset()
    logits = backend.forward(full, np.arange(len(full)), np.tril(np.ones((len(full), len(full)), dtype=bool)))
    backend.reset()
    z = logits[len(ids) - 1 :].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_token_logprobs_against_a_direct_softmax():
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((3, 50)) * 4).astype(np.float32)
    out = token_logprobs(rows, [4, 7, 9], 3)
    want = rows.astype(np.float64) - np.log(np.exp(rows.astype(np.float64)).sum(axis=1, keepdims=True))
    for i, (lp, t) in enumerate(zip(out, [4, 7, 9])):
        assert lp.token == t and lp.logprob == pytest.approx(want[i, t], abs=1e-5)
        assert [a for a, _ in lp.top] == list(np.argsort(-want[i])[:3])
        assert [v for _, v in lp.top] == pytest.approx(sorted(want[i], reverse=True)[:3], abs=1e-5)
    assert token_logprobs(rows, [1], 0) == [TokenLogprob(1, pytest.approx(want[0, 1], abs=1e-5), [])]
    assert len(token_logprobs(rows, [1, 2], 1)) == 2  # rows beyond the tokens are not read


def test_medusa_logprobs_are_the_backbones_and_plain_decodings(gen):
    ids = gen.encode(CHAT)
    medusa = gen.generate(CHAT, max_new_tokens=32, logprobs=3)
    plain = gen.generate(CHAT, max_new_tokens=32, logprobs=3, medusa=False)
    assert medusa.stats.mean_accepted > 1.2, "too few multi-token steps to test the verified rows"
    assert medusa.tokens == plain.tokens and len(medusa.logprobs) == len(medusa.tokens)
    direct = direct_logprobs(gen, ids, medusa.tokens)
    for i, (m, p, t) in enumerate(zip(medusa.logprobs, plain.logprobs, medusa.tokens)):
        assert m.token == p.token == t
        assert m.logprob == pytest.approx(p.logprob, abs=1e-4) == pytest.approx(direct[i, t], abs=1e-4)
        assert [a for a, _ in m.top] == list(np.argsort(-direct[i])[:3]), i
        assert m.top[0] == (t, pytest.approx(m.logprob))  # greedy: the token is the likeliest


def test_one_logprob_per_token_however_the_step_is_trimmed(gen):
    """A multi-token step cut by the length (or a stop string) keeps the logprobs of what it emits."""
    for n in range(1, 9):
        out = gen.generate(CHAT, max_new_tokens=n, logprobs=0)
        assert len(out.logprobs) == len(out.tokens) == n and all(lp.top == [] for lp in out.logprobs)
        assert [lp.token for lp in out.logprobs] == out.tokens
    full = gen.generate(CHAT, max_new_tokens=24)
    stop = gen.tokenizer.decode(full.tokens[10:12])
    out = gen.generate(CHAT, max_new_tokens=24, logprobs=1, stop=[stop])
    assert out.stats.finish_reason == "stop_string" and [lp.token for lp in out.logprobs] == out.tokens


def test_streamed_sampled_logprobs_follow_the_chunks(gen):
    chunks = list(gen.stream(CHAT, max_new_tokens=20, temperature=0.8, seed=5, logprobs=2))
    whole = gen.generate(CHAT, max_new_tokens=20, temperature=0.8, seed=5, logprobs=2)
    assert [t for c in chunks for t in c.tokens] == whole.tokens
    assert all(len(c.logprobs) == len(c.tokens) for c in chunks)
    streamed = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token for lp in streamed] == whole.tokens
    assert [lp.logprob for lp in streamed] == pytest.approx([lp.logprob for lp in whole.logprobs], abs=1e-6)
    direct = direct_logprobs(gen, gen.encode(CHAT), whole.tokens)
    assert [lp.logprob for lp in whole.logprobs] == pytest.approx(
        [direct[i, t] for i, t in enumerate(whole.tokens)], abs=1e-4
    )  # sampled tokens: the temperature does not enter the reported log-probabilities
    assert gen.generate(CHAT, max_new_tokens=4).logprobs is None  # off unless asked for


def test_prompt_logprobs_score_the_prompt_across_prefill_chunks(tiny, gen):
    """``prompt_logprobs=True``: the prefill computes every row, so tokens 1 .. n-1 of the prompt get
    the backbone's log-probabilities, chunk boundaries included; decoding is unchanged."""
    import runtime

    ids = gen.encode(CHAT)
    base = gen.generate(CHAT, max_new_tokens=6, logprobs=2)
    small = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1, prefill_chunk=5)
    for g in (gen, small):
        out = g.generate(CHAT, max_new_tokens=6, logprobs=2, prompt_logprobs=True)
        assert out.tokens == base.tokens and base.prompt_logprobs is None
        assert [lp.token for lp in out.prompt_logprobs] == ids[1:]
        direct = direct_logprobs(g, ids[:1], ids[1:] + [0])  # row i: the distribution of prompt token i + 1
        assert [lp.logprob for lp in out.prompt_logprobs] == pytest.approx(
            [direct[i, t] for i, t in enumerate(ids[1:])], abs=1e-4
        )
        assert all(len(lp.top) == 2 for lp in out.prompt_logprobs)
        assert [lp.logprob for lp in out.logprobs] == pytest.approx([lp.logprob for lp in base.logprobs], abs=1e-4)
    chunks = list(gen.stream(CHAT, max_new_tokens=4, prompt_logprobs=True))
    assert len(chunks[0].prompt_logprobs) == len(ids) - 1 and all(c.prompt_logprobs is None for c in chunks[1:])
    assert all(lp.top == [] for lp in chunks[0].prompt_logprobs)  # no logprobs=: no alternatives


@pytest.mark.parametrize("bad", [-1, 21, 2.5, True, "3"])
def test_bad_logprobs_values_are_refused_at_the_call(gen, bad):
    with pytest.raises(ConfigError, match="logprobs"):
        gen.generate(CHAT, max_new_tokens=2, logprobs=bad)


def test_token_bytes_rebuild_the_text_across_utf8_characters(gen):
    tok = gen.tokenizer
    text = "Héllo wörld — 日本語 and 🙂 emoji\n\tdone"
    ids = tok.encode(text)
    pieces = [tok.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(_partial_utf8(p) for p in pieces), "no token ends inside a character: a weak check"
    out = gen.generate(CHAT, max_new_tokens=24, temperature=1.0, seed=0, logprobs=0)
    eos = set(gen.spec.eos_token_ids)
    kept = [t for t in out.tokens if t not in eos]
    assert b"".join(tok.token_bytes(t) for t in kept).decode("utf-8", errors="replace") == tok.decode(kept)


def _partial_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_cli_generate_prints_a_logprob_per_token(tiny, capsys):
    from runtime.cli import main

    art = str(tiny["artifact"])
    for extra in ([], ["--stream"]):
        assert main(["generate", art, "Say hello.", "--max-new-tokens", "6", "--logprobs", "2", "--threads", "1",
                     *extra]) == 0  # fmt: skip
        rows = capsys.readouterr().err.strip().splitlines()
        # per row: the token, its log-probability, then 2 alternatives with theirs
        assert len(rows) == 6 and all(len(re.findall(r" -?\d+\.\d{3}", r.split("|")[1])) == 2 for r in rows), rows
        assert all(float(r.split("|")[0].split()[-1]) <= 0 for r in rows)
    assert main(["generate", art, "Say hello.", "--max-new-tokens", "2", "--logprobs", "21", "--threads", "1"]) == 1
    assert "logprobs must be" in capsys.readouterr().err


def test_the_servers_logprobs_leave_out_what_the_text_does_not_show(gen):
    """The end-of-turn token ends a chat answer but not its text: no logprobs entry for it, so the
    entries' bytes rebuild the content; completions' text_offset follows the returned text."""
    from runtime.serve import Logprobs

    tok = gen.tokenizer
    ids = tok.encode("Rivers flow — to the sea") + [gen.spec.eos_token_ids[0]]
    lps = [TokenLogprob(t, -0.5, [(t, -0.5)]) for t in ids]
    chat = Logprobs(tok, chat=True)
    body = chat.add(lps[:3])
    assert [e["token"] for e in body["content"]] == [tok.token_bytes(t).decode("utf-8", "replace") for t in ids[:3]]
    assert chat.add(lps[-1:]) is None  # a chunk holding only the end-of-turn token: nothing to send
    chat.add(lps[3:-1])
    content = chat.body()["content"]
    assert bytes(b for e in content for b in e["bytes"]).decode() == tok.decode(ids) == "Rivers flow — to the sea"
    done = Logprobs(tok, chat=False)
    done.add(lps)
    shaped = done.body()
    text = tok.decode(ids)
    assert len(shaped["tokens"]) == len(ids) - 1 and shaped["text_offset"][0] == 0
    for token, at in zip(shaped["tokens"], shaped["text_offset"]):
        assert "\ufffd" in token or text[at : at + len(token)] == token, (token, at)


def test_streamed_text_decodes_a_window_and_adds_up_to_the_whole_text(gen):
    """StreamDecoder's deltas, pushed a few tokens at a time, add up to the whole answer's decode at
    every flush and never take back what they sent: words, special tokens, and characters cut into
    single bytes (emoji, CJK, euro), their bytes arriving in separate pushes; each push decodes a
    window, not the answer so far."""
    import random

    from runtime.tokenizer import StreamDecoder, _byte_alphabet

    tok = gen.tokenizer
    byte_id = {b: tok.token_id(c) for c, b in _byte_alphabet().items()}
    cut = [[byte_id[b] for b in ch.encode()] for ch in ("\u20ac", "\U0001f600", "\u4e2d", "\u00e9")]
    words = [tok.encode(w) for w in (" the", " river", "\n", " Name", "!", " 42")]
    specials = [[i] for i in sorted(tok._special_ids)[:3]]
    rng = random.Random(0)
    widest = 0
    for _ in range(200):
        ids: list[int] = []
        for _ in range(rng.randint(1, 120)):
            ids += rng.choice(words + cut + cut + specials)
        if rng.random() < 0.2:
            ids.append(byte_id[0xE2])  # an answer that ends inside a character
        stream, sent, calls = StreamDecoder(tok), "", []
        real = tok.decode
        tok.decode = lambda x, real=real, calls=calls: calls.append(len(x)) or real(x)
        try:
            i = 0
            while i < len(ids):
                n = rng.randint(1, 6)
                sent += stream.push(ids[i : i + n])
                assert real(ids[: i + n]).startswith(sent)  # nothing sent is taken back
                i += n
            sent += stream.flush()
        finally:
            tok.decode = real
        assert sent == tok.decode(ids), ids
        if len(ids) > 200:
            widest = max(widest, max(calls))
    assert 0 < widest < 60, widest  # windows, not answers of hundreds of tokens
