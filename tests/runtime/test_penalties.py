"""OpenAI's presence and frequency penalties: plain decoding with them equals a direct loop that
subtracts them from the backbone's logits, and greedy Medusa (fixed and dynamic trees, lookup
drafts) emits exactly plain decoding's tokens under the same penalties, each tree node penalized by
the tokens on its own path."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.decode import DecodeConfig, Penalties
from runtime.errors import ConfigError
from runtime.tree import build_tree

CHAT = [{"role": "user", "content": "Tell me about rivers and mountains."}]


def reference(gen, ids: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """Greedy decoding by hand: the whole sequence re-run each token, penalties on generated tokens."""
    backend, out = gen.backend, []
    counts = np.zeros(gen.spec.vocab_size)
    for _ in range(n):
        seq = np.array(ids + out, dtype=np.int64)
        backend.reset()
        logits = backend.forward(seq, np.arange(len(seq)), np.tril(np.ones((len(seq), len(seq)), dtype=bool)))
        row = logits[-1].astype(np.float64) - presence * (counts > 0) - frequency * counts
        out.append(int(np.argmax(row)))
        counts[out[-1]] += 1
    backend.reset()
    return out


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 1.0), (0.8, 0.6), (-0.5, 0.0)])
def test_plain_decoding_with_penalties_is_the_direct_loop_and_medusa_equals_it(gen, presence, frequency):
    ids = gen.encode(CHAT)
    want = reference(gen, ids, 20, presence, frequency)
    plain = gen.generate(CHAT, max_new_tokens=20, medusa=False, presence_penalty=presence,
                         frequency_penalty=frequency)  # fmt: skip
    assert plain.tokens == want
    assert want != gen.generate(CHAT, max_new_tokens=20, medusa=False).tokens  # the penalties took effect
    for tree in (None, "mc_sim_7b_63", "dynamic"):
        medusa = gen.generate(CHAT, max_new_tokens=20, tree=tree, presence_penalty=presence,
                              frequency_penalty=frequency)  # fmt: skip
        assert medusa.tokens == want, tree
        if tree != "dynamic":  # (a dynamic tree may shrink to plain steps where the drafts are unsure)
            assert medusa.stats.mean_accepted > 1.0, tree  # multi-token steps: the path penalties mattered


def test_sampled_with_penalties_medusa_draws_plain_samplings_tokens(gen):
    kw = dict(max_new_tokens=24, temperature=0.9, seed=11, presence_penalty=1.0, frequency_penalty=0.5)
    assert gen.generate(CHAT, **kw).tokens == gen.generate(CHAT, medusa=False, **kw).tokens  # coupled sampling


def test_a_tree_node_is_penalized_by_its_own_path():
    tree = build_tree([[0], [1], [0, 0], [0, 0, 0]])  # root; a, b (siblings); a -> c -> d
    cfg = DecodeConfig(presence_penalty=1.0, frequency_penalty=0.5)
    pen = Penalties(cfg, 6)
    pen.add([5, 5])  # generated so far (the root, token 5, among them)
    tokens = np.array([5, 1, 2, 1, 3])  # node tokens: root 5, a=1, b=2, c=1 (under a), d=3 (under c)
    assert list(tree.parent[1:]) == [0, 0, 1, 3]  # a and b under the root, c under a, d under c
    out = pen.apply(np.zeros((5, 6), np.float32), tree, tokens)
    expect = np.zeros((5, 6))
    expect[:, 5] -= 1.0 + 0.5 * 2  # every row: token 5 generated twice
    for v in range(1, 5):
        path, node = [], v
        while node > 0:
            path.append(int(tokens[node]))
            node = int(tree.parent[node])
        for t in set(path):
            expect[v, t] -= 1.0 + 0.5 * path.count(t)
    np.testing.assert_allclose(out, expect)
    assert out[4, 1] == pytest.approx(-(1.0 + 0.5 * 2))  # d's path holds token 1 twice (a and c)


@pytest.mark.parametrize("bad", [2.5, -3, float("nan"), "1", True])
def test_bad_penalties_are_refused(gen, bad):
    with pytest.raises(ConfigError, match="presence_penalty"):
        gen.generate(CHAT, max_new_tokens=2, presence_penalty=bad)
