"""The decode loop: lossless greedy Medusa, typical acceptance, stops, context limit, statistics.

References are Hugging Face ``generate(do_sample=False)`` on tiny random Llama models.
Heads are either fresh (untrained: they mostly guess wrong), an *oracle* that knows the
greedy continuation, or always wrong; the last two wrap a real backend (:class:`ScriptedHeads`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import hf_greedy

import runtime.decode as decode_mod
from exporter.heads import fresh_heads
from exporter.torch_backend import TorchBackend
from runtime.backend import Backend
from runtime.decode import (
    DEFAULT_DELTA,
    DEFAULT_EPSILON,
    GREEDY_BELOW,
    DecodeConfig,
    accept_greedy,
    accept_typical,
    decode,
    decode_steps,
    tree_candidates,
)
from runtime.errors import ContextLengthError, MedusaError
from runtime.tree import PAD, build_tree, load_tree

NUM_HEADS = 5
NEW = 40  # new tokens per lossless comparison

# (seed, config overrides): GQA 4/2, plain multi-head attention, a deeper and wider one
MODELS = [
    pytest.param(0, {}, id="seed0"),
    pytest.param(1, {"num_key_value_heads": 4}, id="seed1-mha"),
    pytest.param(
        2,
        {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3},
        id="seed2-3layers",
    ),
]
TREES = ["mc_sim_7b_63", "chain_3", "cpu_8", [[0]]]


def prompt_for(seed: int, length: int = 7, vocab: int = 128) -> list[int]:
    return np.random.default_rng(100 + seed).integers(3, vocab, size=length).tolist()


def torch_backend(model, max_context=None, num_heads=NUM_HEADS):
    c = model.config
    return TorchBackend(model, fresh_heads(num_heads, c.hidden_size, c.vocab_size), max_context=max_context)


class ScriptedHeads(Backend):
    """A real backend whose Medusa heads are replaced by ones built from a known continuation.

    ``sequence`` is prompt + greedy output. At a node at position ``p``, the backbone's own
    next token sits at ``p + 1`` and head k guesses position ``p + 2 + k``:

    * ``"oracle"``: head k ranks the true token first (so depth-k chains are always right);
    * ``"wrong"``: head k ranks the true token *last*, so no rank of any tree can be right.
    """

    def __init__(self, inner: Backend, sequence: list[int], mode: str, num_heads: int = NUM_HEADS):
        self.inner = inner
        self.sequence = list(sequence)
        self.mode = mode
        self.spec = dataclasses.replace(inner.spec, num_medusa_heads=num_heads)
        self.num_heads = num_heads
        self._positions = None
        self.head_calls = 0

    @property
    def cache_len(self):
        return self.inner.cache_len

    @property
    def max_context(self):
        return self.inner.max_context

    def reset(self):
        self.inner.reset()

    def _forward(self, input_ids, position_ids, tree_mask, logits=None):
        self._positions = np.asarray(position_ids)
        return self.inner.forward(input_ids, position_ids, tree_mask, logits=logits)

    def commit(self, keep):
        self.inner.commit(keep)

    def head_logits(self, index):
        self.head_calls += 1
        v = self.spec.vocab_size
        p = int(self._positions[index])
        out = np.empty((self.num_heads, v), dtype=np.float32)
        for k in range(self.num_heads):
            j = p + 2 + k
            truth = self.sequence[j] if j < len(self.sequence) else None
            if self.mode == "oracle":
                out[k] = 0.0
                if truth is not None:
                    out[k, truth] = 10.0
            else:
                out[k] = np.linspace(1.0, 0.0, v)
                if truth is not None:
                    out[k, truth] = -1e9
        return out


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """(model, prompt, greedy continuation of ``n`` tokens) per model param, cached."""
    cache = {}

    def get(seed, overrides, n=NEW + 12):
        key = (seed, tuple(sorted(overrides.items())), n)
        if key not in cache:
            model = tiny_llama(seed, **overrides)
            prompt = prompt_for(seed)
            cache[key] = (model, prompt, hf_greedy(model, prompt, n))
        return cache[key]

    return get


# ---------------------------------------------------------------------------- lossless greedy


@pytest.mark.parametrize("seed, overrides", MODELS)
def test_plain_decoding_equals_hf(seed, overrides, reference):
    model, prompt, ref = reference(seed, overrides)
    assert len(set(ref[:NEW])) > 5, "degenerate reference: the tiny model repeats one token"
    res = decode(torch_backend(model), prompt, DecodeConfig(max_new_tokens=NEW, medusa=False))
    assert res.tokens == ref[:NEW]
    assert res.stats.steps == NEW - 1 and res.stats.accept_hist == {1: NEW - 1}
    assert res.stats.mean_accepted == 1.0 and res.stats.finish_reason == "length"


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t if isinstance(t, str) else "one-node")
@pytest.mark.parametrize("seed, overrides", MODELS)
def test_greedy_medusa_fresh_heads_equals_hf(seed, overrides, tree, reference):
    model, prompt, ref = reference(seed, overrides)
    res = decode(torch_backend(model), prompt, DecodeConfig(max_new_tokens=NEW), load_tree(tree))
    assert res.tokens == ref[:NEW]
    assert res.stats.new_tokens == NEW and res.stats.finish_reason == "length"


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_oracle_chain_accepts_k_plus_one_every_step(k, reference):
    model, prompt, ref = reference(0, {})
    steps = 6
    n = 1 + steps * (k + 1)  # the prefill's token, then k+1 per step
    _, _, ref = reference(0, {}, n=n + k + 2)
    backend = ScriptedHeads(torch_backend(model), prompt + ref, "oracle")
    res = decode(backend, prompt, DecodeConfig(max_new_tokens=n), load_tree(f"chain_{k}"))
    assert res.tokens == ref[:n]
    assert res.stats.accept_hist == {k + 1: steps}
    assert res.stats.mean_accepted == k + 1


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "cpu_8", "cpu_16", "vicuna_7b_stage2"])
def test_oracle_tree_accepts_full_depth(tree, reference):
    t = load_tree(tree)
    model, prompt, ref = reference(1, {"num_key_value_heads": 4}, n=NEW + 12)
    backend = ScriptedHeads(torch_backend(model), prompt + ref, "oracle")
    n = 1 + 5 * (t.depth + 1)
    res = decode(backend, prompt, DecodeConfig(max_new_tokens=n), t)
    assert res.tokens == ref[:n]
    assert res.stats.accept_hist == {t.depth + 1: 5}


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "cpu_8", "chain_3", [[0]]], ids=str)
@pytest.mark.parametrize("seed, overrides", MODELS[:2])
def test_always_wrong_heads_stay_lossless(seed, overrides, tree, reference):
    model, prompt, ref = reference(seed, overrides)
    backend = ScriptedHeads(torch_backend(model), prompt + ref, "wrong")
    # the heads alone (no context lookup, whose drafts can be right)
    res = decode(backend, prompt, DecodeConfig(max_new_tokens=NEW, lookup=0), load_tree(tree))
    assert res.tokens == ref[:NEW]
    assert res.stats.accept_hist == {1: NEW - 1}
    assert res.stats.mean_accepted == 1.0
    assert backend.head_calls == NEW  # prefill + every step: the heads ran, and were rejected
    with_lookup = decode(backend, prompt, DecodeConfig(max_new_tokens=NEW), load_tree(tree))
    assert with_lookup.tokens == ref[:NEW]  # lossless with lookup drafts too
    # no head draft is ever right: every draft token accepted came from the lookup
    accepted_drafts = sum((k - 1) * v for k, v in with_lookup.stats.accept_hist.items())
    assert accepted_drafts == with_lookup.stats.lookup_accepted, with_lookup.stats.accept_hist


def test_candidates_follow_the_tree():
    tree = build_tree([[0], [1], [0, 0], [1, 0], [0, 1]])
    heads = np.array([[0.1, 0.9, 0.5, 0.0], [0.3, 0.2, 0.1, 0.8]])  # head 1: 1, 2, ...; head 2: 3, 0, ...
    tokens = tree_candidates(7, heads, tree)
    # nodes: root, [0], [1], [0,0], [0,1], [1,0]
    assert tokens.tolist() == [7, 1, 2, 3, 0, 3]


# ---------------------------------------------------------------------------- acceptance units


def _logits_with_argmax(n: int, v: int, best: list[int]) -> np.ndarray:
    logits = np.zeros((n, v))
    logits[np.arange(n), best] = 5.0
    return logits


def test_greedy_acceptance_longest_path():
    tree = build_tree([[0], [1], [0, 0], [1, 0], [1, 0, 0]])
    # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [1,0], 5 [1,0,0]
    tokens = np.array([9, 4, 5, 6, 7, 8])
    # backbone argmax at each node (predicts the child's token): root->5, [1]->7, [1,0]->8
    logits = _logits_with_argmax(6, 10, [5, 0, 7, 0, 8, 0])
    assert accept_greedy(tokens, logits, tree).tolist() == [0, 2, 4, 5]
    logits = _logits_with_argmax(6, 10, [4, 6, 7, 0, 0, 0])  # now [0] then [0,0] agree
    assert accept_greedy(tokens, logits, tree).tolist() == [0, 1, 3]
    logits = _logits_with_argmax(6, 10, [0, 6, 7, 0, 8, 0])  # root disagrees with both: root only
    assert accept_greedy(tokens, logits, tree).tolist() == [0]


def test_padding_is_never_read_as_a_node():
    # rows: [0, 1, PAD] and [0, 2, 3]. The last node (3) agrees with the backbone but its
    # parent does not: if PAD (-1) were used as an index, row 0 would read node 3's "ok".
    tree = build_tree([[0], [1], [1, 0]])
    assert PAD in tree.retrieve_indices
    tokens = np.array([9, 4, 5, 6])
    logits = _logits_with_argmax(4, 10, [4, 0, 6, 0])  # [0] right, [1] wrong, [1,0] "right"
    assert accept_greedy(tokens, logits, tree).tolist() == [0, 1]


def _dist_logits(probs: dict[int, float], v: int) -> np.ndarray:
    """Logits (temperature 1) whose softmax puts ``probs`` on the given tokens, the rest uniform."""
    rest = (1.0 - sum(probs.values())) / (v - len(probs))
    p = np.full(v, rest)
    for t, q in probs.items():
        p[t] = q
    return np.log(p)


V = 64
PEAKED = {5: 0.80, 6: 0.12, 7: 0.0799}  # entropy ~0.65: delta*exp(-H) ~0.16 > epsilon, so epsilon (0.09) binds
FLAT: dict = {}  # uniform over 64 tokens: p = 1/64 ~ 0.0156 < epsilon, but delta*exp(-H) = 0.3/64 ~ 0.0047 binds


def _entropy(logits):
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def test_typical_threshold_is_the_minimum_of_epsilon_and_entropy_term():
    # Hand-checked numbers behind the cases below (p > min(epsilon, delta * exp(-H))).
    h_peaked, h_flat = _entropy(_dist_logits(PEAKED, V)), _entropy(_dist_logits(FLAT, V))
    assert DEFAULT_DELTA * np.exp(-h_peaked) > DEFAULT_EPSILON  # epsilon binds: threshold 0.09
    assert h_flat == pytest.approx(np.log(V))
    assert DEFAULT_DELTA * np.exp(-h_flat) == pytest.approx(0.3 / 64)  # entropy term binds
    assert 1 / 64 < DEFAULT_EPSILON  # a flat token passes only thanks to the entropy term

    cfg = DecodeConfig(temperature=1.0)
    tree = build_tree([[0], [1], [0, 0], [1, 0]])  # 0 root, 1 [0], 2 [1], 3 [0,0], 4 [1,0]
    logits = np.stack(
        [
            _dist_logits(PEAKED, V),
            _dist_logits(FLAT, V),
            _dist_logits(FLAT, V),
            _dist_logits(PEAKED, V),
            _dist_logits(PEAKED, V),
        ]
    )
    # [0] carries token 6 (p 0.12 > 0.09: accepted); [1] carries 7 (p 0.0799 < 0.09: rejected);
    # [0,0] under a flat parent (p 1/64 > 0.3/64: accepted)
    tokens = np.array([1, 6, 7, 30, 31])
    assert accept_typical(tokens, logits, tree, cfg).tolist() == [0, 1, 3]
    tokens = np.array([1, 7, 6, 30, 31])  # swapped: now only the [1] branch passes
    assert accept_typical(tokens, logits, tree, cfg).tolist() == [0, 2, 4]
    tokens = np.array([1, 7, 7, 30, 31])  # both first candidates below epsilon: root only
    assert accept_typical(tokens, logits, tree, cfg).tolist() == [0]


def test_typical_entropy_term_rejects_rare_tokens_of_a_flat_distribution():
    cfg = DecodeConfig(temperature=1.0)
    tree = build_tree([[0]])
    rare = _dist_logits({3: 0.001}, V)  # flat-ish, token 3 at 0.001 < 0.3 * exp(-H) ~ 0.0048
    assert accept_typical(np.array([1, 3]), np.stack([rare, rare]), tree, cfg).tolist() == [0]
    assert accept_typical(np.array([1, 4]), np.stack([rare, rare]), tree, cfg).tolist() == [0, 1]


def test_typical_epsilon_and_delta_are_honoured():
    tree = build_tree([[0]])
    logits = np.stack([_dist_logits(PEAKED, V)] * 2)
    tokens = np.array([1, 6])  # p = 0.12
    assert accept_typical(tokens, logits, tree, DecodeConfig(temperature=1.0, epsilon=0.2)).tolist() == [0]
    assert accept_typical(tokens, logits, tree, DecodeConfig(temperature=1.0, epsilon=0.1)).tolist() == [0, 1]
    assert accept_typical(tokens, logits, tree, DecodeConfig(temperature=1.0, epsilon=0.2, delta=0.05)).tolist() == [
        0,
        1,
    ]


def test_typical_acceptance_accepts_nothing_the_top_k_or_top_p_cut_drops():
    """Typical acceptance is lossy, but a token plain sampling could not draw under the user's cut
    is never accepted: with top_k=1 only the argmax is (so it decodes greedily)."""
    tree = build_tree([[0], [1]])
    root = _dist_logits({5: 0.5, 6: 0.3, 7: 0.15}, V)  # all three above epsilon
    logits = np.stack([root] * 3)
    tokens = np.array([1, 6, 5])
    assert accept_typical(tokens, logits, tree, DecodeConfig(temperature=1.0)).tolist() == [0, 2]
    assert accept_typical(np.array([1, 6, 7]), logits, tree, DecodeConfig(temperature=1.0, top_k=1)).tolist() == [0]
    assert accept_typical(tokens, logits, tree, DecodeConfig(temperature=1.0, top_k=1)).tolist() == [0, 2]
    # top_p 0.5 keeps token 5 alone (0.5 reaches it), 0.6 keeps 5 and 6
    assert accept_typical(np.array([1, 6, 7]), logits, tree, DecodeConfig(temperature=1.0, top_p=0.5)).tolist() == [0]
    assert accept_typical(np.array([1, 6, 7]), logits, tree, DecodeConfig(temperature=1.0, top_p=0.6)).tolist() == [
        0,
        1,
    ]


def test_typical_ties_go_to_the_highest_log_probability():
    cfg = DecodeConfig(temperature=1.0)
    tree = build_tree([[0], [1]])  # two leaves of equal length
    root = _dist_logits({5: 0.5, 6: 0.3, 7: 0.15}, V)  # all three above epsilon
    logits = np.stack([root, root, root])
    assert accept_typical(np.array([1, 6, 5]), logits, tree, cfg).tolist() == [0, 2]
    assert accept_typical(np.array([1, 5, 6]), logits, tree, cfg).tolist() == [0, 1]
    # longer beats likelier: [1] (p .3) has an accepted child, [0] (p .5) is a leaf
    tree = build_tree([[0], [1], [1, 0]])
    logits = np.stack([root, root, root, root])
    assert accept_typical(np.array([1, 5, 6, 7]), logits, tree, cfg).tolist() == [0, 2, 3]
    # ties over summed log-probabilities along the path, not only the last token
    tree = build_tree([[0], [1], [0, 0], [1, 0]])
    logits = np.stack([root] * 5)
    tokens = np.array([1, 5, 6, 7, 5])  # [0]->[0,0]: .5 * .15; [1]->[1,0]: .3 * .5 (likelier)
    assert accept_typical(tokens, logits, tree, cfg).tolist() == [0, 2, 4]


def test_defaults_are_the_papers():
    cfg = DecodeConfig()
    assert (cfg.epsilon, cfg.delta) == (DEFAULT_EPSILON, DEFAULT_DELTA) == (0.09, 0.3)
    assert cfg.temperature == 0.0 and cfg.medusa is True


# ---------------------------------------------------------------------------- typical, end to end


@pytest.mark.parametrize(
    "acceptance, drafts, walk",
    # coupled sampling's walk is greedy verification of the drawn tokens (Backend.forward_argmax with noise)
    [("exact", "coupled", "greedy_tokens"), ("exact", "top", "exact"), ("typical", "top", "typical")],
)
@pytest.mark.parametrize("heads", ["fresh", "oracle"])
@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "cpu_8"])
def test_temperature_to_zero_gives_the_greedy_output(heads, tree, acceptance, drafts, walk, reference, monkeypatch):
    model, prompt, ref = reference(0, {})
    backend = torch_backend(model)
    if heads == "oracle":
        backend = ScriptedHeads(backend, prompt + ref, "oracle")
    calls = {"exact": 0, "typical": 0, "greedy": 0, "coupled": 0, "greedy_tokens": 0}
    noisy = []
    rows = decode_mod.PositionNoise.rows
    monkeypatch.setattr(decode_mod.PositionNoise, "rows", lambda self, p: noisy.append(1) or rows(self, p))
    spied = {name: getattr(decode_mod, f"accept_{name}") for name in calls}

    def spy(name):
        def call(*a, **kw):
            calls[name] += 1
            return spied[name](*a, **kw)

        return call

    for name in calls:
        monkeypatch.setattr(decode_mod, f"accept_{name}", spy(name))
    cfg = DecodeConfig(max_new_tokens=NEW, temperature=1e-4, seed=0, acceptance=acceptance, drafts=drafts)
    assert cfg.temperature > GREEDY_BELOW  # the sampling path, not the greedy shortcut
    res = decode(backend, prompt, cfg, load_tree(tree))
    assert res.tokens == ref[:NEW]
    assert calls[walk] == res.stats.steps > 0 and sum(calls.values()) == calls[walk]
    assert len(noisy) == (res.stats.steps + 1 if drafts == "coupled" else 0)  # the prefill's draw, each step's
    if heads == "oracle":
        assert res.stats.mean_accepted > 2


def test_plain_sampling_at_low_temperature_is_greedy(reference):
    model, prompt, ref = reference(2, MODELS[2].values[1])
    res = decode(torch_backend(model), prompt, DecodeConfig(max_new_tokens=NEW, temperature=1e-4, medusa=False, seed=1))
    assert res.tokens == ref[:NEW]


@pytest.mark.parametrize("medusa", [True, False])
def test_sampling_is_reproducible_under_a_seed(medusa, reference):
    model, prompt, ref = reference(0, {})
    backend = torch_backend(model)
    tree = load_tree("cpu_8")

    def run(seed):
        return decode(
            backend, prompt, DecodeConfig(max_new_tokens=24, temperature=1.0, seed=seed, medusa=medusa), tree
        ).tokens

    first = run(3)
    assert run(3) == first
    others = [run(s) for s in (4, 5, 6)]
    assert any(o != first for o in others), "different seeds gave identical samples"
    assert first != ref[:24], "temperature 1 reproduced greedy exactly: sampling is not sampling"


# ---------------------------------------------------------------------------- stops


def _oracle(model, prompt, ref, tree="chain_3", **kw):
    return ScriptedHeads(torch_backend(model, **kw), prompt + ref, "oracle"), load_tree(tree)


def _first_new_index(ref, start):
    """Smallest j >= start whose token does not occur earlier in ref."""
    return next(j for j in range(start, len(ref)) if ref[j] not in ref[:j])


@pytest.mark.parametrize("medusa", [True, False])
def test_eos_is_included_and_ends_generation(medusa, reference):
    model, prompt, ref = reference(0, {})
    backend, tree = _oracle(model, prompt, ref)
    # with chain_3 + oracle a step emits ref[1:5], ref[5:9], ...: j = 6 sits mid-step
    j = _first_new_index(ref, 6)
    assert j % 4 != 0, "pick an EOS in the middle of a step"
    res = decode(backend, prompt, DecodeConfig(max_new_tokens=NEW, eos_token_ids=[ref[j]], medusa=medusa), tree)
    assert res.tokens == ref[: j + 1]
    assert res.stats.finish_reason == "eos" and res.stats.new_tokens == j + 1
    if medusa:  # the oracle's steps took several tokens: not plain decoding in disguise
        assert max(res.stats.accept_hist) > 1, res.stats.accept_hist


def test_eos_as_the_first_token(reference):
    model, prompt, ref = reference(0, {})
    res = decode(
        torch_backend(model), prompt, DecodeConfig(max_new_tokens=NEW, eos_token_ids=[ref[0]]), load_tree("cpu_8")
    )
    assert res.tokens == ref[:1] and res.stats.finish_reason == "eos" and res.stats.steps == 0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 9, 13])
def test_max_new_tokens_is_exact(n, reference):
    model, prompt, ref = reference(0, {})
    backend, tree = _oracle(model, prompt, ref)  # 4 tokens per step: most n cut a step short
    res = decode(backend, prompt, DecodeConfig(max_new_tokens=n), tree)
    assert res.tokens == ref[:n]
    assert res.stats.finish_reason == "length" and res.stats.new_tokens == n
    assert sum(res.stats.accept_hist.values()) == res.stats.steps
    if n > 2:  # the prefill's token, then a step of 4 tokens cut to n - 1
        assert max(res.stats.accept_hist) > 1, res.stats.accept_hist


def _text(ids):
    return "".join(f"<{t}>" for t in ids)


@pytest.mark.parametrize("medusa", [True, False])
def test_stop_string(medusa, reference):
    model, prompt, ref = reference(0, {})
    backend, tree = _oracle(model, prompt, ref)
    # a stop string spanning tokens 5 and 6 (across the boundary of two oracle steps)
    stop = _text(ref[4:6])
    cut = next(c for c in range(1, len(ref) + 1) if stop in _text(ref[:c]))
    res = decode(
        backend, prompt, DecodeConfig(max_new_tokens=NEW, stop_strings=[stop], medusa=medusa), tree, decode_text=_text
    )
    assert res.tokens == ref[:cut]
    assert stop in _text(res.tokens) and stop not in _text(res.tokens[:-1])
    assert res.stats.finish_reason == "stop_string"
    if medusa:
        assert max(res.stats.accept_hist) > 1, res.stats.accept_hist


def test_stop_string_inside_a_token(reference):
    model, prompt, ref = reference(0, {})
    backend, tree = _oracle(model, prompt, ref)
    stop = f"{ref[7]}>"  # ends inside the text of token 7
    cut = next(c for c in range(1, len(ref) + 1) if stop in _text(ref[:c]))
    res = decode(
        backend, prompt, DecodeConfig(max_new_tokens=NEW, stop_strings=["never", stop]), tree, decode_text=_text
    )
    assert res.tokens == ref[:cut] and res.stats.finish_reason == "stop_string"
    assert max(res.stats.accept_hist) > 1, res.stats.accept_hist


def test_a_stop_string_the_last_allowed_token_completes_is_a_stop_not_the_length(reference):
    """The stop string ends at the very token max_new_tokens allows last: OpenAI's servers and vLLM say
    "stop" there (the text ends before it), not "length"."""
    model, prompt, ref = reference(0, {})
    for medusa in (False, True):
        backend, tree = _oracle(model, prompt, ref)
        stop = _text(ref[5:7])
        assert stop not in _text(ref[:6])
        cfg = DecodeConfig(max_new_tokens=7, stop_strings=[stop], medusa=medusa)
        res = decode(backend, prompt, cfg, tree, decode_text=_text)
        assert res.tokens == ref[:7] and res.stats.finish_reason == "stop_string", res.stats.finish_reason


def test_stop_string_before_eos_in_the_same_step(reference):
    model, prompt, ref = reference(0, {})
    backend, tree = _oracle(model, prompt, ref, tree="chain_4")  # steps emit ref[1:6], ref[6:11], ...
    # stop string completed at token 7, EOS at a later token of the same step
    stop = _text(ref[6:8])
    assert stop not in _text(ref[:7])
    eos = next(j for j in (8, 9, 10) if ref[j] not in ref[:j])
    res = decode(
        backend,
        prompt,
        DecodeConfig(max_new_tokens=NEW, stop_strings=[stop], eos_token_ids=[ref[eos]]),
        tree,
        decode_text=_text,
    )
    assert res.tokens == ref[:8]
    assert res.stats.finish_reason == "stop_string"
    assert res.stats.accept_hist == {5: 1, 2: 1}  # what was emitted, not what the tree accepted


def test_the_stop_check_decodes_a_window_and_finds_what_the_whole_text_shows():
    """A step's stop check decodes the new tokens and a window before them, not the whole answer,
    and cuts where decoding the whole answer would: tokens of 0 (special), 1 and several characters,
    and of a character's first or last bytes (a replacement character decoded alone, as a byte-level
    BPE decoder gives for a cut UTF-8 character)."""
    import random

    from runtime.decode import _stop_string_cut

    pieces = {0: "", 1: "a", 2: "b", 3: "ab ", 4: "Human:", 5: "\n", 6: " ", 7: "\xe2", 8: "\x82\xac"}  # 7 + 8: €

    def text(ids):
        raw = "".join(pieces[t] for t in ids).encode("latin-1")
        return raw.decode("utf-8", errors="replace")

    def whole(out, emitted, stops):  # the check before the window: the whole answer each time
        if not any(s in text(out) for s in stops):
            return None
        return next((c for c in range(len(out) - len(emitted) + 1, len(out) + 1)
                     if any(s in text(out[:c]) for s in stops)), len(out))  # fmt: skip

    # each stop with the tokens that spell it (and empty ones), so that stops reaching far back are common
    cases = [(["Human:"], [4, 0, 5, 1]), (["ab b"], [3, 2, 1, 0, 6]), (["\n\n", "a a"], [5, 1, 6, 0]),
             (["\u20ac a"], [7, 8, 6, 1, 0]), (["b" * 9], [2, 2, 2, 0]), ([" " + "a" * 3], [6, 1, 1, 0, 3])]  # fmt: skip
    rng = random.Random(0)
    widest = hits = 0
    for _ in range(1500):
        stops, alphabet = rng.choice(cases)
        out: list[int] = []
        for _ in range(rng.randint(1, 400)):  # an answer, up to where a stop first shows (if it does)
            out.append(rng.choice(alphabet if rng.random() < 0.9 else list(pieces)))
            if any(s in text(out[-40:]) for s in stops):
                break
        emitted = out[len(out) - rng.randint(1, min(6, len(out))) :]  # the last step's tokens
        calls: list[int] = []
        found = _stop_string_cut(out, emitted, stops, lambda ids, calls=calls: calls.append(len(ids)) or text(ids))
        assert found == whole(out, emitted, stops), (stops, out, emitted)
        widest, hits = max(widest, max(calls)), hits + (found is not None)
    assert hits > 300, hits  # the stops were found, across the window's edge
    out = [2] * 8 + [0] * 100 + [2]  # a stop's start far behind 100 special tokens: the window reaches it
    assert _stop_string_cut(out, [2], ["b" * 9], text) == len(out)
    assert widest < 150, widest  # answers of up to 400 tokens: a window, not the answer


def test_stop_strings_need_decode_text(reference):
    """Without a decode_text callable stop strings cannot be seen; generation runs to the length."""
    model, prompt, ref = reference(0, {})
    res = decode(torch_backend(model), prompt, DecodeConfig(max_new_tokens=10, stop_strings=["<"]), load_tree("cpu_8"))
    assert res.tokens == ref[:10] and res.stats.finish_reason == "length"


# ---------------------------------------------------------------------------- context limit


def test_prompt_that_does_not_fit_is_a_clear_error(tiny_llama):
    model = tiny_llama(0)
    backend = torch_backend(model, max_context=16)
    with pytest.raises(ContextLengthError, match=r"the prompt has 16 tokens but the context holds 16"):
        decode(backend, list(range(3, 19)), DecodeConfig(max_new_tokens=4), load_tree("cpu_8"))
    with pytest.raises(ContextLengthError, match=r"the prompt has 40 tokens but the context holds 16"):
        decode(backend, list(range(3, 43)), DecodeConfig(max_new_tokens=4, medusa=False))
    assert issubclass(ContextLengthError, MedusaError)


@pytest.mark.parametrize(
    "mode, tree", [("fresh", "mc_sim_7b_63"), ("fresh", "cpu_8"), ("oracle", "chain_4"), ("plain", None)]
)
def test_generation_stops_at_the_context_end_losslessly(mode, tree, reference):
    cap = 40
    model, prompt, ref = reference(0, {}, n=cap)
    backend = torch_backend(model, max_context=cap)
    if mode == "oracle":
        backend = ScriptedHeads(backend, prompt + ref, "oracle")
    cfg = DecodeConfig(max_new_tokens=1000, medusa=mode != "plain")
    res = decode(backend, prompt, cfg, load_tree(tree) if tree else None)
    # the cache fills to the cap; the last token is predicted from position cap-1
    expected = cap - len(prompt) + 1
    assert res.stats.finish_reason == "context"
    assert res.tokens == ref[:expected]
    assert backend.cache_len == cap
    if mode == "oracle":
        assert max(res.stats.accept_hist) > 1, res.stats.accept_hist


def test_prompt_one_short_of_the_context(tiny_llama):
    model = tiny_llama(0)
    prompt = prompt_for(0, length=15)
    ref = hf_greedy(model, prompt, 2)
    res = decode(
        torch_backend(model, max_context=16), prompt, DecodeConfig(max_new_tokens=10), load_tree("mc_sim_7b_63")
    )
    assert res.tokens == ref and res.stats.finish_reason == "context"


def test_the_last_event_at_the_context_end_says_so_as_it_comes(tiny_llama):
    """The event whose step fills the cache carries finish_reason "context" when it is yielded (as an EOS,
    a stop or the length does), so a stream's consumer knows the decode ended without asking for one more
    step (runtime.api would restore a cache another call took, only to find the loop over)."""
    model = tiny_llama(0)
    prompt = prompt_for(0, length=12)
    for tree in (None, load_tree("chain_4")):
        backend = torch_backend(model, max_context=16)
        cfg = DecodeConfig(max_new_tokens=10, medusa=tree is not None)
        seen = [ev.stats.finish_reason for ev in decode_mod.decode_steps(backend, prompt, cfg, tree)]
        assert seen[-1] == "context" and not any(seen[:-1]), seen


# ---------------------------------------------------------------------------- statistics and streaming


@pytest.mark.parametrize("tree, n", [("mc_sim_7b_63", NEW), ("chain_2", 11), ("cpu_16", 23)])
def test_statistics(tree, n, reference):
    model, prompt, ref = reference(1, {"num_key_value_heads": 4})
    backend = ScriptedHeads(torch_backend(model), prompt + ref, "oracle")
    res = decode(backend, prompt, DecodeConfig(max_new_tokens=n), load_tree(tree))
    s = res.stats
    assert res.tokens == ref[:n]
    assert sum(s.accept_hist.values()) == s.steps
    assert s.new_tokens == len(res.tokens) == n
    emitted = sum(k * v for k, v in s.accept_hist.items())
    assert 1 + emitted == s.new_tokens  # the prefill's token + every step's
    assert s.mean_accepted == pytest.approx(emitted / s.steps)
    assert max(s.accept_hist) > 1, s.accept_hist  # the oracle's drafts were accepted
    d = s.as_dict()
    assert d["steps"] == s.steps and d["new_tokens"] == n and d["finish_reason"] == "length"
    assert d["accept_hist"] == {str(k): v for k, v in sorted(s.accept_hist.items())}
    assert s.total_s > 0 and s.times["prefill"] > 0 and s.times["engine"] > 0
    assert s.decode_s <= s.total_s


def test_streaming_events_add_up(reference):
    model, prompt, ref = reference(0, {})
    backend = torch_backend(model)
    events = list(decode_steps(backend, prompt, DecodeConfig(max_new_tokens=NEW), load_tree("cpu_8")))
    assert [t for e in events for t in e.tokens] == ref[:NEW]
    assert len(events) == events[-1].stats.steps + 1  # the prefill's event, then one per step
    assert all(e.tokens for e in events)


def test_backend_is_reset_between_calls(reference):
    model, prompt, ref = reference(0, {})
    backend = torch_backend(model)
    tree = load_tree("mc_sim_7b_63")
    first = decode(backend, prompt, DecodeConfig(max_new_tokens=20), tree).tokens
    other = prompt_for(5)
    decode(backend, other, DecodeConfig(max_new_tokens=20), tree)
    assert decode(backend, prompt, DecodeConfig(max_new_tokens=20), tree).tokens == first == ref[:20]


class RecordingBackend(Backend):
    """A real backend that records each forward's positions and mask (to see how prefill is split)."""

    def __init__(self, inner: Backend):
        self.inner, self.spec, self.calls = inner, inner.spec, []

    cache_len = property(lambda self: self.inner.cache_len)
    max_context = property(lambda self: self.inner.max_context)

    def reset(self):
        self.inner.reset()

    def _forward(self, input_ids, position_ids, tree_mask, logits=None):
        self.calls.append((np.asarray(position_ids).copy(), np.asarray(tree_mask).copy(), self.inner.cache_len))
        return self.inner.forward(input_ids, position_ids, tree_mask, logits=logits)

    def commit(self, keep):
        self.inner.commit(keep)

    def head_logits(self, index):
        return self.inner.head_logits(index)


@pytest.mark.parametrize("chunk", [1, 5, 22, 23, 0])
@pytest.mark.parametrize("medusa", [True, False], ids=["medusa", "plain"])
def test_chunked_prefill_is_lossless_and_bounded(chunk, medusa, tiny_llama):
    """A 23-token prompt in chunks of ``chunk`` (0: one call): each call holds at most ``chunk``
    tokens at consecutive positions under a causal mask over a cache of the earlier chunks,
    and the output equals Hugging Face greedy whatever the split."""
    model = tiny_llama(0)
    prompt = prompt_for(0, length=23)
    ref = hf_greedy(model, prompt, 20)
    backend = RecordingBackend(torch_backend(model))
    cfg = DecodeConfig(max_new_tokens=20, medusa=medusa, prefill_chunk=chunk)
    res = decode(backend, prompt, cfg, load_tree("mc_sim_7b_63") if medusa else None)
    assert res.tokens == ref
    size = chunk or len(prompt)
    n_prefill = -(-len(prompt) // size)
    prefill, steps = backend.calls[:n_prefill], backend.calls[n_prefill:]
    assert len(steps) == res.stats.steps
    starts = list(range(0, len(prompt), size))
    for (pos, mask, cached), s in zip(prefill, starts):
        m = min(size, len(prompt) - s)
        assert cached == s
        assert pos.tolist() == list(range(s, s + m))
        assert (mask == np.tril(np.ones((m, m), dtype=bool))).all()
    assert steps[0][2] == len(prompt)  # the first step sees the whole prompt in the cache


# ---------------------------------------------------------------------------- user errors


def test_user_errors(tiny_llama):
    model = tiny_llama(0)
    backend = torch_backend(model, num_heads=3)
    with pytest.raises(MedusaError, match=r"tree 'cpu_8' has depth 4 but the model has 3 Medusa heads"):
        decode(backend, [5, 6], DecodeConfig(max_new_tokens=4), load_tree("cpu_8"))
    with pytest.raises(MedusaError, match=r"needs a tree"):
        decode(backend, [5, 6], DecodeConfig(max_new_tokens=4))
    with pytest.raises(MedusaError, match=r"prompt token ids must lie in \[0, 128\); got 5\.\.128"):
        decode(backend, [5, 128], DecodeConfig(max_new_tokens=4, medusa=False))
    with pytest.raises(MedusaError, match=r"non-empty list of token ids"):
        decode(backend, [], DecodeConfig(max_new_tokens=4, medusa=False))
    with pytest.raises(MedusaError, match=r"max_new_tokens must be an integer >= 1, got 0"):
        DecodeConfig(max_new_tokens=0)
    with pytest.raises(MedusaError, match=r"temperature must be >= 0, got -1"):
        DecodeConfig(temperature=-1)
    with pytest.raises(
        MedusaError, match=r"prefill_chunk must be an integer >= 0 \(0: the whole prompt in one call\), got -2"
    ):
        DecodeConfig(prefill_chunk=-2)
    with pytest.raises(MedusaError, match=r"prefill_chunk must be an integer >= 0 .*got 1.5"):
        DecodeConfig(prefill_chunk=1.5)
    with pytest.raises(MedusaError, match=r"epsilon"):
        DecodeConfig(epsilon=0)
