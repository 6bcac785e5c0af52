"""Install a training run's heads as the shipped form: float16 (``load_heads`` upcasts), at most
10 MB, with their model card. Both training scripts end with it.

    python -m scripts.install_heads RUN HEADS DATA --command "NUM_PROMPTS=... bash scripts/train_smollm2_heads.sh"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MACHINE = "shared 2-core AMD EPYC VM (AVX2), 24 GB RAM, no GPU, torch 2.13 CPU"
MAX_BYTES = 10e6  # the repository's budget for a heads file


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the training run's folder (medusa-train medusa1 --out)")
    p.add_argument("heads", help="where the installed heads go")
    p.add_argument("data", help="the distilled .jsonl they were trained on (for the card)")
    p.add_argument("--command", required=True, help="the command that reproduces them (for the card)")
    p.add_argument("--machine", default=MACHINE)
    a = p.parse_args(argv)

    import torch

    from exporter.heads import load_heads, save_heads
    from training.card import write_card

    cfg = json.loads((Path(a.run) / "medusa_heads.json").read_text())
    trained = load_heads(a.run, vocab_size=cfg["vocab_size"])
    trained.config.meta = {}  # load_heads adds layout/source; keep the run's meta only
    save_heads(trained, a.heads, meta=cfg["meta"], dtype=torch.float16)
    size = (Path(a.heads) / "medusa_heads.safetensors").stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{a.heads}: {size / 1e6:.1f} MB, more than the repo's 10 MB for heads")
    write_card(Path(a.heads), Path(a.data), command=a.command, machine=a.machine)
    print(f"installed {a.run} into {a.heads} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
