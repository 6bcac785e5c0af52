"""``medusa-train datastore``: the runtime's datastore (runtime/datastore.py) from self-distilled answers.

Only the ``train`` split of the records goes in (the split the heads were trained on; the held-out
prompts the benches evaluate stay unseen), and only the answers: the prompts belong to the users.

    medusa-train datastore --data runs/distill/smollm2_alpaca.jsonl --out artifacts/smollm2-135m-medusa/datastore.npz
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.datastore import DEFAULT_MAX_NGRAM, DEFAULT_MIN_COUNT, FILE, Datastore
from runtime.errors import ConfigError
from training.data import SPLITS, split_of


@dataclass
class DatastoreConfig:
    model: str = "smollm2-135m"  # its vocabulary size bounds the token ids
    data: Path = Path("runs/distill/smollm2_alpaca.jsonl")
    out: Path = Path("runs") / FILE  # a file, or an artifact folder (written as <folder>/datastore.npz)
    split: str = "train"
    max_ngram: int = DEFAULT_MAX_NGRAM
    min_count: int = DEFAULT_MIN_COUNT
    threads: int | None = None  # unused


def read_answers(path: Path, split: str) -> list[list[int]]:
    """The ``response_ids`` of the records of ``split`` in a distilled .jsonl."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (medusa-train distill writes one)")
    out = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rid, ids = rec["id"], rec["response_ids"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{path}:{n}: expected a distilled record with 'id' and 'response_ids'") from None
            if split_of(rid) == split:
                out.append([int(t) for t in ids])
    if not out:
        raise ConfigError(f"{path}: no record of the {split!r} split")
    return out


def build_datastore(cfg: DatastoreConfig) -> Path:
    """Build and write the datastore; returns the file written."""
    from exporter.models import resolve_model

    if cfg.split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    if cfg.max_ngram < 1 or cfg.min_count < 1:
        raise ConfigError("--max-ngram and --min-count must be >= 1")
    vocab = int(json.loads((resolve_model(cfg.model) / "config.json").read_text())["vocab_size"])
    answers = read_answers(Path(cfg.data), cfg.split)
    out = Path(cfg.out)
    if out.is_dir():
        out = out / FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        store = Datastore.build(answers, vocab, cfg.max_ngram, cfg.min_count,
                                source=f"{Path(cfg.data).name}, {cfg.split} split")  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"{cfg.data}: {e} (answers of another model?)") from None
    store.save(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {store.summary()}")
    return out
