"""Structured output (``response_format``, :mod:`runtime.grammar`): every answer is in the format, and
Medusa under a format emits exactly what plain decoding under it does (greedy, and seeded coupled
sampling), with fixed and dynamic trees, penalties and the batch engine; each tree node's row is masked
after its own path; bad formats are ConfigErrors naming the problem; the server takes the field."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import runtime
from runtime.errors import ConfigError, MedusaError

llguidance = pytest.importorskip("llguidance")

# bounded (enums, small integers, no free whitespace) so that a tiny random model's answers end
COMPACT = {"whitespace_flexible": False}
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "n", "ok"],
    "additionalProperties": False,
    "x-guidance": COMPACT,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
PROMPTS = ["Describe a thing as JSON.", [{"role": "user", "content": "Give me a colour and a number."}], "t5 t6 t7"]


def conforms(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"color", "n", "ok"}
        and value["color"] in ("red", "green", "blue")
        and isinstance(value["n"], int)
        and 0 <= value["n"] <= 99
        and isinstance(value["ok"], bool)
    )


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "chat", "words"])
def test_greedy_medusa_equals_plain_under_the_format_and_the_answer_conforms(gen, prompt):
    plain = gen.generate(prompt, max_new_tokens=48, temperature=0, medusa=False, response_format=FORMAT)
    fixed = gen.generate(prompt, max_new_tokens=48, temperature=0, response_format=FORMAT)
    dynamic = gen.generate(prompt, max_new_tokens=48, temperature=0, response_format=FORMAT, tree="dynamic")
    free = gen.generate(prompt, max_new_tokens=48, temperature=0, medusa=False)
    assert fixed.tokens == plain.tokens == dynamic.tokens
    assert plain.stats.finish_reason == "eos" and conforms(plain.text), plain.text
    assert free.tokens != plain.tokens  # the format changed the answer: the mask did something
    assert fixed.stats.steps < len(fixed.tokens)  # some steps accepted drafts: the tree ran under the mask


def test_any_json_object(gen):
    fmt = {"type": "json_object"}
    out = gen.generate(PROMPTS[0], max_new_tokens=64, temperature=0, response_format=fmt)
    assert out.tokens == gen.generate(PROMPTS[0], max_new_tokens=64, temperature=0, medusa=False,
                                      response_format=fmt).tokens  # fmt: skip
    assert out.text.lstrip().startswith("{")  # an object begins (a random model may not close it in 64 tokens)


def test_seeded_sampling_under_the_format_is_plain_sampling_s(gen):
    for seed in (1, 2, 3):
        kw = dict(max_new_tokens=48, temperature=0.8, seed=seed, response_format=FORMAT)
        medusa, plain = gen.generate(PROMPTS[0], **kw), gen.generate(PROMPTS[0], medusa=False, **kw)
        assert medusa.tokens == plain.tokens
        if plain.stats.finish_reason == "eos":
            assert conforms(plain.text), plain.text
    typical = gen.generate(PROMPTS[0], max_new_tokens=48, temperature=0.8, seed=1, acceptance="typical",
                           response_format=FORMAT)  # fmt: skip
    assert typical.stats.finish_reason != "eos" or conforms(typical.text)  # lossy, but still in the format


def test_penalties_and_the_format_together(gen):
    kw = dict(max_new_tokens=48, temperature=0, presence_penalty=1.5, frequency_penalty=0.5, response_format=FORMAT)
    medusa, plain = gen.generate(PROMPTS[0], **kw), gen.generate(PROMPTS[0], medusa=False, **kw)
    assert medusa.tokens == plain.tokens and conforms(plain.text)


def test_the_batch_engine_gives_the_same_answers(tiny, gen):
    batched = runtime.load(tiny["artifact"], threads=1, max_batch=2)
    try:
        for prompt in PROMPTS:
            kw = dict(max_new_tokens=48, temperature=0, response_format=FORMAT)
            assert batched.generate(prompt, **kw).tokens == gen.generate(prompt, **kw).tokens
    finally:
        batched.close()


def test_each_tree_node_s_row_is_masked_after_its_own_path(gen):
    """GrammarMask.apply against a fresh matcher per node: row v allows exactly what the grammar allows
    after the root's text and v's path; a node the grammar refuses keeps its row."""
    from runtime.tree import build_tree

    grammar = gen.grammar(FORMAT)
    ids = gen.tokenizer.encode
    prefix = ids('{"color":"')
    # paths below the root: red / re+d / green, and a node the grammar refuses (a digit)
    red, green, digit = ids("red")[0], ids("green")[0], ids("7")[0]
    tree = build_tree([[0], [1], [2], [0, 0]], name="t", num_heads=2)
    tokens = np.array([prefix[-1], red, green, digit, ids('",')[0]])
    mask = grammar.mask(gen.spec.vocab_size)
    mask.add(prefix)
    logits = np.zeros((tree.num_nodes, gen.spec.vocab_size), dtype=np.float32)
    out = mask.apply(logits, tree, tokens)
    for v in range(tree.num_nodes):
        fresh = grammar.mask(gen.spec.vocab_size)
        fresh.add(prefix)
        path = [int(t) for t in tokens[1:][tree.attn_mask[v, 1:]]]
        if fresh.matcher.try_consume_tokens(path) == len(path):
            assert np.array_equal(np.isfinite(out[v]), fresh.allowed()), v
        else:
            assert np.isfinite(out[v]).all(), v  # refused path: left as it was
    assert np.isfinite(out[0]).sum() < 20  # after '{"color":"' only the enum's beginnings


@pytest.mark.parametrize("masked_ranking", [True, False])
def test_the_screen_draws_the_best_allowed_candidate_or_leaves_the_row_open(masked_ranking):
    """runtime.onnxrt.screen_draws under a grammar's mask, against the masked float argmax, the graph's
    ranking simulated (``logits + T g`` plus :func:`runtime.onnxrt.screen_ranking`'s mask, the bound the
    next-ranked token's): the best allowed candidate where it beats the bound, a row's only allowed
    token whatever the scores, -1 (the float rerun) where no allowed candidate beats the bound. With
    the mask in the ranking (what the backends feed) every row that allows a token is settled."""
    from runtime.backend import draw_argmax, perturbed
    from runtime.onnxrt import screen_draws, screen_ranking, screen_ties

    rng = np.random.default_rng(5)
    rows, vocab, k = 400, 300, 8
    opened = empty = 0
    for noise, t in ((None, 1.0), (rng.gumbel(size=(rows, vocab)).astype(np.float32), 0.7)):
        logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
        allowed = rng.random((rows, vocab)) < rng.choice([0.005, 0.05, 0.5, 1.0], size=(rows, 1))
        allowed[:20] = False
        allowed[np.arange(20), rng.integers(0, vocab, 20)] = True  # one token allowed: forced
        ranking = screen_ranking(noise, t, allowed if masked_ranking else None)
        ranked = logits if ranking is None else logits + ranking  # what the graph ranks
        order = np.argsort(-ranked, axis=1)
        ids = order[:, :k]
        scores = np.take_along_axis(logits, ids, axis=1)
        bound = np.take_along_axis(ranked, order[:, k : k + 1], axis=1)[:, 0] + np.float32(1e-3)
        got = screen_draws(ids, scores, bound, noise, t, allowed)
        want = draw_argmax(logits, noise, t, allowed)
        settled = got >= 0
        assert (got[settled] == want[settled]).all()
        one = allowed.sum(1) == 1  # rows that allow one token: drawn whatever the scores
        assert (got[one] == want[one]).all() and one.sum() > 20
        masked = np.where(np.take_along_axis(allowed, ids, 1), perturbed(scores, np.take_along_axis(noise, ids, 1), t)
                          if noise is not None else scores, -np.inf)  # fmt: skip
        best = masked.max(1)
        b = bound / np.float32(t) if noise is not None else bound
        # open exactly where no allowed candidate beats the bound, or the best two are a near-tie
        assert (settled[~one] == ((best > b) & ~screen_ties(masked))[~one]).all()
        if masked_ranking:
            assert settled[allowed.any(1)].all()
        opened += int((~settled).sum())
        empty += int((~allowed.any(1)).sum())
    if masked_ranking:
        assert opened == empty > 0  # the rows that allow nothing
    else:
        assert opened > 0


@pytest.mark.parametrize("unsettled", ["none", "every", "odd"])
def test_constrained_steps_draw_through_the_screen_the_float_paths_tokens(tiny, gen, monkeypatch, unsettled):
    """Greedy and coupled-sampling steps under a format read their drawn tokens through the lm_head
    screen with each row's mask (Backend.forward_argmax(allowed=...)): the tokens of the float path,
    also where the screen settles no row or every other one (settle_argmax: the float row, masked),
    for plain decoding, fixed and dynamic trees and the batch engine."""
    from runtime.onnxrt import FusedOnnxRuntimeBackend

    backend = gen.backend
    assert backend.screens_argmax and backend.screens_noise
    asks = [dict(temperature=0, medusa=False), dict(temperature=0), dict(temperature=0, tree="dynamic"),
            dict(temperature=0.9, seed=1, medusa=False), dict(temperature=0.9, seed=1)]  # fmt: skip

    def answers(g):
        return [g.generate(p, max_new_tokens=40, response_format=FORMAT, **a).tokens for p in PROMPTS[:2] for a in asks]

    monkeypatch.setattr(backend, "screens_argmax", False)  # the float lm_head, masked logits
    want = answers(gen)
    monkeypatch.setattr(backend, "screens_argmax", True)
    real, masked = FusedOnnxRuntimeBackend._forward_argmax, []

    def forward_argmax(self, ids, pos, mask, rows, noise=None, temperature=1.0, allowed=None):
        best = real(self, ids, pos, mask, rows, noise, temperature, allowed)
        masked.append(allowed is not None)
        forced = allowed is not None and allowed.sum(1) == 1  # no float rerun needed: left as drawn
        if unsettled == "every":
            best[~forced] = -1
        elif unsettled == "odd":
            best[1::2][~np.asarray(forced)[1::2] if allowed is not None else slice(None)] = -1
        return best

    monkeypatch.setattr(FusedOnnxRuntimeBackend, "_forward_argmax", forward_argmax)
    before = backend.screen_fallbacks
    assert answers(gen) == want
    assert masked and all(masked)  # every call went through the screen with its masks
    if unsettled == "every":
        assert backend.screen_fallbacks > before  # the path's last rows were settled in float, masked
    elif unsettled == "none":  # the graph ranked each row's allowed tokens alone: the bound settled every row
        assert backend.screen_fallbacks == before
    if unsettled == "none":  # the batch engine screens its one-sequence calls with the masks too
        batched = runtime.load(tiny["artifact"], threads=1, max_batch=2, budgets=None)
        try:
            assert answers(batched) == want and batched.engine.stats["screened_calls"] > 0
        finally:
            batched.close()


def test_a_padded_vocabulary_s_ids_in_a_tree_do_not_break_the_grammar(gen):
    """A model whose lm_head is padded past its tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens) may
    draft a padding id; its node is refused (its row left unmasked) and the grammar goes on: the
    matcher is not left in llguidance's error state, the next rows allow what they allowed, and a
    matcher that does reach an error state makes ``add`` raise instead of ending the answer quietly."""
    from runtime.tree import build_tree

    grammar = gen.grammar({"type": "json_object"})
    known = int(grammar._tokenizer.vocab_size)
    vocab = known + 64
    ids = gen.tokenizer.encode
    prefix = ids('{"a')
    mask = grammar.mask(vocab)
    mask.add(prefix)
    before = mask.allowed()
    tree = build_tree([[0], [1]], name="t", num_heads=1)
    tokens = np.array([prefix[-1], ids('"')[0], known + 5])  # the second candidate: a padding id
    rows = mask.masks(tree.num_nodes, tree, tokens)
    assert not mask.matcher.is_error()
    assert rows[2].all() and np.array_equal(rows[0], before) and rows[1].sum() < before.sum()
    assert np.array_equal(mask.allowed(), before) and before.sum() > 2
    mask.add([ids('"')[0]])  # the step accepted a real token: the grammar follows it
    mask.matcher.consume_token(known + 5)  # what the padding id did to llguidance's matcher
    assert mask.matcher.is_error()
    with pytest.raises(MedusaError, match="error state"):
        mask.add([ids("1")[0]])


@pytest.mark.parametrize(
    "fmt, words",
    [
        ({"type": "xml"}, "type 'xml' is not one of text, json_object, json_schema, grammar"),
        ("json", "must be a mapping"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}, "json_schema must be"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "does not compile"),
    ],
)
def test_bad_formats_are_config_errors_naming_the_problem(gen, fmt, words):
    with pytest.raises(ConfigError, match=words):
        gen.generate("x", max_new_tokens=2, response_format=fmt)


def test_a_lark_grammar(gen):
    """{"type": "grammar"}: llguidance's Lark (vLLM's guided_grammar), here a choice and a regular expression."""
    fmt = {"type": "grammar", "grammar": 'start: ("yes" | "no") ", " /[0-9]{2}/'}
    plain = gen.generate(PROMPTS[0], max_new_tokens=16, temperature=0, medusa=False, response_format=fmt)
    assert gen.generate(PROMPTS[0], max_new_tokens=16, temperature=0, response_format=fmt).tokens == plain.tokens
    assert plain.stats.finish_reason == "eos" and re.fullmatch(r"(yes|no), [0-9]{2}", plain.text), plain.text
    with pytest.raises(ConfigError, match="the grammar does not compile"):
        gen.generate("x", max_new_tokens=2, response_format={"type": "grammar", "grammar": "start: nothing_defined"})
    with pytest.raises(ConfigError, match='needs "grammar"'):
        gen.generate("x", max_new_tokens=2, response_format={"type": "grammar"})


def test_text_and_none_are_free_text(gen):
    free = gen.generate(PROMPTS[0], max_new_tokens=8, temperature=0)
    assert (
        gen.generate(PROMPTS[0], max_new_tokens=8, temperature=0, response_format={"type": "text"}).tokens
        == free.tokens
    )
    assert gen.grammar(None) is None and gen.grammar(FORMAT) is gen.grammar(json.loads(json.dumps(FORMAT)))  # cached


def test_without_llguidance_the_error_names_the_extra(gen, monkeypatch):
    import sys

    import runtime.grammar as grammar

    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(MedusaError, match=r"pip install 'medusa-trt\[structured\]'"):
        grammar.require_llguidance()


# ---------------------------------------------------------------------------- through the server


@pytest.mark.parametrize("stream", [False, True])
def test_the_server_takes_response_format(gen, stream):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from test_serve import running

    body = {"messages": PROMPTS[1], "max_tokens": 48, "temperature": 0, "response_format": FORMAT, "stream": stream}
    with running(gen) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        bad = httpx.post(f"{url}/v1/chat/completions", json={**body, "response_format": {"type": "xml"}}, timeout=60)
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    else:
        text = r.json()["choices"][0]["message"]["content"]
    assert text == gen.generate(PROMPTS[1], max_new_tokens=48, temperature=0, response_format=FORMAT).text
    assert conforms(text)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_medusa_run_generate_takes_a_format_or_a_schema_file(tiny, gen, capsys, tmp_path):
    from runtime.cli import main

    art = str(tiny["artifact"])
    path = tmp_path / "thing.json"
    path.write_text(json.dumps(SCHEMA))
    common = ["--max-new-tokens", "48", "--temperature", "0", "--threads", "1", "--raw"]
    assert main(["generate", art, PROMPTS[0], "--json-schema", str(path), *common]) == 0
    by_file = capsys.readouterr().out.strip()
    assert main(["generate", art, PROMPTS[0], "--response-format", json.dumps(FORMAT), *common]) == 0
    assert capsys.readouterr().out.strip() == by_file == gen.generate(PROMPTS[0], max_new_tokens=48, temperature=0,
                                                                       response_format=FORMAT).text  # fmt: skip
    assert conforms(by_file)
    path.write_text("{")
    assert main(["generate", art, "x", "--json-schema", str(path), *common]) == 1  # before the artifact loads
    assert "--json-schema" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one of the two
        main(["generate", art, "x", "--json-schema", str(path), "--response-format", "{}"])
