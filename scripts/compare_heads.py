"""Held-out top-1 / top-5 of several head sets on the same records (the hidden-state cache's split).

    python -m scripts.compare_heads runs/old_heads exporter/shipped_heads/smollm2-135m \
        --cache runs/distill/smollm2_alpaca.jsonl.hidden

The cache is what `medusa-train medusa1` built for its data (the default, for the shipped heads,
comes from scripts/train_smollm2_heads.sh: ~147 min of distillation; a fresh clone does not have
it, and the script then says so in one line); heads that were trained on other data are compared
fairly only when none of the cache's held-out records was in their training split (splits are by
a hash of the record id, so growing the data never moves a record).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("heads", nargs="+", help="heads folders")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cache", default="runs/distill/smollm2_alpaca.jsonl.hidden")
    p.add_argument("--split", default="heldout", choices=("heldout", "calib", "train"))
    p.add_argument("--max-rows", type=int, default=0, help="only the split's first rows (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--any-token",
        action="store_true",
        help="drop the heads' draft vocabulary: measure them as trained, proposing any token",
    )
    p.add_argument(
        "--outside-vocab",
        action="store_true",
        help="also report how often head 1's top-1 (proposing any token) lies outside the cache's "
        "training-target vocabulary, against how often the target itself does",
    )
    a = p.parse_args(argv)

    from scripts.common import require_hidden_cache

    require_hidden_cache("compare_heads", a.cache, (a.split, "train") if a.outside_vocab else (a.split,))

    import numpy as np
    import torch

    from exporter.heads import load_heads
    from exporter.models import load_backbone
    from training.data import IGNORE
    from training.medusa1 import load_split, rank_accuracy, target_vocab

    torch.set_num_threads(a.threads)
    model = load_backbone(a.model)[0]
    loaded = [load_heads(h, hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size) for h in a.heads]
    if a.any_token:
        for heads in loaded:
            heads.set_draft_vocab(None)
    split = load_split(Path(a.cache), a.split, max(h.config.num_heads for h in loaded))
    rows = len(split.labels) if not a.max_rows else min(a.max_rows, len(split.labels))
    print(f"{a.split}: {split.num_examples} records of {a.cache}, {rows} of {len(split.labels)} rows")
    for path, heads in zip(a.heads, loaded):
        k = heads.config.num_heads
        sub = type(split)(split.hidden[:rows], split.labels[:rows, :k], split.num_examples)
        acc = rank_accuracy(heads.eval(), model.lm_head, sub)
        print(
            f"{path}: top-1 "
            + " / ".join(f"{x:.3f}" for x in acc[:, 0])
            + "   top-5 "
            + " / ".join(f"{x:.3f}" for x in acc[:, :5].sum(1))
        )
        if a.outside_vocab:
            vocab = target_vocab(load_split(Path(a.cache), "train", k))
            draft, valid = heads.draft_vocab, sub.labels[:, 0] != IGNORE
            heads.set_draft_vocab(None)
            top = []
            with torch.inference_mode():
                for i in range(0, rows, 512):
                    h = torch.from_numpy(np.asarray(sub.hidden[i : i + 512], dtype=np.float32))
                    logits = heads(h, model.lm_head) if heads.config.shared_lm_head else heads(h)
                    top.append(logits[:, 0].argmax(-1).numpy())
            heads.set_draft_vocab(draft)
            top = np.concatenate(top)[valid]
            print(
                f"  head 1, proposing any token: top-1 outside the {len(vocab)} training-target tokens on "
                f"{np.mean(~np.isin(top, vocab)):.1%} of {int(valid.sum())} positions; targets outside: "
                f"{np.mean(~np.isin(sub.labels[valid, 0], vocab)):.1%}"
            )
    return 0


if __name__ == "__main__":
    from runtime.errors import run_cli

    sys.exit(run_cli("compare_heads", main))
