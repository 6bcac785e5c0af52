"""Offline estimate: does a datastore draft that follows coupled sampling's noise find the backbone's draws?

    python docs/results/session37/coupled_datastore_sim.py 100 3 2   # answers, followers kept, their min count

Reads runs/gpu_heads/all.jsonl (the GPU-distilled answers; not in the repository). The store is built from
the train split's answers (1- to 4-grams, the top follower seen >= 2 times, up to FOLLOWERS followers, the
next ones seen >= MIN times); the first ANSWERS held-out answers sampled at 0.7 are scored. At every answer
position: a fresh Gumbel vector g, the draw y = argmax(logits / T + g) given the answer so far, and whether the
store's first draft token is y, for the runtime's draft (the most frequent follower, share >= 0.5) and for the
follower with the highest log(count / total) + g where that beats log(rest) + 0.5772 + margin.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from runtime.datastore import _P, _hash  # noqa: E402
from training.data import prompt_id, split_of  # noqa: E402

T, MAX_N, MIN_COUNT = 0.7, 4, 2
MARGINS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def build(seqs, followers: int, alt_min: int) -> dict[int, dict[int, tuple[list[int], list[int], int]]]:
    tables = {}
    for n in range(1, MAX_N + 1):
        keys, nxt = [], []
        for a in seqs:
            if len(a) <= n:
                continue
            h = np.zeros(len(a) - n, np.int64)
            with np.errstate(over="ignore"):
                for j in range(n):
                    h = h * np.int64(_P) + a[j : len(a) - n + j]
            keys.append(h)
            nxt.append(a[n:])
        pairs, counts = np.unique(np.stack([np.concatenate(keys), np.concatenate(nxt)], 1), axis=0, return_counts=True)
        order = np.lexsort((-counts, pairs[:, 0]))
        pairs, counts = pairs[order], counts[order]
        first = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]])
        total = np.add.reduceat(counts, first)
        table = {}
        for f, e, tot in zip(first, np.r_[first[1:], len(pairs)], total):
            if counts[f] < MIN_COUNT:
                continue
            cc = counts[f : min(e, f + followers)]
            k = 1 + int((cc[1:] >= alt_min).sum())
            table[int(pairs[f, 0])] = (pairs[f : f + k, 1].tolist(), cc[:k].tolist(), int(tot))
        tables[n] = table
    return tables


def main() -> None:
    answers, followers, alt_min = (int(x) for x in sys.argv[1:4])
    recs = [json.loads(line) for line in open(ROOT / "runs/gpu_heads/all.jsonl")]
    train = [np.asarray(r["response_ids"], np.int64) for r in recs if split_of(r["id"]) == "train"]
    held = [r for r in recs if split_of(r["id"]) == "heldout" and prompt_id(r["id"]) != r["id"]][:answers]
    tables = build(train, followers, alt_min)
    folder = Path.home() / ".cache/medusa-trt/models/smollm2-135m"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    pos = det_drafts = det_hits = 0
    drafts, hits = dict.fromkeys(MARGINS, 0), dict.fromkeys(MARGINS, 0)
    for r in held:
        p, a = r["prompt_ids"], r["response_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0, len(p) - 1 : len(p) + len(a) - 1].double().numpy() / T
        for t in range(len(a)):
            ctx = (p + a[:t])[-MAX_N:]
            g = rng.gumbel(size=logits.shape[1])
            y = int(np.argmax(logits[t] + g))
            pos += 1
            entry = next((tables[n].get(_hash(ctx[-n:])) for n in range(MAX_N, 0, -1) if _hash(ctx[-n:]) in tables[n]),
                         None)  # fmt: skip
            if entry is None:
                continue
            toks, counts, total = entry
            if counts[0] / total >= 0.5:
                det_drafts += 1
                det_hits += toks[0] == y
            scores = [np.log(c / total) + g[x] for x, c in zip(toks, counts)]
            best = int(np.argmax(scores))
            rest = 1 - sum(counts) / total
            for m in MARGINS:
                if scores[best] > np.log(max(rest, 1e-9)) + 0.5772 + m:
                    drafts[m] += 1
                    hits[m] += toks[best] == y
    for m in MARGINS:
        print(f"margin {m} hits/pos {hits[m] / pos:.3f} precision {hits[m] / max(1, drafts[m]):.3f} "
              f"drafts/pos {drafts[m] / pos:.3f}")  # fmt: skip
    print(f"det        hits/pos {det_hits / pos:.3f} precision {det_hits / max(1, det_drafts):.3f} "
          f"drafts/pos {det_drafts / pos:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
