"""Load test of ``medusa-run serve`` with the ``openai`` client: Medusa vs plain server.

    python -m scripts.load_test artifacts/smollm2-135m-medusa --concurrency 1 2 4 8 16 --requests 16 \\
        --max-tokens 128 --threads 2 --json runs/load_test.json --plot runs/load_test.png

Starts the ``--servers`` (default: ``plain`` and ``medusa``; ``plain-interleave`` and
``medusa-interleave`` serve one sequence per engine call instead of batching through
batch.onnx) on free loopback ports, same artifact, ``--max-batch`` = the largest concurrency,
then for each concurrency level runs the servers in ``--rounds`` alternating rounds (A B, B A, ...:
a shared machine's drift falls on all of them alike), ``--requests`` streamed greedy chat requests
(MT-Bench first turns, in order; each round the next share of them) from that many client threads
(``--per-client N``: at least N requests a client, so that a level measures a full batch, not one
wave of requests filling and draining it). Per level and server:
total generated tokens/s over the level's wall time, p50/p99 time to first token and
inter-token latency, failed requests; then the ratios between servers and each server's
throughput against its own at the first level. Bounded by ``--requests`` and ``--time-limit``
seconds per level (no new request starts after it).

    python -m scripts.load_test artifacts/smollm2-135m-medusa --soak 900 --concurrency 8 --json runs/soak.json

``--llama-server DIR``: llama.cpp's own server beside ours under the same load, what a user picks
instead: ``llama-server`` (plain greedy decoding, continuous batching over ``--max-batch`` slots) and
``llama-server-spec`` (its default self-speculation, ``--spec-default``) in ``--servers``, running
SmolLM2's GGUF dequantized to float32 by ``DIR/llama-quantize`` (our weights; ``--gguf FILE`` runs
another file as it is), with the model's chat template (``--jinja``), each request's prompt
prefilled whole (``cache_prompt: false``, as our servers run here). ``DIR`` is a llama.cpp build
(``python -m scripts.bench_llamacpp --help`` has the commands); its greedy answers are compared with
the first server's like every other server's (its float32 kernels round differently, so a near-tie
can go the other way).

``--soak SECONDS``: the Medusa server alone, ``--concurrency`` clients (the first value) sending
requests back to back for that long; reports failed requests and the server's resident memory
(``/proc/PID/status`` VmRSS) sampled every 30 s, start / end / max.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from runtime.errors import ConfigError, run_cli, sigterm_as_interrupt
from runtime.paths import PLOT_SUFFIXES, save_figure, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# llama.cpp's server (--llama-server DIR): extra command-line arguments of each kind
LLAMA_SERVERS = {"llama-server": [], "llama-server-spec": ["--spec-default"]}
SERVERS = ("plain", "medusa", "plain-interleave", "medusa-interleave", *LLAMA_SERVERS)
LLAMA_SLOT_CONTEXT = 2048  # llama-server's context per slot (-c is this times -np)
# what every request to llama-server adds: no prompt kept from an earlier request (our servers run
# without prefix reuse here too)
LLAMA_BODY = {"cache_prompt": False}


def start_server(artifact: str, kind: str, max_batch: int, threads: int | None,
                 prefix_reuse: bool = False) -> tuple[subprocess.Popen, str]:  # fmt: skip
    """``kind``: plain or medusa decoding, batched engine calls (the default where the artifact has
    batch.onnx) or ``-interleave`` (one sequence per engine call, steps taking turns). Prefix reuse
    is off unless ``prefix_reuse``: every level sends the same prompts again, and a server that kept
    them would skip prefills at the later levels that the first did not."""
    port = free_port()
    cmd = [sys.executable, "-m", "runtime.cli", "serve", artifact, "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", "1000", "-q"]  # fmt: skip
    if threads:
        cmd += ["--threads", str(threads)]
    if kind.startswith("plain"):
        cmd.append("--plain")
    if not prefix_reuse:
        cmd.append("--no-prefix-reuse")
    if kind.endswith("-interleave"):
        cmd += ["--batching", "interleave"]
    env = {k: v for k, v in os.environ.items() if k != "MEDUSA_API_KEY"}  # the load test's client sends no key
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, _ready(proc, port)


def start_llama_server(binary: Path, gguf: Path, kind: str, max_batch: int, threads: int | None,
                       log: Path) -> tuple[subprocess.Popen, str]:  # fmt: skip
    """llama.cpp's ``llama-server`` (``kind``: a key of LLAMA_SERVERS) on ``gguf``: ``max_batch``
    slots decoding together (continuous batching), the GGUF's chat template, ``threads`` threads;
    its log (a few lines a request) written to ``log``, not a pipe: one nobody reads would fill and
    stall the server."""
    from scripts.bench_llamacpp import server_command

    port = free_port()
    cmd = server_command(binary, gguf, port, LLAMA_SLOT_CONTEXT * max_batch, max_batch, threads,
                         ["--jinja", *LLAMA_SERVERS[kind]])  # fmt: skip
    with open(log, "w") as out:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return proc, _ready(proc, port, log)


def _ready(proc: subprocess.Popen, port: int, log: Path | None = None) -> str:
    """The server's URL once ``/health`` answers 200 (llama-server: 503 while it loads). A server
    that exits first, or is not up within 120 s, is an error with the end of its stderr (or of
    ``log``, the file it writes to); whatever ends the wait (an error, Ctrl-C) stops the server."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited ({proc.returncode}): {_tail(proc, log)}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        raise SystemExit(f"the server did not start within 120 s: {_tail(proc, log)}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise


def _tail(proc: subprocess.Popen, log: Path | None) -> str:
    """The end of a stopped server's output: its log file, else its stderr pipe."""
    if log is not None:
        text = log.read_text(errors="replace") if log.is_file() else ""
    else:
        text = proc.stderr.read() if proc.stderr else ""
    return text[-2000:].strip()


def one_request(client, model: str, prompt: str, max_tokens: int, extra_body: dict | None = None) -> dict:
    t0 = time.perf_counter()
    stamps, tokens, prompt_tokens, cached, text = [], 0, 0, 0, []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body=extra_body)  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            details = chunk.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details else 0
    end = time.perf_counter()
    ttft = (stamps[0] - t0) if stamps else end - t0
    itl = (stamps[-1] - stamps[0]) / (tokens - 1) if len(stamps) > 1 and tokens > 1 else None
    # itl: the request's mean gap between its first and last chunk (a Medusa chunk carries several tokens)
    return {"tokens": tokens, "ttft": ttft, "itl": itl, "seconds": end - t0, "prompt_tokens": prompt_tokens,
            "cached_tokens": cached, "text": "".join(text)}  # fmt: skip


def run_level(url: str, model: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int,
              time_limit: float, extra_body: dict | None = None) -> dict:  # fmt: skip
    """``requests`` streamed requests (prompts in order) from ``concurrency`` client threads: one row."""
    return _level(concurrency, [_requests(url, model, prompts, concurrency, requests, max_tokens, time_limit,
                                          extra_body=extra_body)])  # fmt: skip


def _requests(url: str, model: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int,
              time_limit: float, first: int = 0, extra_body: dict | None = None) -> tuple[list, list, float]:  # fmt: skip
    """(per-request results, failures, wall seconds), the prompts taken from index ``first`` on;
    ``extra_body``: fields every request adds (a peer server's own)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    total = max(requests, concurrency)
    issued = 0
    lock = threading.Lock()
    results, failures = [], []
    start = time.perf_counter()

    stop = threading.Event()  # Ctrl-C / SIGTERM in the main thread: no client starts another request

    def worker():
        nonlocal issued
        while True:
            with lock:
                if stop.is_set() or issued >= total or time.perf_counter() - start > time_limit:
                    return
                i, issued = issued, issued + 1
            try:
                r = one_request(client, model, prompts[(first + i) % len(prompts)], max_tokens, extra_body)
                r["request"] = first + i  # the same index, the same prompt, on every server
                with lock:
                    results.append(r)
            except Exception as e:  # counted, reported: a load test must not stop at the first failure
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]  # daemon: a request
    for t in threads:  # in flight when the run is interrupted does not hold the process
        t.start()
    try:
        for t in threads:
            t.join()
    finally:
        stop.set()
    wall = time.perf_counter() - start
    return results, failures, wall


def _level(concurrency: int, parts: list[tuple[list, list, float]]) -> dict:
    """One level's row from its rounds' (results, failures, wall seconds): tokens and seconds
    summed over the rounds, latency percentiles over all their requests."""
    results = [r for res, _, _ in parts for r in res]
    failures = [f for _, fs, _ in parts for f in fs]
    wall = sum(w for _, _, w in parts)
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(r["itl"] for r in results if r["itl"] is not None)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "failed": len(failures),
        "failures": failures[:3],
        "tokens": tokens,
        "seconds": wall,
        "rounds": len(parts),
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50": _pct(ttft, 50),
        "ttft_p99": _pct(ttft, 99),
        "itl_p50": _pct(itl, 50),
        "itl_p99": _pct(itl, 99),
        # prompt tokens the server did not prefill (its slots' caches held them: prefix reuse)
        "cached_share": sum(r.get("cached_tokens", 0) for r in results)
        / max(1, sum(r.get("prompt_tokens", 0) for r in results)),
        "answers": {r["request"]: r["text"] for r in results if "request" in r},
    }


def same_answers(a: dict, b: dict) -> tuple[int, int]:
    """(identical, compared): the greedy answers two servers gave to the same requests of a level.
    Batched steps round logits differently in the last bits, so a near-tie may rarely go the
    other way; a broken server differs on most."""
    both = a["answers"].keys() & b["answers"].keys()
    return sum(a["answers"][i] == b["answers"][i] for i in both), len(both)


def run_rounds(urls: dict[str, str], model: str, prompts: list[str], concurrency: int, requests: int,
               max_tokens: int, time_limit: float, rounds: int,
               extra_bodies: dict[str, dict] | None = None) -> dict[str, dict]:  # fmt: skip
    """One level for every server, split into ``rounds`` that alternate the servers in ABBA order
    (A B, B A, A B, ...), each round the next ``max(requests / rounds, concurrency)`` prompts for
    every server: the machine's drift over the level falls on all servers alike, and each server
    answers the same prompts. ``extra_bodies``: fields a server's requests add, by server."""
    per = max(-(-requests // rounds), concurrency)
    parts: dict[str, list] = {k: [] for k in urls}
    for i in range(rounds):
        for kind in list(urls) if i % 2 == 0 else list(reversed(urls)):
            parts[kind].append(_requests(urls[kind], model, prompts, concurrency, per, max_tokens, time_limit / rounds,
                                         first=i * per, extra_body=(extra_bodies or {}).get(kind)))  # fmt: skip
    return {kind: _level(concurrency, ps) for kind, ps in parts.items()}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(artifact: str, prompts: list[str], model: str, concurrency: int, seconds: float, max_tokens: int,
         threads: int | None, prefix_reuse: bool = False) -> dict:  # fmt: skip
    """``concurrency`` clients back to back for ``seconds`` against one Medusa server; RSS sampled."""
    proc, url = start_server(artifact, "medusa", concurrency, threads, prefix_reuse)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample():
        t0 = time.perf_counter()
        while not done.is_set():
            samples.append((time.perf_counter() - t0, rss_mib(proc.pid)))
            done.wait(30)

    sampler = threading.Thread(target=sample)
    try:
        run_level(url, model, prompts, 1, 1, 8, 60)  # warm-up: first-call allocations happen before the start sample
        sampler.start()
        r = run_level(url, model, prompts, concurrency, 10**9, max_tokens, seconds)
    finally:
        done.set()
        if sampler.is_alive():
            sampler.join()
        samples.append((samples[-1][0] + 1 if samples else 0.0, rss_mib(proc.pid)))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    r.pop("answers")
    r.update(rss_mib_samples=samples, rss_start=samples[0][1], rss_end=samples[-1][1],
             rss_max=max(m for _, m in samples), soak_seconds=seconds)  # fmt: skip
    return r


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/mt_bench_question.jsonl"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=8, help="requests per level (at least the concurrency)")
    ap.add_argument("--per-client", type=int, default=0,
                    help="at least this many requests per client at every level (requests = max(--requests, N x "
                         "concurrency)): the clients' requests follow each other, so the level measures a full batch "
                         "rather than one wave filling and draining")  # fmt: skip
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of each server")
    ap.add_argument("--time-limit", type=float, default=300, help="seconds per level after which no request starts")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds per level, alternating the servers A B, B A, ... (each round max(requests / "
                         "rounds, concurrency) requests per server): drift on a shared machine hits them alike")  # fmt: skip
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--servers", nargs="+", choices=SERVERS, default=["plain", "medusa"],
                    help="servers to compare (-interleave: one sequence per engine call)")  # fmt: skip
    ap.add_argument("--soak", type=float, default=0, help="seconds of a soak at the first concurrency (Medusa only)")
    ap.add_argument("--llama-server", default=None, metavar="DIR",
                    help="a llama.cpp build's folder (llama-server, llama-quantize): llama-server and "
                         "llama-server-spec in --servers run on it")  # fmt: skip
    ap.add_argument("--gguf", default=None,
                    help="the GGUF file llama-server runs as it is (default: SmolLM2's, dequantized to float32)")  # fmt: skip
    ap.add_argument("--prefix-reuse", action="store_true",
                    help="servers keep prompts' cache entries (serve's default); off here by default, since every "
                         "level resends the same prompts and later levels would skip prefills the first did not")  # fmt: skip
    a = ap.parse_args(argv)
    with sigterm_as_interrupt():  # SIGTERM, like Ctrl-C: the servers are stopped, exit 143 (130)
        return run_cli("load_test", lambda: run(a), interrupted="interrupted")


def run(a) -> int:
    from runtime import checks
    from runtime.bench import load_prompts
    from runtime.paths import check_output_file

    checks.integer("--rounds", a.rounds, 1)
    checks.integer("--per-client", a.per_client, 0)
    checks.integer("--requests", a.requests, 1)
    checks.integer("--max-tokens", a.max_tokens, 1)
    for c in a.concurrency:
        checks.integer("--concurrency", c, 1)
    checks.real("--time-limit", a.time_limit, 0.0, min_open=True)
    checks.real("--soak", a.soak, 0.0)
    if not Path(a.artifact).is_dir():
        raise ConfigError(f"{a.artifact} is not an artifact folder (medusa-export writes one)")
    for flag, out, suffixes in (("--json", a.json, ()), ("--plot", a.plot, PLOT_SUFFIXES)):
        if out:  # the folder made as before (runs/ ...), the file checked before any server starts
            with contextlib.suppress(OSError):  # (a file in the way: the check names it)
                Path(out).parent.mkdir(parents=True, exist_ok=True)
            check_output_file(flag, out, suffixes)
    llama = [k for k in a.servers if k in LLAMA_SERVERS]
    binary = llama_gguf = None
    if llama or a.llama_server or a.gguf:
        binary, llama_gguf = _llama_files(a, llama)
    # MT-Bench JSONL (first turns), {"prompt": ...} lines or an Alpaca list: checked, one line on a bad file
    prompts = [p.text for p in load_prompts(a.prompts)]
    model = Path(a.artifact).resolve().name
    if a.soak:
        r = soak(a.artifact, prompts, model, a.concurrency[0], a.soak, a.max_tokens, a.threads, a.prefix_reuse)
        print(f"soak {a.soak:.0f} s at concurrency {r['concurrency']}: {r['requests']} requests, {r['failed']} failed, "
              f"{r['tokens_per_s']:.1f} tok/s; server RSS start {r['rss_start']:.0f} MiB, end {r['rss_end']:.0f} MiB, "
              f"max {r['rss_max']:.0f} MiB ({len(r['rss_mib_samples'])} samples)")  # fmt: skip
        if a.json:
            write_text_atomic(a.json, json.dumps(r, indent=2) + "\n")
            print(f"wrote {a.json}")
        return 0 if r["failed"] == 0 else 1
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    logs = Path(tempfile.mkdtemp(prefix="load-test-llama-")) if llama else None  # llama-server's, a file a level
    rows: list[dict] = []
    try:
        for kind in a.servers:
            if kind not in LLAMA_SERVERS:
                servers[kind] = start_server(a.artifact, kind, max(a.concurrency), a.threads, a.prefix_reuse)
        bodies = {kind: LLAMA_BODY for kind in llama}
        for c in a.concurrency:
            # llama-server starts afresh at each level: its speculation's n-gram pool is the server's and
            # keeps every answer it gave, and each level resends the same prompts (a second pass over
            # them ran 2.8x faster with --spec-default); our servers keep nothing between requests here
            for kind in llama:
                assert binary is not None and llama_gguf is not None and logs is not None  # _llama_files
                if kind in servers:
                    _stop([servers.pop(kind)[0]])
                servers[kind] = start_llama_server(binary, llama_gguf, kind, max(a.concurrency), a.threads,
                                                   logs / f"{kind}-c{c}.log")  # fmt: skip
            urls = {kind: servers[kind][1] for kind in a.servers}
            for kind in a.servers:  # warm-up on the last prompt: a level takes the prompts in order, so it comes last
                run_level(urls[kind], model, prompts[-1:], 1, 1, 8, a.time_limit, bodies.get(kind))
            requests = max(a.requests, a.per_client * c)
            level = run_rounds(urls, model, prompts, c, requests, a.max_tokens, a.time_limit, a.rounds, bodies)
            first = a.servers[0]  # every server's greedy answers against the first's
            counts = {kind: same_answers(level[kind], level[first]) for kind in a.servers}
            for kind in a.servers:
                r = level[kind]
                r["server"] = kind
                r["same_as_" + first] = list(counts[kind])
                rows.append(r)
                same = "" if kind == first else f" answers as {first} {counts[kind][0]}/{counts[kind][1]}"
                # llama-server reports no cached prompt tokens: its requests ask for none (LLAMA_BODY)
                cached = "n/a" if kind in LLAMA_SERVERS else f"{100 * r['cached_share']:.0f}%"
                print(f"{kind:>17} c={c:<3} {r['requests']:>3} req {r['tokens_per_s']:7.1f} tok/s  ttft p50/p99 "
                      f"{_ms(r['ttft_p50'])}/{_ms(r['ttft_p99'])} ms  itl p50/p99 {_ms(r['itl_p50'])}/"
                      f"{_ms(r['itl_p99'])} ms  prompt cached {cached}  failed {r['failed']}{same}", flush=True)  # fmt: skip
            for kind in a.servers:  # the counts are kept, not the texts
                level[kind].pop("answers")
    finally:
        _stop([proc for proc, _ in servers.values()])
        if logs is not None:  # kept where a llama-server request failed: what the server said is there
            if any(r["failed"] for r in rows if r["server"] in LLAMA_SERVERS):
                print(f"llama-server's logs: {logs}", file=sys.stderr)
            else:
                shutil.rmtree(logs, ignore_errors=True)
    by = {(r["server"], r["concurrency"]): r for r in rows}
    print("\n" + f"{'c':>3} " + " ".join(f"{k + ' tok/s':>23}" for k in a.servers), end="")
    pairs = [(m, p) for m, p in (("medusa", "plain"), ("medusa-interleave", "plain-interleave"),
                                 ("medusa", "medusa-interleave"), ("plain", "plain-interleave"),
                                 ("medusa", "llama-server"), ("medusa", "llama-server-spec"), ("plain", "llama-server"))
             if m in a.servers and p in a.servers]  # fmt: skip
    print("".join(f" {m + '/' + p:>30}" for m, p in pairs) + "".join(f" {k + ' vs c=1':>24}" for k in a.servers))
    for c in a.concurrency:
        cells = [f"{by[(k, c)]['tokens_per_s']:23.1f}" for k in a.servers]
        ratios = [by[(m, c)]["tokens_per_s"] / by[(p, c)]["tokens_per_s"] if by[(p, c)]["tokens_per_s"] else 0
                  for m, p in pairs]  # fmt: skip
        scale = [by[(k, c)]["tokens_per_s"] / by[(k, a.concurrency[0])]["tokens_per_s"]
                 if by[(k, a.concurrency[0])]["tokens_per_s"] else 0 for k in a.servers]  # fmt: skip
        print(f"{c:>3} " + " ".join(cells) + "".join(f" {x:29.2f}x" for x in ratios)
              + "".join(f" {x:23.2f}x" for x in scale))  # fmt: skip
    result = {"artifact": a.artifact, "max_tokens": a.max_tokens, "requests": a.requests,
              "per_client": a.per_client, "rounds": a.rounds,
              "threads": a.threads, "llama_server": a.llama_server, "gguf": str(llama_gguf) if llama_gguf else None,
              "cpu_count": os.cpu_count(), "servers": a.servers, "rows": rows}  # fmt: skip
    if a.json:
        write_text_atomic(a.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.json}")
    if a.plot:
        plot(rows, a.concurrency, a.plot)
        print(f"wrote {a.plot}")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every server, then each waited for (killed after 60 s)."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _llama_files(a, llama: list[str]) -> tuple[Path, Path]:
    """(llama-server, the GGUF it runs), checked before any server starts: one line each mistake.
    SmolLM2's GGUF is dequantized to float32 by llama-quantize once (cached), as bench_llamacpp does."""
    if not llama:
        raise ConfigError("--llama-server and --gguf need llama-server or llama-server-spec in --servers")
    if a.soak:
        raise ConfigError("--soak runs the Medusa server alone: no llama-server")
    if a.llama_server is None:
        raise ConfigError(f"--servers {' '.join(llama)} needs --llama-server DIR (a llama.cpp build's folder)")
    binary, quantize = Path(a.llama_server) / "llama-server", Path(a.llama_server) / "llama-quantize"
    needed = [binary] if a.gguf is not None else [binary, quantize]  # a GGUF of one's own runs as it is
    missing = [str(b) for b in needed if not b.is_file()]
    if missing:
        raise ConfigError(f"--llama-server {a.llama_server}: no {', '.join(missing)} "
                          "(build them: python -m scripts.bench_llamacpp --help)")  # fmt: skip
    if a.gguf is not None:
        if not Path(a.gguf).is_file():
            raise ConfigError(f"--gguf {a.gguf}: no such file")
        return binary, Path(a.gguf)
    from scripts.bench_llamacpp import f32_gguf, smollm2_gguf

    return binary, f32_gguf(smollm2_gguf(), quantize=quantize)


def plot(rows: list[dict], levels: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, kind in enumerate(dict.fromkeys(r["server"] for r in rows)):
        rs = [r for r in rows if r["server"] == kind]
        color = f"C{i}"  # one color a server in every panel: p50 solid, p99 dashed
        axes[0].plot(levels, [r["tokens_per_s"] for r in rs], marker="o", color=color, label=kind)
        for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
            ax.plot(levels, [(r[f"{key}_p50"] or 0) * 1000 for r in rs], marker="o", color=color, label=f"{kind} p50")
            ax.plot(levels, [(r[f"{key}_p99"] or 0) * 1000 for r in rs], marker="x", ls="--", color=color,
                    label=f"{kind} p99")  # fmt: skip
    for ax, title in zip(axes, ("total tokens/s", "time to first token (ms)", "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)  # whole or not at all
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
