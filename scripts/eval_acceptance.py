"""Mean accepted tokens per step on MT-Bench first turns (greedy), PyTorch reference backend.

    python -m scripts.eval_acceptance --heads exporter/shipped_heads/smollm2-135m \
        --tree tree_configs/smollm2_selected.json --limit 80 --out runs/eval/mt_bench.json

Each first-turn question goes through the model's chat template; decoding is greedy
(lossless: the output equals plain greedy decoding), ``--max-new-tokens`` 256. The number
reported is the paper's acceleration rate: tokens emitted per verification step, pooled
over all prompts (sum of tokens / sum of steps); the per-prompt mean is reported too.
MT-Bench is evaluation data only: nothing here trains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench_question.jsonl"


def order_questions(questions: list[dict], order: str) -> list[dict]:
    """File order, or round-robin over categories (1st of each category, then 2nd, ...)."""
    if order == "file":
        return list(questions)
    cats: dict[str, list[dict]] = {}
    for q in questions:
        cats.setdefault(q["category"], []).append(q)
    out = []
    for i in range(max(len(v) for v in cats.values())):
        out.extend(v[i] for v in cats.values() if i < len(v))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", default=str(ROOT / "exporter" / "shipped_heads" / "smollm2-135m"))
    p.add_argument("--tree", default=str(ROOT / "tree_configs" / "smollm2_selected.json"))
    p.add_argument("--questions", default=str(MT_BENCH))
    p.add_argument("--limit", type=int, default=80, help="first N questions (in --order)")
    p.add_argument(
        "--order",
        choices=("file", "interleave"),
        default="interleave",
        help="interleave: round-robin over the 8 categories, so a partial run covers all of them",
    )
    p.add_argument("--shard", default="0/1", help="i/n: this process takes every n-th question from i (parallel runs)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--time-budget-s", type=float, default=0, help="stop starting new prompts after this (0: none)")
    p.add_argument("--check-lossless", type=int, default=0, help="also decode the first N prompts plainly and compare")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write per-prompt results as JSON")
    p.add_argument(
        "--merge", nargs="+", default=None, help="pool the --out files of parallel shards and print the summary"
    )
    a = p.parse_args(argv)
    if a.merge:
        return merge(a.merge)

    import numpy as np

    from exporter.heads import load_heads
    from exporter.models import load_backbone
    from exporter.torch_backend import TorchBackend
    from runtime.decode import DecodeConfig, decode
    from runtime.errors import MedusaError
    from runtime.tree import load_tree
    from training.distill import chat_prompt_ids

    try:
        model, tok, _ = load_backbone(a.model)
        heads = load_heads(a.heads, hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size)
        tree = load_tree(a.tree, num_heads=heads.config.num_heads)
        backend = TorchBackend(model, heads, threads=a.threads)
        questions = [json.loads(line) for line in Path(a.questions).read_text().splitlines() if line.strip()]
        questions = order_questions(questions, a.order)[: a.limit]
        shard, shards = (int(x) for x in a.shard.split("/"))
        questions = questions[shard::shards]
    except MedusaError as e:
        print(f"eval_acceptance: error: {e}", file=sys.stderr)
        return 1
    cfg = DecodeConfig(max_new_tokens=a.max_new_tokens, temperature=0.0, eos_token_ids=backend.spec.eos_token_ids)
    rows, t0 = [], time.time()
    for i, q in enumerate(questions):
        if a.time_budget_s and time.time() - t0 > a.time_budget_s:
            print(f"time budget reached after {i} prompts")
            break
        ids = chat_prompt_ids(tok, q["turns"][0])
        res = decode(backend, ids, cfg, tree)
        s = res.stats
        row = {
            "question_id": q["question_id"],
            "category": q["category"],
            "prompt_tokens": len(ids),
            "new_tokens": s.new_tokens,
            "steps": s.steps,
            "mean_accepted": s.mean_accepted,
            "accept_hist": {str(k): v for k, v in sorted(s.accept_hist.items())},
            "tokens_per_s": s.tokens_per_s,
            "finish": s.finish_reason,
        }
        if i < a.check_lossless:
            plain = decode(
                backend,
                ids,
                DecodeConfig(max_new_tokens=a.max_new_tokens, medusa=False, eos_token_ids=backend.spec.eos_token_ids),
            )
            row["lossless"] = plain.tokens == res.tokens
        rows.append(row)
        steps = sum(r["steps"] for r in rows)
        emitted = sum(sum(int(k) * v for k, v in r["accept_hist"].items()) for r in rows)
        print(
            f"[{i + 1}/{len(questions)}] q{q['question_id']} {q['category']:<10} tokens {s.new_tokens:>3} "
            f"steps {s.steps:>3} accepted/step {s.mean_accepted:.2f} | pooled {emitted / max(steps, 1):.3f}"
            + (f" lossless={row['lossless']}" if "lossless" in row else ""),
            flush=True,
        )
    steps = sum(r["steps"] for r in rows)
    emitted = sum(sum(int(k) * v for k, v in r["accept_hist"].items()) for r in rows)
    summary = {
        "prompts": len(rows),
        "mean_accepted_pooled": emitted / max(steps, 1),
        "mean_accepted_per_prompt": float(np.mean([r["mean_accepted"] for r in rows])) if rows else 0.0,
        "tree": tree.name,
        "tree_nodes": tree.num_nodes,
        "heads": a.heads,
        "model": a.model,
        "max_new_tokens": a.max_new_tokens,
        "backend": "torch-reference",
        "seconds": round(time.time() - t0, 1),
        "lossless_checked": sum("lossless" in r for r in rows),
        "lossless_ok": sum(bool(r.get("lossless")) for r in rows),
        "command": "python -m scripts.eval_acceptance " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(summary, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"summary": summary, "prompts": rows}, indent=1) + "\n")
    return 0


def merge(files: list[str]) -> int:
    rows, parts = [], []
    for f in files:
        doc = json.loads(Path(f).read_text())
        rows.extend(doc["prompts"])
        parts.append(doc["summary"])
    steps = sum(r["steps"] for r in rows)
    emitted = sum(sum(int(k) * v for k, v in r["accept_hist"].items()) for r in rows)
    hist: dict[str, int] = {}
    for r in rows:
        for k, v in r["accept_hist"].items():
            hist[k] = hist.get(k, 0) + v
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    summary = {
        "prompts": len(rows),
        "mean_accepted_pooled": emitted / max(steps, 1),
        "mean_accepted_per_prompt": sum(r["mean_accepted"] for r in rows) / max(len(rows), 1),
        "accept_hist": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "by_category": {
            c: round(
                sum(sum(int(k) * v for k, v in r["accept_hist"].items()) for r in rs)
                / max(sum(r["steps"] for r in rs), 1),
                3,
            )
            for c, rs in sorted(by_cat.items())
        },
        "lossless_checked": sum("lossless" in r for r in rows),
        "lossless_ok": sum(bool(r.get("lossless")) for r in rows),
        "shards": [p["command"] for p in parts],
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
