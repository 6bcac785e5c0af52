"""Prefix reuse: a call whose prompt begins with what the previous call left in the cache (its
prompt and answer: the next turn of a chat) keeps those entries and prefills only the rest.

Every test compares with a generator that never reuses (``reuse_prefix=False``): the tokens must
be the same, and ``stats.cached_prompt_tokens`` says how much of the prompt was not prefilled.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_batch import run_together
from test_decode import prompt_for, torch_backend

import runtime
from runtime import batch as rb
from runtime.decode import DecodeConfig, decode, prefill
from runtime.errors import MedusaError

MODES = {
    "greedy": {},
    "plain": {"medusa": False},
    "exact-sampling": {"temperature": 0.8, "seed": 5},
}


@pytest.fixture(scope="module")
def pair(tiny):
    on = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1)
    off = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1, reuse_prefix=False)
    return on, off


def first_turn(g) -> list[int]:
    return g.encode([{"role": "user", "content": "Tell me about rivers and mountains."}])


@pytest.mark.parametrize("mode", MODES)
def test_the_next_turn_reuses_the_last_prompt_and_answer_and_decodes_the_same(pair, mode):
    on, off = pair
    kw = dict(max_new_tokens=24, tree="cpu_8", **MODES[mode])
    ids = first_turn(on)
    a1 = on.generate(ids, **kw)
    assert a1.tokens == off.generate(ids, **kw).tokens
    more = on.encode("And the sea?")
    ids2 = ids + a1.tokens + more
    a2 = on.generate(ids2, **kw)
    # the cache held the prompt and the answer but its last token (a step the length trimmed may have kept it)
    done = len(ids) + len(a1.tokens)
    assert done - 1 <= a2.stats.cached_prompt_tokens <= done
    want = off.generate(ids2, **kw)
    assert want.stats.cached_prompt_tokens == 0
    assert a2.tokens == want.tokens


def test_a_prompt_that_departs_from_the_cache_keeps_only_the_common_prefix(pair):
    on, off = pair
    ids = first_turn(on)
    on.generate(ids, max_new_tokens=8)
    k = len(ids) // 2
    other = ids[:k] + [(ids[k] + 1) % on.spec.vocab_size] + ids[k + 1 :]
    got = on.generate(other, max_new_tokens=16)
    assert got.stats.cached_prompt_tokens == k
    assert got.tokens == off.generate(other, max_new_tokens=16).tokens
    # the same prompt again: everything but its last token, whose logits the prefill must compute
    again = on.generate(other, max_new_tokens=16)
    assert again.stats.cached_prompt_tokens == len(other) - 1 and again.tokens == got.tokens


def test_prompt_logprobs_score_the_whole_prompt_anew(pair):
    on, off = pair
    ids = first_turn(on)
    on.generate(ids, max_new_tokens=4)
    got = on.generate(ids, max_new_tokens=4, logprobs=0, prompt_logprobs=True)
    assert got.stats.cached_prompt_tokens == 0
    want = off.generate(ids, max_new_tokens=4, logprobs=0, prompt_logprobs=True)
    assert got.prompt_logprobs is not None and want.prompt_logprobs is not None
    assert len(got.prompt_logprobs) == len(ids) - 1
    np.testing.assert_allclose([t.logprob for t in got.prompt_logprobs], [t.logprob for t in want.prompt_logprobs],
                               atol=1e-5)  # fmt: skip


def test_a_stream_displaced_between_steps_lends_its_prefix_and_still_decodes_its_own(pair):
    on, off = pair
    ids = first_turn(on)
    solo = off.generate(ids, max_new_tokens=20, tree="cpu_8").tokens
    stream = on.stream(ids, max_new_tokens=20, tree="cpu_8")
    head = next(stream).tokens  # the prompt and the first step are in the cache now
    branch = ids + [(head[0] + 1) % on.spec.vocab_size]  # departs where the stream's answer begins
    got = on.generate(branch, max_new_tokens=12)
    assert got.stats.cached_prompt_tokens == len(ids)
    assert got.tokens == off.generate(branch, max_new_tokens=12).tokens
    rest = [t for chunk in stream for t in chunk.tokens]  # put back (its saved copy), then on to the end
    assert head + rest == solo


def test_nothing_is_reused_after_a_failed_call_or_a_backend_driven_directly(pair):
    on, off = pair
    ids = first_turn(on)
    want = off.generate(ids, max_new_tokens=16).tokens
    calls = []

    def failing(real):  # greedy calls forward_argmax (the lm_head screen), the rest forward
        def call(*a, **kw):
            calls.append(1)
            if len(calls) == 3:  # a step after the prefill
                raise MedusaError("engine call failed: injected")
            return real(*a, **kw)

        return call

    on.backend.forward = failing(on.backend.forward)
    on.backend.forward_argmax = failing(on.backend.forward_argmax)
    try:
        with pytest.raises(MedusaError, match="injected"):
            on.generate(ids, max_new_tokens=16)
    finally:
        del on.backend.forward, on.backend.forward_argmax
    after = on.generate(ids, max_new_tokens=16)
    assert after.stats.cached_prompt_tokens == 0 and after.tokens == want
    on.backend.truncate(3)  # the cache no longer has the length the last call left
    again = on.generate(ids, max_new_tokens=16)
    assert again.stats.cached_prompt_tokens == 0 and again.tokens == want
    # driven directly back to the very length the last call left, with other tokens (a scoring pass)
    n = on.backend.cache_len
    on.backend.reset()
    prefill(on.backend, [3 + i % 50 for i in range(n)], 0, want_logits=False)
    assert on.backend.cache_len == n
    third = on.generate(ids + again.tokens + [5], max_new_tokens=8)
    assert third.stats.cached_prompt_tokens == 0
    assert third.tokens == off.generate(ids + again.tokens + [5], max_new_tokens=8).tokens


def test_truncate_keeps_exactly_a_prefix_on_each_backend(tiny, tiny_portable, tiny_llama):
    """After truncate(n), the next forward computes what it computes over a fresh prefill of the
    prompt's first n tokens: on the fused and portable ONNX Runtime backends and PyTorch's."""
    backends = [
        runtime.load(tiny["artifact"], backend="onnxruntime", threads=1).backend,
        runtime.load(tiny_portable["artifact"], backend="onnxruntime", threads=1).backend,
        torch_backend(tiny_llama(0)),
    ]
    prompt = np.array(prompt_for(0, length=12))
    tail = np.array(prompt_for(1, length=3))
    for b in backends:
        assert b.keeps_prefix
        b.reset()
        prefill(b, prompt[:7], chunk=0, want_logits=False)
        want = b.forward(tail, 7 + np.arange(3), np.tril(np.ones((3, 3), bool))).copy()
        b.reset()
        prefill(b, prompt, chunk=5, want_logits=False)  # more, in other chunks, then cut back
        b.truncate(7)
        assert b.cache_len == 7
        got = b.forward(tail, 7 + np.arange(3), np.tril(np.ones((3, 3), bool)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=type(b).__name__)
        for bad in (-1, 8 + 3):
            with pytest.raises(MedusaError, match="truncate"):
                b.truncate(bad)


def test_decode_with_reuse_on_the_reference_backend_equals_a_fresh_decode(tiny_llama):
    b = torch_backend(tiny_llama(0))
    prompt = prompt_for(2, length=9)
    cfg = DecodeConfig(max_new_tokens=20, medusa=False)
    first = decode(b, prompt, cfg)
    nxt = prompt + first.tokens + prompt_for(3, length=4)
    kept = decode(b, nxt, DecodeConfig(max_new_tokens=20, medusa=False), reuse=len(prompt) + len(first.tokens) - 1)
    assert kept.stats.cached_prompt_tokens == len(prompt) + len(first.tokens) - 1
    fresh = decode(torch_backend(tiny_llama(0)), nxt, DecodeConfig(max_new_tokens=20, medusa=False))
    assert kept.tokens == fresh.tokens and fresh.stats.cached_prompt_tokens == 0


def test_reuse_prefix_is_checked(tiny):
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="reuse_prefix"):
        runtime.load(tiny["artifact"], backend="onnxruntime", threads=1, reuse_prefix="yes")


# ---------------------------------------------------------------------------- the batch engine


@pytest.fixture(scope="module")
def batched(tiny):
    g = runtime.load(tiny["artifact"], threads=1, max_batch=3, prefill_chunk=16, budgets=None)
    yield g
    g.close()


def test_batched_next_turns_take_the_slots_holding_their_chats(pair, batched):
    on, off = pair
    chats = [first_turn(on), on.encode("Write a poem about the sea.")]
    kw = dict(max_new_tokens=20, tree="cpu_8")
    firsts = run_together([lambda c=c: batched.generate(c, **kw) for c in chats])
    assert [a.tokens for a in firsts] == [off.generate(c, **kw).tokens for c in chats]
    seconds = [c + a.tokens + on.encode("Say more.") for c, a in zip(chats, firsts)]
    got = run_together([lambda c=c: batched.generate(c, **kw) for c in seconds])
    for c, a, g in zip(chats, firsts, got):
        done = len(c) + len(a.tokens)
        assert done - 1 <= g.stats.cached_prompt_tokens <= done  # its own chat's slot, not the other's
    assert [g.tokens for g in got] == [off.generate(c, **kw).tokens for c in seconds]


def test_a_free_slot_is_chosen_by_the_chat_its_prompt_continues(tiny):
    """The slot whose chat the prompt continues (its last prompt whole, or 3/4 of what it holds);
    else an empty slot; else the free slot sharing the longest prefix. Slots here hold made-up
    tokens with no cache behind them: a fresh engine, closed at the end."""
    g = runtime.load(tiny["artifact"], threads=1, max_batch=4, budgets=None)
    e = g.engine

    def hold(*chats):  # slots as finished sequences of these (prompt + answer, prompt length) leave them
        slots = [e.acquire(prompt=None) for _ in chats]
        for slot, (tokens, prompt_len) in zip(slots, chats):
            slot.length = len(tokens)
            e.release(slot, tokens, prompt_len)
        return [slot.index for slot in slots]

    try:
        sys_prompt = [5, 6, 7]
        # chat a: a 5-token prompt and a 6-token answer; chat b: 4 and 1
        chat_a, chat_b = hold((sys_prompt + [8, 9, 10, 11, 12, 13, 14, 15], 5), (sys_prompt + [20, 21], 4))
        # chat a's next turn, whose re-encoded answer departs from the tokens generated early on: its
        # last prompt comes back whole (5 of 11 shared, under 3/4): still chat a's slot
        got = e.acquire(prompt=sys_prompt + [8, 9, 99, 98, 97])
        assert got.index == chat_a and got.reusable == 5 and got.length == 11
        assert e._held[got.index] == rb.NOTHING_HELD  # taken: no longer offered
        e.release(got, None)
        # a prompt sharing only the system prompt leaves chat b's slot alone and takes an empty one
        other = e.acquire(prompt=sys_prompt + [40])
        assert other.index != chat_b and other.reusable == 0 and not e._held[other.index][1]
        e.release(other, None)
        # no slot continues it and none is empty: the one sharing the longest prefix
        slots = [e.acquire(prompt=None) for _ in range(len(e._free))]
        for slot in slots:  # chat b's slot as it was, the others sharing 2 tokens of the system prompt
            tokens = sys_prompt + [20, 21] if slot.index == chat_b else sys_prompt[:2] + [50 + slot.index, 51]
            slot.length = len(tokens)
            e.release(slot, tokens, 3)
        last = e.acquire(prompt=sys_prompt + [70])
        assert last.index == chat_b and last.reusable == 3
        e.release(last, None)
    finally:
        g.close()


def test_a_failed_batched_call_leaves_its_slot_with_nothing_to_reuse(tiny, pair):
    on, off = pair
    g = runtime.load(tiny["artifact"], threads=1, max_batch=1, budgets=None)
    try:
        ids = first_turn(on)
        want = off.generate(ids, max_new_tokens=12).tokens
        assert g.generate(ids, max_new_tokens=12).tokens == want
        real = g.engine._run_forward
        calls = []

        def failing(reqs):
            calls.append(1)
            if len(calls) == 2:
                raise MedusaError("injected")
            real(reqs)

        g.engine._run_forward = failing
        with pytest.raises(MedusaError, match="injected"):
            g.generate(ids + [3], max_new_tokens=12)
        g.engine._run_forward = real
        assert g.engine._held == [rb.NOTHING_HELD]
        after = g.generate(ids, max_new_tokens=12)
        assert after.stats.cached_prompt_tokens == 0 and after.tokens == want
    finally:
        g.close()


def test_the_bench_prefills_every_prompt_whole(tiny, shared_data, monkeypatch):
    """``medusa-run bench`` runs each prompt once per decoder (and the peer reuses nothing): its
    generator must not keep a prefix, or every decoder after the first would skip its prefill."""
    from runtime.cli import main

    seen = []
    real = runtime.load

    def spy(*a, **kw):
        g = real(*a, **kw)
        seen.append(g.reuse_prefix)
        return g

    monkeypatch.setattr(runtime, "load", spy)
    assert main(["bench", str(tiny["artifact"]), "--prompts", str(shared_data / "mt_bench_question.jsonl"),
                 "--limit", "1", "--max-new-tokens", "4", "--threads", "1", "-q"]) == 0  # fmt: skip
    assert seen == [False]


def test_chats_taking_turns_keep_their_own_slots(tiny, pair):
    """Two chats that share a system prompt, one request at a time: each next turn finds its own
    chat's slot (the other chat's request took an empty one instead of ending it)."""
    on, off = pair
    g = runtime.load(tiny["artifact"], threads=1, max_batch=3, budgets=None)
    try:
        chats = {"a": first_turn(on), "b": on.encode([{"role": "user", "content": "Write a poem about the sea."}])}
        for turn in range(3):
            for name, ids in chats.items():
                r = g.generate(ids, max_new_tokens=8)
                if turn:
                    assert r.stats.cached_prompt_tokens >= len(ids) - 8, (
                        turn,
                        name,
                    )  # its last turn's prompt and answer
                assert r.tokens == off.generate(ids, max_new_tokens=8).tokens
                chats[name] = ids + r.tokens + on.encode("More.")
    finally:
        g.close()


@pytest.mark.parametrize("medusa", [True, False], ids=["trees-fold", "plain-in-place"])
def test_a_free_slot_between_decoding_slots_keeps_its_entries_intact(tiny, pair, medusa):
    """Calls over the slots lo .. hi write throwaway rows into the free slots between them: past the
    entries a free slot keeps for its chat's next turn, never over them."""
    import threading
    import time

    on, off = pair
    g = runtime.load(tiny["artifact"], threads=1, max_batch=3, budgets=None)
    try:
        prompts = [on.encode("Hi."), on.encode("You are a helpful assistant. " * 6 + "Tell me about rivers."),
                   on.encode("Yo!")]  # fmt: skip
        lengths = (120, 2, 120)  # the middle slot's sequence ends first, its neighbours decode on
        out: dict[int, object] = {}

        def run(i):
            out[i] = g.generate(prompts[i], max_new_tokens=lengths[i], medusa=medusa)

        threads = []
        for i in range(3):  # one at a time, so that sequence i takes slot i
            free = len(g.engine._free)
            threads.append(threading.Thread(target=run, args=(i,)))
            threads[-1].start()
            deadline = time.time() + 30
            while len(g.engine._free) == free and time.time() < deadline:
                time.sleep(0.001)
        for t in threads:
            t.join(120)
        middle = out[1]
        assert g.engine._held[1][1] >= len(prompts[1])  # slot 1 kept its chat
        nxt = prompts[1] + middle.tokens + on.encode("And the sea?")
        got = g.generate(nxt, max_new_tokens=16, logprobs=0)
        assert got.stats.cached_prompt_tokens >= len(prompts[1])
        want = off.generate(nxt, max_new_tokens=16, logprobs=0)
        assert got.tokens == want.tokens
        # the log-probabilities too: one overwritten entry need not change a greedy token of the tiny model
        assert [t.logprob for t in got.logprobs] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-3)
    finally:
        g.close()
