"""Structured output, timed: our plain decoding and Medusa under a JSON schema (``response_format``)
against onnxruntime-genai's plain decoding and its n-gram speculation under the same schema (its
``set_guidance``), interleaved prompt by prompt in one run, every answer checked against our plain one
and against the schema.

    python -m scripts.bench_structured artifacts/smollm2-135m-medusa --limit 16 --threads 2 --peer ortgenai

Prompts: the first turns of MT-Bench (evaluation only) with one sentence asking for the JSON
object, the schema below (``--schema FILE`` for another). Speeds are end to end (prefill
included, every prompt prefilled whole), tokens per second over all prompts; "conforms": the
answers that ended (EOS) parse as JSON and hold the schema's required keys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "key_points": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["answer", "key_points", "confidence"],
    "additionalProperties": False,
}
ASK = "\n\nReply with a JSON object with the keys answer, key_points (at most 3) and confidence (0 to 100)."


def conforms(text: str, schema: dict) -> bool:
    """The text parses as a JSON object holding the schema's required keys (and no others where the
    schema says so)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if not isinstance(value, dict) or not set(schema.get("required", [])) <= set(value):
        return False
    return schema.get("additionalProperties", True) is not False or set(value) <= set(schema.get("properties", {}))


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--prompts", default=str(ROOT.parent / "shared/data/mt_bench_question.jsonl"))
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--schema", default=None, help="a JSON schema file (default: the one in this script)")
    p.add_argument("--peer", choices=["ortgenai", "none"], default="ortgenai")
    p.add_argument("--json", default=None, help="write the per-prompt rows and the summary here")
    a = p.parse_args(argv)

    import runtime
    from runtime.bench import load_prompts, whole_prefills

    schema = json.loads(Path(a.schema).read_text()) if a.schema else SCHEMA
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    gen = runtime.load(a.artifact, threads=a.threads)
    peer = None
    if a.peer == "ortgenai":
        from runtime.peers import OrtGenaiPeer, peer_model_dir

        peer = OrtGenaiPeer(peer_model_dir(gen, None), a.threads)
    prompts = load_prompts(a.prompts, limit=a.limit)
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=0, response_format=fmt)
    ids0 = gen.encode([{"role": "user", "content": prompts[0].text + ASK}])
    gen.generate(ids0, **{**kw, "max_new_tokens": 8})  # warm-up: the grammar compiles, the sessions run once
    gen.generate(ids0, **{**kw, "max_new_tokens": 8}, medusa=False)
    rows = []
    with whole_prefills(gen):
        for i, pr in enumerate(prompts):
            ids = gen.encode([{"role": "user", "content": pr.text + ASK}])
            runs = {}
            runs["plain"] = timed(gen.generate, ids, medusa=False, **kw)
            runs["medusa"] = timed(gen.generate, ids, **kw)
            if peer is not None:
                runs["peer"] = timed(peer.run, ids, a.max_new_tokens, json_schema=json.dumps(schema))
                if peer.ngram_unavailable is None:  # its own speculation under its guidance: its best
                    runs["peer_ngram"] = timed(peer.run, ids, a.max_new_tokens, ngram=True,
                                               json_schema=json.dumps(schema))  # fmt: skip
            plain = runs["plain"][0]
            row = {"id": pr.id, "category": pr.category, "prompt_tokens": len(ids)}
            for name, (out, seconds) in runs.items():
                tokens = out.tokens
                row[name] = {"tokens": len(tokens), "seconds": seconds, "identical": tokens == plain.tokens}
                if name == "medusa":
                    row[name].update(steps=out.stats.steps, forced_steps=out.stats.forced_steps)
            ended = plain.stats.finish_reason == "eos"
            row["ended"] = ended
            row["conforms"] = conforms(plain.text, schema) if ended else None
            rows.append(row)
            print(f"[{i + 1}/{len(prompts)}] {pr.id} {pr.category}: "
                  + ", ".join(f"{n} {r['tokens'] / r['seconds']:.1f} tok/s" for n, r in row.items()
                              if isinstance(r, dict)), file=sys.stderr, flush=True)  # fmt: skip

    def rate(name):
        return sum(r[name]["tokens"] for r in rows) / sum(r[name]["seconds"] for r in rows)

    names = ["plain", "medusa"] + [n for n in ("peer", "peer_ngram") if n in rows[0]]
    summary = {n: {"tokens_per_s": rate(n), "identical": sum(r[n]["identical"] for r in rows)} for n in names}
    steps = sum(r["medusa"]["steps"] for r in rows)
    summary["medusa"]["mean_accepted"] = sum(r["medusa"]["tokens"] for r in rows) / max(1, steps)
    summary["medusa"]["forced_steps"] = sum(r["medusa"]["forced_steps"] for r in rows)
    summary["medusa"]["median_prompt_speedup"] = statistics.median(
        (r["plain"]["seconds"] / r["plain"]["tokens"]) / (r["medusa"]["seconds"] / r["medusa"]["tokens"]) for r in rows
    )
    ended = [r for r in rows if r["ended"]]
    print(f"\nstructured output, {len(rows)} prompts of {a.prompts}, {a.max_new_tokens} tokens at most, "
          f"{a.threads} threads; the schema's answers that ended: {len(ended)}/{len(rows)}, of them conforming "
          f"{sum(bool(r['conforms']) for r in ended)}/{len(ended)}")  # fmt: skip
    print("| decoder (under the schema) | tok/s | vs our plain | vs the peer's plain | vs the peer's n-gram "
          "| tokens identical to our plain |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    labels = {"plain": "medusa-trt plain", "medusa": "medusa-trt Medusa"}
    if peer is not None:
        labels.update(peer=f"{peer.version} plain", peer_ngram=f"{peer.version} n-gram speculation")

    def vs(s, other):
        return f"{s['tokens_per_s'] / summary[other]['tokens_per_s']:.2f}x" if other in summary else "-"

    for n in names:
        s = summary[n]
        extra = f" ({s['mean_accepted']:.2f} accepted a step)" if n == "medusa" else ""
        print(f"| {labels[n]}{extra} | {s['tokens_per_s']:.2f} | {vs(s, 'plain')} | {vs(s, 'peer')} "
              f"| {vs(s, 'peer_ngram')} | {s['identical']}/{len(rows)} |")  # fmt: skip
    # a small model under a schema may loop inside a string until the limit (emoji, a repeated sentence),
    # which the context lookup drafts whole: the answers that ended apart from those cut at the limit
    for label, part in (("ended (EOS)", ended), ("cut at the limit", [r for r in rows if not r["ended"]])):
        if not part:
            continue
        rates = {n: sum(r[n]["tokens"] for r in part) / sum(r[n]["seconds"] for r in part) for n in names}
        accepted = sum(r["medusa"]["tokens"] for r in part) / max(1, sum(r["medusa"]["steps"] for r in part))
        summary[f"medusa, {label}"] = {"prompts": len(part), "tokens_per_s": rates, "mean_accepted": accepted}
        print(
            f"answers {label}, {len(part)}: Medusa {rates['medusa']:.2f} tok/s, {accepted:.2f} accepted a step, "
            + ", ".join(f"{rates['medusa'] / rates[n]:.2f}x {labels[n]}" for n in names if n != "medusa")
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "summary": summary, "schema": schema}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
