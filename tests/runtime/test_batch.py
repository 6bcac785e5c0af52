"""Batched decoding (runtime/batch.py): several sequences' steps in one ``batch.onnx`` call.

Every sequence must emit exactly what it emits alone on the one-sequence graph (greedy Medusa
with trees and lookup, plain decoding, a long prompt chunked between the others' steps,
sequences that join and leave, a cache that grows), the engine must really batch, the load's
budgets must turn trees into plain steps without changing the output, and a closed engine or an
artifact without a batch graph must say so.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import runtime
import runtime.backend
from runtime import batch as rb
from runtime.errors import ArtifactError, MedusaError

PROMPTS = [
    [{"role": "user", "content": "Tell me about rivers and mountains."}],
    [{"role": "user", "content": "Write a poem about the sea."}],
    "Once upon a time",
    # longer than max_rows and prefill_chunk below: its prompt runs in chunks between the others' steps
    " ".join(f"word{i}" for i in range(40)),
]


@pytest.fixture(scope="module")
def batched(tiny):
    gen = runtime.load(tiny["artifact"], threads=1, max_batch=4, prefill_chunk=16, budgets=None)
    yield gen
    gen.close()


def run_together(calls):
    """Run each zero-argument callable in its own thread at once; their results in order."""
    out: dict[int, object] = {}
    errors: list[BaseException] = []

    def go(i, fn):
        try:
            out[i] = fn()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return [out[i] for i in range(len(calls))]


def assert_same_result(r, w) -> None:
    """Two engine calls' results for one sequence agree: logits, hidden states, the new K/V."""
    for got, want in zip(r.result, w.result):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def engine_stats(gen) -> dict:
    return dict(gen.engine.stats)


@pytest.mark.parametrize("tree", ["smollm2_ort_cpu", "chain_3", "cpu_8"])
def test_batched_greedy_equals_each_sequence_alone(gen, batched, tree):
    """Medusa (tree + lookup) and plain requests decoded at once equal the one-sequence graph."""
    want = [gen.generate(p, max_new_tokens=40, tree=tree).tokens for p in PROMPTS]
    want_plain = gen.generate(PROMPTS[0], max_new_tokens=40, medusa=False).tokens
    before = engine_stats(batched)
    calls = [lambda p=p: batched.generate(p, max_new_tokens=40, tree=tree) for p in PROMPTS]
    calls.append(lambda: batched.generate(PROMPTS[0], max_new_tokens=40, medusa=False))
    with pytest.raises(MedusaError):  # 5 calls on 4 slots: the fifth waits; acquire with a timeout says so
        slots = [batched.engine.acquire() for _ in range(4)]
        try:
            batched.engine.acquire(timeout=0.1)
        finally:
            for s in slots:
                batched.engine.release(s)
    got = run_together(calls)
    assert [g.tokens for g in got[:4]] == want
    assert got[4].tokens == want_plain == want[0]  # greedy Medusa is lossless against plain decoding
    assert any(g.stats.mean_accepted > 1 for g in got[:4])  # the trees did accept tokens
    after = engine_stats(batched)
    calls_made = after["calls"] - before["calls"]
    assert after["sequences"] - before["sequences"] > 1.5 * calls_made  # steps really ran together


def test_streams_join_and_leave_between_steps(gen, batched):
    """Two long streams run; two short requests join mid-way and leave first: all exact."""
    want_long = [gen.generate(p, max_new_tokens=60).tokens for p in PROMPTS[:2]]
    want_short = [gen.generate(p, max_new_tokens=8).tokens for p in PROMPTS[2:]]
    started = threading.Event()

    def long(p):
        tokens = []
        for i, chunk in enumerate(batched.stream(p, max_new_tokens=60)):
            tokens.extend(chunk.tokens)
            if i == 3:
                started.set()
        return tokens

    def short(p):
        assert started.wait(60)
        return batched.generate(p, max_new_tokens=8).tokens

    got = run_together([lambda: long(PROMPTS[0]), lambda: long(PROMPTS[1]),
                        lambda: short(PROMPTS[2]), lambda: short(PROMPTS[3])])  # fmt: skip
    assert got == [*want_long, *want_short]


def test_sampled_requests_beside_others(batched):
    """Exact and typical sampling with seeds, beside a greedy request: the greedy one is exact; a
    seeded one reproduces its tokens alone (beside others its draws may differ where the batched
    call's rounding moves a near-tie of the noisy argmax: runtime/batch.py)."""
    asks = [dict(temperature=0.8, seed=1), dict(temperature=1.0, seed=2, acceptance="typical"), dict(temperature=0)]
    alone = [batched.generate(PROMPTS[i], max_new_tokens=24, **a).tokens for i, a in enumerate(asks)]
    assert [batched.generate(PROMPTS[i], max_new_tokens=24, **a).tokens for i, a in enumerate(asks)] == alone
    together = run_together([lambda i=i, a=a: batched.generate(PROMPTS[i], max_new_tokens=24, **a)
                             for i, a in enumerate(asks)])  # fmt: skip
    assert together[2].tokens == alone[2]
    assert all(0 < len(r.tokens) <= 24 for r in together)
    other_seed = batched.generate(PROMPTS[0], max_new_tokens=24, temperature=0.8, seed=99).tokens
    assert other_seed != alone[0]
    # coupled sampling (the default): plain sampling through the same engine draws the same tokens
    assert batched.generate(PROMPTS[0], max_new_tokens=24, temperature=0.8, seed=1, medusa=False).tokens == alone[0]


@pytest.mark.parametrize("unsettled", ["none", "every third"])
def test_the_engine_draws_greedy_and_coupled_tokens_through_the_screen(gen, tiny, monkeypatch, unsettled):
    """Calls on model.onnx whose sequences all read drawn tokens alone (greedy; coupled sampling,
    its noise in its rows) run through the lm_head screen: greedy sequences decoded at once (their
    single-sequence calls screened, their tree steps of several on fold.onnx drawn from float
    logits) and sampled ones (plain and Medusa) give the one-sequence backend's tokens; where the
    screen leaves a row open the engine runs the call again with float logits; a float call after
    screened ones screens nothing (the screen's inputs are bound back to their defaults); noise of
    the wrong shape is refused."""
    import runtime.onnxrt as ro

    asks = [dict(temperature=0.8, seed=3), dict(temperature=0.8, seed=3, medusa=False), dict(temperature=1.2, seed=4)]
    want_greedy = [gen.generate(p, max_new_tokens=24).tokens for p in PROMPTS[:3]]
    want_sampled = [gen.generate(PROMPTS[1], max_new_tokens=24, **a).tokens for a in asks]
    assert want_sampled[0] == want_sampled[1] != want_sampled[2]
    # the tiny random model's logits are small and often near-tied: without the tie rule (tested on its own
    # below) only the rows this test opens fall back
    monkeypatch.setattr(ro, "SCREEN_TIE", np.float32(0))
    if unsettled != "none":
        real, seen = ro.screen_draws, []

        def open_rows(*args, **kw):
            out = real(*args, **kw)
            seen.append(1)
            return out if len(seen) % 3 else np.full_like(out, -1)

        monkeypatch.setattr(ro, "screen_draws", open_rows)
    g = runtime.load(tiny["artifact"], threads=1, max_batch=3, budgets=None)
    try:
        e = g.engine
        assert e.screens and e.screens_noise
        got = run_together([lambda p=p: g.generate(p, max_new_tokens=24) for p in PROMPTS[:3]])
        assert [r.tokens for r in got] == want_greedy
        assert [g.generate(PROMPTS[1], max_new_tokens=24, **a).tokens for a in asks] == want_sampled
        assert e.stats["screened_calls"] > 0
        assert (e.stats["screen_fallbacks"] > 0) == (unsettled != "none")
        # a call that wants float logits after screened ones: the screen's inputs are bound back to their defaults
        calls = []
        real_call = e._call_in_place
        monkeypatch.setattr(e, "_call_in_place", lambda *a: calls.append(real_call(*a)) or calls[-1])
        slot = e.acquire()
        try:
            slot.reset()
            n = 4
            mask = np.tril(np.ones((n, n), bool))
            best = slot.forward_argmax(np.arange(n), np.arange(n), mask)
            assert calls[0][2][0].shape == (1, n, 32)  # screened: every row (then a float rerun where one is open)
            out = slot.forward(np.arange(n), np.arange(n), mask)
            assert out.shape == (n, e.spec.vocab_size)
            assert calls[-1][2][0].shape[1] == 0  # nothing screened (a stale num_screened would screen n rows)
            np.testing.assert_array_equal(best, out.argmax(1))
            with pytest.raises(MedusaError, match="noise of shape"):
                slot.forward_argmax(np.arange(n), np.arange(n), mask, noise=np.zeros((n - 1, e.spec.vocab_size)))
        finally:
            e.release(slot)
    finally:
        g.close()


@pytest.mark.parametrize("temperature", [0.5, 5.0])
def test_the_engines_screened_draws_are_the_float_draws(tiny, temperature, monkeypatch):
    """One engine call of several rows with coupled sampling's noise (a hot temperature: the noise
    decides the candidates) draws, row by row, the float logits' ``argmax(logit / T + g)``, and the
    screen's bound is above every other token's ``logit + T g`` (the noise reached the graph scaled)."""
    import runtime.onnxrt as ro
    from runtime.backend import draw_argmax

    seen = []
    real = ro.screen_draws
    monkeypatch.setattr(ro, "screen_draws", lambda *a: seen.append([np.array(x) for x in a[:3]]) or real(*a))
    g = runtime.load(tiny["artifact"], threads=1, max_batch=2, budgets=None)
    e = g.engine
    rng = np.random.default_rng(11)
    V = e.spec.vocab_size
    try:
        for trial in range(6):
            n = 10 + trial
            ids, pos, mask = rng.integers(0, V, n), np.arange(n), np.tril(np.ones((n, n), bool))
            noise = -np.log(rng.standard_exponential((n, V))).astype(np.float32)
            drawn = rb._Request(0, "forward", ids=ids, pos=pos, mask=mask)
            drawn.draw = (noise, temperature, None)
            e._run_forward([drawn])
            float_call = rb._Request(0, "forward", ids=ids, pos=pos, mask=mask)
            e._run_forward([float_call])
            np.testing.assert_array_equal(drawn.result[0], draw_argmax(float_call.result[0], noise, temperature))
            cand, _, bound = seen[-1]
            others = float_call.result[0] + np.float32(temperature) * noise
            np.put_along_axis(others, cand, -np.inf, 1)
            assert (others.max(1) <= bound).all()
        assert e.stats["screened_calls"] == 6
    finally:
        g.close()


def test_the_cache_grows_by_doubling_and_shrinks_when_idle(tiny, gen, monkeypatch):
    monkeypatch.setattr(rb, "MIN_CAPACITY", 16)
    monkeypatch.setattr(runtime.backend, "KEEP_CAPACITY", 32)  # below what the sequences grow it to
    g = runtime.load(tiny["artifact"], threads=1, max_batch=2, budgets=None)
    try:
        assert g.engine.capacity == 16
        seen = []
        orig = g.engine._run_forward

        def spy(reqs):
            seen.append(g.engine.capacity)
            orig(reqs)

        g.engine._run_forward = spy
        want = [gen.generate(p, max_new_tokens=70).tokens for p in PROMPTS[:2]]
        got = run_together([lambda p=p: g.generate(p, max_new_tokens=70).tokens for p in PROMPTS[:2]])
        assert got == want
        assert max(seen) >= 64 and set(seen) <= {16, 32, 64, 128, 256}  # doubled as the sequences grew
        assert g.engine.capacity == 16  # every slot free: back to the start
        monkeypatch.setattr(runtime.backend, "KEEP_CAPACITY", 256)  # now above it: kept for the next answers
        got = run_together([lambda p=p: g.generate(p, max_new_tokens=70).tokens for p in PROMPTS[:2]])
        assert got == want and g.engine.capacity == max(seen) >= 64
    finally:
        g.close()


def test_budgets_turn_trees_into_plain_steps_without_changing_tokens(tiny, gen):
    """A budget of 1 token a step (the load's choice when speculation no longer pays): every step
    is plain, the heads are never called after the prefill, and the tokens do not change."""
    g = runtime.load(tiny["artifact"], threads=1, max_batch=2, budgets=[1])
    try:
        alone = [gen.generate(p, max_new_tokens=30) for p in PROMPTS[:2]]
        assert any(r.stats.mean_accepted > 1 for r in alone)  # without the budget, the trees accept tokens
        got = run_together([lambda p=p: g.generate(p, max_new_tokens=30) for p in PROMPTS[:2]])
        assert [r.tokens for r in got] == [r.tokens for r in alone]
        assert all(r.stats.mean_accepted == 1.0 for r in got)
        st = g.engine.stats
        assert st["heads_calls"] <= 2  # the prefills' (lazy heads: none after plain steps)
    finally:
        g.close()


def test_plain_steps_of_several_sequences_run_in_place_on_the_one_sequence_graph(tiny):
    """One-token steps of several sequences run as one model.onnx call over their slots of the
    cache (GroupQueryAttention, in place): the same logits, hidden states and new K/V as batch.onnx,
    written at each slot's own length; a slot in the range that is not in the call keeps its
    entries; a step on an empty cache or with more tokens goes to batch.onnx."""
    g = runtime.load(tiny["artifact"], threads=1, max_batch=3, budgets=None)
    e = g.engine
    try:
        slots = [e.acquire() for _ in range(3)]
        rng = np.random.default_rng(0)
        V = e.spec.vocab_size
        for s, n in zip(slots, (5, 9, 7)):  # prefills, one sequence a call
            s.forward(rng.integers(0, V, n), np.arange(n), np.tril(np.ones((n, n), bool)))
            s.commit(np.arange(n))
        e._apply(e._commits)
        e._commits.clear()
        middle = e.kv[:, :, 1].copy()

        def step(slot: int, token: int):
            return rb._Request(slot, "forward", ids=np.array([token]), pos=np.array([e._len[slot]]),
                               mask=np.ones((1, 1), bool))  # fmt: skip

        assert e._plain_lengths([step(0, 3), step(2, 4)]).tolist() == [e._len[0], e._len[1], e._len[2]]
        assert None is e._plain_lengths([step(0, 3), rb._Request(2, "forward", ids=np.array([4, 5]),
                                  pos=np.array([7, 8]), mask=np.tril(np.ones((2, 2), bool)))])  # fmt: skip
        e._len[1], saved = 0, e._len[1]
        assert (
            e._plain_lengths([step(1, 3), step(2, 4)]) is None
        )  # an empty cache: GroupQueryAttention's first-prompt path
        e._len[1] = saved
        ref = [step(0, 3), step(2, 4)]
        e._run_batch(ref)  # batch.onnx: writes nothing into the cache
        got = [step(0, 3), step(2, 4)]
        e._run_forward(got)
        assert ("single", 0, 3) in e._bindings
        for r, w in zip(got, ref):
            assert_same_result(r, w)
            np.testing.assert_array_equal(e.kv[:, :, r.slot, :, e._len[r.slot]], r.result[2][:, :, :, 0])
        # slot 1 sat in the call's range: its cached entries are untouched (a throwaway row at its length)
        np.testing.assert_array_equal(e.kv[:, :, 1, :, : e._len[1]], middle[:, :, :, : e._len[1]])
        for s in slots:
            e.release(s)
    finally:
        g.close()


def test_slots_between_plain_steps_never_break_the_call(tiny, monkeypatch):
    """A held slot between two sequences' plain steps whose cache fills the buffer sends the call
    to batch.onnx (no throwaway entry past the buffer); a free one that keeps nothing (released
    without tokens), whatever length it last had, takes its throwaway entry at 0 (one that keeps
    entries for prefix reuse takes it past them: tests/runtime/test_prefix_reuse.py); with every slot free and the buffer past what an idle engine
    keeps, the lengths go to 0 with the shrunk buffer, so growing again copies nothing from outside
    it. (fold.onnx off: it would take the call and grow the buffer; see the folded-graph test below.)"""
    monkeypatch.setattr(rb, "MIN_CAPACITY", 16)
    monkeypatch.setattr(runtime.backend, "KEEP_CAPACITY", 16)  # every slot free: back to 16
    monkeypatch.setattr(rb, "FOLD_STEPS", False)
    g = runtime.load(tiny["artifact"], threads=1, max_batch=3, budgets=None)
    e = g.engine
    try:
        slots = [e.acquire() for _ in range(3)]
        rng = np.random.default_rng(1)
        for s, n in zip(slots, (5, 16, 7)):  # slot 1 fills the 16-position buffer exactly
            s.forward(rng.integers(0, e.spec.vocab_size, n), np.arange(n), np.tril(np.ones((n, n), bool)))
            s.commit(np.arange(n))
        e._apply(e._commits)
        e._commits.clear()
        assert e.capacity == 16 and e._len == [5, 16, 7]
        held = e.kv[:, :, 1].copy()

        def steps():
            return [rb._Request(i, "forward", ids=np.array([3]), pos=np.array([e._len[i]]), mask=np.ones((1, 1), bool))
                    for i in (0, 2)]  # fmt: skip

        assert e._plain_lengths(steps()) is None  # held and full: batch.onnx
        reqs = steps()
        e._run_forward(reqs)  # runs, on batch.onnx
        assert ("single", 0, 3) not in e._bindings and all(r.result is not None for r in reqs)
        np.testing.assert_array_equal(e.kv[:, :, 1], held)
        e.release(slots[1])  # free now, its length left as it was
        assert e._plain_lengths(steps()).tolist() == [5, 0, 7]
        e._run_forward(steps())
        assert ("single", 0, 3) in e._bindings
        e._ensure_capacity(32)  # past KEEP_CAPACITY: given back when every slot is free
        for s in (slots[0], slots[2]):
            e.release(s)
        assert e.capacity == 16 and e._len == [0, 0, 0]  # every slot free: shrunk, nothing held
        e._ensure_capacity(40)  # grows without copying stale lengths
        assert e.capacity == 64
    finally:
        g.close()


def test_trees_of_several_sequences_run_in_place_on_the_folded_graph(tiny, monkeypatch):
    """Steps with trees of 2 .. fold_max sequences run as one fold.onnx call over their slots of
    the cache (GroupQueryAttention in place, the slots as one sequence): the same logits, hidden
    states and new K/V as batch.onnx, every sequence's new entries written at the longest cache
    length of the call's range; a held slot in the range that is not in the call keeps its
    entries; more slots than the graph branches over, a step past the context at that length, or
    FOLD_STEPS off go to batch.onnx."""
    from exporter.fused import FOLD_MAX_BATCH

    g = runtime.load(tiny["artifact"], threads=1, max_batch=FOLD_MAX_BATCH + 1, budgets=None)
    e = g.engine
    try:
        assert e.fold is not None and e.fold_max == e.config.fold_max_batch == FOLD_MAX_BATCH
        slots = [e.acquire() for _ in range(FOLD_MAX_BATCH + 1)]
        rng = np.random.default_rng(2)
        V = e.spec.vocab_size
        for s, n in zip(slots, (5, 11, 7, 3, 4, 6, 2, 8, 9)):  # prefills, one sequence a call
            s.forward(rng.integers(0, V, n), np.arange(n), np.tril(np.ones((n, n), bool)))
            s.commit(np.arange(n))
        e._apply(e._commits)
        e._commits.clear()
        held = e.kv[:, :, 1, :, : e._len[1]].copy()
        tree = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool)

        def steps(*slots_rows):
            out = []
            for slot, n in slots_rows:
                depth = tree[:n, :n].sum(1) - 1
                out.append(rb._Request(slot, "forward", ids=rng.integers(0, V, n), pos=e._len[slot] + depth,
                                       mask=tree[:n, :n]))  # fmt: skip
            return out

        got = steps((0, 4), (2, 3))  # slot 1 (held, 11 entries) lies between them
        ref = [rb._Request(r.slot, "forward", ids=r.ids, pos=r.pos, mask=r.mask) for r in got]
        assert e._fold_lengths(got).tolist() == [5, 11, 7]
        e._run_batch(ref)  # batch.onnx: writes nothing into the cache
        e._run_forward(got)
        assert ("fold", 0, 3) in e._bindings
        for r, w in zip(got, ref):
            assert_same_result(r, w)
            # written in place at the range's longest length (11), whence they were staged
            np.testing.assert_array_equal(e.kv[:, :, r.slot, :, 11 : 11 + r.rows], r.result[2])
        np.testing.assert_array_equal(e.kv[:, :, 1, :, : e._len[1]], held)
        last = FOLD_MAX_BATCH
        assert e._fold_lengths(steps((0, 2), (last - 1, 2))) is not None  # as many slots as the graph takes
        assert e._fold_lengths(steps((0, 2), (last, 2))) is None  # one more: batch.onnx
        e.max_context, saved = 13, e.max_context
        assert e._fold_lengths(steps((0, 2), (2, 3))) is None  # 11 + 3 rows > 13: past the context
        e.max_context = saved
        monkeypatch.setattr(rb, "FOLD_STEPS", False)
        assert e._fold_lengths(steps((0, 2), (2, 3))) is None
        for s in slots:
            e.release(s)
    finally:
        g.close()


def test_choose_budget_follows_the_load():
    # seconds per call: rows are nearly free for one sequence, expensive for eight
    costs = {(1, 1): 0.016, (1, 3): 0.017, (1, 6): 0.019, (8, 1): 0.025, (8, 3): 0.040, (8, 6): 0.060}
    steps = [(3, 1)] * 20 + [(3, 2)] * 10 + [(6, 3)] * 6 + [(6, 1)] * 4  # tree steps, some with lookup drafts
    assert rb.choose_budget(1, costs, steps[:10]) is None  # before WARMUP_STEPS: no limit
    assert rb.choose_budget(1, costs, steps) == 6  # alone: the tree and its lookup drafts
    assert rb.choose_budget(8, costs, steps) == 1  # eight decoding: plain steps pay more
    assert rb.choose_budget(4, costs, steps) == 1  # between profiled sizes: the next larger one's costs
    cheap = {k: (0.025 if k[1] == 1 else 0.026) for k in costs}  # if rows were free at 8 too
    assert rb.choose_budget(8, cheap, steps) == 6
    assert rb.choose_budget(1, {}, steps) is None  # no profile: no limit
    assert rb.choose_budget(1, costs, [(1, 1)] * 40) is None  # plain steps only: nothing to weigh


def test_auto_budgets_profile_the_graph_at_load(tiny):
    g = runtime.load(tiny["artifact"], threads=1, max_batch=2)  # budgets="auto"
    try:
        costs = g.engine.costs
        assert {b for b, _ in costs} == {1, 2} and {n for _, n in costs} == set(rb.PROFILE_ROWS)
        assert all(t > 0 for t in costs.values())
        assert g.engine.stats["calls"] == 0  # the profile's calls are not counted as serving
        assert g.engine.budget() == g.engine.max_context  # nothing seen yet: no limit
        g.generate(PROMPTS[0], max_new_tokens=8)
    finally:
        g.close()


def test_exploring_steps_are_rarer_where_plain_steps_are_chosen(tiny):
    """An unlimited step pads its whole call to its tree: where the budget for the load is plain
    it comes PLAIN_EXPLORE times less often than where a tree is chosen; alone, every step is
    unlimited."""
    g = runtime.load(tiny["artifact"], threads=1, max_batch=2)
    e = g.engine
    slots = [e.acquire(), e.acquire()]
    try:
        period = rb.EXPLORE_EVERY * rb.PLAIN_EXPLORE

        def unlimited(budget: int) -> int:
            e._budget_cache[2] = (budget, time.monotonic() + 3600)  # chosen, and not refreshed meanwhile
            n = 0
            for i in range(period):
                e._explore = i
                n += e.budget() == e.max_context
            return n

        assert unlimited(1) == 1
        assert unlimited(3) == rb.PLAIN_EXPLORE
        e.release(slots.pop())
        assert e.budget() == e.max_context  # alone
    finally:
        for s in slots:
            e.release(s)
        g.close()


def test_no_unlimited_steps_above_a_light_load(tiny):
    """Above EXPLORE_MAX_BUSY decoding sequences an unlimited step (it pads the whole call to its
    tree) never runs: before there is anything to weigh the budget is plain there (trees at a
    light load: the warm-up), and no step explores."""
    g = runtime.load(tiny["artifact"], threads=1, max_batch=rb.EXPLORE_MAX_BUSY + 1)
    e = g.engine
    slots = [e.acquire() for _ in range(rb.EXPLORE_MAX_BUSY + 1)]
    try:
        assert not e._steps  # nothing weighed yet
        assert e.budget() == 1  # the warm-up waits for a lighter load
        e._budget_cache[len(slots)] = (3, time.monotonic() + 3600)  # a tree budget chosen for this load
        for i in range(rb.EXPLORE_EVERY * rb.PLAIN_EXPLORE):
            e._explore = i
            assert e.budget() == 3  # never unlimited
        e.release(slots.pop())
        e._budget_cache.clear()
        assert e.budget() == e.max_context  # a light load, nothing weighed: the warm-up's trees
    finally:
        for s in slots:
            e.release(s)
        g.close()


def test_observed_costs_are_clipped_and_skip_calls_that_grew_the_cache(tiny, monkeypatch):
    monkeypatch.setattr(rb, "MIN_CAPACITY", 16)
    monkeypatch.setattr(runtime.backend, "KEEP_CAPACITY", 16)  # the profile's growth given back
    g = runtime.load(tiny["artifact"], threads=1, max_batch=2)
    e = g.engine
    try:
        cell = (2, 1)
        was = e.costs[cell]
        e._observe_cost(2, 1, 100 * was)  # one call stalled by another process
        assert e.costs[cell] == pytest.approx((1 - rb.COST_EMA) * was + rb.COST_EMA * rb.COST_CLIP * was)
        c = e.costs[cell]
        e._observe_cost(2, 1, 0.0)
        assert e.costs[cell] == pytest.approx((1 - rb.COST_EMA) * c + rb.COST_EMA * c / rb.COST_CLIP)
        observed, calls = [], []
        orig_observe, orig_forward = e._observe_cost, e._run_forward
        monkeypatch.setattr(e, "_observe_cost", lambda *a: observed.append(a) or orig_observe(*a))

        def forward(reqs):
            before, n = e.capacity, len(observed)
            orig_forward(reqs)
            calls.append((before != e.capacity, len(observed) - n, all(r.logits is None for r in reqs)))

        monkeypatch.setattr(e, "_run_forward", forward)
        g.generate(PROMPTS[0], max_new_tokens=40)  # 16 -> 32 -> 64 cache positions
        grew = [c for c in calls if c[0] and c[2]]
        assert grew and all(n == 0 for _, n, _ in grew)  # the step calls that grew the cache: not observed
        assert sum(n for g_, n, step in calls if not g_ and step) == len([c for c in calls if not c[0] and c[2]])
    finally:
        g.close()


def test_a_closed_engine_refuses_calls(tiny):
    g = runtime.load(tiny["artifact"], threads=1, max_batch=1, budgets=None)
    g.close()
    with pytest.raises(MedusaError, match="closed"):
        g.generate(PROMPTS[0], max_new_tokens=4)


def test_the_slot_backend_checks_its_inputs(batched):
    slot = batched.engine.acquire()
    try:
        with pytest.raises(MedusaError, match="diagonal"):
            slot.forward(np.array([1, 2]), np.array([0, 1]), np.zeros((2, 2), bool))
        with pytest.raises(RuntimeError, match="commit"):
            slot.commit([0])
    finally:
        batched.engine.release(slot)


def test_an_artifact_without_a_batch_graph(tiny, tmp_path):
    """load(max_batch=...) names the missing batch.onnx; the server falls back to interleaving."""
    from transformers import AutoTokenizer

    from exporter.export import ExportOptions, export_artifact
    from runtime.serve import load_for_serving

    out = tmp_path / "no_batch"
    export_artifact(tiny["model"], tiny["heads"], out, ExportOptions(validate=False, batch_graph=False),
                    tokenizer=AutoTokenizer.from_pretrained(str(tiny["artifact"])))  # fmt: skip
    assert not (out / "batch.onnx").exists()
    with pytest.raises(ArtifactError, match="no batch graph"):
        runtime.load(out, max_batch=2)
    served = load_for_serving(out, 2, "auto", threads=1)
    assert getattr(served, "engine", None) is None and served.backend_name == "onnxruntime"
    with pytest.raises(MedusaError, match="--batching interleave"):
        load_for_serving(out, 2, "batch", threads=1)
    with_batch = load_for_serving(tiny["artifact"], 2, "auto", threads=1)
    try:
        assert with_batch.backend_name == "onnxruntime-batch"
    finally:
        with_batch.close()


def test_a_straggler_does_not_stall_the_others_forever(tiny, gen):
    """A stream whose consumer stops reading holds its slot but not the others' steps."""
    g = runtime.load(tiny["artifact"], threads=1, max_batch=2, budgets=None)
    try:
        idle = g.stream(PROMPTS[0], max_new_tokens=50)
        next(idle)  # one chunk, then the consumer goes quiet
        t = time.perf_counter()
        out = g.generate(PROMPTS[1], max_new_tokens=30).tokens
        assert out == gen.generate(PROMPTS[1], max_new_tokens=30).tokens
        assert time.perf_counter() - t < 30
        idle.close()
    finally:
        g.close()


def test_a_newcomers_prompt_chunks_take_turns_with_the_running_steps(tiny, gen):
    """While one sequence decodes, a newcomer's long prompt is prefilled a chunk per engine round,
    taking turns with the running sequence's steps: it is neither starved by them nor run whole."""
    g = runtime.load(tiny["artifact"], threads=1, max_batch=2, prefill_chunk=32, budgets=None)
    calls: list[tuple[int, ...]] = []
    orig = g.engine._run_forward

    def spy(reqs):
        calls.append(tuple(r.slot for r in reqs))
        orig(reqs)

    g.engine._run_forward = spy
    long_prompt = " ".join(f"word{i}" for i in range(40))
    n_prompt = len(g.encode(long_prompt))
    started = threading.Event()

    def first():
        out = []
        for i, chunk in enumerate(g.stream(PROMPTS[0], max_new_tokens=80)):
            out.extend(chunk.tokens)
            if i == 2:
                started.set()
        return out

    def newcomer():
        assert started.wait(60)
        return g.generate(long_prompt, max_new_tokens=8).tokens

    try:
        got = run_together([first, newcomer])
        assert got == [
            gen.generate(PROMPTS[0], max_new_tokens=80).tokens,
            gen.generate(long_prompt, max_new_tokens=8).tokens,
        ]
        full = n_prompt // 32  # full chunks run alone (more rows than max_rows); a short last one joins a step
        chunks = [i for i, c in enumerate(calls) if c == (1,)][:full]
        assert len(chunks) == full >= 3
        between = [calls[a + 1 : b] for a, b in zip(chunks, chunks[1:])]
        assert all(len(x) <= 1 for x in between), calls  # one step of the other sequence between two chunks, at most
    finally:
        g.close()


def test_take_alternates_steps_and_prompt_chunks(batched):
    """The scheduling rule itself: with a step and a prompt chunk both waiting round after round,
    the engine's rounds alternate between them (the chunk is never starved by steps)."""
    eng = batched.engine
    step = lambda: rb._Request(0, "forward", ids=np.zeros(3, np.int64), pos=np.arange(3), mask=np.eye(3, dtype=bool))
    chunk = rb._Request(1, "forward", ids=np.zeros(40, np.int64), pos=np.arange(40), mask=np.eye(40, dtype=bool))
    taken = []
    with eng._cond:
        saved = dict(eng._pending), set(eng._computing), eng._chunk_turn
        try:
            eng._pending.clear()
            eng._computing.clear()
            eng._chunk_turn = False
            for _ in range(4):
                eng._pending.setdefault(0, step())
                eng._pending.setdefault(1, chunk)
                taken.append(tuple(r.rows for r in eng._take()))
        finally:
            eng._pending.clear()
            eng._pending.update(saved[0])
            eng._computing |= saved[1]
            eng._chunk_turn = saved[2]
    assert taken == [(3,), (40,), (3,), (40,)]


def test_random_prompts_eight_at_once_equal_each_alone(gen, tiny):
    """Eight calls at once on 8 slots (2 threads), random token prompts of 2-69 tokens (chunked past
    16), fixed trees, the artifact's tree and plain decoding, greedy and coupled sampling: each
    sequence's tokens equal its decode alone on the one-sequence graph."""
    engine = runtime.load(tiny["artifact"], threads=2, max_batch=8, prefill_chunk=16, reuse_prefix=False)
    rng = np.random.default_rng(7)
    trees = [None, "chain_3", "cpu_8", None, "chain_1", None, "cpu_8", None]
    try:
        for rnd in range(6):
            sampling = {"temperature": 0.8} if rnd % 2 else {}
            prompts = [[int(x) for x in rng.integers(3, 128, rng.integers(2, 70))] for _ in trees]
            medusa = [i != 3 + rnd % 3 for i in range(len(trees))]  # one plain request a round
            kw = [dict(max_new_tokens=48, tree=t, medusa=m, seed=len(p), **sampling)
                  for p, t, m in zip(prompts, trees, medusa)]  # fmt: skip
            got = run_together([lambda p=p, k=k: engine.generate(p, **k).tokens for p, k in zip(prompts, kw)])
            assert got == [gen.generate(p, **k).tokens for p, k in zip(prompts, kw)], rnd
    finally:
        engine.close()


def test_a_stream_the_cycle_collector_frees_inside_acquire_is_released_after_it(tiny, gen, monkeypatch):
    """A stream nobody closed is released by its finalizer, which Python's cycle collector runs at
    any allocation of any thread: here inside ``acquire`` -> ``_choose_slot`` (which holds the
    re-entrant lock and walks the free slots). The release waits for the section's end, so the
    newcomer continuing a finished chat still takes that chat's slot and keeps its entries, and
    answers as the one-sequence generator does (before, it took the freed stream's slot and decoded
    over that stream's entries)."""
    import gc

    g = runtime.load(tiny["artifact"], threads=1, max_batch=3, budgets=None)
    gc.disable()
    try:
        s = g.stream([5, 6, 7], max_new_tokens=60, medusa=False)
        it = iter(s)
        for _ in range(30):  # slot 0: 33 entries, then left in a reference cycle
            next(it)
        prompt = list(range(10, 50))
        a = g.generate(prompt, max_new_tokens=8)  # slot 1 keeps its prompt and answer
        box: list = [s, it]
        box.append(box)
        del s, it, box
        fired: list[int] = []
        common_prefix = rb.common_prefix

        def collecting(x, y):  # the automatic collection, had it crossed its threshold here
            if not fired:
                fired.append(gc.collect())
            return common_prefix(x, y)

        monkeypatch.setattr(rb, "common_prefix", collecting)
        follow = prompt + a.tokens + [60, 61]
        got = g.generate(follow, max_new_tokens=10)
        assert fired and fired[0] > 0  # the collector freed the stream there
        assert got.tokens == gen.generate(follow, max_new_tokens=10).tokens
        assert got.stats.cached_prompt_tokens >= len(prompt)  # the chat's slot, its entries kept
        assert sorted(g.engine._free) == [0, 1, 2] and not g.engine._released
    finally:
        gc.enable()
        g.close()


def test_int8_heads_draft_each_sequence_as_if_alone(tiny):
    """int8 heads quantize their input with one scale a call: the engine runs them a sequence at a
    time, so one sequence's head logits (its drafts) do not depend on the others in the step."""
    g = runtime.load(tiny["artifact"], threads=1, max_batch=3, budgets=None)
    try:
        engine = g.engine
        assert engine.heads_quantized  # the default: int8 heads on the CPU
        rng = np.random.default_rng(0)
        hidden = rng.standard_normal((3, engine.spec.hidden_size)).astype(np.float32)
        hidden[2] *= 40  # a sequence whose hidden state has a much larger range

        def heads(rows):
            reqs = [rb._Request(i, "heads", hidden=hidden[i]) for i in rows]
            engine._run_heads(reqs)
            return [r.result for r in reqs]

        alone = [heads([i])[0] for i in range(3)]
        together = heads([0, 1, 2])
        for a, b in zip(alone, together):
            np.testing.assert_array_equal(a, b)
    finally:
        g.close()


@pytest.mark.parametrize(
    "budgets, words",
    [("x", "budgets must be 'auto'"), (4, "got 4"), ([], "at least one token budget"), ([2, 0], "budgets must be")],
)
def test_bad_budgets_are_one_error_naming_what_is_taken_before_the_load(tiny, monkeypatch, budgets, words):
    """budgets='x' was read as the list ['x'] ("must be an integer"), budgets=4 raised TypeError, and both
    only after the artifact's sessions had loaded."""
    monkeypatch.setattr(rb.BatchEngine, "__init__", lambda *a, **k: pytest.fail("the engine began to load"))
    with pytest.raises(MedusaError, match=words):
        runtime.load(tiny["artifact"], threads=1, max_batch=2, budgets=budgets)


def test_a_stopped_engines_failure_is_raised_as_a_fresh_copy_each_time(tiny):
    """Every request of a stopped engine gets its failure, and every sequence of a failed call that
    call's error: each raise is a copy caused by the original, so the original's traceback does not
    gather the frames (and arrays) of every later request and thread that raised it."""
    from runtime.errors import EngineError

    g = runtime.load(tiny["artifact"], threads=1, max_batch=2, budgets=None)
    try:
        e = g.engine
        e._fail(EngineError("simulated: the cache write failed", stopped=True))
        seen = []
        for _ in range(3):
            with pytest.raises(EngineError, match="cache write failed") as got:
                e.acquire(timeout=1)
            seen.append(got.value)
        assert all(x is not e.failure and x.__cause__ is e.failure and x.stopped for x in seen)
        assert len({id(x) for x in seen}) == 3
        assert e.failure.__traceback__ is None  # never raised itself
    finally:
        g.close()


def test_errors_inside_a_call_are_the_engines_and_a_batch_graph_that_cannot_open_is_not_reopened(tiny, monkeypatch):
    """A call that fails on something other than the request's own context (an artifact that cannot load,
    a broken invariant) is the engine's fault: EngineError (the server's 500), never a MedusaError the
    server would answer 400. batch.onnx, opened at the first call that needs it, is not reloaded at every
    such call once it failed to open."""
    import runtime.onnxrt
    from runtime.errors import EngineError

    g = runtime.load(tiny["artifact"], threads=1, max_batch=2, budgets=None)
    try:
        e = g.engine
        slot = e.acquire()
        try:

            def broken(run):
                raise ArtifactError("simulated: a graph's inputs do not match")

            forward = e._run_forward
            monkeypatch.setattr(e, "_run_forward", broken)
            mask = np.tril(np.ones((2, 2), bool))
            req = rb._Request(slot.index, "forward", ids=np.array([1, 2]), pos=np.arange(2), mask=mask)
            with pytest.raises(EngineError, match="ArtifactError: simulated"):
                e._submit(req)
            monkeypatch.setattr(e, "_run_forward", forward)
        finally:
            e.release(slot)
        opened: list[str] = []

        def cannot_open(ort, path, *a, **k):
            opened.append(path.name)
            raise RuntimeError("simulated: out of memory")

        monkeypatch.setattr(runtime.onnxrt, "_session", cannot_open)
        e._session = None
        for _ in range(3):
            with pytest.raises(EngineError, match="cannot be opened .*out of memory"):
                e.session  # noqa: B018 (the property opens the graph)
        assert opened == ["batch.onnx"]
    finally:
        g.close()


def test_a_release_deferred_while_this_thread_holds_the_lock_frees_the_slot_a_wait_wants(tiny):
    """A finalizer's release inside a section waits for the section's end; a thread that then waits in
    acquire (no timeout in library use) must still see that slot free, not wait for a wake-up that no
    other thread will send."""
    g = runtime.load(tiny["artifact"], threads=1, max_batch=1, budgets=None)
    try:
        e = g.engine
        slot = e.acquire()
        with e._section():  # as the cycle collector would, inside this thread's section
            e.release(slot)
            assert list(e._released) and not e._free  # deferred
            again = e.acquire(timeout=2)  # before: 'no free slot in 2 s'
        assert again.index == slot.index
        e.release(again)
    finally:
        g.close()


def test_the_screen_leaves_near_ties_between_candidates_to_the_float_path():
    """Two candidates tied, or within SCREEN_TIE: the float argmax breaks a tie by the lower token id and
    scores with another MatMul, so the screen leaves such a row open (-1: the call reruns in float) rather
    than take the graph's TopK order; a clear best candidate above the bound is drawn as before."""
    from runtime.backend import draw_argmax
    from runtime.onnxrt import SCREEN_TIE, screen_draws

    ids = np.array([[7, 3, 9], [7, 3, 9], [7, 3, 9], [4, 8, 1]])
    scores = np.array([[2.0, 2.0, 1.0], [2.0, 2.0 - SCREEN_TIE / 2, 1.0], [2.0, 1.5, 1.0], [5.0, 1.0, 0.5]], np.float32)
    bound = np.float32(0.5)
    got = screen_draws(ids, scores, np.full(4, bound, np.float32))
    assert got.tolist() == [-1, -1, 7, 4]
    logits = np.full((1, 10), -9.0, np.float32)
    logits[0, [7, 3]] = 2.0
    assert draw_argmax(logits)[0] == 3  # what the float path draws on the tie: not the screen's first candidate
    noise = np.zeros((4, 10), np.float32)
    assert screen_draws(ids, scores, np.full(4, bound, np.float32), noise, 1.0).tolist() == [-1, -1, 7, 4]
