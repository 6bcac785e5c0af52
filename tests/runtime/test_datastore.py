"""The datastore (runtime/datastore.py): what it proposes on hand-made corpora, its file, the lookup's
fallback to it, and that its drafts change neither greedy output nor the law of exact sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_greedy
from test_decode import ScriptedHeads, prompt_for, torch_backend
from test_lookup import Repeating

from runtime.datastore import Datastore
from runtime.decode import DecodeConfig, decode
from runtime.dynamic import CostModel, DynamicTree
from runtime.errors import ArtifactError, MedusaError
from runtime.lookup import ROWS, NgramLookup
from runtime.tree import load_tree

FLAT = CostModel({1: 1.0, 64: 1.0}, heads=0.0, source="flat")


def store(seqs, vocab=100, **kw) -> Datastore:
    return Datastore.build(seqs, vocab, **kw)


# ---------------------------------------------------------------------------- proposals


def test_the_most_frequent_follower_of_the_longest_known_suffix():
    ds = store([[1, 2, 3], [1, 2, 3], [1, 2, 4], [9, 2, 5], [9, 2, 5], [9, 2, 5]], min_count=1, max_ngram=2)
    # after "1 2": 3 (twice) beats 4 (once); after "9 2": 5; after an unknown "7 2": the 1-gram "2" -> 5 (3x)
    assert ds.draft([1, 2], 1) == ([3], 2, pytest.approx(2 / 3))
    assert ds.propose([9, 2], 1) == [5]
    assert ds.draft([7, 2], 1) == ([5], 1, pytest.approx(3 / 6))


def test_a_draft_walks_on_and_stops_where_the_store_knows_nothing():
    ds = store([[1, 2, 3, 4, 5]] * 2, max_ngram=3)
    assert ds.propose([0, 1], 3) == [2, 3, 4]
    assert ds.propose([0, 1], 10) == [2, 3, 4, 5]  # nothing ever followed 5
    assert ds.draft([42], 3) == ([], 0, 0.0) and ds.propose([], 3) == [] and ds.propose([1], 0) == []


def test_ngrams_never_cross_two_answers_and_rare_ones_are_dropped():
    ds = store([[1, 2], [3, 4], [1, 2], [3, 4], [7, 8]], max_ngram=2, min_count=2)
    assert ds.propose([2], 1) == []  # "2 3" joins two answers: never an n-gram
    assert ds.propose([3], 1) == [4]
    assert ds.propose([7], 1) == []  # seen once, below min_count


def test_a_draft_stops_at_a_follower_below_the_share():
    # "5" is followed by 6 and 7 equally (share 0.5) then 8 always; "1" by 2 in 3 of 4 (0.75)
    seqs = [[5, 6], [5, 7], [5, 6], [5, 7], [1, 2], [1, 2], [1, 2], [1, 3], [3, 9], [3, 9]]
    ds = store(seqs, max_ngram=1, min_count=1)
    assert ds.propose([1], 2) == [2]  # nothing followed 2
    ds.min_share = 0.8
    assert ds.propose([1], 2) == []  # 0.75 < 0.8
    ds.min_share = 0.5
    assert ds.draft([5], 1) == ([6], 1, 0.5)  # a tie: the lower token id, deterministically


def test_bad_corpora_are_refused():
    with pytest.raises(ValueError, match="token ids"):
        store([[1, 200]], vocab=100)
    with pytest.raises(ValueError, match=">= 1"):
        store([[1, 2]], max_ngram=0)


# ---------------------------------------------------------------------------- the file


def test_file_round_trip_and_checks(tmp_path: Path):
    ds = store([[1, 2, 3, 4]] * 3 + [[4, 3, 2, 1]] * 2, source="toy")
    path = tmp_path / "datastore.npz"
    ds.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["datastore.npz"]  # no temporary file left behind
    back = Datastore.load(path, vocab_size=100)
    assert back.meta == ds.meta and len(back) == len(ds) and back.summary() == ds.summary()
    for ctx in ([1], [2, 3], [4, 3], [9], [3, 2, 1]):
        assert back.draft(ctx, 4) == ds.draft(ctx, 4)
    with pytest.raises(ArtifactError, match="vocabulary of 100 tokens, the model has 50"):
        Datastore.load(path, vocab_size=50)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a readable datastore"):
        Datastore.load(tmp_path / "junk.npz")
    arrays = dict(np.load(path))
    arrays["keys_2"] = arrays["keys_2"][::-1].copy()
    np.savez(tmp_path / "unsorted.npz", **arrays)
    with pytest.raises(ArtifactError, match="not sorted"):
        Datastore.load(tmp_path / "unsorted.npz")
    for field in ("total_2", "count_2"):  # a zero total divided the draft's share by zero
        arrays = dict(np.load(path))
        arrays[field] = np.zeros_like(arrays[field])
        np.savez(tmp_path / "zero.npz", **arrays)
        with pytest.raises(ArtifactError, match="counted 0 times, or more often than its n-gram"):
            Datastore.load(tmp_path / "zero.npz")


def test_a_generator_refuses_a_foreign_datastore(tiny, tmp_path: Path):
    import shutil

    import runtime

    art = tmp_path / "art"
    shutil.copytree(tiny["artifact"], art)
    store([[1, 2, 3]] * 2, vocab=7).save(art / "datastore.npz")
    with pytest.raises(ArtifactError, match="vocabulary of 7 tokens"):
        runtime.load(art, threads=1)


# ---------------------------------------------------------------------------- the lookup's fallback


def test_the_context_comes_first_and_the_store_fills_in():
    ds = store([[1, 2, 3, 4]] * 4, max_ngram=2)
    lk = NgramLookup([7, 1, 9, 7, 1], max_ngram=2, datastore=ds)
    assert lk.propose_row(2) == ([9, 7], 2)  # "7 1" occurred before: the context's own continuation
    lk.extend([2])  # "1 2" and "2" never occurred before in the context: the store
    chain, row = lk.propose_row(2)
    assert chain == [3, 4] and row == ROWS + 0 + 3  # matched on 2 tokens (<= 2), share 1.0 (top quarter)
    lk.extend([5, 1])  # only "1" occurred before (followed by 9, then 2): a 1-gram match yields to the store
    assert lk.propose_match(2) == ([2, 5], 1) and lk.propose_row(2) == ([2, 3], ROWS + 3)
    lk.extend([8])  # "8" is new to the context and unknown to the store: nothing
    assert lk.propose_row(2) == ([], 0)
    plain = NgramLookup([7, 1, 9, 5, 1], max_ngram=2)
    assert plain.propose_row(2) == ([9, 5], 1)  # no store: the 1-gram match drafts


# ---------------------------------------------------------------------------- lossless


def oracle_store(tokens, vocab) -> Datastore:
    """A store that knows the answer: drafts right wherever its n-grams are unambiguous."""
    return Datastore.build([tokens] * 2, vocab, max_ngram=4, min_count=2)


def wrong_store(tokens, vocab) -> Datastore:
    """The oracle's n-grams with every follower replaced by the next token id: always wrong."""
    ds = oracle_store(tokens, vocab)
    for t in ds.tables.values():
        t.next = (t.next + 1) % vocab
    return ds


@pytest.mark.parametrize("kind", ["oracle", "wrong"])
@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_greedy_with_a_datastore_equals_hf(kind, tree, tiny_llama):
    model = tiny_llama(0)
    vocab = model.config.vocab_size
    for seed in range(2):
        prompt = prompt_for(seed)
        ref = hf_greedy(model, prompt, 40)
        ds = (oracle_store if kind == "oracle" else wrong_store)(prompt + ref, vocab)
        backend = ScriptedHeads(torch_backend(model), prompt + ref + [0] * 8, "wrong")  # heads never help
        t = load_tree("cpu_4") if tree == "static" else DynamicTree(depth=3, cost=FLAT)
        on = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=3), t, datastore=ds)
        off = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=3, datastore=False), t, datastore=ds)
        assert on.tokens == off.tokens == ref
        assert off.stats.datastore_steps == off.stats.datastore_accepted == 0
        assert on.stats.datastore_steps > 0  # the store drafted (right or wrong)
        assert on.stats.datastore_accepted <= on.stats.lookup_accepted
        if kind == "oracle":
            assert on.stats.lookup_accepted > off.stats.lookup_accepted + 10, (on.stats, off.stats)
            assert on.stats.datastore_accepted >= 10 and on.stats.mean_accepted > 2.0
        else:
            assert on.stats.datastore_accepted == 0  # every follower it holds is wrong


def test_exact_sampling_with_a_datastore_follows_the_law():
    from test_sampling import ALPHA, PROMPT, VOCAB, N, TableModel, exact_law, gof_pvalue

    model = TableModel()
    # a store that drafts the table model's likeliest continuation after any token: often right
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(300):
        s = [int(rng.integers(VOCAB))]
        for _ in range(4):
            s.append(int(np.argmax(model.logits_of(PROMPT + s))))
        seqs.append(s)
    ds = Datastore.build(seqs, VOCAB, max_ngram=2, min_count=1)
    ds.min_share = 0.0
    law = exact_law(TableModel(), DecodeConfig(temperature=1.0))
    samples, accepted = [], 0
    for seed in range(N):
        cfg = DecodeConfig(max_new_tokens=3, seed=seed, temperature=1.0, lookup=2)
        res = decode(model, PROMPT, cfg, load_tree("chain_1"), datastore=ds)
        samples.append(tuple(res.tokens))
        accepted += res.stats.lookup_accepted
    assert accepted > N // 10, accepted  # the store's drafts were verified, and often taken
    assert gof_pvalue(samples, law) > ALPHA


def test_the_lookup_fallback_reaches_every_decode_path():
    """A toy model that copies its context, a store of exactly its output: the store's drafts are
    taken on the chain-only path (int8/int4 engines) as well."""
    backend = Repeating()
    prompt = [5, 9, 3, 11, 7]
    plain = decode(backend, prompt, DecodeConfig(max_new_tokens=40, medusa=False), None).tokens
    ds = Datastore.build([prompt + plain] * 2, backend.spec.vocab_size)
    backend.exact_branching = False
    on = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=4), load_tree("chain_1"), datastore=ds)
    off = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=4), load_tree("chain_1"))
    assert on.tokens == off.tokens == plain
    assert on.stats.steps < off.stats.steps


def test_the_flag_is_checked():
    with pytest.raises(MedusaError, match="datastore"):
        DecodeConfig(datastore="yes")


def test_the_bench_compares_with_and_without():
    from runtime.bench import make_variants

    t = load_tree("chain_1")
    names = [v.name for v in make_variants([t], [3], [True, False])]
    assert names == ["chain_1 datastore", "chain_1 no-datastore"]
    assert [v.name for v in make_variants([t], [3])] == ["chain_1"]


def test_the_bench_splits_a_steps_tokens_by_what_drafted_them():
    from runtime.bench import draft_sources

    # 10 steps emitting 25 tokens: 10 the backbone's, 6 only the context drafted, 4 only the datastore
    runs = [{"accept_hist": {"2": 5, 3: 5}, "steps": 10, "lookup_accepted": 10, "datastore_accepted": 4}]
    assert draft_sources(runs) == pytest.approx({"backbone": 1.0, "heads": 0.5, "context": 0.6, "datastore": 0.4})
    assert draft_sources([{"accept_hist": {}, "steps": 0}]) == {}


def test_calibration_files_from_before_the_datastore_rows_still_load():
    from runtime.dynamic import BIN_EDGES, LOOKUP_ROWS, Calibration

    bins = len(BIN_EDGES) + 1
    cal = Calibration(np.zeros((2, bins)), np.ones((2, bins)), np.zeros((ROWS, 65)), np.ones((ROWS, 65)))
    data = json.loads(json.dumps(cal.to_json()))
    back = Calibration.from_json(data)
    assert back.lookup_trials.shape == (LOOKUP_ROWS, 65) and back.lookup_trials[ROWS:].sum() == 0


@pytest.mark.parametrize("max_batch", [None, 3], ids=["one-sequence", "batch-engine"])
def test_an_artifact_with_a_datastore_stays_lossless_on_onnx_runtime(tiny, tmp_path: Path, max_batch):
    """The exported engine with a datastore.npz of the model's own answers: every answer is plain
    decoding's, through one sequence a call and through the batch engine, and the store drafted."""
    import shutil

    from test_dynamic import generate_together

    import runtime

    art = tmp_path / "art"
    shutil.copytree(tiny["artifact"], art)
    prompts = [prompt_for(s, vocab=4000) for s in range(3)]
    gen = runtime.load(art, threads=1)
    try:
        plain = [gen.generate(p, max_new_tokens=32, medusa=False).tokens for p in prompts]
        vocab = gen.spec.vocab_size
    finally:
        gen.close()
    Datastore.build([t for t in plain for _ in range(2)], vocab).save(art / "datastore.npz")
    # the batch engine without step budgets: three sequences at once start above a light load,
    # where the load-aware budgets keep plain steps until they have estimates (runtime/batch.py)
    gen = runtime.load(art, threads=1, **({"max_batch": max_batch, "budgets": None} if max_batch else {}))
    try:
        assert gen.datastore is not None
        # the artifact's fixed tree with the grow schedule (every draft grafted); with cost sizing and with
        # a dynamic tree, both weighing each draft against the (CPU default) step cost, a doubtful store
        # draft may be cut: they draft less, never nothing here
        for tree, sizing, least in ((None, "grow", 10), (None, "cost", 1), ("dynamic:6", "cost", 1)):
            outs = generate_together(gen, prompts, max_new_tokens=32, tree=tree, lookup_sizing=sizing)
            assert [o.tokens for o in outs] == plain
            assert sum(o.stats.datastore_accepted for o in outs) >= least, (
                tree,
                sizing,
                [o.stats.as_dict() for o in outs],
            )
    finally:
        gen.close()
