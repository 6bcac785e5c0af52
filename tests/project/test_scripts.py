"""The repository scripts run as modules from the repository root (``python -m scripts.NAME``),
without editing ``sys.path``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py") if p.stem not in ("__init__", "common"))


def test_the_scripts_are_a_package_and_edit_no_sys_path():
    assert (ROOT / "scripts" / "__init__.py").is_file()
    assert len(SCRIPTS) >= 10
    edits = [name for name in [*SCRIPTS, "common"] if "sys.path" in (ROOT / "scripts" / f"{name}.py").read_text()]
    assert edits == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_as_a_module(name):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-m", f"scripts.{name}", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_docs_use_the_module_form():
    """README, docs and shell scripts name the scripts as modules (Polygraphy's --data-loader-script
    takes the loader's file path: that is the one file path left)."""
    texts = [
        ROOT / "README.md",
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "scripts").glob("*.sh"),
        *(ROOT / "scripts").glob("*.py"),
    ]
    stale = [
        f"{p.name}: {line.strip()}"
        for p in texts
        for line in p.read_text().splitlines()
        if "python scripts/" in line or "python3 scripts/" in line
    ]
    assert stale == []


def _run(args, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "argv",
    [
        [
            "compare_heads",
            "exporter/shipped_heads/smollm2-135m",
            "--any-token",
            "--outside-vocab",
            "--cache",
            "{tmp}/nope.hidden",
        ],
        ["add_draft_vocab", "exporter/shipped_heads/smollm2-135m", "--cache", "{tmp}/nope.hidden", "-o", "{tmp}/out"],
        ["learning_curve", "--data", "{tmp}/nope.jsonl", "--out", "runs/never"],
        ["check_kept_states", "--data", "{tmp}/nope.jsonl"],
    ],
)
def test_scripts_that_need_the_distillation_say_so_in_one_line(argv, tmp_path):
    """On a fresh clone the distilled data (runs/distill, ~147 minutes of distillation) is missing: the
    scripts that read it stop with one line naming what is missing and the command that makes it."""
    r = _run([sys.executable, "-m", f"scripts.{argv[0]}", *(a.format(tmp=tmp_path) for a in argv[1:])])
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"{argv[0]}: error: {tmp_path}/nope") and "is missing" in lines[0]
    assert "scripts/train_smollm2_heads.sh" in lines[0] and "147 min" in lines[0]
    assert not (ROOT / "runs" / "never").exists() and not (tmp_path / "out").exists()


def test_make_tree_configs_writes_outside_the_source_tree(tmp_path):
    r = _run([sys.executable, "-m", "scripts.make_tree_configs", "--out-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    for f in tmp_path.glob("*.json"):  # what the tracked files hold
        assert f.read_text() == (ROOT / "tree_configs" / f.name).read_text(), f.name
    (tmp_path / "cpu_4.json").write_text("{}")
    r = _run([sys.executable, "-m", "scripts.make_tree_configs", "--out-dir", str(tmp_path)])
    assert r.returncode == 1 and "--force" in r.stderr and (tmp_path / "cpu_4.json").read_text() == "{}"
    r = _run([sys.executable, "-m", "scripts.make_tree_configs", "--help"])
    assert "runs/tree_configs" in r.stdout


def test_shell_scripts_refuse_to_overwrite_results(tmp_path):
    """bench_readme.sh writes into runs/bench_readme unless given a folder, and replaces results
    (docs/results included) only with --force; train_smollm2_heads.sh never writes into the source
    tree and replaces trained heads only with FORCE=1. Both refuse before any work."""
    before = (ROOT / "docs" / "results" / "bench.txt").read_text()
    r = _run(["bash", "scripts/bench_readme.sh", "docs/results", "16"])
    assert r.returncode == 1 and "docs/results/latency_profile.json exists: pass --force" in r.stderr
    assert (ROOT / "docs" / "results" / "bench.txt").read_text() == before
    assert "OUT=${1:-runs/bench_readme}" in (ROOT / "scripts" / "bench_readme.sh").read_text()
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "medusa_heads.safetensors").write_bytes(b"")
    r = _run(["bash", "scripts/train_smollm2_heads.sh"], env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 1 and "already holds heads: FORCE=1" in r.stderr, r.stderr
    text = (ROOT / "scripts" / "train_smollm2_heads.sh").read_text()
    assert "OUT=${OUT:-runs/smollm2_heads}" in text
    assert "--out-dir tree_configs" not in text and "HEADS=exporter/" not in text


def test_hydra_training_script_refuses_to_overwrite_heads(tmp_path):
    """train_smollm2_hydra.sh, like the Medusa script, writes under OUT only and replaces trained
    heads only with FORCE=1, refusing before any work."""
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "medusa_heads.safetensors").write_bytes(b"")
    r = _run(["bash", "scripts/train_smollm2_hydra.sh"], env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 1 and "already holds heads: FORCE=1" in r.stderr, r.stderr
    text = (ROOT / "scripts" / "train_smollm2_hydra.sh").read_text()
    assert "OUT=${OUT:-runs/smollm2_hydra}" in text and "--head-type hydra" in text
    assert "--out-dir tree_configs" not in text and "HEADS=exporter/" not in text


def test_heldout_prompts_are_the_heldout_split(tmp_path, shared_data):
    """scripts/heldout_prompts.py writes exactly the Alpaca prompts of the held-out split (the ones
    no head trained on), in file order."""
    from training.data import split_of

    out = tmp_path / "held.json"
    r = _run([sys.executable, "-m", "scripts.heldout_prompts", "-o", str(out), "--last", "5"])
    assert r.returncode == 0, r.stderr
    rows = json.loads((shared_data / "alpaca_5000.json").read_text())
    held = [row for i, row in enumerate(rows) if split_of(f"alpaca-{i:05d}") == "heldout"]
    assert 150 < len(held) < 350  # ~5% of 5,000
    assert json.loads(out.read_text()) == held[-5:]


def test_hydra_bench_script_refuses_to_overwrite_results(tmp_path):
    (tmp_path / "hydra_bench.txt").write_text("kept")
    r = _run(["bash", "scripts/bench_hydra.sh", str(tmp_path)])
    assert r.returncode == 1 and "pass --force" in r.stderr and (tmp_path / "hydra_bench.txt").read_text() == "kept"


def test_dynamic_bench_script_refuses_to_overwrite_results(tmp_path):
    (tmp_path / "hydra_categories.txt").write_text("kept")
    r = _run(["bash", "scripts/bench_dynamic.sh", str(tmp_path)])
    assert (
        r.returncode == 1 and "pass --force" in r.stderr and (tmp_path / "hydra_categories.txt").read_text() == "kept"
    )


def test_datastore_bench_script_refuses_to_overwrite_results(tmp_path):
    (tmp_path / "hydra_categories.txt").write_text("kept")
    r = _run(["bash", "scripts/bench_datastore.sh", str(tmp_path)])
    assert (
        r.returncode == 1 and "pass --force" in r.stderr and (tmp_path / "hydra_categories.txt").read_text() == "kept"
    )


def test_load_test_rounds_alternate_the_servers_over_the_same_prompts(monkeypatch):
    """Each level runs its servers in ABBA rounds, each round the next prompts for every server;
    a level's row sums the rounds' tokens and seconds."""
    from scripts import load_test

    calls = []

    def fake(url, model, prompts, concurrency, requests, max_tokens, time_limit, first=0, extra_body=None):
        calls.append((url, first, requests))
        done = [{"tokens": 10, "ttft": 0.1, "itl": 0.01, "seconds": 1.0, "request": first + i,
                 "text": "odd" if url == "B" and first + i == 3 else f"answer {first + i}"}
                for i in range(requests)]  # fmt: skip
        return done, ([] if url == "A" else ["Timeout: x"]), 2.0 if url == "A" else 4.0

    monkeypatch.setattr(load_test, "_requests", fake)
    out = load_test.run_rounds({"plain": "A", "medusa": "B"}, "m", ["p"] * 40, 2, 8, 16, 60.0, rounds=4)
    assert [c[0] for c in calls] == list("ABBAABBA")
    assert {c[1] for c in calls if c[0] == "A"} == {c[1] for c in calls if c[0] == "B"} == {0, 2, 4, 6}
    assert all(c[2] == 2 for c in calls)  # 8 requests over 4 rounds
    a, b = out["plain"], out["medusa"]
    assert (a["requests"], a["tokens"], a["seconds"], a["rounds"], a["failed"]) == (8, 80, 8.0, 4, 0)
    assert (b["tokens_per_s"], b["failed"]) == (80 / 16.0, 4)
    # the servers' answers to the same requests compared: request 3's differs
    assert load_test.same_answers(b, a) == (7, 8) and load_test.same_answers(a, a) == (8, 8)
    load_test.run_rounds({"plain": "A"}, "m", ["p"], 16, 16, 16, 60.0, rounds=2)
    assert [c[2] for c in calls[-2:]] == [16, 16]  # a round has at least one request per client
    assert load_test.main(["art", "--rounds", "0"]) == 1


def test_load_test_checks_its_input_in_one_line_and_stops_its_clients_when_interrupted(
    tmp_path, capsys, monkeypatch, tiny
):
    """Bad flags and prompt files are one line before any server starts; Ctrl-C (or SIGTERM) while
    the clients run stops them: no client starts another request."""
    import threading
    from types import SimpleNamespace

    from scripts import load_test

    monkeypatch.setattr(load_test, "start_server", lambda *a, **k: pytest.fail("a server started"))
    art = str(tiny["artifact"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": []}\n')
    for argv, match in ((["--prompts", str(tmp_path / "none.jsonl")], "does not exist"),
                        (["--prompts", str(bad)], "bad.jsonl"), (["--prompts", str(tmp_path)], "is a folder"),
                        (["--concurrency", "0"], "--concurrency must be an integer >= 1"),
                        (["--json", str(tmp_path)], "is a folder: give a file name"),
                        (["--plot", str(tmp_path / "x.txt")], "the name must end in")):  # fmt: skip
        assert load_test.main([art, *argv]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("load_test: error:") and match in err and "\n" not in err, (argv, err)
    assert load_test.main([str(tmp_path / "none"), "--soak", "5"]) == 1
    assert "is not an artifact folder" in capsys.readouterr().err

    started = []

    def request(client, model, prompt, max_tokens, extra_body=None):
        started.append(prompt)
        time.sleep(0.05)
        return {"tokens": 1, "ttft": 0.01, "itl": None}

    class Interrupted(threading.Thread):  # Ctrl-C arrives while the main thread waits for the clients
        def join(self, timeout=None):
            super().join(0.3)
            raise KeyboardInterrupt

    monkeypatch.setattr(load_test, "one_request", request)
    monkeypatch.setattr(load_test, "threading", SimpleNamespace(Thread=Interrupted, Lock=threading.Lock,
                                                                Event=threading.Event))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        load_test._requests("http://127.0.0.1:9", "m", ["p"], 2, 10**6, 8, 3600.0)
    time.sleep(0.2)
    n = len(started)
    time.sleep(0.5)
    assert len(started) == n, "clients kept starting requests after the interrupt"


def test_lookup_max_bench_script_refuses_to_overwrite_results(tmp_path):
    (tmp_path / "medusa_full80.txt").write_text("kept")
    r = _run(["bash", "scripts/bench_lookup_max.sh", str(tmp_path)])
    assert r.returncode == 1 and "pass --force" in r.stderr and (tmp_path / "medusa_full80.txt").read_text() == "kept"


def test_coupled_pairs_compares_drafts_on_plain_samplings_tokens(tiny, shared_data, capsys):
    """The paired tool: every configuration emits plain sampling's tokens (the check it prints), the
    greedy reference plain greedy's, and the patched drafts are restored afterwards."""
    import runtime.decode as D
    from scripts import coupled_pairs

    perturb, choose = D.PositionNoise.perturb, D.PositionNoise.choose
    coupled_pairs.main([str(tiny["artifact"]), "--prompts", str(shared_data / "mt_bench_question.jsonl"),
                        "--per-category", "1", "--limit", "2", "--max-new-tokens", "12", "--factors", "0", "1",
                        "--trees", "chain_2", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "chain_2" in line]
    assert len(rows) == 2 and all("plain sampling's tokens 2/2" in r for r in rows), out
    assert "identical 2/2" in out
    assert (D.PositionNoise.perturb, D.PositionNoise.choose) == (perturb, choose)
    with pytest.raises(SystemExit):
        coupled_pairs.main([str(tiny["artifact"]), "--temperature", "0"])


def test_bench_batch_compares_where_plain_steps_run(tiny, capsys):
    """``--plain-steps in-place batch-graph``: every row twice, the same answers both ways, and the
    engine left on its default (in place) afterwards."""
    from runtime import batch as rb
    from scripts import bench_batch

    assert bench_batch.main([str(tiny["artifact"]), "--prompts", "3", "--concurrency", "3", "--max-new-tokens", "6",
                             "--threads", "1", "--budgets", "plain", "--plain-steps", "in-place", "batch-graph"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()[1:]
    rows = [line for line in lines if line.strip() and not line.startswith(" ")]
    profiles = [line for line in lines if line.startswith("    one token a sequence, ms a call: ")]
    assert len(profiles) == 2 and all("1 seq" in p and "2 seq" in p for p in profiles)  # after each plain row
    assert [r.split("  ")[0].strip() for r in rows] == [
        "plain decoding (in-place)", "plain decoding (batch-graph)",
        "medusa, budgets plain (in-place)", "medusa, budgets plain (batch-graph)",
    ]  # fmt: skip
    assert all(r.endswith("3/3") for r in rows)
    assert rb.PLAIN_STEPS_IN_PLACE is True


def test_bench_batch_reads_an_alpaca_list_as_the_other_benches_do(tiny, tmp_path, capsys):
    """``--prompts-file`` in any of runtime.bench.load_prompts' forms (here the held-out Alpaca
    list ``scripts/heldout_prompts.py`` writes), not MT-Bench's alone."""
    from scripts import bench_batch

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Name {k} rivers.", "input": ""} for k in (2, 3, 4)]))
    assert bench_batch.main([str(tiny["artifact"]), "--prompts-file", str(alpaca), "--prompts", "2",
                             "--concurrency", "2", "--max-new-tokens", "4", "--threads", "1", "--budgets", "plain"]) == 0  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines()[1:] if line.strip() and not line.startswith(" ")]
    assert len(rows) == 2 and all(r.endswith("2/2") for r in rows), rows
    with pytest.raises(SystemExit):  # argparse's one-line error naming the flag, not load_prompts' --limit
        bench_batch.main([str(tiny["artifact"]), "--prompts-file", str(alpaca), "--prompts", "0"])
    assert "--prompts and --concurrency must be >= 1" in capsys.readouterr().err


def test_bench_batch_compares_where_tree_steps_run(tiny, capsys):
    """``--tree-steps fold batch-graph``: every row twice, the same answers both ways (trees of
    several sequences on fold.onnx and on batch.onnx), the cost of a 4-token step after each
    Medusa row with load-aware budgets, and the engine left on fold.onnx afterwards."""
    from runtime import batch as rb
    from scripts import bench_batch

    assert bench_batch.main([str(tiny["artifact"]), "--prompts", "3", "--concurrency", "3", "--max-new-tokens", "8",
                             "--threads", "1", "--budgets", "none", "auto", "--tree-steps", "fold",
                             "batch-graph"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()[1:]
    rows = [line for line in lines if line.strip() and not line.startswith(" ")]
    assert [r.split("  ")[0].strip() for r in rows] == [
        "plain decoding [fold]", "plain decoding [batch-graph]", "medusa, budgets none [fold]",
        "medusa, budgets none [batch-graph]", "medusa, budgets auto [fold]", "medusa, budgets auto [batch-graph]",
    ]  # fmt: skip
    assert all(r.endswith("3/3") for r in rows)
    small = [line for line in lines if line.startswith("    4 tokens a sequence, ms a call: ")]
    assert len(small) == 2 and all("2 seq" in s for s in small)  # after the two budgets-auto rows
    assert rb.FOLD_STEPS is True


def test_bench_multiturn_reuses_the_first_turn_and_answers_the_same(tiny, shared_data, capsys, tmp_path):
    """Both turns of MT-Bench conversations with and without prefix reuse: the same tokens, the
    second turn's prompt mostly reused (the first question and answer), nothing reused without."""
    from scripts import bench_multiturn

    out = tmp_path / "mt.json"
    assert bench_multiturn.main([str(tiny["artifact"]), "--prompts", str(shared_data / "mt_bench_question.jsonl"),
                                 "--per-category", "1", "--limit", "3", "--max-new-tokens", "8", "--threads", "1",
                                 "--json", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "tokens identical on 3/3 conversations" in text
    s = json.loads(out.read_text())["summary"]
    assert s["reuse, turn 2"]["reused_share"] > 0.5 and s["no reuse, turn 2"]["reused_share"] == 0
    assert s["reuse, turn 1"]["prompt_tokens"] == s["no reuse, turn 1"]["prompt_tokens"]


def test_serve_prefix_reuse_flag():
    from runtime.cli import _load_args, build_parser

    on = build_parser().parse_args(["serve", "ART"])
    off = build_parser().parse_args(["serve", "ART", "--no-prefix-reuse"])
    assert _load_args(on)["reuse_prefix"] is True and _load_args(off)["reuse_prefix"] is False


def test_load_test_servers_run_without_prefix_reuse_unless_asked(monkeypatch):
    """Every level resends the same prompts: servers that kept them would skip prefills at the later
    levels that the first level paid, so the load test turns prefix reuse off unless asked."""
    import io

    from scripts import load_test

    cmds = []

    class Exited:
        returncode = 1

        def __init__(self, cmd, **kw):
            cmds.append(cmd)
            self.stderr = io.StringIO("")

        def poll(self):
            return 1

        def wait(self, timeout=None):
            return 1

    monkeypatch.setattr(load_test.subprocess, "Popen", Exited)
    for reuse in (False, True):
        with pytest.raises(SystemExit, match="the server exited"):
            load_test.start_server("ART", "medusa", 4, 2, prefix_reuse=reuse)
    assert "--no-prefix-reuse" in cmds[0] and "--no-prefix-reuse" not in cmds[1]


FAKE_LLAMA_SERVER = r"""
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
log = open(sys.argv[0] + ".log", "a")
log.write(json.dumps({"argv": args, "pid": os.getpid()}) + "\n")
log.flush()


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        data = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log.write(json.dumps({"path": self.path, "body": body, "pid": os.getpid()}) + "\n")
        log.flush()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
        for word in ("one", " two", " three"):
            delta = {"index": 0, "delta": {"content": word}, "finish_reason": None}
            self.wfile.write(f"data: {json.dumps({**base, 'choices': [delta]})}\n\n".encode())
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        self.wfile.write(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())


ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_load_test_drives_llama_server_beside_ours_with_its_prompts_prefilled_whole(tmp_path, capsys, monkeypatch):
    """``--llama-server DIR``: llama.cpp's server under the same load as ours (stand-ins speaking the
    streamed chat API here, ours started by a stubbed start_server): llama-server started afresh at
    each level with one slot per client at the top level, the chat template and the threads asked
    for; only its requests ask it to prefill the prompt whole (our server would refuse the unknown
    field); tokens from the stream's usage; the ratio against ours printed; every server stopped and
    its logs removed at the end; mistakes one line before anything starts; a server that exits
    before it is up is an error quoting its log."""
    import subprocess

    from scripts import load_test

    d = tmp_path / "bin"
    d.mkdir()
    (d / "server.py").write_text(FAKE_LLAMA_SERVER)
    (d / "llama-server").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{d / "server.py"}" "$@"\n')
    (d / "llama-server").chmod(0o755)
    gguf, art = tmp_path / "m.gguf", tmp_path / "art"
    gguf.write_bytes(b"GGUF")
    art.mkdir()
    out = tmp_path / "r.json"
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(load_test.tempfile, "tempdir", str(tmp_path / "tmp"))  # where the llama logs go

    def ours(artifact, kind, max_batch, threads, prefix_reuse=False):  # the stand-in, as our "medusa" server
        port = load_test.free_port()
        proc = subprocess.Popen([sys.executable, str(d / "server.py"), "--port", str(port), "--ours"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        return proc, load_test._ready(proc, port)

    monkeypatch.setattr(load_test, "start_server", ours)
    argv = [str(art), "--servers", "medusa", "llama-server-spec", "--llama-server", str(d), "--gguf", str(gguf),
            "--concurrency", "1", "3", "--requests", "3", "--rounds", "1", "--threads", "2", "--json", str(out)]  # fmt: skip
    assert load_test.main(argv) == 0
    printed = capsys.readouterr().out
    assert "medusa/llama-server-spec" in printed and "prompt cached n/a" in printed
    log = [json.loads(line) for line in (d / "server.py.log").read_text().splitlines()]
    starts = {e["pid"]: e["argv"] for e in log if "argv" in e}
    llama = [pid for pid, argv in starts.items() if "--ours" not in argv]
    # a fresh llama-server at each level (its speculation's n-gram pool would keep the answers to the
    # prompts every level resends); ours started once
    assert len(starts) == 3 and len(llama) == 2
    for pid in llama:
        start = starts[pid]
        assert start[start.index("-m") + 1] == str(gguf) and start[start.index("-np") + 1] == "3"
        assert start[start.index("-c") + 1] == str(3 * load_test.LLAMA_SLOT_CONTEXT) and "--jinja" in start
        assert start[start.index("-t") + 1] == start[start.index("-tb") + 1] == "2" and "--spec-default" in start
    requests = [e for e in log if "path" in e]
    assert len(requests) == 2 * 2 * (1 + 3)  # per level and server: a warm-up and the level's 3 requests
    for r in requests:
        assert r["path"] == "/v1/chat/completions" and r["body"]["temperature"] == 0 and r["body"]["stream"] is True
        if r["pid"] in llama:
            assert r["body"]["cache_prompt"] is False
        else:
            assert "cache_prompt" not in r["body"]  # our server takes no unknown field
    first = [r["body"] for r in requests if r["pid"] == llama[0]]
    warm, level = first[0], first[1:]
    assert warm["max_tokens"] == 8 and {b["max_tokens"] for b in level} == {128} and len(level) == 3
    assert warm["messages"] not in [b["messages"] for b in level]  # the warm-up's prompt is not the level's
    for pid in starts:  # every server stopped when the run ends
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert list((tmp_path / "tmp").iterdir()) == []  # no request failed: the llama logs are gone
    rows = json.loads(out.read_text())["rows"]
    assert [(r["server"], r["concurrency"], r["requests"], r["tokens"], r["failed"]) for r in rows] == [
        ("medusa", 1, 3, 9, 0), ("llama-server-spec", 1, 3, 9, 0), ("medusa", 3, 3, 9, 0),
        ("llama-server-spec", 3, 3, 9, 0)]  # fmt: skip
    assert json.loads(out.read_text())["gguf"] == str(gguf)
    for extra, match in ((["--servers", "llama-server"], "needs --llama-server DIR"),
                         (["--llama-server", str(d)], "need llama-server or llama-server-spec in --servers"),
                         (["--servers", "llama-server", "--llama-server", str(d)], "no " + str(d / "llama-quantize")),
                         (["--servers", "llama-server", "--llama-server", str(tmp_path), "--gguf", str(gguf)],
                          "no " + str(tmp_path / "llama-server")),
                         (["--servers", "llama-server", "--llama-server", str(d), "--gguf", str(tmp_path / "x")],
                          "no such file"),
                         (["--servers", "llama-server", "--llama-server", str(d), "--soak", "5"], "--soak")):  # fmt: skip
        assert load_test.main([str(art), *extra]) == 1, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("load_test: error:") and match in err and "\n" not in err, (extra, err)
    assert len((d / "server.py.log").read_text().splitlines()) == len(log)  # none of them started a server
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "llama-server").write_text("#!/bin/sh\necho 'error: bad model file' >&2\nexit 3\n")
    (bad / "llama-server").chmod(0o755)
    with pytest.raises(SystemExit, match=r"the server exited \(3\): error: bad model file"):  # its log's end
        load_test.start_llama_server(bad / "llama-server", gguf, "llama-server", 2, None, tmp_path / "bad.log")


def test_a_server_whose_start_is_interrupted_or_times_out_is_stopped(tmp_path, monkeypatch):
    """Ctrl-C (or any error) while the load test waits for a server to come up, or a server not up
    in time, stops that server: it is not in the run's list yet, so nothing else would."""
    import subprocess
    from types import SimpleNamespace

    from scripts import load_test

    def silent():  # a server that never answers /health
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def interrupt(seconds):
        raise KeyboardInterrupt

    proc = silent()
    monkeypatch.setattr(load_test.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_test._ready(proc, load_test.free_port())
    assert proc.poll() is not None  # killed and reaped
    monkeypatch.undo()
    proc = silent()
    clock = iter([0.0, 0.0, 1000.0])  # the deadline, one poll, then past it
    monkeypatch.setattr(load_test, "time", SimpleNamespace(time=lambda: next(clock), sleep=lambda s: None))
    with pytest.raises(SystemExit, match="did not start within 120 s"):
        load_test._ready(proc, load_test.free_port())
    assert proc.poll() is not None


def test_bench_structured_times_both_decoders_under_the_schema(tiny, shared_data, capsys, tmp_path):
    """Our plain decoding and Medusa under the schema, side by side (the peer left out: its graph of the
    tiny model is not built here; tests/runtime/test_peers.py covers its runs): the same tokens, and
    a table and JSON a person can read."""
    pytest.importorskip("llguidance")
    from scripts import bench_structured

    out = tmp_path / "s.json"
    assert bench_structured.main([str(tiny["artifact"]), "--prompts", str(shared_data / "mt_bench_question.jsonl"),
                                  "--limit", "2", "--max-new-tokens", "16", "--threads", "1", "--peer", "none",
                                  "--json", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "| medusa-trt Medusa (" in text and "| medusa-trt plain | " in text, text
    s = json.loads(out.read_text())["summary"]
    assert s["medusa"]["identical"] == 2 == s["plain"]["identical"] and "peer" not in s
    assert s["plain"]["tokens_per_s"] > 0 and s["medusa"]["mean_accepted"] >= 1
    assert bench_structured.conforms('{"answer": "a", "key_points": [], "confidence": 3}', bench_structured.SCHEMA)
    assert not bench_structured.conforms('{"answer": "a"}', bench_structured.SCHEMA)
    assert not bench_structured.conforms('{"answer": "a", "key_points": [], "confidence": 3, "x": 1}',
                                         bench_structured.SCHEMA)  # fmt: skip


def test_stream_clients_serves_every_request_once_with_the_answers_of_one_stream(tiny):
    """``scripts.bench_batch.stream_clients`` (the in-process load of the session probes): ``count`` requests
    from ``first`` on, wrapping over the chats, each streamed once by one of the client threads; the batched
    answers are the one-stream generator's."""
    import runtime
    from scripts.bench_batch import stream_clients

    chats = [f"t{k} t{k + 1} t{k + 2}" for k in (3, 5, 7)]
    gen = runtime.load(tiny["artifact"], threads=1, max_batch=2, reuse_prefix=False)
    try:
        done, wall = stream_clients(gen, chats, 2, 4, first=1, max_new_tokens=6)
    finally:
        gen.close()
    assert wall > 0 and sorted(k for k, _ in done) == [0, 1, 1, 2]  # requests 1 .. 4: chats 1, 2, 0, 1
    one = runtime.load(tiny["artifact"], threads=1)
    for k, tokens in done:
        assert tokens == one.generate(chats[k], max_new_tokens=6).tokens
