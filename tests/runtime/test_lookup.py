"""Context lookup: the n-gram index on hand-made contexts, grafting its drafts into a tree,
and decoding with it (lossless greedy, exact sampling, drafts actually accepted)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtime.backend import Backend
from runtime.decode import DecodeConfig, accept_greedy, decode
from runtime.errors import MedusaError
from runtime.lookup import NgramLookup
from runtime.tree import PAD, build_tree, graft_chain, load_tree


def test_no_match_proposes_nothing():
    assert NgramLookup([1, 2, 3, 4, 5]).propose(4) == []
    assert NgramLookup([]).propose(4) == [] and NgramLookup([7]).propose(4) == []
    assert NgramLookup([1, 2, 1]).propose(0) == []


def test_longest_suffix_wins_over_a_more_recent_shorter_one():
    # suffix (8, 9) occurred at 0-1 (followed by 5, 6); the 1-gram (9) occurred more recently at 4 (followed by 7)
    lk = NgramLookup([8, 9, 5, 6, 9, 7, 8, 9])
    assert lk.propose(2) == [5, 6]


def test_most_recent_earlier_occurrence_of_the_same_ngram():
    lk = NgramLookup([1, 2, 3, 1, 2, 4, 0, 1, 2])
    assert lk.propose(3) == [4, 0, 1]  # the latest earlier (1, 2) is at 3-4


def test_match_at_the_end_of_the_context_gives_a_short_draft():
    lk = NgramLookup([5, 6, 5, 6])  # (5, 6) at 0-1 is followed by 5, 6: the continuation runs into the suffix
    assert lk.propose(4) == [5, 6]
    lk = NgramLookup([3, 4, 3])  # (3) at 0 followed by 4, 3 (up to the end)
    assert lk.propose(5) == [4, 3]


def test_extend_is_incremental():
    lk = NgramLookup([1, 2, 3], max_ngram=2)
    assert lk.propose(2) == []
    lk.extend([9, 1, 2])
    assert lk.propose(2) == [3, 9]
    lk.extend([7])
    assert lk.propose(2) == []
    with pytest.raises(ValueError):
        NgramLookup(max_ngram=0)


def test_graft_merges_then_branches():
    tree = build_tree([[0], [1], [0, 0]])  # root, a(0), b(1), a0(2)
    tokens = np.array([10, 11, 12, 13])
    # the drafts agree with node [0] (11) and [0, 0] (13), then continue: 2 new nodes below [0, 0]
    g, toks, added = graft_chain(tree, tokens, [11, 13, 14, 15])
    assert added == 2 and g.num_nodes == 6
    assert toks.tolist() == [10, 11, 12, 13, 14, 15]
    assert g.parent.tolist() == [-1, 0, 0, 1, 3, 4]
    assert g.position_ids.tolist() == [0, 1, 1, 2, 3, 4]
    assert g.attn_mask[5].tolist() == [True, True, False, True, True, True]
    rows = {tuple(int(x) for x in r if x != PAD) for r in g.retrieve_indices}
    assert rows == {(0, 2), (0, 1, 3, 4, 5)}
    # drafts that leave the tree at once: a new branch below the root, siblings stay distinct
    g, toks, added = graft_chain(tree, tokens, [20, 21])
    assert added == 2 and g.parent.tolist()[-2:] == [0, 4] and len(set(toks[g.parent == 0])) == 3
    # nothing new: the same tree object
    same, toks, added = graft_chain(tree, tokens, [12])
    assert same is tree and added == 0


def test_graft_keeps_a_chain_when_branching_is_not_exact():
    tree = load_tree("chain_3")
    tokens = np.array([10, 11, 12, 13])
    g, toks, added = graft_chain(tree, tokens, [11, 30, 31], branching=False)
    assert g.is_chain and toks.tolist() == [10, 11, 30, 31] and added == 2
    g, toks, _ = graft_chain(tree, tokens, [11, 12, 13, 14, 15], branching=False)
    assert g.is_chain and toks.tolist() == [10, 11, 12, 13, 14, 15]


def test_greedy_acceptance_on_a_grafted_tree():
    tree = build_tree([[0], [1]])
    g, toks, _ = graft_chain(tree, np.array([1, 2, 3]), [4, 5])  # lookup branch 1 -> 4 -> 5
    logits = np.zeros((g.num_nodes, 8))
    logits[0, 4] = logits[3, 5] = logits[4, 6] = 1.0  # the backbone agrees with the lookup branch
    assert accept_greedy(toks, logits, g).tolist() == [0, 3, 4]


class Repeating(Backend):
    """A backend over a deterministic 'model' that copies its context: the next token is the
    token after the previous occurrence of the current token (else a fixed function of it),
    so context lookup drafts right and the heads (always wrong) never do."""

    def __init__(self, vocab: int = 32):
        from runtime.artifact import ModelSpec

        self.spec = ModelSpec("toy", 1, 1, 1, 16, 16, vocab, 512, num_medusa_heads=3)
        self.exact_branching = True
        self.tokens: list[int] = []

    @property
    def cache_len(self):
        return len(self.tokens)

    @property
    def max_context(self):
        return self.spec.max_context

    def reset(self):
        self.tokens = []

    def next_of(self, prefix):
        last = prefix[-1]
        for i in range(len(prefix) - 2, -1, -1):
            if prefix[i] == last:
                return prefix[i + 1]
        return (last * 7 + 3) % self.spec.vocab_size

    def _forward(self, ids, pos, mask, logits=None):
        ids = [int(t) for t in ids]
        self._new = ids
        rows = [self.tokens + [ids[j] for j in range(len(ids)) if mask[i, j]] for i in range(len(ids))]
        self._rows = rows
        out = np.zeros((len(ids), self.spec.vocab_size))
        for i, r in enumerate(rows):
            out[i, self.next_of(r)] = 50.0  # p ~ 1: sampling at temperature 1 follows it too
        return out

    def commit(self, keep):
        self.tokens += [self._new[int(k)] for k in keep]

    def head_logits(self, index):
        out = np.zeros((3, self.spec.vocab_size))
        out[:, 0] = 9.0  # always token 0, which the toy model never produces after a prompt without 0
        return out


def test_lookup_drafts_are_accepted_and_greedy_stays_lossless():
    backend = Repeating()
    prompt = [5, 9, 3, 11, 7, 5, 9]
    tree = load_tree("cpu_4")
    plain = decode(backend, prompt, DecodeConfig(max_new_tokens=40, medusa=False), None)
    off = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=0), tree)
    on = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=4), tree)
    assert on.tokens == off.tokens == plain.tokens
    assert off.stats.mean_accepted == 1.0 and off.stats.lookup_steps == 0
    assert on.stats.mean_accepted > 2.5 and on.stats.lookup_accepted > 20 and on.stats.lookup_steps > 0
    assert on.stats.steps < off.stats.steps / 2


def test_lookup_with_exact_sampling_and_near_the_context_end():
    backend = Repeating()
    backend.spec.max_context = 30
    prompt = [5, 9, 3, 11, 7, 5, 9]
    tree = load_tree("cpu_4")
    plain = decode(backend, prompt, DecodeConfig(max_new_tokens=100, medusa=False), None)
    on = decode(backend, prompt, DecodeConfig(max_new_tokens=100, lookup=5), tree)
    assert on.tokens == plain.tokens and on.stats.finish_reason == "context"
    assert on.stats.lookup_accepted > 0  # the heads are always wrong: these came from the lookup
    # exact sampling over lookup branches: the toy model's next token has probability ~1, so the
    # sample is its greedy answer, reached through accepted lookup drafts
    backend.spec.max_context = 512
    greedy = decode(backend, prompt, DecodeConfig(max_new_tokens=40, medusa=False), None).tokens
    s = decode(backend, prompt, DecodeConfig(max_new_tokens=40, temperature=1.0, seed=0, lookup=4), tree)
    assert s.tokens == greedy and s.stats.lookup_accepted > 20


def test_bad_lookup_options():
    from runtime.errors import MedusaError

    for kw in (dict(lookup=-1), dict(lookup=2.0), dict(lookup_ngram=0), dict(lookup=True)):
        with pytest.raises(MedusaError, match="lookup"):
            DecodeConfig(**kw)


def test_lookup_on_a_chain_only_engine_stays_a_chain_and_is_counted():
    """Engines exact only for chains (int8/int4): lookup drafts replace the chain's tail instead of
    branching; what they draft is accepted, counted, and the output is plain decoding's."""
    backend = Repeating()
    backend.exact_branching = False
    prompt = [5, 9, 3, 11, 7, 5, 9]
    plain = decode(backend, prompt, DecodeConfig(max_new_tokens=40, medusa=False), None)
    on = decode(backend, prompt, DecodeConfig(max_new_tokens=40, lookup=4), load_tree("chain_1"))
    assert on.tokens == plain.tokens
    assert on.stats.lookup_steps > 0 and on.stats.lookup_accepted > 20 and on.stats.mean_accepted > 2.5


def test_draft_width_grows_while_accepted_whole_and_shrinks_otherwise():
    from runtime.lookup import DraftWidth

    w = DraftWidth(3, 8)
    assert w.width == 3
    w.update([1, 2, 3], [1, 2, 3, 9])  # accepted whole (and more)
    assert w.width == 5
    w.update([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    w.update([1] * 7, [1] * 7)
    assert w.width == 8  # capped at top
    w.update([1, 2, 3], [1, 2])  # one short
    assert w.width == 7
    for _ in range(9):
        w.update([1, 2], [7])
    assert w.width == 3  # never below base
    w.update([], [])  # no draft: unchanged
    assert w.width == 3
    fixed = DraftWidth(4, 2)
    fixed.update([1, 2, 3, 4], [1, 2, 3, 4])
    assert fixed.width == 4  # top <= base: fixed


@pytest.mark.parametrize("sizing", ["grow", "cost"])
def test_a_growing_lookup_draft_stays_lossless_and_takes_longer_runs(sizing):
    """On a context that repeats itself word for word, the draft grows past ``lookup`` (steps
    accept more than lookup + 1 tokens) and the output is still plain decoding's; with
    ``lookup_max <= lookup`` no step accepts more than the fixed draft allows."""
    backend = Repeating()
    prompt = [5, 9, 3, 11, 7, 5, 9]
    tree = load_tree("cpu_4")
    plain = decode(backend, prompt, DecodeConfig(max_new_tokens=80, medusa=False), None)
    fixed = decode(backend, prompt, DecodeConfig(max_new_tokens=80, lookup=3, lookup_max=3), tree)
    grown = decode(
        backend, prompt, DecodeConfig(max_new_tokens=80, lookup=3, lookup_max=11, lookup_sizing=sizing), tree
    )
    assert fixed.tokens == grown.tokens == plain.tokens
    assert max(fixed.stats.accept_hist) <= 4
    assert max(grown.stats.accept_hist) > 4 and grown.stats.steps < fixed.stats.steps
    assert max(grown.stats.accept_hist) <= 12
    for drafts in ("coupled", "sampled"):  # exact sampling takes the grown drafts too (sampled: q per node)
        cfg = DecodeConfig(max_new_tokens=80, temperature=1.0, seed=0, lookup=3, lookup_max=11, lookup_sizing=sizing)
        s = decode(backend, prompt, dataclasses.replace(cfg, drafts=drafts), tree)
        assert s.tokens == plain.tokens and max(s.stats.accept_hist) > 4, drafts
    with pytest.raises(MedusaError, match="lookup_max"):
        DecodeConfig(lookup_max=-1)


@pytest.mark.parametrize("sizing", ["grow", "cost"])
def test_a_grown_draft_is_cut_to_what_the_engine_takes(sizing):
    """Under a load's budget (fewer tokens a call than the tree and the grown draft) the draft's
    head is still verified, so the width keeps following what is accepted; lossless."""

    class Budgeted(Repeating):
        budget = 6

        def max_new_tokens(self, past=None):
            return min(self.budget, super().max_new_tokens(past))

    backend = Budgeted()
    prompt = [5, 9, 3, 11, 7, 5, 9]
    tree = load_tree("cpu_4")
    assert tree.num_nodes < Budgeted.budget
    plain = decode(backend, prompt, DecodeConfig(max_new_tokens=60, medusa=False), None)
    cfg = DecodeConfig(max_new_tokens=60, lookup=3, lookup_max=11, lookup_sizing=sizing)
    on = decode(backend, prompt, cfg, tree)
    assert on.tokens == plain.tokens
    assert on.stats.lookup_steps > 10 and on.stats.lookup_accepted > 10
    assert max(on.stats.accept_hist) <= Budgeted.budget  # never more than a step carried
    # an engine that runs steps above step_rows apart (a batch engine's max_rows): drafts stay below it
    rows = Repeating()
    rows.step_rows = 7
    seen = []
    forward = rows._forward
    rows._forward = lambda ids, pos, mask, logits=None: seen.append(len(ids)) or forward(ids, pos, mask, logits)
    capped = decode(rows, prompt, cfg, tree)
    assert capped.tokens == plain.tokens and capped.stats.lookup_accepted > 10
    assert max(seen[1:]) == 7  # the prefill aside


# a CPU-like step cost (one-token steps by tokens verified): flat within blocks of 6 rows, a jump after
STEPPED = np.array([0, 1.0, 1.1, 1.18, 1.25, 1.27, 1.29, 1.6, 1.62, 1.66, 1.73, 1.74, 1.82, 2.08, 2.1, 2.15, 2.2, 2.25, 2.3]
                   + [2.7, 2.72, 2.75, 2.8, 2.85, 2.9])  # fmt: skip
BLOCK_ENDS = (6, 12, 18, 24)
CONTEXT_3GRAM, DATASTORE_SHORT = 3, 8  # NgramLookup.propose_row rows: a context 3-gram match, a datastore <= 2-gram one


def _sizes(nodes: int, n: int, shared: int = 0) -> np.ndarray:
    return nodes + np.maximum(0, np.arange(n + 1) - shared)


def test_draft_sizer_fills_a_cost_step_and_cuts_a_tail_that_would_start_the_next():
    from runtime.lookup import DraftSizer

    draft = list(range(100, 112))
    # beside a 3-node tree a doubtful draft still fills the first block (6 tokens: nearly free), not the
    # next; a likely one (a context 3-gram, each next token 0.77-0.86 likely) fills the second block too
    assert 3 + DraftSizer(12, STEPPED).choose(draft, DATASTORE_SHORT, _sizes(3, 12), 0) == 6
    assert 3 + DraftSizer(12, STEPPED).choose(draft, CONTEXT_3GRAM, _sizes(3, 12), 0) == 12
    # a 6-node tree fills that block: a likely draft is worth the next blocks, whole, a doubtful one none of them
    assert 6 + DraftSizer(12, STEPPED).choose(draft, CONTEXT_3GRAM, _sizes(6, 12), 0) in BLOCK_ENDS[1:]
    assert DraftSizer(12, STEPPED).choose(draft, DATASTORE_SHORT, _sizes(6, 12), 0) == 0
    # the heads' top candidate agreeing with the first token makes the draft likelier
    weak = DraftSizer(12, STEPPED).choose(draft, DATASTORE_SHORT, _sizes(6, 12, shared=1), 1, agree=0)
    strong = DraftSizer(12, STEPPED).choose(draft, DATASTORE_SHORT, _sizes(6, 12, shared=1), 1, agree=2)
    assert strong > weak
    # where more tokens cost nothing more (a GPU's flat profile) the whole draft goes, and no more than the table covers
    assert DraftSizer(12, np.r_[0.0, np.ones(30)]).choose(draft, DATASTORE_SHORT, _sizes(6, 12), 0) == 12
    assert DraftSizer(12, np.r_[0.0, np.ones(9)]).choose(draft, DATASTORE_SHORT, _sizes(6, 12), 0) == 3
    assert DraftSizer(12, STEPPED).choose([], CONTEXT_3GRAM, _sizes(3, 0), 0) == 0


def test_draft_sizer_follows_the_call_and_scores_past_its_cut():
    from runtime.lookup import FIRST_RATES, PRIOR_WEIGHT, DraftSizer

    draft = list(range(100, 112))
    s = DraftSizer(12, STEPPED)
    first = s.choose(draft, DATASTORE_SHORT, _sizes(6, 12), 0)
    assert first == 0
    s.observe(0, draft[:4], 6)  # not verified, but the step emitted its first 4 tokens: 4 positions scored
    assert s.first[:, 3, 0].tolist() == [1, 1] and s.next[1, 3, 0, :3].tolist() == [1, 1, 1]
    for _ in range(round(3 * PRIOR_WEIGHT)):  # every draft of this source right as far as the steps show
        k = s.choose(draft, DATASTORE_SHORT, _sizes(6, 12), 0)
        s.observe(k, draft[: k + 1], 6 + k)
    assert 6 + s.choose(draft, DATASTORE_SHORT, _sizes(6, 12), 0) == 12 and s.streak == 1  # the next block, whole
    for _ in range(round(20 * PRIOR_WEIGHT)):  # now wrong from the first token on
        k = s.choose(draft, DATASTORE_SHORT, _sizes(6, 12), 0)
        s.observe(k, [7], 6 + k)
    assert s.streak == 0 and s.rates(DATASTORE_SHORT, 0, 1)[0] < 0.2 < FIRST_RATES[3, 0]
    assert s.choose(draft, DATASTORE_SHORT, _sizes(6, 12), 0) < 6  # no longer the whole next block
    # the call's rate: tokens emitted per unit of step cost (plus the prior's)
    t = DraftSizer(12, STEPPED, heads=0.1)
    t.observe(0, [1, 2, 3], 6)
    assert t.tokens / t.spent == pytest.approx((12 + 3) / (8 + 1.29 + 0.1))


def test_draft_sizes_count_the_tokens_a_graft_verifies():
    from runtime.decode import _draft_sizes

    tree = build_tree([[0], [1], [0, 0]])  # root, a (rank 0), b (rank 1), a0
    tokens = np.array([10, 11, 12, 13])
    sizes, shared, agree = _draft_sizes(tree, tokens, [11, 13, 14], branching=True)
    assert (shared, agree) == (2, 2) and sizes.tolist() == [4, 4, 4, 5]
    for k in range(4):  # what graft_chain builds
        assert graft_chain(tree, tokens, [11, 13, 14][:k])[0].num_nodes == sizes[k]
    assert _draft_sizes(tree, tokens, [12, 9], branching=True)[1:] == (1, 1)
    assert _draft_sizes(tree, tokens, [9, 9], branching=True)[0].tolist() == [4, 5, 6]
    chain = build_tree([[0], [0, 0], [0, 0, 0]])
    ctoks = np.array([10, 11, 13, 15])
    sizes, shared, _ = _draft_sizes(chain, ctoks, [11, 14, 16], branching=False)
    # past the shared prefix the drafts replace the chain; a cut that would leave a shorter chain is not allowed
    assert shared == 1 and sizes.tolist() == [4, 4, -1, 4]
    for k in (0, 1, 3):
        assert graft_chain(chain, ctoks, [11, 14, 16][:k], branching=False)[0].num_nodes == sizes[k]
    assert graft_chain(chain, ctoks, [11, 14], branching=False)[0].num_nodes == 3


def test_on_a_chain_engine_a_doubtful_draft_never_shortens_the_heads_chain():
    from runtime.decode import _draft_sizes
    from runtime.lookup import DraftSizer

    chain = build_tree([[0], [0, 0], [0, 0, 0]])  # the heads' chain of 3 below the root
    ctoks = np.array([10, 11, 13, 15])
    draft = [9, 8, 7, 6, 5]  # leaves the chain at once
    sizes, shared, agree = _draft_sizes(chain, ctoks, draft, branching=False)
    assert sizes.tolist() == [4, -1, -1, 4, 5, 6]
    k = DraftSizer(12, STEPPED).choose(draft, DATASTORE_SHORT, sizes, shared, agree)
    assert k == 0 or k >= 3  # keep the heads' chain, or replace it with at least as long a draft


def test_cost_sized_drafts_stay_lossless_and_keep_to_what_pays():
    """With a profile where every token past 6 costs a whole step more, cost sizing never verifies
    more than 6 tokens (the grow schedule does), and both give plain decoding's output."""
    from runtime.dynamic import CostModel

    backend = Repeating()
    prompt = [5, 9, 3, 11, 7, 13, 2, 17, 19, 23, 29, 5, 9]  # a period of 11: drafts up to 11 tokens long
    tree = load_tree("chain_1")
    plain = decode(backend, prompt, DecodeConfig(max_new_tokens=80, medusa=False), None)
    steep = CostModel({1: 1.0, 6: 1.05, 7: 3.0, 8: 4.0, 16: 12.0})
    cfg = dict(max_new_tokens=80, lookup=3, lookup_max=11)
    sized = decode(backend, prompt, DecodeConfig(**cfg), tree, cost=steep)
    grown = decode(backend, prompt, DecodeConfig(**cfg, lookup_sizing="grow"), tree, cost=steep)
    assert sized.tokens == grown.tokens == plain.tokens
    assert 1 < max(sized.stats.accept_hist) < 6 < max(grown.stats.accept_hist)
    assert sized.stats.nodes == 6 * sized.stats.steps  # every step fills what costs nothing more: 6 tokens
    flat = decode(backend, prompt, DecodeConfig(**cfg), tree, cost=CostModel({1: 1.0, 64: 1.0}))
    assert flat.tokens == plain.tokens and max(flat.stats.accept_hist) == 12  # all 11 drafted, and the next root
    s = decode(backend, prompt, DecodeConfig(**cfg, temperature=1.0, seed=0), tree, cost=steep)
    assert s.tokens == plain.tokens  # exact sampling on this deterministic model: the same tokens
    assert max(s.stats.accept_hist) > 1, s.stats.accept_hist
    with pytest.raises(MedusaError, match="lookup_sizing"):
        DecodeConfig(lookup_sizing="longest")


def test_the_bench_compares_the_two_sizings():
    from runtime.bench import make_variants

    t = load_tree("chain_1")
    variants = make_variants([t], [3], sizings=["cost", "grow"])
    assert [v.name for v in variants] == ["chain_1 cost", "chain_1 grow"]
    assert [v.decode_args()["lookup_sizing"] for v in variants] == ["cost", "grow"]
    assert [v.name for v in make_variants([t], [3])] == ["chain_1"]
    assert make_variants([t], [3])[0].decode_args()["lookup_sizing"] == DecodeConfig().lookup_sizing == "cost"


def test_lookup_rates_script_adds_up_every_calls_counts(gen, tmp_path, capsys):
    """``scripts.lookup_rates`` (how the sizer's prior was measured): the summed counts are each
    call's, hits never above trials, the tables in the shipped shapes, thin cells the shipped values."""
    import json

    from runtime.lookup import FIRST_RATES, NEXT_RATES
    from scripts.lookup_rates import main, measure, table

    words = " ".join(f"t{i}" for i in (5, 6, 7, 8, 5, 6, 7, 8, 5, 6))
    prompts = [words, "t9 t10 t9 t10 t9", words + " t11"]
    first, nxt = measure(gen, prompts, 24)
    calls = [gen.generate(gen.encode([{"role": "user", "content": p}]), max_new_tokens=24) for p in prompts]
    assert first[1].sum() == sum(c.stats.draft_sizer.first[1].sum() for c in calls) > 0
    assert np.all(first[0] <= first[1]) and np.all(nxt[0] <= nxt[1])
    f, n = table(first, nxt, NEXT_RATES.shape[2], min_trials=10**9)
    assert np.array_equal(f, FIRST_RATES) and np.array_equal(n, NEXT_RATES)  # no cell has enough: the shipped ones
    f, n = table(first, nxt, NEXT_RATES.shape[2], min_trials=1)
    seen = first[1] >= 1
    assert np.allclose(f[seen], first[0][seen] / first[1][seen]) and f.shape == FIRST_RATES.shape
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"instruction": p} for p in prompts]))
    assert main([str(gen.folder), "--prompts", str(path), "--limit", "2", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "2 prompts of" in out and "FIRST_RATES = [[" in out and "NEXT_RATES = [[[" in out
