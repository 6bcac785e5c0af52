"""Dynamic trees (runtime/dynamic.py): a tree per step from the drafts' calibrated values and
the cost profile. Lossless greedy (fresh, oracle and always-wrong Medusa heads; Hydra heads;
the ONNX Runtime engine one sequence a call and batched), the law of exact sampling, the
builder on hand-made drafts, the cost model, the calibration file and its command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_greedy, make_tiny_llama
from test_decode import NUM_HEADS, ScriptedHeads, prompt_for, torch_backend
from test_hydra import OracleHydra, hydra_artifact, random_hydra  # noqa: F401 (a fixture)

from exporter.torch_backend import TorchBackend
from runtime.decode import DecodeConfig, decode
from runtime.dynamic import (
    BIN_EDGES,
    CostModel,
    DynamicState,
    DynamicTree,
    build,
    calibration_from,
    observe,
    parse_dynamic,
    read_calibration,
    softmax_top,
    write_calibration,
)
from runtime.errors import ConfigError, MedusaError

FLAT = CostModel({1: 1.0, 64: 1.0}, heads=0.0, source="flat")  # verification costs the same for any N
FLAT_FILE = Path(__file__).resolve().parents[2] / "scripts" / "flat_cost_profile.json"
STEEP = CostModel({1: 1.0, 2: 2.0}, heads=0.0, source="steep")  # every node costs a whole step


def policy(depth=NUM_HEADS, cost=FLAT, **kw) -> DynamicTree:
    return DynamicTree(depth=depth, cost=cost, **kw)


# ---------------------------------------------------------------------------- lossless greedy


@pytest.mark.parametrize("heads", ["fresh", "oracle", "wrong"])
@pytest.mark.parametrize("cost", [FLAT, STEEP], ids=["flat", "steep"])
def test_greedy_with_dynamic_trees_equals_hf(heads, cost, tiny_llama):
    model = tiny_llama(0)
    for seed in range(2):
        prompt = prompt_for(seed)
        ref = hf_greedy(model, prompt, 40)
        inner = torch_backend(model)
        backend = inner if heads == "fresh" else ScriptedHeads(inner, prompt + ref + [0] * 8, heads)
        res = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=3), policy(cost=cost))
        assert res.tokens == ref
        if heads == "oracle" and cost is FLAT:  # right drafts on every depth: long steps
            assert res.stats.mean_accepted > 3.0, res.stats.accept_hist
        if heads == "wrong":  # no head draft is ever right: every draft token accepted came from the lookup
            accepted_drafts = sum((k - 1) * v for k, v in res.stats.accept_hist.items())
            assert accepted_drafts == res.stats.lookup_accepted, res.stats.accept_hist


def test_unsure_drafts_shrink_the_tree_to_plain_steps(tiny_llama):
    """With every node costing a whole step, drafts that are never right stop being verified:
    the tree shrinks towards the root alone (a plain step)."""
    model = tiny_llama(0)
    prompt = prompt_for(0)
    ref = hf_greedy(model, prompt, 40)
    backend = ScriptedHeads(torch_backend(model), prompt + ref + [0] * 8, "wrong")
    res = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=0), policy(cost=STEEP))
    assert res.tokens == ref
    assert res.stats.nodes / res.stats.steps < 1.2, (res.stats.nodes, res.stats.steps)
    flat = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=0), policy(cost=FLAT))
    assert flat.tokens == ref
    assert flat.stats.nodes / flat.stats.steps > 4  # flat cost: the cap is free, every step fills it


def test_sure_drafts_grow_the_tree_even_where_nodes_cost(tiny_llama):
    model = tiny_llama(0)
    prompt = prompt_for(1)
    ref = hf_greedy(model, prompt, 40)
    backend = ScriptedHeads(torch_backend(model), prompt + ref + [0] * 8, "oracle")
    cost = CostModel({1: 1.0, 2: 1.2, 8: 2.2}, heads=0.0)
    res = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=0), policy(cost=cost))
    assert res.tokens == ref
    assert res.stats.mean_accepted > 3.0, res.stats.accept_hist


@pytest.mark.parametrize("drafts", ["random", "oracle", "wrong"])
def test_greedy_with_hydra_heads_and_dynamic_trees_equals_hf(drafts):
    model = make_tiny_llama(0)
    inner = TorchBackend(model, random_hydra(model))
    backend = inner if drafts == "random" else OracleHydra(inner, model, wrong=drafts == "wrong")
    for seed in range(2):
        prompt = prompt_for(seed)
        ref = hf_greedy(model, prompt, 30)
        res = decode(backend, prompt, DecodeConfig(max_new_tokens=30, lookup=2), policy(depth=3))
        assert res.tokens == ref
        if drafts == "oracle":
            assert res.stats.mean_accepted > 3.0, res.stats.accept_hist
        if drafts == "wrong":  # no Hydra draft is ever right: every draft token accepted came from the lookup
            accepted_drafts = sum((k - 1) * v for k, v in res.stats.accept_hist.items())
            assert accepted_drafts == res.stats.lookup_accepted, res.stats.accept_hist


def generate_together(gen, prompts, **kw) -> list:
    """``gen.generate(prompt, **kw)`` for every prompt, each on its own thread, all at once."""
    import threading

    outs: list = [None] * len(prompts)

    def run(i):
        outs[i] = gen.generate(prompts[i], **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


@pytest.mark.parametrize("max_batch", [None, 3], ids=["one-sequence", "batch-engine"])
def test_exported_engine_greedy_dynamic_equals_plain(tiny, max_batch):
    import runtime

    # batch engine: no step budgets (three sequences at once start above a light load, where the
    # load-aware budgets keep plain steps until they have estimates: runtime/batch.py)
    gen = runtime.load(tiny["artifact"], threads=1, **({"max_batch": max_batch, "budgets": None} if max_batch else {}))
    try:
        prompts = [prompt_for(s, vocab=4000) for s in range(3)]
        plain = [gen.generate(p, max_new_tokens=32, medusa=False).tokens for p in prompts]
        outs = generate_together(gen, prompts, max_new_tokens=32, tree="dynamic:6")
        assert [o.tokens for o in outs] == plain
        assert all(o.stats.nodes > o.stats.steps for o in outs)  # some steps verified a tree
        assert any(max(o.stats.accept_hist) > 1 for o in outs)  # and some accepted drafts
    finally:
        gen.close()


@pytest.mark.parametrize("max_batch", [None, 3], ids=["one-sequence", "batch-engine"])
def test_hydra_artifact_greedy_dynamic_equals_plain(hydra_artifact, max_batch):  # noqa: F811 (the fixture)
    """Hydra heads drafted level by level on the frontier a dynamic tree keeps, through ONNX Runtime
    one sequence a call and through the batch engine (mixed depths in one heads call)."""
    import runtime

    # batch engine: no step budgets (three sequences at once start above a light load, where the
    # load-aware budgets keep plain steps until they have estimates: runtime/batch.py)
    gen = runtime.load(
        hydra_artifact["artifact"], threads=1, **({"max_batch": max_batch, "budgets": None} if max_batch else {})
    )
    try:
        prompts = [prompt_for(s, vocab=4000) for s in range(3)]
        refs = [hf_greedy(hydra_artifact["model"], p, 24) for p in prompts]
        outs = generate_together(gen, prompts, max_new_tokens=24, tree=f"dynamic:6@{FLAT_FILE}", lookup=2)
        assert [o.tokens for o in outs] == refs
        assert all(o.stats.nodes > o.stats.steps for o in outs)  # flat cost: trees were verified
    finally:
        gen.close()


# ---------------------------------------------------------------------------- exact sampling


@pytest.mark.parametrize("heads", ["fixed", "oracle", "bad"])
def test_exact_sampling_with_dynamic_trees_follows_the_law(heads):
    from test_sampling import ALPHA, TableModel, draw, exact_law, gof_pvalue

    model = TableModel(heads=heads)
    law = exact_law(TableModel(), DecodeConfig(temperature=1.0))
    samples = draw(model, dict(temperature=1.0, acceptance="exact", lookup=2), policy(depth=2, width=3))
    assert gof_pvalue(samples, law) > ALPHA


def test_coupled_sampling_with_dynamic_trees_draws_plain_samplings_tokens():
    from test_sampling import PROMPT, TableModel

    model = TableModel(heads="oracle")
    multi = 0
    for seed in range(20):
        kw = dict(max_new_tokens=12, temperature=0.8, seed=seed, lookup=2)
        plain = decode(model, PROMPT, DecodeConfig(medusa=False, **kw)).tokens
        res = decode(model, PROMPT, DecodeConfig(**kw), policy(depth=2, width=3))
        assert res.tokens == plain
        multi += sum(v for k, v in res.stats.accept_hist.items() if k > 1)
    assert multi > 5  # drafts were accepted


def test_sampled_drafts_need_a_fixed_tree():
    from test_sampling import TableModel

    cfg = DecodeConfig(temperature=1.0, acceptance="exact", drafts="sampled", max_new_tokens=3)
    with pytest.raises(MedusaError, match="sampled"):
        decode(TableModel(), [1, 3], cfg, policy(depth=2))


# ---------------------------------------------------------------------------- the builder


def scripted_drafts(table: dict[int, list[tuple[int, float]]]):
    """drafts(depth, rows, paths): the same (token, probability) list below every parent of a depth."""

    def drafts(d, rows, paths):
        toks = np.array([[t for t, _ in table[d]]] * len(rows), dtype=np.int64)
        probs = np.array([[p for _, p in table[d]]] * len(rows))
        return toks, probs

    return drafts


def fresh_state(**kw) -> DynamicState:
    return DynamicState(policy(**kw))


def test_flat_cost_takes_the_most_valuable_nodes_as_a_tree():
    state = fresh_state(depth=2, max_nodes=4)
    # values: depth 1 = p; depth 2 = p(parent) * p (raw probabilities: no calibration yet)
    drafts = scripted_drafts({1: [(10, 0.6), (11, 0.3)], 2: [(20, 0.5), (21, 0.1)]})
    b = build(state, 5, drafts, [], 0, room=64)
    t = b.tree
    assert t.num_nodes == 5
    got = {(int(t.parent[i]), int(b.tokens[i])) for i in range(1, t.num_nodes)}
    # 0.6 (10), 0.3 (11), 0.6*0.5 = 0.3 (10 -> 20), then 0.3*0.5 = 0.15 (11 -> 20) or 0.06 (10 -> 21)
    ten = int(np.flatnonzero(b.tokens == 10)[0])
    eleven = int(np.flatnonzero(b.tokens == 11)[0])
    assert got == {(0, 10), (0, 11), (ten, 20), (eleven, 20)}
    assert b.tokens[0] == 5
    assert all(t.parent[i] < i for i in range(1, t.num_nodes))  # parents first
    assert t.attn_mask[ten, 0] and not t.attn_mask[ten, eleven]
    assert list(t.node_head[1:]) == [0, 0, 1, 1]


def test_a_depth_drafts_below_its_most_valuable_parents_only():
    calls = []
    inner = scripted_drafts({d: [(10 + i, p) for i, p in enumerate((0.5, 0.2, 0.1, 0.05, 0.04))] for d in (1, 2, 3)})

    def drafts(d, rows, paths):
        calls.append((d, len(rows), paths.tolist()))
        return inner(d, rows, paths)

    state = DynamicState(policy(depth=3, max_nodes=20, width=5, beam=2))
    build(state, 5, drafts, [], 0, room=64)
    assert [(d, n) for d, n, _ in calls] == [(1, 1), (2, 2), (3, 2)]
    assert calls[1][2] == [[5, 10], [5, 11]]  # the two likeliest depth-1 nodes, best first


def test_a_depth_whose_best_child_cannot_pay_for_its_heads_call_is_not_drafted():
    calls = []
    inner = scripted_drafts({1: [(10, 0.8)], 2: [(20, 0.6)], 3: [(30, 0.6)]})

    def drafts(d, rows, paths):
        calls.append(d)
        return inner(d, rows, paths)

    half = CostModel({1: 1.0, 2: 1.1}, heads=0.3)  # a node costs 0.1 of a step, a heads call 0.3
    state = DynamicState(policy(depth=3, cost=half))
    b = build(state, 5, drafts, [], 0, room=64, call_cost=0.3)
    # at 1.5 tokens a step a depth's call must promise 1.5 x (0.1 + 0.3) = 0.6: depth 2's best child
    # (0.8 x at most 0.999) does, depth 3's (0.8 x 0.6 x 0.999) does not
    assert calls == [1, 2] and b.tree.num_nodes == 3
    assert b.cost == pytest.approx(half.table(3)[3] + 0.3 + 0.3)
    calls.clear()
    build(state, 5, drafts, [], 0, room=64, call_cost=0.0)  # Medusa heads: the depths come free
    assert calls == [1, 2, 3]


def test_a_step_that_does_not_pay_is_the_root_alone():
    # half a step per node: at the starting rate of 1.5 tokens per step, a node must be accepted
    # with probability >= 0.75 to pay
    state = fresh_state(depth=2, cost=CostModel({1: 1.0, 2: 1.5}, heads=0.0))
    b = build(state, 5, scripted_drafts({1: [(10, 0.3)], 2: [(20, 0.3)]}), [], 0, room=64)
    assert b.tree.num_nodes == 1 and list(b.tokens) == [5]
    # ... and a sure one does, even at a whole step per node
    b = build(state, 5, scripted_drafts({1: [(10, 0.99)], 2: [(20, 0.99)]}), [], 0, room=64)
    assert b.tree.num_nodes == 3


def test_room_caps_the_tree():
    state = fresh_state(depth=2, max_nodes=8)
    drafts = scripted_drafts({1: [(10, 0.9), (11, 0.8)], 2: [(20, 0.9), (21, 0.8)]})
    assert build(state, 5, drafts, [], 0, room=3).tree.num_nodes == 3
    assert build(state, 5, drafts, [], 0, room=1).tree.num_nodes == 1


def test_lookup_chain_merges_with_a_head_draft_and_continues_below_the_heads():
    state = fresh_state(depth=1, max_nodes=8)
    # the lookup proposes 10 (also head 1's top draft), then 30, 31: deeper than the one head reaches
    b = build(state, 5, scripted_drafts({1: [(10, 0.5), (11, 0.4)]}), [10, 30, 31], 3, room=64)
    t, toks = b.tree, b.tokens
    assert list(toks).count(10) == 1  # one node for the two drafts of the same token
    ten = int(np.flatnonzero(toks == 10)[0])
    thirty = int(np.flatnonzero(toks == 30)[0])
    thirty_one = int(np.flatnonzero(toks == 31)[0])
    assert t.parent[ten] == 0 and t.parent[thirty] == ten and t.parent[thirty_one] == thirty
    assert t.node_head[ten] == 0 and t.node_head[thirty] == -1  # the head's node; a lookup-only node
    assert list(b.lookup_pos[[ten, thirty, thirty_one]]) == [1, 2, 3]
    # siblings stay distinct tokens
    for p in set(t.parent[1:].tolist()):
        kids = toks[t.parent == p]
        assert len(set(kids.tolist())) == len(kids)


def test_engines_exact_only_for_chains_get_a_chain():
    state = fresh_state(depth=2, max_nodes=8)
    drafts = scripted_drafts({1: [(10, 0.6), (11, 0.5)], 2: [(20, 0.9), (21, 0.8)]})
    b = build(state, 5, drafts, [12, 30], 2, room=64, branching=False)
    assert b.tree.is_chain and b.tree.num_nodes == 3
    assert list(b.tokens) == [5, 10, 20]  # the likeliest of each depth (head 1's 0.6 beats the lookup's 0.4)


def test_dynamic_trees_on_a_chain_only_engine_verify_chains_and_stay_exact():
    from test_lookup import Repeating

    class Spy(Repeating):
        chains = True

        def _forward(self, ids, pos, mask, logits=None):
            n = len(ids)
            self.chains &= bool((np.asarray(mask) == np.tril(np.ones((n, n), dtype=bool))).all())
            return super()._forward(ids, pos, mask, logits)

    backend = Spy()
    backend.exact_branching = False
    prompt = [5, 9, 3, 11, 7, 5, 9]
    plain = decode(backend, prompt, DecodeConfig(max_new_tokens=40, medusa=False), None)
    backend.chains = True
    on = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=4), policy(depth=3))
    assert on.tokens == plain.tokens and backend.chains
    assert on.stats.lookup_accepted > 10 and on.stats.mean_accepted > 2.0


def test_observe_counts_every_tried_child_and_the_rate():
    state = fresh_state(depth=2, max_nodes=4)
    b = build(state, 5, scripted_drafts({1: [(10, 0.6), (11, 0.3)], 2: [(20, 0.5), (21, 0.1)]}), [], 0, room=64)
    ten = int(np.flatnonzero(b.tokens == 10)[0])
    path = np.array([0, ten])  # head 1's top draft accepted, its child rejected
    tokens_before, spent_before = state.tokens, state.spent
    observe(state, b, path)
    b06, b03, b05 = (int(np.digitize(p, BIN_EDGES)) for p in (0.6, 0.3, 0.5))
    assert state.trials[0, b06] == 1 and state.hits[0, b06] == 1
    assert state.trials[0, b03] == 1 and state.hits[0, b03] == 0
    assert state.trials[1, b05] == 1 and state.hits[1, b05] == 0  # 10 -> 20 was tried and missed
    assert state.trials[1].sum() == 1  # 11's child was never tried: its parent was rejected
    assert state.tokens == tokens_before + 2 and state.spent == pytest.approx(spent_before + b.cost)
    # the calibrated value of a bin follows its hits
    for _ in range(40):
        state.hits[0, b03] += 1
        state.trials[0, b03] += 1
    assert state.calibrated(1, np.array([0.3]))[0] > 0.9


def test_softmax_top_ranks_and_normalises():
    logits = np.array([[0.0, 2.0, 1.0, np.finfo(np.float32).min]], dtype=np.float32)
    toks, probs = softmax_top(logits, 2)
    assert toks.tolist() == [[1, 2]]
    z = np.exp([0.0, 2.0, 1.0]).sum()
    np.testing.assert_allclose(probs[0], np.exp([2.0, 1.0]) / z, rtol=1e-6)
    toks, probs = softmax_top(logits, 2, temperature=0.5)  # the filler stays at probability 0
    np.testing.assert_allclose(probs[0], np.exp([4.0, 2.0]) / np.exp([0.0, 4.0, 2.0]).sum(), rtol=1e-6)


# ---------------------------------------------------------------------------- cost, calibration, spec


def test_cost_model_interpolates_extrapolates_and_never_falls():
    c = CostModel({1: 10.0, 4: 16.0, 8: 15.0})
    t = c.table(12)
    assert t[1] == 1.0 and t[4] == pytest.approx(1.6) and t[2] == pytest.approx(1.2)
    assert np.all(np.diff(t[1:]) >= 0)  # the measured dip at 8 is flattened
    assert t[12] >= t[8]
    with pytest.raises(ConfigError, match="N = 1"):
        CostModel({2: 1.0})
    with pytest.raises(ConfigError, match="positive"):
        CostModel({1: 1.0, 2: float("nan")})


def test_cost_model_from_a_profile_file(tmp_path):
    p = tmp_path / "latency_profile.json"
    p.write_text(json.dumps({"relative_cost": {"1": 1.0, "2": 1.5}, "heads_relative_cost": 0.2}))
    c = CostModel.from_profile(p)
    assert c.table(2)[2] == 1.5 and c.heads == 0.2
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a latency profile"):
        CostModel.from_profile(p)


def test_calibration_round_trip_and_malformed_files(tmp_path):
    s = fresh_state(depth=2)
    s.hits[0, 3], s.trials[0, 3] = 2, 5
    s.lookup_hits[3, 1], s.lookup_trials[3, 1] = 7, 8
    cal = calibration_from([s], source="test")
    path = write_calibration(cal, tmp_path / "c.json")
    back = read_calibration(path)
    np.testing.assert_array_equal(back.hits, cal.hits)
    np.testing.assert_array_equal(back.lookup_trials, cal.lookup_trials)
    assert "depth 1" in back.summary() and "3-gram" in back.summary()
    # a state started from it: the measured rate, at most CALIBRATION_WEIGHT observations
    started = DynamicState(policy(depth=2, calibration=back))
    assert started.hits[0, 3] == 2 and started.lookup_value(3, 1) == pytest.approx((7 + 0.8) / 10)
    bad = json.loads(path.read_text())
    bad["hits"][0][3] = 9  # more hits than trials
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="malformed"):
        read_calibration(path)
    path.write_text(json.dumps({**bad, "bin_edges": [0.5]}))
    with pytest.raises(ConfigError, match="bins differ"):
        read_calibration(path)
    with pytest.raises(ConfigError, match="started without"):
        calibration_from([started])


@pytest.mark.parametrize("spec", ["dynamic:0", "dynamic:x", "dynamic:-3", "dynamic:"])
def test_bad_dynamic_specs_are_user_errors(spec):
    if spec == "dynamic:":
        assert parse_dynamic(spec, 4).max_nodes == 12  # nothing after the colon: the default
        return
    with pytest.raises(ConfigError, match="dynamic"):
        parse_dynamic(spec, 4)


def test_generator_reads_the_artifacts_profile_and_calibration(tiny, tmp_path):
    import shutil

    import runtime
    from runtime.cli import main

    art = tmp_path / "art"
    shutil.copytree(tiny["artifact"], art)
    gen = runtime.load(art, threads=1)
    t = gen._tree("dynamic:5")
    assert t.max_nodes == 5 and t.calibration is None and t.cost.source.startswith("default")
    (art / "latency_profile.json").write_text(json.dumps({"relative_cost": {"1": 1.0, "8": 1.0}}))
    # the command writes the calibration the generator then reads
    rc = main(["calibrate", str(art), "--prompts", str(tmp_path / "p.jsonl"), "--threads", "1"])
    assert rc != 0  # no such prompt file: a one-line error, nothing written
    assert not (art / "draft_calibration.json").exists()
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"t{i} t{i + 1} t{i}"}) + "\n" for i in range(3)))
    assert main(["calibrate", str(art), "--prompts", str(tmp_path / "p.jsonl"), "--threads", "1",
                 "--max-new-tokens", "16", "--max-nodes", "4"]) == 0  # fmt: skip
    t = runtime.load(art, threads=1)._tree("dynamic")
    assert t.calibration is not None and t.calibration.trials.sum() > 0
    assert t.cost.source.endswith("latency_profile.json") and t.cost.table(8)[8] == 1.0
    ids = prompt_for(2, vocab=4000)
    gen = runtime.load(art, threads=1)
    out = gen.generate(ids, max_new_tokens=24, tree="dynamic")
    assert out.tokens == gen.generate(ids, max_new_tokens=24, medusa=False).tokens
    assert max(out.stats.accept_hist) > 1, out.stats.accept_hist


def test_a_profile_after_at_sets_the_cost(tmp_path):
    p = tmp_path / "flat.json"
    p.write_text(json.dumps({"relative_cost": {"1": 1.0, "64": 1.0}, "heads_relative_cost": 0.0}))
    t = parse_dynamic(f"dynamic:9@{p}", 3)
    assert t.max_nodes == 9 and t.cost.table(9)[9] == 1.0 and t.name == f"dynamic:9@{p}"
    assert parse_dynamic(f"dynamic@{p}", 3).max_nodes == 12
    with pytest.raises(ConfigError, match="latency profile"):
        parse_dynamic(f"dynamic:9@{tmp_path / 'missing.json'}", 3)
    with pytest.raises(ConfigError, match="after '@'"):
        parse_dynamic("dynamic:9@", 3)


def test_policy_fields_are_checked():
    with pytest.raises(ConfigError, match="width"):
        DynamicTree(depth=2, width=0)
    assert dataclasses.replace(policy(), max_nodes=3).num_nodes == 4


def test_a_dynamic_tree_stream_resumes_after_another_call_is_cancelled_before_its_first_call(tiny):
    """Streams take turns on one cache (runtime.api saves and restores it). A call that took the cache,
    reset it and was cancelled before any engine call leaves the backend's forward count as it was,
    but the restored cache's last hidden state is gone: the dynamic tree's next step must draft from a
    new call (a plain step), not ask the heads for a hidden state nobody holds."""
    import threading

    import runtime
    from runtime.errors import Cancelled

    gen = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1)
    try:
        prompt = prompt_for(0, vocab=4000)
        want = gen.generate(prompt, max_new_tokens=24, medusa=False).tokens
        it = iter(gen.stream(prompt, max_new_tokens=24, tree="dynamic:6"))
        got = [t for _ in range(2) for t in next(it).tokens]
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(Cancelled):
            list(gen.stream(prompt_for(1, vocab=4000), max_new_tokens=4, cancel=cancel))
        got += [t for chunk in it for t in chunk.tokens]
        assert got == want
    finally:
        gen.close()
