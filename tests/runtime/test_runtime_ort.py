"""ONNX Runtime backend and runtime.load(): lossless, reproducible, streaming, stops, errors.

A tiny random Llama (real SmolLM2 tokenizer, so chat templates and stop strings are real)
is exported once per test session with the real exporter (conftest ``tiny``, shared and read-only).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import runtime  # noqa: E402
from runtime.errors import ArtifactError, ContextLengthError, MedusaError, MedusaWarning  # noqa: E402

PROMPTS = ["Write a haiku about rivers.", "What is 17 times 23?", "List three prime numbers."]


def _hf_greedy(model, ids, n):
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "chain_3", "cpu_8", [[0]]])
def test_greedy_medusa_equals_plain_and_hf(gen, tiny, tree):
    multi = 0  # steps that accepted candidates: without them this test would prove little
    for text in PROMPTS:
        ids = gen.encode([{"role": "user", "content": text}])
        plain = gen.generate(ids, max_new_tokens=40, medusa=False)
        med = gen.generate(ids, max_new_tokens=40, tree=tree)
        assert med.tokens == plain.tokens
        ref = _hf_greedy(tiny["model"], ids, 40)
        assert plain.tokens == ref[: len(plain.tokens)]
        assert med.stats.steps <= plain.stats.steps
        multi += sum(v for k, v in med.stats.accept_hist.items() if k > 1)
    assert multi > 0


def test_chunked_prefill_on_onnxruntime(gen, tiny):
    """Prefill in 4-token calls gives the tokens of the one-call prefill, Medusa and plain."""
    chunked = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1, prefill_chunk=4)
    whole = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1, prefill_chunk=0)
    ids = gen.encode([{"role": "user", "content": PROMPTS[1]}])
    assert len(ids) > 8
    for medusa in (True, False):
        a = chunked.generate(ids, max_new_tokens=24, medusa=medusa)
        b = whole.generate(ids, max_new_tokens=24, medusa=medusa)
        assert a.tokens == b.tokens == gen.generate(ids, max_new_tokens=24, medusa=medusa).tokens
    with pytest.raises(MedusaError, match=r"prefill_chunk must be an integer >= 0"):
        runtime.load(tiny["artifact"], backend="onnxruntime", prefill_chunk=-1)


def test_onnxruntime_matches_torch_reference_backend(gen, tiny):
    from exporter.torch_backend import TorchBackend
    from runtime.decode import DecodeConfig, decode
    from runtime.tree import load_tree

    ref_backend = TorchBackend(tiny["model"], tiny["heads"])
    tree = load_tree("mc_sim_7b_63")
    ids = gen.encode(PROMPTS[0])
    cfg = DecodeConfig(max_new_tokens=32, eos_token_ids=())
    a = decode(gen.backend, ids, cfg, tree)
    b = decode(ref_backend, ids, cfg, tree)
    assert a.tokens == b.tokens
    assert a.stats.accept_hist == b.stats.accept_hist
    # the head proposals agree too, for the last step's root (both backends ran the same calls): ONNX
    # Runtime's heads graph (int8 weights on the CPU) against the torch heads, wherever the torch top-1
    # leads its runner-up by more than int8's error could move it
    ours = np.asarray(gen.backend.head_logits(0), dtype=np.float64)
    ref = np.asarray(ref_backend.head_logits(0), dtype=np.float64)
    assert ours.shape == ref.shape == (tiny["num_heads"], ref.shape[-1])
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05 * (np.abs(ref).max() + 1e-9)
    assert clear.any(), "no head has a clear top-1 to compare"
    assert (np.argmax(ours, -1) == np.argmax(ref, -1))[clear].all()
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.99


def test_no_torch_on_the_onnxruntime_path(tiny):
    code = (
        "import sys, runtime\n"
        f"g = runtime.load({str(tiny['artifact'])!r}, backend='onnxruntime', threads=1)\n"
        "g.generate('Hi', max_new_tokens=4)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_typical_acceptance_reproducible_under_seed(gen):
    kw = dict(max_new_tokens=24, temperature=0.8, seed=11, tree="cpu_8", acceptance="typical")
    a = gen.generate(PROMPTS[1], **kw)
    b = gen.generate(PROMPTS[1], **kw)
    c = gen.generate(PROMPTS[1], **{**kw, "seed": 12})
    assert a.tokens == b.tokens
    assert a.stats.accept_hist == b.stats.accept_hist
    assert len(a.tokens) == 24 or a.stats.finish_reason == "eos"
    assert c.tokens != a.tokens  # another seed samples another text (24 tokens at T=0.8)


def test_streaming_equals_non_streaming(gen):
    for tree in ("cpu_8", "chain_2"):
        whole = gen.generate(PROMPTS[2], max_new_tokens=30, tree=tree)
        chunks = list(gen.stream(PROMPTS[2], max_new_tokens=30, tree=tree))
        assert [t for c in chunks for t in c.tokens] == whole.tokens
        assert "".join(c.text for c in chunks) == whole.text
        assert len(chunks) == whole.stats.steps + 1  # the prefill's token, then one chunk per step


def test_stop_strings(gen):
    full = gen.generate(PROMPTS[0], max_new_tokens=40, medusa=False)
    # a stop string taken from the middle of the real output
    stop = gen.tokenizer.decode(full.tokens[18:21]).strip()
    assert stop, full.text
    out = gen.generate(PROMPTS[0], max_new_tokens=40, stop=[stop])
    assert out.stats.finish_reason == "stop_string"
    assert stop in out.text
    assert out.tokens == full.tokens[: len(out.tokens)]
    assert max(out.stats.accept_hist) > 1, out.stats.accept_hist  # drafts were accepted before the stop
    # the last token completes the stop string: without it, the text does not contain it
    assert stop not in gen.tokenizer.decode(out.tokens[:-1])


def test_context_limit(tiny):
    small = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1, max_context=48)
    ids = small.encode("one two three four five six seven eight nine ten " * 2)
    assert len(ids) < 48
    with pytest.warns(MedusaWarning, match="every step decodes plain"):  # 64 nodes never fit after this prompt
        out = small.generate(ids, max_new_tokens=200, tree="mc_sim_7b_63")
    plain = small.generate(ids, max_new_tokens=200, medusa=False)
    assert out.stats.finish_reason == "context"
    assert out.tokens == plain.tokens  # lossless up to the end of the context
    assert set(out.stats.accept_hist) == {1}  # plain steps only, as the warning says
    assert len(ids) + len(out.tokens) == 48 + 1  # the last token needs no cache slot
    too_long = list(range(5, 5 + 60))
    with pytest.raises(ContextLengthError, match="60 tokens but the context holds 48"):
        small.generate(too_long, max_new_tokens=4)


def test_concurrent_callers_do_not_corrupt_each_other(gen):
    import threading

    expected = {p: gen.generate(p, max_new_tokens=20).tokens for p in PROMPTS}
    results, errors = [], []

    def work(p):
        try:
            results.append((p, gen.generate(p, max_new_tokens=20).tokens))  # every thread's, none overwritten
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in PROMPTS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == sorted((p, expected[p]) for p in PROMPTS * 2)


def test_bad_prompts(gen):
    with pytest.raises(MedusaError, match="empty"):
        gen.generate("", max_new_tokens=4)
    with pytest.raises(MedusaError, match="role"):
        gen.generate([{"content": "no role"}], max_new_tokens=4)
    with pytest.raises(MedusaError, match="token ids must lie"):
        gen.generate([10**9], max_new_tokens=4)
    with pytest.raises(MedusaError, match="unknown tree"):
        gen.generate("hi", tree="no_such_tree")


@pytest.mark.parametrize("damage", ["config", "model", "tokenizer", "version", "json"])
def test_broken_artifacts_give_clear_errors(tiny, tmp_path, damage):
    art = tmp_path / "a"
    shutil.copytree(tiny["artifact"], art)
    cfg = art / "medusa_config.json"
    if damage == "config":
        cfg.unlink()
        match = "medusa_config.json is missing"
    elif damage == "model":
        (art / "model.onnx").unlink()
        match = "model.onnx is missing"
    elif damage == "tokenizer":
        (art / "tokenizer.json").unlink()
        match = "tokenizer.json is missing"
    elif damage == "version":
        raw = json.loads(cfg.read_text())
        raw["format_version"] = 999
        cfg.write_text(json.dumps(raw))
        match = "incompatible exporter"
    else:
        cfg.write_text("{not json")
        match = "not valid JSON"
    with pytest.raises(ArtifactError, match=match):
        runtime.load(art)
    with pytest.raises(ArtifactError):
        runtime.load(tmp_path / "nowhere")


def test_cli_generate_bench_profile(tiny, tmp_path, shared_data, capsys):
    from runtime.cli import main

    art = str(tiny["artifact"])
    assert main(["generate", art, "Say hello.", "--max-new-tokens", "8", "--stats", "--threads", "1"]) == 0
    assert main(["generate", art, "Say hello.", "--max-new-tokens", "8", "--stream", "--no-medusa"]) == 0
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(
        [
            "bench",
            art,
            "--prompts",
            str(shared_data / "mt_bench_question.jsonl"),
            "--limit",
            "2",
            "--max-new-tokens",
            "16",
            "--tree",
            "cpu_8",
            "chain_2",
            "--threads",
            "1",
            "--json",
            str(js),
            "--plot",
            str(png),
            "--quiet",
        ]
    )
    assert rc == 0
    res = json.loads(js.read_text())
    for key in (
        "prompts",
        "identical",
        "ar_tokens_per_s",
        "medusa_tokens_per_s",
        "speedup",
        "mean_accepted",
        "overhead_fraction",
    ):
        assert key in res, key
    assert res["prompts"] == 2 and res["identical"] == 2
    assert res["mean_accepted"] > 1  # drafts were accepted: "identical" means something
    assert set(res["trees"]) == {"cpu_8", "chain_2"}
    assert res["speedup"] == pytest.approx(res["medusa_tokens_per_s"] / res["ar_tokens_per_s"])
    assert 0 <= res["overhead_fraction"] < 1
    assert png.stat().st_size > 10_000
    prof = tmp_path / "p.json"
    assert main(["profile", art, "--sizes", "1", "4", "--cached", "16", "--repeats", "2", "-o", str(prof)]) == 0
    p = json.loads(prof.read_text())
    assert p["relative_cost"]["1"] == 1.0 and set(p["ms"]) == {"1", "4"}
    assert p["heads_ms"] > 0 and p["heads_relative_cost"] == pytest.approx(p["heads_ms"] / p["ms"]["1"], rel=1e-2)
    out = capsys.readouterr().out  # the screen was timed beside the float lm_head: where it runs now is printed
    cut = p["screen_max_rows"]
    assert (f"lm_head screen: calls of up to {cut} rows" if cut else "lm_head screen: dearer") in out, out
    assert main(["generate", str(tmp_path / "missing"), "x"]) == 1


def test_bench_with_hf_peer(tiny, tmp_path, shared_data):
    """--peer hf runs Hugging Face generate on the same prompts, in the same run."""
    from runtime.bench import format_report, load_prompts, run_bench

    folder = tmp_path / "hf"
    tiny["model"].save_pretrained(folder)
    gen = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1)
    prompts = load_prompts(shared_data / "mt_bench_question.jsonl", limit=2)
    res = run_bench(
        gen, prompts, ["chain_2"], max_new_tokens=12, peer="hf", peer_model=str(folder), threads=1, progress=False
    )
    assert res["peer_tokens_per_s"] > 0
    assert res["ar_vs_peer"] == pytest.approx(res["ar_tokens_per_s"] / res["peer_tokens_per_s"])
    # HF generate stops at the same EOS and decodes greedily: its tokens equal the plain decode's
    assert res["peer_identical_to_plain"] == 2
    assert "peer hf" in format_report(res)
    with pytest.raises(MedusaError, match="--peer-model"):
        run_bench(gen, prompts, ["chain_2"], max_new_tokens=4, peer="hf", progress=False)


def test_bench_prefills_every_prompt_whole_even_where_the_generator_reuses_prefixes(tiny, shared_data):
    """Plain decoding, then each variant, run the same prompt: none may find it cached from the call
    before (the peers prefill every prompt), whatever the loaded generator's reuse_prefix."""
    from runtime.bench import load_prompts, run_bench

    gen = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1)
    assert gen.reuse_prefix
    cached, kinds = [], {}
    real = gen.generate
    warm = gen.encode([{"role": "user", "content": "Hello"}])  # run_bench's warm-up prompt

    def spy(ids, **kw):
        out = real(ids, **kw)
        cached.append(out.stats.cached_prompt_tokens)
        same = {("medusa", "True"), ("tree", "None"), ("seed",), ("max_new_tokens",)}  # defaults, or per call
        kind = tuple(sorted((k, str(v)) for k, v in kw.items() if (k, str(v)) not in same and (k,) not in same))
        kinds.setdefault(list(ids) == warm, set()).add(kind)  # the warm-up's prompt, or a timed one
        return out

    gen.generate = spy
    prompts = load_prompts(shared_data / "mt_bench_question.jsonl", limit=2)
    run_bench(gen, prompts, ["chain_2", "cpu_8"], max_new_tokens=8, progress=False, sampling=[0.7])
    assert len(cached) >= 2 * 5 and set(cached) == {0}, cached
    assert kinds[True] == kinds[False] and len(kinds[False]) >= 5  # every decoder timed was warmed up first
    assert gen.reuse_prefix  # restored
    ids = gen.encode(prompts[0].text)
    real(ids, max_new_tokens=4)
    assert real(ids, max_new_tokens=4).stats.cached_prompt_tokens > 0  # reuse works again after the bench


def test_load_prompts_reads_mt_bench_alpaca_skip_and_per_category(shared_data):
    from runtime.bench import load_prompts

    mt = load_prompts(shared_data / "mt_bench_question.jsonl", per_category=2)
    assert len(mt) == 16 and len({p.category for p in mt}) == 8
    assert [p.id for p in load_prompts(shared_data / "mt_bench_question.jsonl", limit=2, skip=3)] == ["84", "85"]
    al = load_prompts(shared_data / "alpaca_5000.json", skip=4988)
    assert len(al) == 12 and al[0].id == "alpaca-4988" and al[0].category == "alpaca" and al[0].text
    with pytest.raises(MedusaError, match="after skipping"):
        load_prompts(shared_data / "alpaca_5000.json", skip=5000)


def test_a_stream_ending_inside_a_step_runs_nothing_after_it(tiny):
    """A length cut inside a multi-token step leaves the cache longer than the emitted tokens;
    the stream's last chunk must not then re-run its sequence (a full prefill under the lock)."""
    g = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1)
    sizes = []
    real = g.backend._checked  # every engine call's inputs: forward and forward_argmax (the screen)

    def spy(ids, pos, mask):
        sizes.append(len(ids))
        return real(ids, pos, mask)

    g.backend._checked = spy
    ids = g.encode(PROMPTS[0])
    multi = 0
    for n in range(2, 9):
        sizes.clear()
        pieces = list(g.stream(ids, max_new_tokens=n, tree="cpu_8"))
        chunks = [chunk.tokens for chunk in pieces]
        tokens = [t for c in chunks for t in c]
        multi += any(len(c) > 1 for c in chunks)
        streamed = list(sizes)  # the stream's forwards only, not the plain decode's below
        assert tokens == g.generate(ids, max_new_tokens=n, medusa=False).tokens and len(tokens) == n
        # the prefill (of the prompt past what the last call left in the cache: all but its last token), then steps
        kept = pieces[-1].stats.cached_prompt_tokens
        assert kept == (0 if n == 2 else len(ids) - 1)
        assert streamed[0] == len(ids) - kept and len(streamed) > 1, (n, streamed)
        assert all(s <= 9 for s in streamed[1:]), (n, streamed)  # tree steps only: no replayed prefill
    assert multi > 0  # some step emitted several tokens: a cut can fall inside a step


def test_bench_lookup_variants_categories_and_sampling(tiny, shared_data):
    """Each tree x lookup setting is its own row (lossless, lookup counted only where on), the
    per-category table covers every prompt, and --sampling reports plain / exact / typical."""
    from runtime.bench import format_report, load_prompts, run_bench

    gen = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1)
    prompts = load_prompts(shared_data / "mt_bench_question.jsonl", per_category=1)[:3]
    res = run_bench(gen, prompts, ["chain_2"], max_new_tokens=16, lookups=[3, 0], sampling=[0.7], progress=False)
    assert list(res["trees"]) == ["chain_2 lookup=3", "chain_2 lookup=0"]
    on, off = res["trees"]["chain_2 lookup=3"], res["trees"]["chain_2 lookup=0"]
    assert on["identical"] == off["identical"] == 3 and off["lookup_accepted"] == 0 and on["lookup"] == 3
    assert on["mean_accepted"] > 1 and off["mean_accepted"] > 1  # drafts were accepted
    cats = res["by_category"]
    assert sum(c["prompts"] for c in cats.values()) == 3 and len(cats) == 3
    assert all(set(c) >= {"plain_tokens_per_s", "chain_2 lookup=3", "chain_2 lookup=0"} for c in cats.values())
    s = res["sampling"]["0.7"]
    assert s["tree"] == "chain_2 lookup=3" and s["greedy_speedup"] == on["speedup"]
    for k in ("plain", "exact", "exact_top", "exact_sampled", "typical"):
        assert s[k + "_tokens_per_s"] > 0 and (k == "plain" or s[k + "_mean_accepted"] >= 1.0)
    assert s["exact_identical"] == 3  # coupled sampling: plain sampling's tokens for the seed
    # tokens a step by what drafted them: they add up to the accepted length, and a run without the
    # lookup has none from the context or the datastore
    for src, mean in [(on["sources"], on["mean_accepted"]), (off["sources"], off["mean_accepted"]),
                      *((s[k + "_sources"], s[k + "_mean_accepted"]) for k in ("exact", "typical"))]:  # fmt: skip
        assert sum(src.values()) == pytest.approx(mean) and src["backbone"] == 1.0 and min(src.values()) >= 0
    assert off["sources"]["context"] == off["sources"]["datastore"] == 0
    assert on["sources"]["context"] + on["sources"]["datastore"] == pytest.approx(
        on["lookup_accepted"] / sum(r["trees"]["chain_2 lookup=3"]["steps"] for r in res["per_prompt"])
    )
    report = format_report(res, per_prompt=False)
    assert "by category" in report and "sampling at temperature 0.7" in report and "exact" in report
    assert "tokens a step, by what drafted them" in report and "exact at 0.7, " in report
    with pytest.raises(MedusaError, match="--lookup"):
        run_bench(gen, prompts, ["chain_2"], max_new_tokens=4, lookups=[3, 3], progress=False)
    with pytest.raises(MedusaError, match="--sampling"):
        run_bench(gen, prompts, ["chain_2"], max_new_tokens=4, sampling=[0.0], progress=False)


def test_exact_sampling_uses_the_recorded_sampling_tree(tiny, tmp_path, monkeypatch):
    """An artifact's sampling_tree serves exact sampling when no tree is given; greedy and typical
    keep the default tree; a tree given to generate() or load() wins."""
    import shutil

    import runtime.api as api_mod

    art = tmp_path / "art"
    shutil.copytree(tiny["artifact"], art)
    cfg = json.loads((art / "medusa_config.json").read_text())
    cfg["sampling_tree"], cfg["sampling_tree_paths"] = "chain_1", [[0]]
    (art / "medusa_config.json").write_text(json.dumps(cfg))
    used = []
    real = api_mod.decode_steps
    monkeypatch.setattr(
        api_mod,
        "decode_steps",
        lambda b, ids, c, t, *a, **kw: used.append(t and t.name) or real(b, ids, c, t, *a, **kw),
    )
    g = runtime.load(art, backend="onnxruntime", threads=1)
    default = g.default_tree.name
    assert default != "chain_1" and g.sampling_tree.name == "chain_1"
    ids = g.encode(PROMPTS[0])
    g.generate(ids, max_new_tokens=4, temperature=0.7, seed=0)
    g.generate(ids, max_new_tokens=4)
    g.generate(ids, max_new_tokens=4, temperature=0.7, seed=0, acceptance="typical")
    g.generate(ids, max_new_tokens=4, temperature=0.7, seed=0, tree="chain_2")
    assert used == ["chain_1", default, default, "chain_2"]
    assert runtime.load(art, backend="onnxruntime", threads=1, tree="chain_3").sampling_tree is None


def test_the_fused_backend_guards_its_calls_edges(tiny):
    """``forward_argmax`` asked for more rows than the call has draws one token a token (the float path sliced
    ``rows`` from the end, a negative start that kept too few); ``commit`` refuses rows outside what the last
    forward staged (a pad row or a stale entry would otherwise enter the cache)."""
    from runtime.errors import MedusaError

    g = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1)
    try:
        b = g.backend
        b.screens_argmax = b.screens_noise = False  # the float path
        n = 4
        ids, pos, mask = np.arange(3, 3 + n), np.arange(n), np.tril(np.ones((n, n), bool))
        want = b.forward(ids, pos, mask).argmax(1)
        b.reset()
        got = b.forward_argmax(ids, pos, mask, rows=n + 2)
        assert got.tolist() == want.tolist()
        for bad in ([0, n], [-1]):
            with pytest.raises(MedusaError, match="outside the 4 the last forward staged"):
                b.commit(bad)
        b.commit([0, 1, 2, 3])
        assert b.cache_len == n
    finally:
        g.close()


@pytest.mark.parametrize("graph", ["fused", "portable"])
def test_output_buffers_grown_by_a_long_prefill_go_back_between_sequences(tiny, tiny_portable, graph):
    """A prompt longer than KEEP_OUTPUT_ROWS grows the backend's output buffers (the portable graph writes
    every row's logits: ~200 KB a row at SmolLM2's vocabulary); the next sequence's reset gives them back, as
    the KV cache's growth is, and decoding goes on alike."""
    from runtime.onnxrt import KEEP_OUTPUT_ROWS

    art = tiny["artifact"] if graph == "fused" else tiny_portable["artifact"]
    g = runtime.load(art, backend="onnxruntime", threads=1, prefill_chunk=0)
    try:
        long = list(range(5, 5 + min(KEEP_OUTPUT_ROWS + 8, g.backend.max_context - 8)))
        first = g.generate(long, max_new_tokens=4, medusa=False).tokens
        assert g.backend._outputs.capacity > KEEP_OUTPUT_ROWS
        g.backend.reset()
        assert g.backend._outputs.capacity == 0
        assert g.generate(long, max_new_tokens=4, medusa=False).tokens == first
    finally:
        g.close()
