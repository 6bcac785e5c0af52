"""Give trained heads the draft vocabulary their training softmax covered (a copy of the heads).

    python -m scripts.add_draft_vocab exporter/shipped_heads/smollm2-135m \
        --cache runs/distill/smollm2_alpaca.jsonl.hidden -o runs/draft_vocab/smollm2-135m

The heads with their draft vocabulary go to ``-o`` (default ``runs/draft_vocab/<heads folder name>``,
git-ignored); an existing heads file there is replaced only with ``--force`` (``-o HEADS --force``
rewrites the heads in place). The cache is the one `medusa-train medusa1` built for the heads'
training data (for the shipped heads: scripts/train_smollm2_heads.sh, ~147 min of distillation).

For heads trained with `medusa-train medusa1 --train-vocab data` before the draft vocabulary
existed (`medusa-train medusa1` now sets it itself): the draft vocabulary is the set of tokens
that occur as a target in the cache's training split, exactly the rows of the training softmax
(`train_vocab_size` in the heads' meta must match). The weights are unchanged. Held-out accuracy
is measured without and with the restriction; the heads' meta then holds the restricted
accuracy (`heldout_top1/5`) and both measurements (`draft_vocab_added`). Rewrite CARD.md
afterwards (`training.card.write_card`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("heads")
    p.add_argument("--cache", default="runs/distill/smollm2_alpaca.jsonl.hidden")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "-o",
        "--out",
        default=None,
        help="folder for the heads with their draft vocabulary (default: runs/draft_vocab/<heads folder name>)",
    )
    p.add_argument("--force", action="store_true", help="replace the heads in --out if it holds some")
    a = p.parse_args(argv)

    from scripts.common import refuse_existing, require_hidden_cache

    out = Path(a.out) if a.out else Path("runs/draft_vocab") / Path(a.heads).resolve().name
    require_hidden_cache("add_draft_vocab", a.cache)
    refuse_existing("add_draft_vocab", out / "medusa_heads.safetensors", a.force)

    import torch
    from safetensors import safe_open

    from exporter.heads import DRAFT_VOCAB_KEY, HEADS_CONFIG, HEADS_WEIGHTS, load_heads, save_heads
    from exporter.models import load_backbone
    from runtime.errors import MedusaError
    from training.medusa1 import accuracy_any_and_draft, load_split, target_vocab

    torch.set_num_threads(a.threads)
    model = load_backbone(a.model)[0]
    heads = load_heads(a.heads, hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size)
    meta = heads.config.meta
    if heads.config.draft_vocab_size:
        raise MedusaError(f"{a.heads} already has a draft vocabulary ({heads.config.draft_vocab_size} tokens)")
    K = heads.config.num_heads
    train = load_split(Path(a.cache), "train", K)
    used = target_vocab(train)
    if meta.get("train_vocab") != "data" or meta.get("train_vocab_size") != len(used):
        raise MedusaError(
            f"{a.heads}: trained with train_vocab={meta.get('train_vocab')!r} over "
            f"{meta.get('train_vocab_size')} tokens, but the cache's training targets are {len(used)} tokens: "
            "not the data these heads were trained on"
        )
    held = load_split(Path(a.cache), "heldout", K)
    before, after = accuracy_any_and_draft(heads, model.lm_head, held, used)
    fmt = lambda acc: " / ".join(f"{x:.3f}" for x in acc)
    print(
        f"held-out top-1 ({held.num_examples} records): any token {fmt(before[:, 0])}; "
        f"draft vocabulary ({len(used)} tokens) {fmt(after[:, 0])}"
    )
    print(f"held-out top-5: any token {fmt(before.sum(1))}; draft vocabulary {fmt(after.sum(1))}")

    with safe_open(str(Path(a.heads) / HEADS_WEIGHTS), framework="pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys() if k != DRAFT_VOCAB_KEY}
    meta = {k: v for k, v in meta.items() if k not in ("layout", "source")}
    meta.update(
        {
            "heldout_top1": after[:, 0].round(4).tolist(),
            "heldout_top5": after.sum(1).round(4).tolist(),
            "draft_vocab_size": len(used),
            "draft_vocab_added": {
                "command": "python -m scripts.add_draft_vocab " + " ".join(argv if argv is not None else sys.argv[1:]),
                "heldout_top1_any_token": before[:, 0].round(4).tolist(),
                "heldout_top5_any_token": before.sum(1).round(4).tolist(),
                "heldout_top1_draft": after[:, 0].round(4).tolist(),
                "heldout_top5_draft": after.sum(1).round(4).tolist(),
            },
        }
    )
    heads.config.meta = {}
    save_dtype = torch.float16 if dtypes == {"F16"} else torch.float32  # as the file was
    save_heads(heads, out, meta=meta, dtype=save_dtype)
    cfg = json.loads((out / HEADS_CONFIG).read_text())
    print(f"wrote {out} ({save_dtype}, draft vocabulary {cfg['draft_vocab_size']} tokens)")
    return 0


if __name__ == "__main__":
    from runtime.errors import run_cli

    sys.exit(run_cli("add_draft_vocab", main))
