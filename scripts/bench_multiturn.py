"""Multi-turn chats with and without prefix reuse: MT-Bench's two turns, the second sent as the whole
conversation (its first question, the first answer, its second question), as a chat client sends it.

Two generators of one artifact, interleaved conversation by conversation (which goes first
alternates): one keeps the cache of the previous call's prompt and answer (``reuse_prefix=True``,
the default) and prefills only the second question, the other prefills every prompt whole. Prints,
per turn, the median time to the first token (the prefill and the first token; here the whole
call's prefill phase, ``stats.times["prefill"]``) and the end-to-end tokens per second, the prompt
tokens reused, and whether both gave the same tokens on every turn. ``--peer`` adds onnxruntime-genai's
plain decoding of the same prompts, each whole and on one generator a conversation that keeps its
cache between the turns (``Generator.rewind_to`` to the prefix it shares, ``append_tokens`` the rest),
and its n-gram speculation on such a generator.

    python -m scripts.bench_multiturn artifacts/smollm2-135m-medusa --limit 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def conversations(path: Path, limit: int | None, per_category: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if len(r.get("turns", [])) >= 2]
    if per_category:
        count: Counter[str] = Counter()
        kept = []
        for r in rows:
            if count[r["category"]] < per_category:
                count[r["category"]] += 1
                kept.append(r)
        rows = kept
    return rows[:limit] if limit else rows


def run_chat(gen, q: dict, max_new_tokens: int, medusa: bool) -> list[dict]:
    """Both turns of one conversation: per turn its tokens, prompt size, reused tokens and times."""
    chat = [{"role": "user", "content": q["turns"][0]}]
    out = []
    for turn in (0, 1):
        if turn:
            chat += [{"role": "assistant", "content": out[0]["text"]}, {"role": "user", "content": q["turns"][1]}]
        t = time.perf_counter()
        g = gen.generate(chat, max_new_tokens=max_new_tokens, medusa=medusa)
        seconds = time.perf_counter() - t
        out.append({"tokens": g.tokens, "text": g.text, "prompt": g.prompt_tokens,
                    "cached": g.stats.cached_prompt_tokens, "prefill_s": g.stats.times["prefill"],
                    "seconds": seconds})  # fmt: skip
    return out


def _first(run) -> float:
    """A peer run's time to its first token (every turn here generates at least one)."""
    if run.first_token_s is None:
        raise RuntimeError("a peer turn generated nothing: no time to its first token")
    return run.first_token_s


def main(argv=None) -> int:
    from tqdm import tqdm

    import runtime

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/mt_bench_question.jsonl"))
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--per-category", type=int, default=None, help="the first N conversations of each category")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plain", action="store_true", help="plain decoding instead of Medusa (both generators)")
    ap.add_argument("--peer", action="store_true",
                    help="also onnxruntime-genai on the same prompts (pip install -e .[peers]): plain decoding of "
                         "each prompt whole and on one generator per conversation that keeps its cache between "
                         "the turns, and its n-gram speculation on such a generator: time to first token and "
                         "end-to-end tokens/s per turn beside ours")  # fmt: skip
    ap.add_argument("--json", default=None, help="write the per-conversation numbers here")
    a = ap.parse_args(argv)

    qs = conversations(Path(a.prompts), a.limit, a.per_category)
    gens = {
        "reuse": runtime.load(a.artifact, threads=a.threads),
        "no reuse": runtime.load(a.artifact, threads=a.threads, reuse_prefix=False),
    }
    for g in gens.values():  # warm-up: first-call allocations before any timing
        g.generate([{"role": "user", "content": "Hi"}], max_new_tokens=8)
    peer = None
    if a.peer:
        from runtime.peers import OrtGenaiPeer, peer_model_dir

        peer = OrtGenaiPeer(peer_model_dir(gens["reuse"]), threads=a.threads)
        hi = gens["reuse"].encode([{"role": "user", "content": "Hi"}])
        peer.run(hi, 8)
        peer.chat([hi], 8, ngram=True)  # its speculation's first shapes too
    rows: dict[str, list] = {k: [] for k in gens}
    peer_rows: dict[str, list] = {"whole": [], "kept": [], "kept n-gram": []}
    same = 0
    peer_same = dict.fromkeys(peer_rows, 0)
    for i, q in enumerate(tqdm(qs, desc="conversations", unit="chat")):
        order = list(gens) if i % 2 == 0 else list(reversed(gens))
        got = {k: run_chat(gens[k], q, a.max_new_tokens, not a.plain) for k in order}
        for k in gens:
            rows[k].append(got[k])
        same += all(got["reuse"][t]["tokens"] == got["no reuse"][t]["tokens"] for t in (0, 1))
        if peer is not None:  # the same two prompts as ours (turn 2 carries our turn-1 answer)
            chat = [{"role": "user", "content": q["turns"][0]}]
            second = chat + [{"role": "assistant", "content": got["reuse"][0]["text"]},
                             {"role": "user", "content": q["turns"][1]}]  # fmt: skip
            ids = [gens["reuse"].encode(c) for c in (chat, second)]
            ways = {
                "whole": lambda ids=ids: [peer.run(x, a.max_new_tokens) for x in ids],
                "kept": lambda ids=ids: peer.chat(ids, a.max_new_tokens),
                "kept n-gram": lambda ids=ids: peer.chat(ids, a.max_new_tokens, ngram=True),
            }
            kinds = list(ways)
            kinds = kinds[i % 3 :] + kinds[: i % 3]  # which way goes first rotates (ours go before the peer's)
            peer_runs = {kind: ways[kind]() for kind in kinds}
            for kind in ways:
                runs = peer_runs[kind]
                peer_rows[kind].append(runs)
                peer_same[kind] += all(r.tokens == got["reuse"][t]["tokens"] for t, r in enumerate(runs))

    mode = "plain decoding" if a.plain else "Medusa"
    print(f"{len(qs)} MT-Bench conversations x 2 turns, {mode}, max_new_tokens {a.max_new_tokens}, threads {a.threads}")
    print(f"{'':16} {'turn':>4} {'prompt tok':>10} {'reused':>7} {'TTFT p50 ms':>12} {'tok/s (end to end)':>19}")
    summary: dict = {}
    for k in gens:
        for t in (0, 1):
            turns = [r[t] for r in rows[k]]
            tokens = sum(len(x["tokens"]) for x in turns)
            seconds = sum(x["seconds"] for x in turns)
            s = {
                "prompt_tokens": statistics.mean(x["prompt"] for x in turns),
                "reused_share": sum(x["cached"] for x in turns) / sum(x["prompt"] for x in turns),
                "ttft_p50_ms": 1000 * statistics.median(x["prefill_s"] for x in turns),
                "tokens_per_s": tokens / seconds,
            }
            summary[f"{k}, turn {t + 1}"] = s
            print(f"{k:16} {t + 1:>4} {s['prompt_tokens']:>10.0f} {100 * s['reused_share']:>6.0f}% "
                  f"{s['ttft_p50_ms']:>12.1f} {s['tokens_per_s']:>19.2f}")  # fmt: skip
    if peer is not None:
        how = {
            "whole": "plain, each prompt whole",
            "kept": "plain, one generator a chat: rewind_to + append_tokens",
            "kept n-gram": "its n-gram speculation, one generator a chat",
        }
        for kind, runs_of in peer_rows.items():
            for t in (0, 1):
                turns = [r[t] for r in runs_of]
                s = {
                    "reused_share": sum(r.cached for r in turns) / sum(x[t]["prompt"] for x in rows["reuse"]),
                    "ttft_p50_ms": 1000 * statistics.median(_first(r) for r in turns),
                    "tokens_per_s": sum(len(r.tokens) for r in turns) / sum(r.seconds for r in turns),
                }
                summary[f"peer {kind}, turn {t + 1}"] = s
                ours = summary[f"reuse, turn {t + 1}"]
                print(f"{'peer ' + kind:16} {t + 1:>4} {'':>10} {100 * s['reused_share']:>6.0f}% {s['ttft_p50_ms']:>12.1f} "
                      f"{s['tokens_per_s']:>19.2f}   ({how[kind]}; ours with reuse {ours['tokens_per_s'] / s['tokens_per_s']:.2f}x "
                      f"its tokens/s; its time to first token {s['ttft_p50_ms'] / ours['ttft_p50_ms']:.2f}x ours)")  # fmt: skip
        print(
            f"the peer is {peer.version}; its tokens equal ours on "
            + ", ".join(f"{peer_same[k]}/{len(qs)} conversations ({k})" for k in peer_same)
            + " (both turns)"
        )
    r, n = summary["reuse, turn 2"], summary["no reuse, turn 2"]
    print(f"turn 2: time to first token {n['ttft_p50_ms'] / r['ttft_p50_ms']:.2f}x shorter with reuse (medians), "
          f"end to end {r['tokens_per_s'] / n['tokens_per_s']:.2f}x; tokens identical on {same}/{len(qs)} "
          "conversations (both turns)")  # fmt: skip
    if a.json:
        record = {"summary": summary, "identical": same, "conversations": len(qs)}
        if peer is not None:
            record.update(peer=peer.version, peer_identical=peer_same)
        Path(a.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {a.json}")
    return 0 if same == len(qs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
