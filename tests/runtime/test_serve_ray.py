"""``medusa-run serve --ray-replicas 2``: the same app as a Ray Serve deployment, two replicas
(each its own process and engine) behind Ray's HTTP proxy on loopback."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve import CHAT, free_port  # noqa: E402


def test_two_replicas_behind_rays_proxy_answer_like_offline_generate(tiny, gen, repo_root):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # the key from the environment reaches the replicas (each is built by the same function; /health stays open)
    env = {**os.environ, "PYTHONPATH": str(repo_root), "RAY_USAGE_STATS_ENABLED": "0", "MEDUSA_API_KEY": "ray-key"}
    cmd = [sys.executable, "-m", "runtime.cli", "serve", str(tiny["artifact"]), "--ray-replicas", "2",
           "--port", str(port), "--threads", "1", "--model-name", "tiny"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        pids: collections.Counter = collections.Counter()

        def health():
            try:
                pids.update([httpx.get(f"{url}/health", timeout=5).json()["pid"]])
            except (httpx.HTTPError, ValueError, KeyError):  # not up yet: the proxy answers 503 text
                time.sleep(0.5)

        while len(pids) < 2:  # both replicas up: the proxy spreads concurrent calls over them
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else "timeout"
            calls = [threading.Thread(target=health) for _ in range(8)]
            for t in calls:
                t.start()
            for t in calls:
                t.join()
        assert proc.pid not in pids  # the replicas are processes of their own
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="ray-key", max_retries=0, timeout=120)
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        for _ in range(4):  # whichever replica answers
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
        answers = {}

        def ask(i):
            r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
            answers[i] = r.choices[0].message.content

        asks = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in asks:
            t.start()
        for t in asks:
            t.join()
        assert set(answers.values()) == {gen.generate(CHAT, max_new_tokens=12).text} and len(answers) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_replicas_that_fail_to_start_are_one_line_naming_their_error(tiny, tmp_path, repo_root):
    """A replica that cannot start (here: its graphs are not ONNX) fails the command with the
    replica's own error on one line, and Ray is shut down; Ray Serve's own message only says
    that the deployment failed."""
    import shutil

    art = tmp_path / "broken"
    shutil.copytree(tiny["artifact"], art)
    for graph in art.glob("*.onnx"):
        graph.write_bytes(b"not a graph")
    env = {**os.environ, "PYTHONPATH": str(repo_root), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "runtime.cli", "serve", str(art), "--ray-replicas", "2",
           "--port", str(free_port()), "--threads", "1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if "the Ray Serve replicas failed to start" in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "ready:" not in done.stdout
