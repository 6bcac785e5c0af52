"""Two ways a CPU step got cheaper, each drafting or computing exactly what it did before.

heads_int8_first.onnx: the first Medusa head alone. The exporter writes it beside heads_int8.onnx
(Medusa heads, K > 1); ONNX Runtime on the CPU drafts a depth-1 tree from it (one projected row
instead of K). Drafts only: greedy output stays plain greedy's, whichever graph drafted.

The fused backend's cache buffer starts small and doubles as the sequence grows (GroupQueryAttention's
CPU kernel costs by the bound buffer's length): same logits and cache as a full-length buffer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import runtime
import runtime.backend
from runtime.errors import ArtifactError

PROMPTS = ["Name three rivers in Europe.", "Write a limerick about a cat.", "Explain why the sky is blue."]


def test_export_writes_and_seals_the_first_head_graph(tiny):
    art = tiny["artifact"]
    cfg = json.loads((art / "medusa_config.json").read_text())
    first = cfg["heads_int8_first"]
    assert first["file"] == "heads_int8_first.onnx" and (art / first["file"]).is_file()
    assert (first["inputs"], first["outputs"]) == (cfg["heads"]["inputs"], cfg["heads"]["outputs"])
    assert "heads_int8_first.onnx" in cfg["provenance"]["checksums"]


def test_the_first_head_is_traced_in_tempfiles_folder(tiny, tmp_path, monkeypatch):
    """The float first head (110 MB for SmolLM2) is traced where tempfile puts files, which an export
    points into its partial folder (removed with it, even after a kill), not beside the output."""
    import tempfile

    import exporter.export
    from exporter.quantize import quantize_first_head
    from runtime.artifact import read_artifact

    scratch, out = tmp_path / "scratch", tmp_path / "out" / "art"
    scratch.mkdir()
    out.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    traced = []
    real = exporter.export.export_heads
    monkeypatch.setattr(
        exporter.export, "export_heads", lambda h, lm, path, opset: traced.append(path) or real(h, lm, path, opset)
    )
    cfg = read_artifact(tiny["artifact"])
    quantize_first_head(out, cfg, tiny["heads"], tiny["model"].lm_head, exporter.export.ExportOptions().opset)
    assert len(traced) == 1 and scratch in traced[0].parents, traced
    assert (out / "heads_int8_first.onnx").is_file() and sorted(p.name for p in out.parent.iterdir()) == ["art"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a: (a / "heads_int8_first.onnx").unlink(), "heads_int8_first.onnx is missing"),
        (lambda a: _edit(a, lambda c: c["heads_int8_first"].update(outputs=["x"])), "edited after export"),
    ],
    ids=["deleted", "edited"],
)
def test_a_missing_or_edited_first_head_graph_is_named(tiny, tmp_path, damage, message):
    art = tmp_path / "a"
    shutil.copytree(tiny["artifact"], art)
    damage(art)
    with pytest.raises(ArtifactError, match=message):
        runtime.load(art)


def _edit(folder, change):
    path = folder / "medusa_config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def test_first_head_logits_are_head_one_of_the_heads_graph(tiny):
    gen = runtime.load(tiny["artifact"], threads=1)
    b = gen.backend
    assert b.heads_first is not None  # the CPU serves the int8 heads, so their first-head graph too
    tops = []
    for prompt in PROMPTS:
        ids = np.asarray(gen.encode(prompt), dtype=np.int64)
        n = len(ids)
        b.reset()
        b.forward(ids, np.arange(n), np.tril(np.ones((n, n), dtype=bool)))
        for i in range(n):
            one, every = b.first_head_logits(i), b.head_logits(i)
            assert one.shape == (1, gen.spec.vocab_size) and every.shape == (tiny["num_heads"], gen.spec.vocab_size)
            # the same int8 weights; the activations' scale is taken over one row here, K there
            np.testing.assert_allclose(one[0], every[0], atol=0.05 * np.abs(every[0]).max())
            # so near-ties may swap: the heads graph's top draft is among this one's top 3
            tops.append(int((one[0] > one[0, every[0].argmax()]).sum()))
    assert max(tops) < 3 and np.mean(np.array(tops) == 0) >= 0.75, tops


@pytest.mark.parametrize("flavour", ["tiny", "tiny_portable"])
def test_a_depth_one_tree_drafts_from_the_first_head_graph_and_stays_lossless(flavour, request):
    """Greedy output equals plain greedy; the depth-1 tree calls the first-head graph (and not the
    K-head one), a deeper tree the K-head graph; sampling's drafts take the same path. Both graph
    flavours' ONNX Runtime backends."""
    gen = runtime.load(request.getfixturevalue(flavour)["artifact"], threads=1)
    b = gen.backend
    calls = {"first": 0, "all": 0}
    for name, attr in (("first", "heads_first"), ("all", "heads")):
        session = getattr(b, attr)

        class Counted:
            def __init__(self, inner, key):
                self.inner, self.key = inner, key

            def run(self, *args, **kw):
                calls[self.key] += 1
                return self.inner.run(*args, **kw)

            def __getattr__(self, item):
                return getattr(self.inner, item)

        setattr(b, attr, Counted(session, name))
    multi = 0
    for prompt in PROMPTS:
        plain = gen.generate(prompt, max_new_tokens=24, medusa=False)
        res = gen.generate(prompt, max_new_tokens=24, tree="chain_1", lookup=0)
        assert res.tokens == plain.tokens
        multi += sum(v for k, v in res.stats.accept_hist.items() if k > 1)
    assert calls["first"] > 0 and calls["all"] == 0, calls
    assert multi > 0  # drafts were accepted: the comparison means something
    deeper = gen.generate(PROMPTS[0], max_new_tokens=16, tree="chain_2", lookup=0)
    assert calls["all"] > 0 and deeper.tokens == gen.generate(PROMPTS[0], max_new_tokens=16, medusa=False).tokens
    before = calls["first"]
    gen.generate(PROMPTS[1], max_new_tokens=16, tree="chain_1", temperature=0.8, seed=1)
    assert calls["first"] > before


def test_the_batch_engine_serves_depth_one_trees_from_the_first_head_graph(tiny):
    gen = runtime.load(tiny["artifact"], threads=1, max_batch=2)
    engine = gen.engine
    assert engine.heads_first is not None
    runs = {"first": 0}
    inner = engine.heads_first

    class Counted:
        def run(self, *args, **kw):
            runs["first"] += 1
            return inner.run(*args, **kw)

        def __getattr__(self, item):
            return getattr(inner, item)

    engine.heads_first = Counted()
    multi = 0
    for prompt in PROMPTS[:2]:
        plain = gen.generate(prompt, max_new_tokens=20, medusa=False)
        res = gen.generate(prompt, max_new_tokens=20, tree="chain_1", lookup=0)
        assert res.tokens == plain.tokens
        multi += sum(v for k, v in res.stats.accept_hist.items() if k > 1)
    assert runs["first"] > 0
    assert multi > 0  # drafts were accepted: the comparison means something


def test_profile_times_the_first_head_call(tiny):
    from runtime.profile import profile_tree_sizes

    gen = runtime.load(tiny["artifact"], threads=1)
    prof = profile_tree_sizes(gen.backend, [1, 2], cached=8, repeats=2)
    assert prof["first_head_ms"] > 0 and prof["heads_ms"] > 0 and "first_head_relative_cost" in prof


def test_the_fused_cache_buffer_grows_as_needed_and_computes_as_a_full_one(tiny, monkeypatch):
    """The fused backend's cache starts at START_CAPACITY positions and doubles (GroupQueryAttention's
    CPU kernel costs by the bound buffer's length): prefill, tree steps and one-token steps that cross
    every doubling give the logits and cache a full-length buffer gives; reset keeps a buffer up to
    KEEP_CAPACITY positions (the same memory) and starts small again past it; restore of a longer
    snapshot grows the buffer first."""
    import runtime.onnxrt as O
    from runtime.artifact import read_artifact
    from runtime.tree import load_tree

    cfg = read_artifact(tiny["artifact"])
    full = O.FusedOnnxRuntimeBackend(tiny["artifact"], cfg, threads=1)
    assert full.kv.shape[4] == min(O.START_CAPACITY, cfg.model.max_context)
    monkeypatch.setattr(O, "START_CAPACITY", 8)
    grow = O.FusedOnnxRuntimeBackend(tiny["artifact"], cfg, threads=1)
    assert grow.kv.shape[4] == 8
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 1000, size=11)
    tree = load_tree("cpu_4")
    sizes = set()
    for b in (full, grow):
        b.forward(prompt, np.arange(11), np.tril(np.ones((11, 11), dtype=bool)))
        b.commit(np.arange(11))
    while grow.cache_len < 90:
        L = grow.cache_len
        toks = rng.integers(3, 1000, size=tree.num_nodes)
        want = full.forward(toks, L + tree.position_ids, tree.attn_mask).copy()
        got = grow.forward(toks, L + tree.position_ids, tree.attn_mask)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        keep = np.array([0, 1]) if L % 2 else np.array([0])
        full.commit(keep)
        grow.commit(keep)
        sizes.add(grow.kv.shape[4])
    assert sizes >= {32, 64, 128}, sizes
    n = grow.cache_len
    np.testing.assert_allclose(grow.kv[..., :n, :], full.kv[..., :n, :], rtol=0, atol=1e-5)
    saved = grow.snapshot()
    kept = grow.kv
    grow.reset()
    assert grow.kv is kept and grow.cache_len == 0  # the next answer writes into the pages already mapped
    monkeypatch.setattr(runtime.backend, "KEEP_CAPACITY", 64)  # below what the buffer grew to
    grow.reset()
    assert grow.kv.shape[4] == 8 and grow.cache_len == 0
    grow.restore(saved)
    assert grow.kv.shape[4] >= n and grow.cache_len == n
    step = np.array([7]), np.array([n]), np.ones((1, 1), dtype=bool)
    np.testing.assert_allclose(grow.forward(*step), full.forward(*step), rtol=0, atol=1e-5)


def test_the_profile_times_the_screen_beside_the_float_lm_head_and_a_load_keeps_its_limit(tiny, tmp_path, monkeypatch):
    """``medusa-run profile`` times each size through the lm_head screen and through the float lm_head,
    interleaved, and records up to how many rows calls go through the screen (``screen_max_rows``: the
    cut that saves the most summed over the sizes, so one noisy size does not end it); ``ms`` is then
    what a step pays. A generator (and the batch engine) of an artifact with that profile screens calls
    of up to that many rows only; the tokens are the same."""

    from conftest import capture_logs

    from runtime.onnxrt import FusedOnnxRuntimeBackend
    from runtime.profile import PROFILE_FILE, profile_tree_sizes, screen_limit, screen_summary

    # this machine's profile (session 38): two rows a hair dearer screened, three to five clearly cheaper
    screen, flt = {1: 14.6, 2: 19.0, 3: 18.4, 4: 19.4, 5: 21.4}, {1: 16.6, 2: 18.7, 3: 20.6, 4: 22.6, 5: 23.9}
    assert screen_limit(screen, flt) == 5
    # the screen dearer from two rows on (session 33's machine): cut where the savings peak
    assert screen_limit({1: 26.9, 2: 31.1, 3: 35.0, 4: 40.0}, {1: 28.4, 2: 31.0, 3: 33.0, 4: 36.0}) == 1
    assert screen_limit({1: 9.0, 2: 10.0, 3: 12.0, 4: 11.0}, {1: 10.0, 2: 10.0, 3: 11.0, 4: 12.0}) == 1  # a tie: fewer
    assert screen_limit({1: 11.0, 2: 9.0}, {1: 10.0, 2: 10.0}) == 0  # no cut saves anything
    assert screen_limit({1: 11.0, 2: 8.0}, {1: 10.0, 2: 10.0}) == 2  # one row dearer, two cheaper by more
    prof = {"screen_max_rows": 5, "screen_ms": {str(n): v for n, v in screen.items()},
            "float_ms": {str(n): v for n, v in flt.items()}}  # fmt: skip
    assert screen_summary(prof) == (
        "lm_head screen: calls of up to 5 rows (saves 9.6 ms summed over the sizes up to it; more rows: the float lm_head)"
    )
    assert "not used" in screen_summary({**prof, "screen_max_rows": 0})
    with capture_logs() as logs:
        gen = runtime.load(tiny["artifact"], threads=1)
    assert any(f"has no {PROFILE_FILE}" in line and "medusa-run profile" in line for line in logs), logs
    assert gen.backend.screens_argmax and gen.backend.screen_max_rows is None  # no profile: every call screened
    prof = profile_tree_sizes(gen.backend, [1, 2, 3], cached=8, repeats=2)
    assert prof["lm_head"] == "screen" and set(prof["screen_ms"]) == set(prof["float_ms"]) == {"1", "2", "3"}
    cut = prof["screen_max_rows"]
    assert cut == screen_limit(*({int(n): v for n, v in prof[k].items()} for k in ("screen_ms", "float_ms")))
    assert all(prof["ms"][n] == prof["screen_ms" if int(n) <= cut else "float_ms"][n] for n in prof["ms"])
    assert gen.backend.screen_max_rows is None  # (the profile timed every size screened, then put it back)

    art = tmp_path / "art"
    shutil.copytree(tiny["artifact"], art)
    (art / PROFILE_FILE).write_text(json.dumps({**prof, "screen_max_rows": 1}))
    prompt, asks = "t5 t6 t7 t8", ({"tree": "cpu_8"}, {"medusa": False}, {"temperature": 0.9, "seed": 2})
    want = [gen.generate(prompt, max_new_tokens=24, **kw).tokens for kw in asks]
    screened = []
    real = FusedOnnxRuntimeBackend._forward_argmax

    def spy(self, ids, pos, mask, rows, *rest):
        screened.append(rows)
        return real(self, ids, pos, mask, rows, *rest)

    monkeypatch.setattr(FusedOnnxRuntimeBackend, "_forward_argmax", spy)
    with capture_logs() as logs:
        limited = runtime.load(art, threads=1)
    assert not any(PROFILE_FILE in line for line in logs), logs
    assert limited.backend.screen_max_rows == 1
    assert [limited.generate(prompt, max_new_tokens=24, **kw).tokens for kw in asks] == want
    assert screened and max(screened) == 1  # the one-row calls screened, the trees' in float
    batched = runtime.load(art, threads=1, max_batch=2)
    try:
        assert batched.engine.screen_max_rows == 1
        assert batched.generate(prompt, max_new_tokens=24, **asks[0]).tokens == want[0]
    finally:
        batched.close()
