"""``--peer ortgenai``: onnxruntime-genai built from the artifact's source model, in the same run.

A tiny random Llama (head_dim 16) is saved as a Hugging Face folder and exported; the
peer graph is built from that folder by onnxruntime-genai's real model builder (a few
seconds, offline) into a cache under the test's temporary folder. onnxruntime-genai comes
with the dev extra (``pip install -e .[dev]``), so these tests run, and fail, in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import runtime
from runtime.errors import MedusaError

# Prompt texts (wordlevel vocabulary) that encode to ids not ending in the pad id 0:
# onnxruntime-genai takes trailing pad tokens of a prompt for right padding. (None of them reaches
# EOS within MAX_NEW: the chat test below answers a prompt that does.)
TEXTS = ["t36 t47 t58 t69", "t8 t6 t4", "t64 t65 t66", "t5 t9 t7 t33 t81 t90"]
MAX_NEW = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory, wordlevel_tokenizer):
    """{hf, artifact, prompts, cache, built}: the peer graph built once for the whole module."""
    import torch
    from conftest import make_tiny_llama

    from exporter.export import ExportOptions, export_artifact
    from exporter.heads import fresh_heads
    from runtime.peers import build_peer_model

    root = tmp_path_factory.mktemp("peers")
    hf, art, cache = root / "tiny-llama", root / "artifact", root / "cache"
    model = make_tiny_llama(0)
    model.save_pretrained(str(hf))
    wordlevel_tokenizer.save_pretrained(str(hf))
    heads = fresh_heads(2, model.config.hidden_size, model.config.vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(100)
        for p in heads.parameters():
            p.data.normal_(0.0, 0.02)
    # the provenance records the plain folder path, which the peer resolves by itself
    export_artifact(
        model, heads, art, ExportOptions(validate=False, source_model=str(hf)), tokenizer=wordlevel_tokenizer
    )
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"question_id": i, "category": "tiny", "turns": [t]}) + "\n" for i, t in enumerate(TEXTS))
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDUSA_TRT_CACHE", str(cache))
        from conftest import capture_logs

        with capture_logs() as logs:
            built = build_peer_model(hf, "fp32")
        assert any("building" in line for line in logs), logs
        yield {"hf": hf, "artifact": art, "prompts": prompts, "cache": cache, "built": built}


def test_peer_graph_is_built_once_and_reused(setup):
    from runtime.peers import GENAI_CONFIG, _cache_key, build_peer_model

    built = setup["built"]
    assert built.parent == setup["cache"] / "ortgenai"
    from pathlib import Path

    from runtime.artifact import read_artifact

    # export_artifact records the source folder it was given, absolute, for --peer to load
    assert read_artifact(setup["artifact"]).provenance["source_model_path"] == str(Path(setup["hf"]).resolve())
    assert (built / "model.onnx").is_file() and (built / "builder.log").is_file()
    assert not (built / "builder_cache").exists()
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary folder left behind
    stamp = (built / GENAI_CONFIG).stat().st_mtime_ns
    from conftest import capture_logs

    with capture_logs() as logs:
        assert build_peer_model(setup["hf"], "fp32") == built
    assert logs == [] and (built / GENAI_CONFIG).stat().st_mtime_ns == stamp
    # another precision or another onnxruntime-genai is another graph
    keys = {_cache_key(setup["hf"], p, v) for p, v in [("fp32", "0.18.0"), ("int4", "0.18.0"), ("fp32", "0.19")]}
    assert len(keys) == 3


def test_bench_ortgenai_plain_and_ngram(setup, capsys, tmp_path):
    from runtime.bench import format_report, load_prompts, plot_bench, run_bench

    gen = runtime.load(setup["artifact"], threads=1)
    prompts = load_prompts(setup["prompts"])
    res = run_bench(
        gen, prompts, ["chain_2", "chain_1"], max_new_tokens=MAX_NEW, peer="ortgenai", threads=1, progress=False
    )
    assert "building" not in capsys.readouterr().err  # the module's build is reused
    n = len(TEXTS)
    rows = res["per_prompt"]
    assert any(r["ar"]["tokens"] < MAX_NEW for r in rows)  # one decode ended on EOS (counted by both)
    for r in rows:
        assert r["peer"]["tokens"] == r["ar"]["tokens"] and r["peer"]["identical_to_plain"], r
        assert r["peer"]["first_difference"] is None
        ngram = r["peer_ngram"]
        assert ngram["identical_to_peer"] and 0 <= ngram["draft_tokens_accepted"] <= ngram["draft_tokens_proposed"], r
    assert res["peer"] == "ortgenai" and res["peer_version"].startswith("onnxruntime-genai 0.")
    assert res["peer_identical"] == n and res["peer_divergences"] == []
    assert res["peer_ngram_identical_to_peer"] == n
    assert res["peer_tokens_per_s"] > 0 and res["peer_ngram_tokens_per_s"] > 0
    assert res["plain_vs_peer"] == pytest.approx(res["ar_tokens_per_s"] / res["peer_tokens_per_s"])
    assert res["medusa_vs_peer"] == pytest.approx(res["medusa_tokens_per_s"] / res["peer_tokens_per_s"])
    assert res["medusa_vs_peer_ngram"] == pytest.approx(res["medusa_tokens_per_s"] / res["peer_ngram_tokens_per_s"])
    for t in res["trees"].values():
        assert t["medusa_vs_peer"] == pytest.approx(t["medusa_tokens_per_s"] / res["peer_tokens_per_s"])
        assert t["medusa_vs_peer_ngram"] == pytest.approx(t["medusa_tokens_per_s"] / res["peer_ngram_tokens_per_s"])
    assert res["trees"]["chain_2"]["medusa_vs_peer"] == res["medusa_vs_peer"]  # the first tree is the headline
    assert res["peer_ngram_options"] == {"ngram_size": 4, "max_draft_tokens": 6}  # runtime.peers: its best found
    # the share of drafted tokens accepted, over every prompt (None only when nothing was drafted)
    proposed = sum(r["peer_ngram"]["draft_tokens_proposed"] for r in rows)
    accepted = sum(r["peer_ngram"]["draft_tokens_accepted"] for r in rows)
    assert proposed > 0, rows  # the tiny model's greedy text repeats itself: n-grams find drafts
    assert res["peer_ngram_drafts_accepted"] == pytest.approx(accepted / proposed)
    report = format_report(res)
    for phrase in (
        "peer ortgenai (onnxruntime-genai",
        "peer plain",
        "peer n-gram",
        f"on {n}/{n} prompts",
        "x peer n-gram (tree chain_2)",
    ):
        assert phrase in report, (phrase, report)
    json.dumps(res)  # the CLI writes it as JSON
    png = plot_bench(res, tmp_path / "bench.png")
    assert png.stat().st_size > 10_000
    res["trees"]["chain_2"]["tree"] = "my$\\frac$tree"  # a tree file's name: text, not TeX
    assert b"my$\\frac$tree" in plot_bench(res, tmp_path / "bench.svg").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file stays


def test_bench_sampling_against_the_peers_sampling(setup, capsys):
    """--sampling with the peer: onnxruntime-genai samples the whole distribution with the same seeds
    (a seed reproduces its tokens, seeds differ), and every sampling kind is reported against it."""
    from runtime.bench import format_report, load_prompts, run_bench
    from runtime.peers import OrtGenaiPeer, peer_model_dir

    gen = runtime.load(setup["artifact"], threads=1)
    peer = OrtGenaiPeer(peer_model_dir(gen), threads=1)
    ids = gen.encode(TEXTS[0])
    a = peer.run(ids, MAX_NEW, temperature=1.0, seed=3).tokens
    assert a == peer.run(ids, MAX_NEW, temperature=1.0, seed=3).tokens
    assert len({tuple(peer.run(ids, MAX_NEW, temperature=1.0, seed=s).tokens) for s in range(4)}) > 1
    res = run_bench(gen, load_prompts(setup["prompts"]), ["chain_2"], max_new_tokens=MAX_NEW, peer="ortgenai",
                    threads=1, progress=False, sampling=[0.8])  # fmt: skip
    e = res["sampling"]["0.8"]
    assert e["peer_tokens_per_s"] > 0
    assert e["plain_vs_peer"] == pytest.approx(e["plain_tokens_per_s"] / e["peer_tokens_per_s"])
    assert e["exact_vs_peer"] == pytest.approx(e["exact_tokens_per_s"] / e["peer_tokens_per_s"])
    assert e["exact_identical"] == len(TEXTS)
    report = format_report(res, per_prompt=False)
    assert "the peer's sampling" in report and "peer sampling" in report, report


def test_peer_row_records_the_first_difference():
    from runtime.bench import RunResult, _peer_row

    ours = RunResult([5, 6, 7, 8], 1.0)
    assert _peer_row(RunResult([5, 6, 7, 8], 0.5), ours)["first_difference"] is None
    row = _peer_row(RunResult([5, 6, 9, 8], 0.5), ours)
    assert row["first_difference"] == 2 and not row["identical_to_plain"] and row["tokens_per_s"] == 8.0
    assert _peer_row(RunResult([5, 6], 0.5), ours)["first_difference"] == 2  # stopped early


def test_cli_profile_with_peer(setup, tmp_path, capsys, monkeypatch):
    from runtime.cli import main

    monkeypatch.setenv("MEDUSA_TRT_CACHE", str(setup["cache"]))
    out = tmp_path / "prof.json"
    rc = main(
        [
            "profile",
            str(setup["artifact"]),
            "--sizes",
            "1",
            "4",
            "--cached",
            "16",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--peer",
            "ortgenai",
            "-o",
            str(out),
        ]
    )
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert "building" not in stderr
    prof = json.loads(out.read_text())
    peer = prof["peer"]
    assert peer["name"] == "ortgenai" and peer["model"] == str(setup["built"])
    assert peer["version"].startswith("onnxruntime-genai 0.")
    assert set(peer["ms"]) == {"1", "4"} and all(v > 0 for v in peer["ms"].values())
    assert peer["relative_cost"]["1"] == 1.0
    # (ms are rounded to the microsecond, coarse for a tiny model's ~0.03 ms steps)
    assert peer["relative_cost"]["4"] == pytest.approx(peer["ms"]["4"] / peer["ms"]["1"], rel=0.1)
    assert peer["cached_tokens"] == prof["cached_tokens"] == 16
    table = stdout[stdout.index("ortgenai ms") :]
    assert len([line for line in table.splitlines() if line.split()[:1] in (["1"], ["4"])]) == 2, stdout
    # ours through the lm_head screen (argmax only) is not the peer's work (float logits): the table says so
    assert ("through the lm_head screen" in table) == (prof["lm_head"] == "screen"), (prof["lm_head"], table)


def test_the_peer_table_says_when_the_work_differs():
    from runtime.profile import format_peer_table

    prof = {"ms": {"1": 10.0, "4": 12.0}, "relative_cost": {"1": 1.0, "4": 1.2}, "cached_tokens": 16,
            "lm_head": "screen",
            "peer": {"name": "ortgenai", "ms": {"1": 12.5, "4": 15.0}, "relative_cost": {"1": 1.0, "4": 1.2},
                     "cached_tokens": 16}}  # fmt: skip
    table = format_peer_table(prof)
    assert "   4     12.00   1.20         15.00   1.20       0.80" in table
    assert "the argmax of each row; the peer's compute every row's float logits" in table
    assert "lm_head screen" not in format_peer_table({**prof, "lm_head": "float"})


def test_missing_package_is_one_line(setup, monkeypatch, capsys):
    from runtime.bench import load_prompts, run_bench
    from runtime.cli import main
    from runtime.peers import MISSING

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if not installed
    gen = runtime.load(setup["artifact"], threads=1)
    with pytest.raises(MedusaError) as e:
        run_bench(gen, load_prompts(setup["prompts"]), [], max_new_tokens=4, peer="ortgenai", progress=False)
    assert str(e.value) == MISSING == "--peer ortgenai needs onnxruntime-genai: pip install -e .[peers]"
    for argv in (
        ["bench", str(setup["artifact"]), "--prompts", str(setup["prompts"]), "--peer", "ortgenai", "--quiet"],
        ["profile", str(setup["artifact"]), "--peer", "ortgenai"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.strip() == f"medusa-run: error: {MISSING}", err


def test_precision_without_a_builder_graph_is_one_line():
    from runtime.peers import builder_precision

    assert [builder_precision(p) for p in ("fp32", "int8", "int4")] == ["fp32", "int8", "int4"]
    with pytest.raises(MedusaError) as e:
        builder_precision("fp16")
    assert "\n" not in str(e.value) and "no fp16 graph for the CPU" in str(e.value)


def test_failed_build_shows_the_builder_log_and_caches_nothing(setup, tmp_path, monkeypatch):
    from runtime.peers import build_peer_model

    monkeypatch.setenv("MEDUSA_TRT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad-model"
    bad.mkdir()
    for f in setup["hf"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(MedusaError, match="model builder failed") as e:
        build_peer_model(bad, "fp32")
    assert "not currently supported" in str(e.value)  # the builder's own words, from its log
    left = sorted(p.name for p in (tmp_path / "cache" / "ortgenai").iterdir())
    assert len(left) == 1 and left[0].endswith(".failed.log")  # the log stays; no model folder, no temporary one


def test_runtime_imports_neither_torch_nor_genai(repo_root):
    code = (
        "import sys, runtime.bench, runtime.peers, runtime.profile, runtime.cli; "
        "print(sorted(m for m in ('torch', 'onnxruntime_genai', 'exporter', 'training') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_peer_chat_keeps_its_cache_between_turns_and_answers_as_whole_prompts(setup):
    """``OrtGenaiPeer.chat``: one generator a conversation, rewound to the prefix the next prompt
    shares with its sequence; every turn's tokens equal a fresh generator's on the whole prompt,
    through an EOS, a prompt that continues the answer, and one that departs from it early."""
    from runtime.peers import OrtGenaiPeer, peer_model_dir

    gen = runtime.load(setup["artifact"], threads=1)
    peer = OrtGenaiPeer(peer_model_dir(gen), threads=1)
    first = [93, 108, 68, 49]  # the tiny model answers it with 13 tokens and an EOS (found by a search)
    answer = peer.run(first, MAX_NEW).tokens
    assert answer[-1] == 2 and len(answer) == 14
    short = peer.run(first, 10).tokens  # the same answer cut by the length
    assert short == answer[:10]
    # per max_new_tokens: the turns, and the prompt tokens each keeps. The cache holds the sequence but
    # its last token: the EOS is never appended to the sequence (all 13 answer tokens are fed), a last
    # token cut by the length is never fed (9 of 10); the third prompt departs after 3 tokens
    chats = {
        MAX_NEW: ([first, first + answer + gen.encode(TEXTS[0]), first[:3] + gen.encode(TEXTS[2])],
                  [0, len(first) + 13, 3]),
        10: ([first, first + short + gen.encode(TEXTS[3])], [0, len(first) + 9]),
    }  # fmt: skip
    for ngram in (False, True):  # greedy, and with its n-gram speculation
        for max_new, (prompts, kept) in chats.items():
            turns = peer.chat(prompts, max_new, ngram=ngram)
            for ids, got in zip(prompts, turns):
                assert got.tokens == peer.run(ids, max_new).tokens
                assert got.first_token_s is not None and got.seconds >= got.first_token_s
            assert [t.cached for t in turns] == kept
            proposed = [t.drafts.get("draft_tokens_proposed", 0) for t in turns]
            assert min(proposed) >= 0 and (sum(proposed) > 0 if ngram else not any(proposed)), proposed  # it speculated
    assert peer.chat([], MAX_NEW) == []
    with pytest.raises(MedusaError, match="empty prompt"):
        peer.chat([first, []], MAX_NEW)


def test_bench_multiturn_with_the_peer_whole_and_kept(setup, capsys, tmp_path):
    """``scripts.bench_multiturn --peer``: onnxruntime-genai on both turns, each prompt whole and on one
    generator a conversation; its tokens equal ours both ways; only the kept generator reuses."""
    from scripts import bench_multiturn

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [a, b]}) + "\n"
                             for i, (c, a, b) in enumerate([("x", TEXTS[0], TEXTS[2]), ("y", TEXTS[3], TEXTS[1])])))  # fmt: skip
    out = tmp_path / "mt.json"
    assert bench_multiturn.main([str(setup["artifact"]), "--prompts", str(chats), "--max-new-tokens", "12",
                                 "--threads", "1", "--peer", "--json", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert ("its tokens equal ours on 2/2 conversations (whole), 2/2 conversations (kept), "
            "2/2 conversations (kept n-gram)") in text, text  # fmt: skip
    rec = json.loads(out.read_text())
    s = rec["summary"]
    assert rec["peer_identical"] == {"whole": 2, "kept": 2, "kept n-gram": 2} and rec["peer"].startswith(
        "onnxruntime-genai"
    )
    assert s["peer whole, turn 2"]["reused_share"] == 0 and s["peer kept, turn 1"]["reused_share"] == 0
    # the kept generator reuses (here the first turn's prompt: the word-level tokenizer re-encodes the
    # tiny model's answers differently, where ours stops reusing too), never more than ours
    assert 0 < s["peer kept, turn 2"]["reused_share"] <= s["reuse, turn 2"]["reused_share"]
    assert s["peer kept n-gram, turn 2"]["reused_share"] == s["peer kept, turn 2"]["reused_share"]
    assert all(s[f"peer {k}, turn {t}"]["ttft_p50_ms"] > 0 for k in rec["peer_identical"] for t in (1, 2))
