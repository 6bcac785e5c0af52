"""Sampling at temperature > 0: exact tree speculative sampling keeps the backbone's law.

The distribution tests run the real decode loop (``runtime.decode.decode``) over a small
numpy language model whose next-token logits are a fixed pseudo-random function of the
whole prefix, so the exact law of the first three sampled tokens can be enumerated
(``VOCAB ** 3`` sequences) and every sampler is compared with it by chi-square
goodness-of-fit tests, at significance ``ALPHA``: of the three tokens' joint law (cells with an
expected count below 5 pooled) and of each position's own law (``VOCAB - 1`` degrees of freedom,
where a shift in one token's probability shows far more strongly than among 125 cells),
Bonferroni-corrected. ``N`` samples are enough that moving 2% of the probability of any first
token to any other is detected (``test_the_test_detects_a_two_percent_shift``, every ordered
pair), and typical acceptance, which is lossy, is detected by the same test. Every sample uses
its own seed, so the tests are deterministic.

The first of those tokens comes from the prefill, not from a Medusa step; the step tests at the end
check one depth-3 verification step directly, each node's conditional law on its own (100,000 steps:
a 2% shift at any node reached in 12% of steps or more is detected, depth 3 included).

Coupled sampling (``drafts="coupled"``, the default) is held to more: for every seed its tokens are
the tokens plain sampling draws, as greedy Medusa's are plain greedy decoding's.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from runtime.artifact import ModelSpec
from runtime.backend import Backend
from runtime.decode import DecodeConfig, PositionNoise, accept_coupled, accept_exact, decode, target_probs
from runtime.errors import MedusaError
from runtime.tree import build_tree

scipy_stats = pytest.importorskip("scipy.stats")

VOCAB = 5
N = 12_000
ALPHA = 1e-3
PROMPT = [1, 3]
TREES = {
    "chain": build_tree([[0], [0, 0]], name="chain"),
    "branching": build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0]], name="branching"),
}


class TableModel(Backend):
    """A language model as a table: next-token logits = a fixed random function of the prefix.

    ``forward`` reads each new token's prefix from the committed tokens and the tree mask,
    so it computes exactly what a real backbone would for any tree. Heads: ``fixed``
    (arbitrary fixed preferences), ``oracle`` (the model's own greedy continuation from the
    node, rank 0 = the likeliest), ``bad`` (the least likely tokens first).
    """

    def __init__(self, heads: str = "fixed", num_heads: int = 2, seed: int = 0, scale: float = 1.5):
        self.spec = ModelSpec("table", 1, 1, 1, 16, 16, VOCAB, 64, num_medusa_heads=num_heads)
        self.seed, self.scale, self.mode, self.num_heads = seed, scale, heads, num_heads
        self.tokens: list[int] = []
        self._rows: list[tuple[int, ...]] = []
        self._new: list[int] = []
        self._fixed = np.random.default_rng(seed + 1).standard_normal((num_heads, VOCAB))

    def logits_of(self, prefix) -> np.ndarray:
        key = hash((self.seed, *map(int, prefix))) % 2**32  # ints and tuples hash the same in every process
        return np.random.default_rng(key).standard_normal(VOCAB) * self.scale

    @property
    def cache_len(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens = []

    def _forward(self, input_ids, position_ids, tree_mask, logits=None):
        ids = [int(t) for t in input_ids]
        self._new = ids
        self._rows = [
            tuple(self.tokens) + tuple(ids[j] for j in range(len(ids)) if tree_mask[i, j]) for i in range(len(ids))
        ]
        return np.stack([self.logits_of(r) for r in self._rows])

    def commit(self, keep) -> None:
        self.tokens += [self._new[int(k)] for k in keep]

    def head_logits(self, index):
        if self.mode == "fixed":
            return self._fixed.copy()
        # head k proposes for the token k+2 after the node: follow the greedy continuation
        prefix = list(self._rows[index])
        prefix.append(int(np.argmax(self.logits_of(prefix))))  # the root's likeliest (the node's next token)
        out = np.zeros((self.num_heads, VOCAB))
        for k in range(self.num_heads):
            z = self.logits_of(prefix)
            out[k] = z if self.mode == "oracle" else -z
            prefix.append(int(np.argmax(z)))
        return out


def exact_law(model: TableModel, cfg: DecodeConfig, length: int = 3) -> dict[tuple[int, ...], float]:
    """P(first ``length`` tokens) under plain sampling: enumerated, no sampling."""
    law = {}
    for seq in itertools.product(range(VOCAB), repeat=length):
        p = 1.0
        for i in range(length):
            p *= target_probs(model.logits_of(PROMPT + list(seq[:i])), cfg)[seq[i]]
        law[seq] = p
    return law


def draw(model: TableModel, cfg_kw: dict, tree, n: int = N) -> list[tuple[int, ...]]:
    out = []
    for seed in range(n):
        cfg = DecodeConfig(max_new_tokens=3, seed=seed, **cfg_kw)
        out.append(tuple(decode(model, PROMPT, cfg, tree).tokens))
    return out


def gof_pvalue(samples: list[tuple[int, ...]], law: dict[tuple[int, ...], float]) -> float:
    """Goodness of fit of ``samples`` to ``law``: the chi-square of the joint law and of each
    position's marginal law, the smallest p-value times their number (Bonferroni)."""
    assert {s for s in samples} <= {seq for seq, p in law.items() if p > 0}, "a sampled sequence has probability 0"
    length = len(next(iter(law)))
    tests = [_chisquare(samples, law)]
    for i in range(length):
        marginal: dict[tuple[int, ...], float] = {}
        for seq, p in law.items():
            marginal[(seq[i],)] = marginal.get((seq[i],), 0.0) + p
        tests.append(_chisquare([(s[i],) for s in samples], marginal))
    return min(1.0, min(tests) * len(tests))


def _chisquare(samples: list[tuple[int, ...]], law: dict[tuple[int, ...], float]) -> float:
    """Chi-square goodness of fit of ``samples`` to ``law`` (cells expected < 5 pooled)."""
    n = len(samples)
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    obs, exp, rare_o, rare_e = [], [], 0, 0.0
    for seq, p in law.items():
        if n * p >= 5:
            obs.append(counts.get(seq, 0))
            exp.append(n * p)
        else:
            rare_o += counts.get(seq, 0)
            rare_e += n * p
    if rare_e > 0:
        obs.append(rare_o)
        exp.append(rare_e)
    exp = np.asarray(exp) * (n / sum(exp))  # exact total (pooling rounding)
    return float(scipy_stats.chisquare(obs, exp).pvalue)


@pytest.fixture(scope="module")
def plain_law():
    return {t: exact_law(TableModel(), DecodeConfig(temperature=t)) for t in (0.7, 1.0)}


@pytest.mark.parametrize("drafts", ["coupled", "top"])  # the Gumbel-max draw / the inverse-CDF draw
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_plain_sampling_follows_the_law(plain_law, temperature, drafts):
    """The harness itself: plain sampling through the decode loop fits the enumerated law, with
    either sampler (``drafts`` picks plain sampling's sampler too)."""
    samples = draw(TableModel(), dict(temperature=temperature, medusa=False, drafts=drafts), None)
    assert gof_pvalue(samples, plain_law[temperature]) > ALPHA


@pytest.mark.parametrize("drafts", ["coupled", "top"])
@pytest.mark.parametrize("heads", ["fixed", "oracle", "bad"])
@pytest.mark.parametrize("tree", ["chain", "branching"])
def test_exact_medusa_sampling_follows_the_law(plain_law, heads, tree, drafts):
    model = TableModel(heads=heads)
    samples = draw(model, dict(temperature=1.0, acceptance="exact", drafts=drafts), TREES[tree])
    assert gof_pvalue(samples, plain_law[1.0]) > ALPHA


@pytest.mark.parametrize(
    "cuts", [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=0.7, top_k=3, top_p=0.9)],
    ids=["t1", "t0.7", "t0.7-top_k-top_p"],
)  # fmt: skip
@pytest.mark.parametrize("heads", ["fixed", "oracle", "bad"])
@pytest.mark.parametrize("tree", ["chain", "branching"])
def test_coupled_medusa_draws_the_tokens_plain_sampling_draws(cuts, heads, tree):
    """For every seed, coupled Medusa sampling (heads and lookup drafts) emits exactly plain
    sampling's tokens: the law follows from plain sampling's, and steps really accept drafts."""
    model = TableModel(heads=heads)
    multi = 0
    for seed in range(30):
        kw = dict(max_new_tokens=16, seed=seed, **cuts)
        plain = decode(model, PROMPT, DecodeConfig(medusa=False, **kw)).tokens
        res = decode(model, PROMPT, DecodeConfig(lookup=2, **kw), TREES[tree])
        assert res.tokens == plain, seed
        multi += sum(v for k, v in res.stats.accept_hist.items() if k > 1)
    assert multi > 20  # drafts were accepted: not plain decoding in disguise


def test_position_noise_is_drawn_in_position_order_and_kept_until_released():
    """A position's noise does not depend on the order positions are asked for (so Medusa, which
    asks ahead, and plain decoding, one at a time, see the same noise), and is kept until released."""
    ahead, one_by_one = PositionNoise(np.random.default_rng(5), 7), PositionNoise(np.random.default_rng(5), 7)
    first = ahead.at(10).copy()
    g13 = ahead.at(13).copy()
    seq = [one_by_one.at(t).copy() for t in range(10, 14)]
    assert np.array_equal(first, seq[0]) and np.array_equal(g13, seq[3])
    assert np.array_equal(ahead.at(12), seq[2])  # kept, not redrawn
    assert not np.array_equal(seq[1], seq[2])
    ahead.release(below=12)
    assert np.array_equal(ahead.at(12), seq[2])
    with pytest.raises(AssertionError, match="released"):
        ahead.at(11)


def _noise_draws(logits, n, cfg):
    noise = PositionNoise(np.random.default_rng(0), len(logits))
    out = []
    for t in range(n):
        out.append(noise.choose(logits, cfg, t))
        noise.release(below=t + 1)
    return np.asarray(out)


def test_position_noise_at_a_real_vocabulary_never_draws_a_negligible_token():
    """At SmolLM2's vocabulary, 49151 tokens 30 nats below the top (4.6e-9 together) are never drawn
    in 4000 positions. float32 exponentials (exactly 0 once in 2^23 draws: g = inf) drew
    one in ~0.6% of the positions."""
    logits = np.full(49152, -30.0, dtype=np.float32)
    logits[7] = 0.0
    assert (_noise_draws(logits, 4000, DecodeConfig(temperature=1.0)) == 7).all()


def test_position_noise_at_a_real_vocabulary_follows_the_law():
    """The Gumbel-max draw over 49152 tokens: the 12 likeliest tokens and the rest pooled, chi-square."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(49152) * 1.5).astype(np.float32)
    logits[:12] = 10.0 + np.linspace(0, 1.5, 12, dtype=np.float32)  # 12 tokens share 97% of the mass
    cfg = DecodeConfig(temperature=0.8)
    p = target_probs(logits, cfg)
    n = 12_000
    draws = _noise_draws(logits, n, cfg)
    obs = [int((draws == k).sum()) for k in range(12)] + [int((draws >= 12).sum())]
    exp = [n * p[k] for k in range(12)] + [n * p[12:].sum()]
    assert min(exp) > 300  # the tail (49140 tokens) included
    assert scipy_stats.chisquare(obs, exp).pvalue > ALPHA


@pytest.mark.parametrize("heads", ["fixed", "oracle", "bad"])
@pytest.mark.parametrize("tree", ["chain", "branching"])
def test_exact_sampling_with_sampled_drafts_follows_the_law(plain_law, heads, tree):
    """Drafts drawn from the heads' own distributions (drafts="sampled"), siblings i.i.d., with
    and without context-lookup nodes (fixed candidates) in the same tree."""
    model = TableModel(heads=heads)
    samples = draw(model, dict(temperature=1.0, acceptance="exact", drafts="sampled", lookup=2), TREES[tree])
    assert gof_pvalue(samples, plain_law[1.0]) > ALPHA


@pytest.mark.parametrize("heads", ["fixed", "oracle", "bad"])
def test_sampled_drafts_on_a_chain_only_engine_with_lookup_follow_the_law(plain_law, heads):
    """An engine exact only for chains (int8/int4 graphs: ``exact_branching`` False) keeps its tree a
    chain: there a lookup draft would replace the sampled chain where it leaves it, so its first node
    would no longer be a draw from its head (with the step grafting the draft and keeping the node's q,
    as before 2026-12-02, this test fails at p < 1e-20)."""
    model = TableModel(heads=heads)
    model.exact_branching = False
    samples = draw(model, dict(temperature=1.0, acceptance="exact", drafts="sampled", lookup=2), TREES["chain"])
    assert gof_pvalue(samples, plain_law[1.0]) > ALPHA


@pytest.mark.parametrize("heads", ["oracle", "bad"])
def test_sampled_drafts_at_another_temperature_follow_the_law(plain_law, heads):
    """Sampled drafts at T 0.7: each node's q is its head's distribution at that temperature (a q
    taken at T 1 while the draft is drawn at T fails this; the tests at T 1 cannot see it)."""
    samples = draw(TableModel(heads=heads), dict(temperature=0.7, acceptance="exact", drafts="sampled"),
                   TREES["branching"])  # fmt: skip
    assert gof_pvalue(samples, plain_law[0.7]) > ALPHA


class FlatHeads(Backend):
    """Heads (Medusa or Hydra) whose logits are all 0, over a cache of ``cache`` tokens: under
    coupled drafts each node's rank-0 token is then the argmax of the noise at its position."""

    def __init__(self, kind: str, cache: int):
        self.spec = ModelSpec("flat", 1, 1, 1, 16, 16, 50, 64, num_medusa_heads=3, medusa_head_type=kind)
        self._cache = cache

    @property
    def cache_len(self) -> int:
        return self._cache

    def reset(self) -> None: ...

    def _forward(self, input_ids, position_ids, tree_mask, logits=None):
        raise AssertionError("not called")

    def commit(self, keep) -> None: ...

    def head_logits(self, index):
        return np.zeros((3, 50), dtype=np.float32)

    def draft_logits(self, index, path_ids, path_len):
        return np.zeros((len(path_ids), 50), dtype=np.float32)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_coupled_drafts_rank_by_the_noise_of_their_own_position(kind):
    """The root sits at the cache length L; a node at depth d drafts the token at L + d, so with
    flat heads its rank-0 token is argmax(g_{L+d}) (an off-by-one here only costs acceptance, which
    the equality tests cannot see)."""
    from runtime.decode import draft_tree

    L = 9
    backend = FlatHeads(kind, L)
    noise, reference = PositionNoise(np.random.default_rng(4), 50), PositionNoise(np.random.default_rng(4), 50)
    tree = build_tree([[0], [0, 0], [0, 0, 0]], name="chain_3")
    cfg = DecodeConfig(temperature=0.9, seed=4)
    noise.at(L)  # as in a run: the root (at L) was drawn before its tree is drafted
    tokens, _ = draft_tree(backend, 0, 7, tree, cfg, np.random.default_rng(0), noise)
    reference.at(L)
    assert tokens[0] == 7
    assert [int(t) for t in tokens[1:]] == [int(np.argmax(reference.at(L + d))) for d in (1, 2, 3)]


def _mean_accepted(drafts: str, tree: str) -> float:
    """Accepted tokens per step over 150 seeds, oracle heads (their distribution is the backbone's)."""
    model, total, steps = TableModel(heads="oracle"), 0, 0
    for seed in range(150):
        cfg = DecodeConfig(max_new_tokens=12, temperature=1.0, seed=seed, drafts=drafts, lookup=0)
        r = decode(model, PROMPT, cfg, TREES[tree])
        total += sum(k * v for k, v in r.stats.accept_hist.items())
        steps += sum(r.stats.accept_hist.values())
    return total / steps


@pytest.mark.parametrize("drafts, tree", [("sampled", "chain"), ("coupled", "branching")])
def test_drafts_that_know_the_distribution_accept_more_than_fixed_candidates(drafts, tree):
    """Heads whose distribution is the backbone's: a drawn draft is accepted with probability
    1 - TV(q, p) = 1, a coupled one is the backbone's own draw, a fixed top-1 candidate is accepted
    only with p(top-1)."""
    top, better = _mean_accepted("top", tree), _mean_accepted(drafts, tree)
    assert better > top + 0.3, (top, better)


@pytest.mark.parametrize("drafts", ["coupled", "top", "sampled"])
def test_exact_sampling_at_another_temperature_with_top_k_and_top_p(drafts):
    cfg = dict(temperature=0.7, top_k=4, top_p=0.9)
    law = exact_law(TableModel(), DecodeConfig(**cfg))
    samples = draw(
        TableModel(heads="oracle"), dict(acceptance="exact", drafts=drafts, **cfg), TREES["branching"], n=8000
    )
    assert gof_pvalue(samples, law) > ALPHA
    # the cuts really cut: some sequences have probability 0 and are never drawn
    assert min(law.values()) == 0.0 and all(law[s] > 0 for s in set(samples))


def test_typical_acceptance_is_detected(plain_law):
    """Typical acceptance (lossy by design) fails the same test: the test has teeth."""
    samples = draw(TableModel(heads="oracle"), dict(temperature=1.0, acceptance="typical"), TREES["branching"])
    assert gof_pvalue(samples, plain_law[1.0]) < 1e-6


def test_the_test_detects_a_two_percent_shift(plain_law):
    """Exact samples against laws with 2% of one first token's probability moved to another: every
    ordered pair of first tokens, the hardest ones (between two likely tokens, where a 2% change is
    a small relative one) included."""
    law = dict(plain_law[1.0])
    first = np.zeros(VOCAB)
    for seq, p in law.items():
        first[seq[0]] += p
    samples = draw(TableModel(heads="oracle"), dict(temperature=1.0, acceptance="exact"), TREES["branching"])
    assert gof_pvalue(samples, law) > ALPHA
    pairs = [(a, b) for a in range(VOCAB) for b in range(VOCAB) if a != b and first[a] > 0.02]
    assert len(pairs) >= VOCAB * (VOCAB - 2)  # (all but the rarest token's moves away)
    for a, b in pairs:
        shifted = {}
        for seq, p in law.items():  # scale the conditional law of sequences starting with a / b
            if seq[0] == a:
                p *= (first[a] - 0.02) / first[a]
            elif seq[0] == b:
                p *= (first[b] + 0.02) / first[b]
            shifted[seq] = p
        assert gof_pvalue(samples, shifted) < ALPHA, (a, b, first)


def test_exact_accepts_more_than_one_token_with_good_heads():
    """With oracle heads steps accept about two tokens; with the least likely candidates far fewer."""

    def mean_accepted(heads):
        model, total, steps = TableModel(heads=heads), 0, 0
        for seed in range(200):
            cfg = DecodeConfig(max_new_tokens=12, temperature=0.7, seed=seed, drafts="top")
            r = decode(model, PROMPT, cfg, TREES["branching"])
            total += sum(k * v for k, v in r.stats.accept_hist.items())
            steps += sum(r.stats.accept_hist.values())
        return total / steps

    good, bad = mean_accepted("oracle"), mean_accepted("bad")
    assert good > 1.8 and bad < 1.4 and good - bad > 0.5


def test_walk_by_hand():
    """accept_exact on a hand-made step: a certain child is accepted, an impossible one never."""
    tree = build_tree([[0], [1]])
    tokens = np.array([0, 2, 3])
    logits = np.full((3, VOCAB), -1e9)
    logits[0, 2] = 0.0  # after the root: token 2 with probability 1
    logits[1, 4] = 0.0  # after child 1: token 4 with probability 1
    cfg = DecodeConfig(temperature=1.0)
    path, nxt = accept_exact(tokens, logits, tree, cfg, np.random.default_rng(0))
    assert path.tolist() == [0, 1] and nxt == 4
    logits[0] = -1e9
    logits[0, 1] = 0.0  # now only token 1 (no candidate) can follow the root
    path, nxt = accept_exact(tokens, logits, tree, cfg, np.random.default_rng(0))
    assert path.tolist() == [0] and nxt == 1


def test_seeds_reproduce_and_differ():
    model = TableModel(heads="fixed")
    run = lambda seed: (
        decode(model, PROMPT, DecodeConfig(max_new_tokens=20, temperature=1.0, seed=seed), TREES["branching"]).tokens
    )
    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in range(5)}) > 1


def test_bad_sampling_options_are_user_errors():
    for kw, msg in (
        (dict(acceptance="fast"), "acceptance"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=2.5), "top_k"),
    ):
        with pytest.raises(MedusaError, match=msg):
            DecodeConfig(temperature=1.0, **kw)


def test_greedy_is_unchanged_by_the_sampling_options():
    model = TableModel(heads="oracle")
    plain = decode(model, PROMPT, DecodeConfig(max_new_tokens=15, medusa=False), None).tokens
    for acceptance in ("exact", "typical"):
        cfg = DecodeConfig(max_new_tokens=15, acceptance=acceptance, top_k=2, top_p=0.5)
        res = decode(model, PROMPT, cfg, TREES["branching"])
        assert res.tokens == plain
        assert max(res.stats.accept_hist) > 1, res.stats.accept_hist  # the oracle's drafts were accepted


def test_exact_sampling_on_an_exported_graph_reproduces(tiny):
    """Through the fused ONNX graph and runtime.load: a seed reproduces, seeds differ, and the
    first sampled token's frequencies match the backbone's own distribution."""
    import runtime

    gen = runtime.load(tiny["artifact"], threads=1)
    ids = [5, 17, 42, 99]
    a = gen.generate(ids, max_new_tokens=16, temperature=1.0, seed=3)
    assert a.tokens == gen.generate(ids, max_new_tokens=16, temperature=1.0, seed=3).tokens
    assert a.tokens == gen.generate(ids, max_new_tokens=16, temperature=1.0, seed=3, medusa=False).tokens  # coupled
    assert len({tuple(gen.generate(ids, max_new_tokens=16, temperature=1.0, seed=s).tokens) for s in range(4)}) > 1
    assert a.stats.steps > 0 and sum(a.stats.accept_hist.values()) == a.stats.steps
    # the first two tokens against the backbone's law (the second is drawn by the exact walk
    # inside a Medusa step); top_k=8 keeps the law small enough to enumerate
    cfg = DecodeConfig(temperature=1.0, top_k=8)
    first = target_probs(_last_logits(gen.backend, ids), cfg)
    law = {}
    for x1 in np.flatnonzero(first):
        second = target_probs(_last_logits(gen.backend, ids + [int(x1)]), cfg)
        for x2 in np.flatnonzero(second):
            law[(int(x1), int(x2))] = float(first[x1] * second[x2])
    samples = [tuple(gen.generate(ids, max_new_tokens=2, temperature=1.0, top_k=8, seed=s).tokens) for s in range(2000)]
    assert gof_pvalue(samples, law) > ALPHA


def _last_logits(backend, ids) -> np.ndarray:
    backend.reset()
    n = len(ids)
    logits = backend.forward(np.array(ids), np.arange(n), np.tril(np.ones((n, n), dtype=bool)))
    return np.array(logits[-1])


def test_temperature_top_k_and_top_p_equal_their_definitions():
    """target_probs against the textbook definitions, written independently here: softmax of
    logits / T; top_k keeps the k likeliest (stable index order on ties); top_p then keeps, of what
    is left renormalised, the likeliest through the one reaching top_p; the rest renormalised."""
    rng = np.random.default_rng(1)
    for case in range(300):
        v = int(rng.integers(2, 200))
        logits = rng.standard_normal(v) * rng.uniform(0.1, 5)
        if case % 4 == 0:  # ties
            logits = np.round(logits)
        t = float(rng.uniform(0.2, 2.0))
        k = int(rng.integers(0, v + 2))  # 0: no cut; >= v: no cut either
        top_p = float(rng.choice([1.0, rng.uniform(0.05, 0.999)]))
        z = logits.astype(np.float64) / t
        want = np.exp(z - z.max())
        want /= want.sum()
        if 0 < k < v:
            keep = np.argsort(-want, kind="stable")[:k]
            cut = np.zeros_like(want)
            cut[keep] = want[keep]
            want = cut / cut.sum()
        if top_p < 1.0:
            order = np.argsort(-want, kind="stable")
            n = int(np.argmax(np.cumsum(want[order]) >= top_p)) + 1 if np.cumsum(want[order])[-1] >= top_p else v
            cut = np.zeros_like(want)
            cut[order[:n]] = want[order[:n]]
            want = cut / cut.sum()
        got = target_probs(logits, DecodeConfig(temperature=t, top_k=k, top_p=top_p))
        assert np.array_equal(got > 0, want > 0), (case, k, top_p)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)


def test_top_p_cut_equals_the_full_sort_definition():
    """The fast nucleus (sorting only the tokens that can be in it) keeps exactly the set the
    definition keeps: the likeliest tokens, in stable index order on ties, through the one reaching top_p."""
    rng = np.random.default_rng(0)
    for case in range(200):
        v = int(rng.integers(2, 300))
        logits = rng.standard_normal(v) * rng.uniform(0.1, 5)
        if case % 3 == 0:  # ties
            logits = np.round(logits)
        cfg = DecodeConfig(temperature=float(rng.uniform(0.3, 2.0)), top_p=float(rng.uniform(0.05, 0.999)))
        p = np.exp(logits / cfg.temperature - (logits / cfg.temperature).max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        keep = order[: np.searchsorted(np.cumsum(p[order]), cfg.top_p) + 1]
        want = np.zeros_like(p)
        want[keep] = p[keep]
        got = target_probs(logits, cfg)
        assert np.array_equal(got > 0, want > 0), case
        np.testing.assert_allclose(got, want / want.sum(), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------- one step, directly

# One verification step at depth 3, without the decode loop, so that each node's conditional law
# gets many samples: a 9-node tree whose children hold their parent row's likeliest tokens (as good
# heads would), fixed target rows, 100,000 steps a sampler (about 5 s each).
STEP_TREE = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]], name="step")
STEP_N = 100_000
STEP_CFG = DecodeConfig(temperature=1.0)


@pytest.fixture(scope="module")
def step():
    """(tokens, logits, probs, kids_of, reach): the step's candidates, target rows and laws, each
    node's children by token, and how often plain sampling reaches each node."""
    tree = STEP_TREE
    logits = np.random.default_rng(0).standard_normal((tree.num_nodes, VOCAB)) * 1.5
    probs = np.stack([target_probs(row, STEP_CFG) for row in logits])
    tokens = np.zeros(tree.num_nodes, dtype=np.int64)
    for v in range(tree.num_nodes):
        for rank, c in enumerate(np.flatnonzero(tree.parent == v)):
            tokens[c] = np.argsort(-probs[v])[rank]
    kids_of = {v: {int(tokens[c]): int(c) for c in np.flatnonzero(tree.parent == v)} for v in range(tree.num_nodes)}
    reach = np.zeros(tree.num_nodes)
    reach[0] = 1.0
    for v in range(tree.num_nodes):  # parents come before their children
        for y, c in kids_of[v].items():
            reach[c] = reach[v] * probs[v][y]
    return tokens, logits, probs, kids_of, reach


def _step_counts(step, sample) -> np.ndarray:
    """[nodes, VOCAB]: how often each token followed each node in ``STEP_N`` steps of ``sample``
    (a step emits its accepted nodes' tokens, then the next token; it reaches a node when the token
    after its parent is the node's)."""
    tokens, logits, probs, kids_of, reach = step
    counts = np.zeros((STEP_TREE.num_nodes, VOCAB))
    for i in range(STEP_N):
        path, nxt = sample(i)
        emitted = [int(t) for t in tokens[path[1:]]] + [int(nxt)]
        v = 0
        for y in emitted:
            counts[v, y] += 1
            v = kids_of[v].get(y, -1)
            if v < 0:
                break
        assert v < 0 or not kids_of[v], "a step stopped at a node with a child holding the token after it"
    return counts


def _node_pvalues(counts: np.ndarray, probs: np.ndarray) -> list[float]:
    """Each reached node's chi-square: the tokens after it against its law (what plain sampling
    draws there, whatever the tree), Bonferroni-corrected over the nodes."""
    reached = [v for v in range(len(counts)) if counts[v].sum() > 0]
    return [min(1.0, len(reached) * float(scipy_stats.chisquare(counts[v], probs[v] * counts[v].sum()).pvalue))
            for v in reached]  # fmt: skip


@pytest.fixture(scope="module")
def exact_step_counts(step):
    tokens, logits = step[0], step[1]
    rng = np.random.default_rng(1)
    return _step_counts(step, lambda i: accept_exact(tokens, logits, STEP_TREE, STEP_CFG, rng))


def test_one_exact_step_follows_the_law_at_every_node(step, exact_step_counts):
    """The rejection walk (point-mass drafts): at every node, the token after it follows the target row
    (so every emitted sequence has plain sampling's probability), and every node was reached."""
    assert exact_step_counts.sum(axis=1).min() > 3000
    assert min(_node_pvalues(exact_step_counts, step[2])) > ALPHA


def test_one_coupled_step_follows_the_law_at_every_node(step):
    """The coupled walk: each step's noise fresh from its own seed (positions 1.. of a new sequence)."""
    tokens, logits = step[0], step[1]
    counts = _step_counts(
        step,
        lambda i: accept_coupled(
            tokens, logits, STEP_TREE, STEP_CFG, PositionNoise(np.random.default_rng(i), VOCAB), 0
        ),
    )
    assert min(_node_pvalues(counts, step[2])) > ALPHA


def test_the_step_test_detects_a_two_percent_shift_at_depth_three(step, exact_step_counts):
    """The same samples against a law with 2% of one token's probability moved to another, at one
    node: detected for every ordered pair at every node reached in at least 12% of steps (6 of the 9,
    at depths 0 to 3), with the same correction."""
    probs, reach = step[2], step[4]
    nodes = [v for v in range(STEP_TREE.num_nodes) if reach[v] >= 0.12]
    assert len(nodes) == 6 and max(STEP_TREE.position_ids[nodes]) == 3
    for v in nodes:
        for a in range(VOCAB):
            for b in range(VOCAB):
                if a == b or probs[v][a] < 0.02:
                    continue
                shifted = probs.copy()
                shifted[v, a] -= 0.02
                shifted[v, b] += 0.02
                assert min(_node_pvalues(exact_step_counts, shifted)) < ALPHA, (v, a, b)
