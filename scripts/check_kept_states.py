"""Compare the hidden states `medusa-train distill` kept with a fresh causal forward.

    python -m scripts.check_kept_states --data runs/distill/smollm2_alpaca.jsonl --skip 1024 --limit 4

(--skip 1024: the shipped heads' first 960 answers got their states from the earlier hidden-state
cache, a plain forward, and answers 960-1023 were distilled before states were kept.)

Distillation keeps float16 hidden states from batched, left-padded generation; Medusa-1 trains
on them instead of a second backbone pass. This prints, per record, the largest and mean
absolute difference to an unbatched float32 forward over prompt + answer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/distill/smollm2_alpaca.jsonl")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=4, help="records with kept states to check")
    p.add_argument("--skip", type=int, default=0, help="skip the first N records")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    from scripts.common import require_distilled

    require_distilled("check_kept_states", a.data)

    import numpy as np
    import torch

    from exporter.models import load_backbone
    from training.data import build_examples
    from training.distill import load_states, read_records, states_dir
    from training.medusa1 import Medusa1Config, cached_positions, last_hidden

    torch.set_num_threads(a.threads)
    folder = states_dir(Path(a.data))
    model = load_backbone(a.model)[0]
    checked = 0
    for e in build_examples(read_records(Path(a.data))[a.skip :], max_len=Medusa1Config.max_len):
        kept = load_states(folder, e.id)
        if kept is None or kept[1] != a.model:
            continue
        first, _, hidden, _ = kept
        lo, hi = cached_positions(e)
        ref = last_hidden(model, torch.from_numpy(e.tokens)[None])[0, lo:hi].float().numpy()
        d = np.abs(hidden[lo - first : hi - first].astype(np.float32) - ref)
        print(
            f"{e.id}: {hi - lo} positions, max |diff| {d.max():.4f}, mean |diff| {d.mean():.6f}, "
            f"mean |h| {np.abs(ref).mean():.3f}"
        )
        checked += 1
        if checked == a.limit:
            break
    if not checked:
        print(f"no kept states for {a.model} in {folder}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
