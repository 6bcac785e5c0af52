"""``medusa-train datastore``: the runtime's datastore (runtime/datastore.py) from self-distilled answers.

Only the ``train`` split of the records goes in (the split the heads were trained on; the held-out
prompts the benches evaluate stay unseen), and only the answers: the prompts belong to the users.

    medusa-train datastore --data runs/distill/smollm2_alpaca.jsonl --out artifacts/smollm2-135m-medusa/datastore.npz
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.artifact import CONFIG_FILE
from runtime.datastore import DEFAULT_MAX_NGRAM, DEFAULT_MIN_COUNT, FILE, Datastore
from runtime.errors import ConfigError
from training.data import SPLITS, split_of
from training.files import output_file, text_lines


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
    for n, line in text_lines(path):  # a byte that is not UTF-8 is named with its line
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
    out = Path(cfg.out)
    if out.is_dir():
        out = out / FILE
    output_file(out, "--out", "the datastore file")
    artifact = out.parent if out.name == FILE and (out.parent / CONFIG_FILE).is_file() else None
    artifact_vocab = _artifact_vocab(artifact) if artifact is not None else None
    vocab = int(json.loads((resolve_model(cfg.model) / "config.json").read_text())["vocab_size"])
    if artifact_vocab is not None and artifact_vocab != vocab:
        raise ConfigError(
            f"--out {artifact} is an artifact of a model with {artifact_vocab} tokens, --model {cfg.model} has {vocab}: "
            "give the artifact's model"
        )
    answers = read_answers(Path(cfg.data), cfg.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        store = Datastore.build(answers, vocab, cfg.max_ngram, cfg.min_count,
                                source=f"{Path(cfg.data).name}, {cfg.split} split")  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"{cfg.data}: {e} (answers of another model?)") from None
    if not len(store):  # a store that drafts nothing: refused, not written and recorded as if it helped
        raise ConfigError(
            f"{cfg.data}: the {cfg.split} split's answers hold no n-gram whose next token was seen --min-count "
            f"{cfg.min_count} times: nothing to draft from (more or longer answers, or a lower --min-count)"
        )
    store.save(out)
    if artifact is not None:
        record_in_artifact(artifact, store, f"medusa-train datastore --data {cfg.data} --split {cfg.split}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {store.summary()}")
    return out


def _artifact_vocab(folder: Path) -> int | None:
    """The vocabulary size an artifact's config records (None where it names none)."""
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        vocab = raw["model"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"--out {folder}: {CONFIG_FILE} there is not a readable artifact config: give an artifact folder "
            "medusa-export wrote, or a file path"
        ) from None
    return vocab if isinstance(vocab, int) else None


def record_in_artifact(folder: Path, store: Datastore, source: str) -> None:
    """Update the artifact's record of its datastore.npz (size and sha256 in ``provenance.checksums``,
    which runtime.load checks, and ``provenance.datastore``) after it was replaced; the config is
    written to a temporary file and renamed, so it is never torn."""
    from runtime.artifact import file_digest
    from runtime.paths import write_text_atomic

    path = folder / CONFIG_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    prov = raw.setdefault("provenance", {})
    file = folder / FILE
    size, digest = file.stat().st_size, file_digest(file)
    if isinstance(prov.get("checksums"), dict):
        prov["checksums"][FILE] = {"bytes": size, "sha256": digest}
    if isinstance(prov.get("files"), dict) and FILE in prov["files"]:  # older artifacts: sizes only
        prov["files"][FILE] = size
    prov["datastore"] = {"file": source, "sha256": digest, **store.meta}
    write_text_atomic(path, json.dumps(raw, indent=2) + "\n")  # never torn; the config's mode kept
