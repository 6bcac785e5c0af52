"""Measure how often the lookup branch's drafts are accepted, in the form of ``runtime.lookup``'s
``FIRST_RATES`` / ``NEXT_RATES`` (what ``DraftSizer`` assumes before a call has seen its own drafts).

Decodes each prompt greedily with Medusa (the artifact's tree, ``lookup_sizing="cost"``) and adds up
every call's ``DraftSizer`` counts: each proposed draft scored against the tokens its step emitted.
Tune on prompts no evaluation uses (never MT-Bench), e.g. the held-out Alpaca split's tuning part:

    python -m scripts.heldout_prompts -o runs/alpaca_tune.json --last 76 --drop-last 24
    python -m scripts.lookup_rates artifacts/smollm2-135m-medusa --prompts runs/alpaca_tune.json --limit 24
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from runtime.lookup import FIRST_RATES, NEXT_RATES, DraftSizer

SOURCES = ("context 1-gram", "context 2-gram", "context >= 3-gram", "datastore <= 2-gram", "datastore >= 3-gram")


def read_prompts(path: str) -> list[str]:
    """An Alpaca-style JSON list (instruction, input) or MT-Bench-style JSONL (turns)."""
    text = Path(path).read_text()
    rows = (
        json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    )
    out = []
    for r in rows:
        p = r.get("instruction") or r["turns"][0]
        out.append(p + ("\n\n" + r["input"] if r.get("input") else ""))
    return out


def measure(gen, prompts: list[str], max_new_tokens: int, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Summed ``(first, next)`` counts (hits and trials, as DraftSizer keeps them) over the prompts."""
    first, nxt = np.zeros((2, *FIRST_RATES.shape)), None
    for i, text in enumerate(prompts):
        ids = gen.encode([{"role": "user", "content": text}])
        out = gen.generate(ids, max_new_tokens=max_new_tokens, lookup_sizing="cost")
        sizer = out.stats.draft_sizer
        if not isinstance(sizer, DraftSizer):
            raise SystemExit("no lookup sizing ran: the artifact's tree must be fixed and the lookup on")
        first += sizer.first
        nxt = sizer.next.copy() if nxt is None else nxt + sizer.next
        if progress:
            progress(i + 1, len(prompts))
    assert nxt is not None
    return first, nxt


def table(first: np.ndarray, nxt: np.ndarray, positions: int, min_trials: int) -> tuple[np.ndarray, np.ndarray]:
    """Rates in FIRST_RATES / NEXT_RATES' shapes; positions past ``positions - 1`` pooled into the last;
    a cell with fewer than ``min_trials`` observations keeps the shipped value."""
    f = np.where(first[1] >= min_trials, first[0] / np.maximum(first[1], 1), FIRST_RATES)
    hits = np.concatenate([nxt[0][..., : positions - 1], nxt[0][..., positions - 1 :].sum(-1, keepdims=True)], -1)
    trials = np.concatenate([nxt[1][..., : positions - 1], nxt[1][..., positions - 1 :].sum(-1, keepdims=True)], -1)
    n = np.where(trials >= min_trials, hits / np.maximum(trials, 1), NEXT_RATES)
    return f, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--prompts", required=True)
    p.add_argument("--limit", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-trials", type=int, default=10, help="fewer observations keep the shipped value")
    a = p.parse_args(argv)
    from runtime.api import load

    gen = load(a.artifact, threads=a.threads)
    prompts = read_prompts(a.prompts)[: a.limit]
    first, nxt = measure(gen, prompts, a.max_new_tokens, lambda i, n: print(f"{i}/{n}", end="\r", file=sys.stderr))
    print(file=sys.stderr)
    f, n = table(first, nxt, NEXT_RATES.shape[2], a.min_trials)
    print(f"{len(prompts)} prompts of {a.prompts}, {a.max_new_tokens} new tokens, {a.artifact}")
    print("first token accepted, where the tree holds it nowhere / as a lower-ranked / as the top candidate (trials):")
    for c, name in enumerate(SOURCES):
        print(f"  {name:20s}", "  ".join(f"{f[c, g]:.2f} ({int(first[1, c, g])})" for g in range(3)))
    print("token j accepted after j - 1 were, j = 2, 3, 4+, after a draft not / accepted whole (trials):")
    for c, name in enumerate(SOURCES):
        for s in range(2):
            t = [int(x) for x in nxt[1, c, s, :2]] + [int(nxt[1, c, s, 2:].sum())]
            print(f"  {name:20s} {s}", "  ".join(f"{n[c, s, j]:.2f} ({t[j]})" for j in range(3)))
    np.set_printoptions(precision=2, floatmode="fixed")
    print("FIRST_RATES =", repr(np.round(f, 2).tolist()))
    print("NEXT_RATES =", repr(np.round(n, 2).tolist()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
