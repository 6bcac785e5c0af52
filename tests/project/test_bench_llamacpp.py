"""scripts/bench_llamacpp.py's glue around llama-cpp-python (not installed here: it builds llama.cpp
from source), with a stand-in ``llama_cpp`` module: how a run is timed and cut, how the float32
GGUF is made, and how the table counts, on the tiny artifact for our side."""

from __future__ import annotations

import sys
import types

import pytest

from scripts import bench_llamacpp as bl


class FakeLlama:
    """llama_cpp.Llama's surface the script uses; generate() yields ``script`` then repeats 7."""

    made: list = []

    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, n_batch, draft_model, verbose):
        self.model_path, self.n_ctx, self.draft = model_path, n_ctx, draft_model
        self.threads = (n_threads, n_threads_batch)
        self.script = [5, 6, 7]
        self.resets = 0
        self.calls: list = []
        FakeLlama.made.append(self)

    def token_eos(self):
        return 2

    def reset(self):
        self.resets += 1

    def generate(self, tokens, **kw):
        self.calls.append((list(tokens), kw))
        yield from self.script
        while True:
            yield 7


class FakeLookup:
    def __init__(self, max_ngram_size, num_pred_tokens):
        self.args = (max_ngram_size, num_pred_tokens)


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    mod = types.ModuleType("llama_cpp")
    mod.__version__ = "0.0-fake"
    mod.Llama = FakeLlama
    quantized = []

    class Params:
        ftype = 7
        allow_requantize = False

    mod.llama_model_quantize_default_params = Params

    def quantize(src, dst, params):
        quantized.append((src.decode(), dst.decode(), params.ftype, params.allow_requantize))
        if b"broken" in src:
            return 1
        with open(dst.decode(), "wb") as f:
            f.write(b"GGUF f32")
        return 0

    mod.llama_model_quantize = quantize
    mod.quantized = quantized
    spec = types.ModuleType("llama_cpp.llama_speculative")
    spec.LlamaPromptLookupDecoding = FakeLookup
    monkeypatch.setitem(sys.modules, "llama_cpp", mod)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", spec)
    FakeLlama.made = []
    return mod


def test_a_missing_binding_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(SystemExit, match=r"pip install -e \.\[llamacpp\]"):
        bl.import_llama_cpp()


def test_a_run_is_greedy_from_an_empty_cache_and_ends_at_eos_or_the_limit(fake_llama_cpp, tmp_path):
    peer = bl.LlamaCppPeer(tmp_path / "m.gguf", threads=2, n_ctx=64)
    llm = FakeLlama.made[-1]
    assert llm.draft is None and llm.threads == (2, 2) and peer.version == "llama-cpp-python 0.0-fake"
    tokens, seconds = peer.run([1, 3, 4], 5)
    assert tokens == [5, 6, 7, 7, 7] and seconds > 0  # cut at max_new_tokens
    ids, kw = llm.calls[-1]
    assert ids == [1, 3, 4] and kw["temp"] == 0.0 and kw["top_k"] == 1 and kw["repeat_penalty"] == 1.0
    llm.script = [5, 2, 9]
    tokens, _ = peer.run([1, 3], 5)
    assert tokens == [5, 2]  # the EOS ends the answer and is counted, as our decode counts it
    assert llm.resets == 2  # every run from an empty cache (no prefix kept from the previous one)
    bl.LlamaCppPeer(tmp_path / "m.gguf", threads=2, n_ctx=64, lookup=(3, 6))
    assert FakeLlama.made[-1].draft.args == (3, 6)


def test_the_float32_gguf_is_made_once_by_llamacpp_and_never_half_written(fake_llama_cpp, tmp_path):
    src = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    src.write_bytes(b"GGUF q4_1")
    cache = tmp_path / "cache"
    out = bl.f32_gguf(src, cache)
    assert out.parent == cache and out.name.startswith("SmolLM2-135M-Instruct.F32-from-Q4_1-")
    assert out.read_bytes() == b"GGUF f32"
    ((_, dst, ftype, requantize),) = fake_llama_cpp.quantized
    assert ftype == bl.F32 == 0 and requantize and dst != str(out)  # a temporary name, renamed when whole
    assert bl.f32_gguf(src, cache) == out and len(fake_llama_cpp.quantized) == 1  # cached
    other = tmp_path / "elsewhere" / src.name  # another file of the same name: its own float32 copy
    other.parent.mkdir()
    other.write_bytes(b"GGUF other q4_1")
    assert bl.f32_gguf(other, cache) != out and len(fake_llama_cpp.quantized) == 2
    broken = tmp_path / "broken.Q4_1.gguf"
    broken.write_bytes(b"x")
    with pytest.raises(SystemExit, match="could not dequantize"):
        bl.f32_gguf(broken, cache)
    assert len(list(cache.iterdir())) == 2 and not list(cache.glob(".*partial"))


class ScriptedPeer:
    def __init__(self, gen, same: bool):
        self.gen, self.same = gen, same

    def run(self, ids, max_new_tokens):
        tokens = self.gen.generate(list(ids), max_new_tokens=max_new_tokens, medusa=False).tokens
        return (tokens if self.same else tokens[:-1] + [(tokens[-1] + 1) % 100]), 0.5


def test_the_table_counts_identical_answers_and_divides_by_each_decoder(gen):
    from runtime.bench import Prompt

    prompts = [Prompt(id=i, category="writing", text=t) for i, t in enumerate(["t5 t6 t7", "t9 t3"])]
    gen.reuse_prefix = False
    peers = {"same": ScriptedPeer(gen, True), "other": ScriptedPeer(gen, False)}
    rows = bl.bench(gen, peers, prompts, 12)
    assert [r["id"] for r in rows] == [0, 1]
    assert all(r["ours Medusa"]["identical"] and r["same"]["identical"] and not r["other"]["identical"] for r in rows)
    s = bl.summarize(rows)
    assert s["same"]["identical"] == 2 and s["other"]["identical"] == 0 and s["ours plain"]["identical"] == 2
    assert s["same"]["tokens_per_s"] == pytest.approx(sum(r["same"]["tokens"] for r in rows) / 1.0)
    assert s["same"]["medusa_over_it"] == pytest.approx(s["ours Medusa"]["tokens_per_s"] / s["same"]["tokens_per_s"])
    assert s["ours Medusa"]["medusa_over_it"] == pytest.approx(1.0)
    text = bl.table(s, 2)
    assert "other" in text and "0/2" in text and f"{s['same']['medusa_over_it']:.2f}x" in text


# ---------------------------------------------------------------------------- --server: llama.cpp's own server

FAKE_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
log = open(sys.argv[0] + ".requests", "a")
log.write(json.dumps({"argv": args}) + "\n")
log.flush()
if "--fail" in args:
    sys.exit(3)


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"status": "ok"} if self.path == "/health" else {"build_info": "b1-fake"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log.write(json.dumps({"path": self.path, "body": body}) + "\n")
        log.flush()
        tokens = [5, 2] if body["prompt"][0] == 9 else [5, 6, 7, 7, 7, 7][: body["n_predict"]]
        spec = "--spec-default" in args
        self._send({"tokens": tokens, "timings": {"draft_n": 4, "draft_n_accepted": 3} if spec else {}})


HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def fake_bin(tmp_path):
    """A folder with a stand-in ``llama-server`` (a Python HTTP server answering /health, /props and
    /completion, logging every request) and ``llama-quantize`` (copies its input, or fails)."""
    d = tmp_path / "bin"
    d.mkdir()
    (d / "server.py").write_text(FAKE_SERVER)
    (d / "llama-server").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{d / "server.py"}" "$@"\n')
    (d / "llama-quantize").write_text('#!/bin/sh\ncase "$2" in *broken*) exit 1;; esac\ncp "$2" "$3"\n')
    for f in ("llama-server", "llama-quantize"):
        (d / f).chmod(0o755)
    return d


def _requests(d):
    import json

    return [json.loads(line) for line in (d / "server.py.requests").read_text().splitlines()]


def test_a_llama_server_peer_decodes_greedily_with_the_prompt_prefilled_whole(fake_bin, tmp_path):
    peer = bl.LlamaServerPeer(fake_bin / "llama-server", tmp_path / "m.gguf", threads=2, n_ctx=64,
                              args=bl.SERVER_SPECS["spec-default"])  # fmt: skip
    try:
        assert peer.version == "llama.cpp server b1-fake"
        tokens, seconds = peer.run([1, 3, 4], 5)
        assert tokens == [5, 6, 7, 7, 7] and seconds > 0
        assert peer.run([9, 3], 5)[0] == [5, 2]  # the server's answer as it ends (an EOS included)
        assert (peer.drafted, peer.accepted) == (8, 6)  # the server's draft counts, summed
        (start, first, _) = _requests(fake_bin)
        argv = start["argv"]
        assert argv[argv.index("-m") + 1] == str(tmp_path / "m.gguf") and "--spec-default" in argv
        assert argv[argv.index("-t") + 1] == argv[argv.index("-tb") + 1] == "2" and argv[argv.index("-np") + 1] == "1"
        assert first["path"] == "/completion"
        body = first["body"]
        assert body["prompt"] == [1, 3, 4] and body["n_predict"] == 5 and body["temperature"] == 0.0
        assert body["top_k"] == 1 and body["cache_prompt"] is False and body["return_tokens"] is True
    finally:
        peer.close()
    assert peer.proc.poll() is not None  # the server is stopped


def test_a_llama_server_that_exits_is_one_line(fake_bin, tmp_path):
    with pytest.raises(SystemExit, match=r"llama-server exited \(3\)"):
        bl.LlamaServerPeer(fake_bin / "llama-server", tmp_path / "m.gguf", threads=2, n_ctx=64, args=["--fail"])


def test_the_float32_gguf_comes_from_llama_quantize_with_server(fake_bin, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # the binding is not needed
    src = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    src.write_bytes(b"GGUF q4_1")
    out = bl.f32_gguf(src, tmp_path / "cache", fake_bin / "llama-quantize")
    assert out.read_bytes() == b"GGUF q4_1" and out.name.startswith("SmolLM2-135M-Instruct.F32-from-Q4_1-")
    broken = tmp_path / "broken.Q4_1.gguf"
    broken.write_bytes(b"x")
    with pytest.raises(SystemExit, match="could not dequantize"):
        bl.f32_gguf(broken, tmp_path / "cache", fake_bin / "llama-quantize")
    assert not list((tmp_path / "cache").glob(".*partial"))


def test_server_without_its_binaries_is_one_line_before_anything_loads(tmp_path):
    with pytest.raises(SystemExit, match=r"--server .*: no .*llama-server"):
        bl.main([str(tmp_path / "no-artifact"), "--server", str(tmp_path)])
