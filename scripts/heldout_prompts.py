"""Write the Alpaca prompts that no head was trained on: the held-out split of the distilled data
(records are split by a hash of their id, training/data.py), as an Alpaca-style JSON list that
``medusa-run bench --prompts`` reads.

    python -m scripts.heldout_prompts -o runs/alpaca_heldout.json --last 40
    python -m scripts.heldout_prompts -o runs/alpaca_tune.json --last 76 --drop-last 24   # disjoint from --last 24
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.data import split_of
from training.distill import ALPACA


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default=str(ALPACA), help="the Alpaca file the heads were distilled from")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--last", type=int, default=0, help="keep the last N held-out prompts (0: all)")
    p.add_argument("--drop-last", type=int, default=0,
                   help="first drop the last N (a calibration split disjoint from an evaluation's --last N)")  # fmt: skip
    a = p.parse_args(argv)
    rows = json.loads(Path(a.prompts).read_text())
    held = [r for i, r in enumerate(rows) if split_of(f"alpaca-{i:05d}") == "heldout"]
    if a.drop_last:
        held = held[: -a.drop_last]
    if a.last:
        held = held[-a.last :]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(held, indent=1))
    print(f"wrote {len(held)} held-out prompts to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
