"""What the scripts share: one-line refusals for missing inputs and for outputs that exist, the A/B
benchmarks' arguments."""

from __future__ import annotations

import sys
from pathlib import Path

TRAINING_RUN = (
    "NUM_PROMPTS=5000 EPOCHS=2 LAYERS=2 bash scripts/train_smollm2_heads.sh "
    "(~147 min of self-distillation on 2 CPU cores, then Medusa-1)"
)


def fail(prog: str, message: str) -> None:
    """Exit 1 with ``prog: error: message`` on one line (no traceback)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def require_distilled(prog: str, data: str | Path) -> Path:
    """The self-distilled answers (``medusa-train distill`` output), or a one-line exit naming the command."""
    p = Path(data)
    if not p.is_file():
        fail(
            prog,
            f"{p} is missing: it holds the self-distilled training answers that `medusa-train distill` "
            f"writes, here from {TRAINING_RUN}; a fresh clone does not have it",
        )
    return p


def require_hidden_cache(prog: str, cache: str | Path, splits: tuple[str, ...] = ("train", "heldout")) -> Path:
    """The hidden-state cache ``medusa-train medusa1`` builds next to its data, or a one-line exit."""
    p = Path(cache)
    missing = [s for s in splits if not (p / f"hidden_{s}.npy").is_file() or not (p / f"index_{s}.npz").is_file()]
    if missing:
        what = "is missing" if not p.exists() else f"lacks the {', '.join(missing)} split"
        fail(
            prog,
            f"{p} {what}: it is the hidden-state cache `medusa-train medusa1` builds from the self-distilled "
            f"answers, here from {TRAINING_RUN}; a fresh clone does not have it",
        )
    return p


def refuse_existing(prog: str, path: str | Path, force: bool) -> Path:
    """``path``, unless it exists and ``force`` is off: then a one-line exit asking for --force."""
    p = Path(path)
    if p.exists() and not force:
        fail(prog, f"{p} exists: pass --force to replace it, or write elsewhere")
    return p


def add_ab_arguments(p, limit: int, max_new_tokens: int, rounds: int) -> None:
    """The arguments of the decode A/B benchmarks (bench_huge_pages, bench_cache_keep): the artifact,
    the prompts, how many, how long, how often the two settings alternate, ONNX Runtime threads."""
    p.add_argument("artifact")
    p.add_argument("--prompts", required=True, help="MT-Bench-style JSONL (first turns are used)")
    p.add_argument("--limit", type=int, default=limit)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--threads", type=int, default=2)
