"""Medusa-1: train the heads on a frozen backbone, from cached last hidden states.

The backbone is frozen, so its final-normed last hidden states (exactly BackboneStep's
``hidden_states`` output, the heads' input) are computed once and cached to disk as a
float16 ``.npy`` memmap per split, with an index. Training then costs the heads alone.

Loss (Medusa paper, Eq. 1): ``sum_k 0.8**k * CE_k``, head k (0-based) at position t
predicting token t+k+2, only where that token is an assistant token.

Cost note: with the shared ``lm_head`` every position costs a [K, H] x [H, V] projection
(V = 49,152 for SmolLM2). ``train_vocab="data"`` takes the softmax over the tokens that
occur in the training responses only (a sampled-softmax-style shortcut, ~5x cheaper on
SmolLM2); accuracy is always measured over the *full* vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.artifact import HEAD_TYPES
from runtime.errors import MedusaError
from runtime.log import quiet
from runtime.paths import not_a_file
from training.data import (
    IGNORE,
    MAX_CACHED_HEADS,
    SPLITS,
    Example,
    build_examples,
    dropped,
    first_cached_position,
    head_labels,
    split_examples,
)

log = logging.getLogger("medusa_trt.training")

HEAD_DECAY = 0.8  # weight of head k is 0.8**k (Medusa paper)
CACHE_FORMAT = 1


@dataclass
class Medusa1Config:
    model: str = "smollm2-135m"
    data: Path = Path("runs/distill/smollm2_alpaca.jsonl")
    out: Path = Path("runs/medusa1")
    cache: Path | None = None  # default: <data>.hidden/
    num_heads: int = 4
    num_layers: int = 1
    # "medusa" (Medusa-1: head k reads the hidden state) or "hydra" (exporter.heads.HydraHeads: head k
    # also reads its path's tokens, trained with teacher forcing on the answers' own tokens)
    head_type: str = "medusa"
    shared_lm_head: bool = True
    lr: float = 1e-3
    epochs: int = 1
    batch_tokens: int = 256  # positions per step
    max_steps: int = 0  # 0: no limit
    max_train_tokens: int = 0  # 0: every cached train position
    train_vocab: str = "data"  # "data": softmax over the training targets' tokens; "full"
    soft_targets: bool = False  # head k learns the backbone's distribution for its token (KL), not its argmax
    # with train_vocab "data": the heads propose only the tokens the training softmax covered
    # (exporter.heads' draft vocabulary); the others were never pushed down by the loss
    draft_vocab: bool = True
    max_len: int = 384
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"  # where the backbone (the cache's missing hidden states) and the heads run
    # trained heads (a medusa-trt heads folder) to go on training instead of fresh ones: their count, blocks and
    # kind, and their draft vocabulary joins the training softmax (fine-tuning on new data, e.g. sampled answers)
    init_heads: Path | None = None


# ---------------------------------------------------------------------------- hidden states


def last_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-normed last hidden states [B, L, H] of a causal forward (BackboneStep's output)."""
    with torch.inference_mode():
        return model.model(input_ids=input_ids.to(model.device)).last_hidden_state


def cached_positions(e: Example) -> tuple[int, int]:
    """[first, last) positions whose hidden state some head (up to MAX_CACHED_HEADS) can use."""
    first = first_cached_position(e.response_start)
    return first, max(first, len(e.tokens) - 2)  # head 0 at t needs t+2 < L


def _fingerprint(model_folder: str, data: Path, max_len: int, weights: str = "") -> str:
    """The cache's key: the model folder, the data file's identity and ``max_len``, and the weights
    themselves (``weights``: exporter.heads.backbone_fingerprint), so new weights saved into the
    same folder rebuild it."""
    st = Path(data).stat()
    return hashlib.sha1(
        f"{model_folder}|{Path(data).resolve()}|{st.st_size}|{st.st_mtime_ns}|{max_len}|{weights}".encode()
    ).hexdigest()


def _kept_states(states: Path | None, model_name: str | None, e: Example, span: tuple[int, int], weights: str = ""):
    """Rows [a, b) of ``e`` from the states distillation kept, or None (absent, other model, other
    weights where both fingerprints are known, other tokens, too short)."""
    from training.distill import load_states

    kept = load_states(states, e.id, e.tokens) if states is not None and model_name is not None else None
    if kept is None:
        return None
    first, model, hidden, kept_weights = kept
    a, b = span
    if model != model_name or (weights and kept_weights and kept_weights != weights):
        return None
    if first > a or first + len(hidden) < b:
        return None
    return hidden[a - first : b - first]


def build_cache(
    model,
    examples: dict[str, list[Example]],
    folder: Path,
    fingerprint: str = "",
    dtype=np.float16,
    batch_size: int = 8,
    states: Path | None = None,
    model_name: str | None = None,
    weights: str = "",
) -> Path:
    """Write ``hidden_<split>.npy`` + ``index_<split>.npz`` per split, then ``cache.json`` last.

    ``states``: the folder where distillation kept hidden states (``OUT.states``); an example
    found there (made by ``model_name``, with these ``weights`` where both sides record them) is
    copied, the rest run through the backbone.
    """
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "cache.json"
    if marker.exists():
        marker.unlink()  # an interrupted rebuild must not look complete
    hidden_size = model.config.hidden_size
    total = sum(cached_positions(e)[1] - cached_positions(e)[0] for s in SPLITS for e in examples[s])
    bar = tqdm(total=total, desc="hidden-state cache", unit="tok", dynamic_ncols=True, disable=quiet())
    counts = {"from_states": 0, "computed": 0}  # examples copied from distillation's states / run now
    for split in SPLITS:
        exs = examples[split]
        spans = [cached_positions(e) for e in exs]
        rows = sum(b - a for a, b in spans)
        mm = np.lib.format.open_memmap(
            folder / f"hidden_{split}.npy", mode="w+", dtype=dtype, shape=(rows, hidden_size)
        )
        starts = np.cumsum([0] + [b - a for a, b in spans])[:-1]
        todo = []
        for j, e in enumerate(exs):
            kept = _kept_states(states, model_name, e, spans[j], weights)
            if kept is None:
                todo.append(j)
            else:
                mm[starts[j] : starts[j] + len(kept)] = kept
                bar.update(len(kept))
        counts["from_states"] += len(exs) - len(todo)
        counts["computed"] += len(todo)
        order = sorted(todo, key=lambda i: len(exs[i].tokens))  # similar lengths share a batch
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            width = max(len(exs[j].tokens) for j in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            for r, j in enumerate(idx):  # right padding: causal attention never sees it
                ids[r, : len(exs[j].tokens)] = torch.from_numpy(exs[j].tokens)
            h = last_hidden(model, ids).float().cpu().numpy()
            for r, j in enumerate(idx):
                a, b = spans[j]
                mm[starts[j] : starts[j] + b - a] = h[r, a:b]
                bar.update(b - a)
        mm.flush()
        del mm
        np.savez(
            folder / f"index_{split}.npz",
            ids=np.array([e.id for e in exs]),
            tokens=np.concatenate([e.tokens for e in exs]) if exs else np.zeros(0, np.int64),
            token_starts=np.cumsum([0] + [len(e.tokens) for e in exs]),
            response_start=np.array([e.response_start for e in exs], dtype=np.int64),
            first_pos=np.array([a for a, _ in spans], dtype=np.int64),
            row_starts=np.append(starts, rows).astype(np.int64),
        )
    bar.close()
    marker.write_text(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "fingerprint": fingerprint,
                "hidden_size": hidden_size,
                "dtype": np.dtype(dtype).name,
                "built_unix": time.time(),
                **counts,
                "splits": {s: len(examples[s]) for s in SPLITS},
            },
            indent=1,
        )
    )
    return folder


def cache_is_valid(folder: Path, fingerprint: str) -> bool:
    marker = Path(folder) / "cache.json"
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return (
        meta.get("format") == CACHE_FORMAT
        and meta.get("fingerprint") == fingerprint
        and all(
            (Path(folder) / f"{kind}_{s}.{ext}").is_file()
            for s in SPLITS
            for kind, ext in (("hidden", "npy"), ("index", "npz"))
        )
    )


@dataclass
class CachedSplit:
    hidden: np.ndarray  # [R, H] memmap
    labels: np.ndarray  # int64 [R, K]
    num_examples: int
    row_end: np.ndarray  # int64 [R]: one past the last row of the row's example


def load_index(folder: Path, split: str) -> dict[str, np.ndarray]:
    """A split's index arrays, read once: an ``NpzFile`` reads (and decompresses) a whole array on each
    ``ix[name]``, which a loop over the examples would do per example (quadratic in the data)."""
    with np.load(Path(folder) / f"index_{split}.npz") as z:
        return {name: z[name] for name in z.files}


def load_split(folder: Path, split: str, num_heads: int) -> CachedSplit:
    """Hidden rows of one split and the heads' labels for each row."""
    if num_heads > MAX_CACHED_HEADS:
        raise MedusaError(f"at most {MAX_CACHED_HEADS} heads can be trained from the cache, got {num_heads}")
    folder = Path(folder)
    hidden = np.load(folder / f"hidden_{split}.npy", mmap_mode="r")
    ix = load_index(folder, split)
    labels = np.full((hidden.shape[0], num_heads), IGNORE, dtype=np.int64)
    row_end = np.zeros(hidden.shape[0], dtype=np.int64)
    ts, rs = ix["token_starts"], ix["row_starts"]
    for e in range(len(ix["ids"])):
        tokens = ix["tokens"][ts[e] : ts[e + 1]]
        assistant = np.arange(len(tokens)) >= ix["response_start"][e]
        positions = ix["first_pos"][e] + np.arange(rs[e + 1] - rs[e])
        labels[rs[e] : rs[e + 1]] = head_labels(tokens, assistant, positions, num_heads)
        row_end[rs[e] : rs[e + 1]] = rs[e + 1]
    return CachedSplit(hidden, labels, len(ix["ids"]), row_end)


def load_paths(folder: Path, split: str, num_heads: int) -> np.ndarray:
    """Teacher forcing for Hydra heads: row r (position t) -> the tokens t+1 .. t+K of its example
    (the root and the drafts above head K-1's node), int64 [R, K]; 0 past the example's end (those
    heads' labels are ignored there)."""
    ix = load_index(Path(folder), split)
    ts, rs = ix["token_starts"], ix["row_starts"]
    out = np.zeros((int(rs[-1]), num_heads), dtype=np.int64)
    for e in range(len(ix["ids"])):
        tokens = ix["tokens"][ts[e] : ts[e + 1]]
        at = ix["first_pos"][e] + np.arange(rs[e + 1] - rs[e])[:, None] + 1 + np.arange(num_heads)[None, :]
        inside = at < len(tokens)
        out[rs[e] : rs[e + 1]] = np.where(inside, tokens[np.minimum(at, len(tokens) - 1)], 0)
    return out


def teacher_rows(split: CachedSplit, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the backbone's own distribution for head k's target is cached.

    Head k at row r (position t) predicts token t+k+2; the backbone predicts that token from
    position t+k+1, i.e. row r+k+1 of the same example. Returns rows [n, K] and a mask [n, K]
    (False where the label is ignored or the row lies past the example's cached span).
    """
    K = split.labels.shape[1]
    rows = idx[:, None] + np.arange(1, K + 1)[None, :]
    ok = (rows < split.row_end[idx][:, None]) & (split.labels[idx] != IGNORE)
    return np.where(ok, rows, idx[:, None]), ok


def prepare_cache(
    model,
    model_folder: str,
    data: Path,
    cache: Path | None,
    max_len: int,
    model_name: str | None = None,
    batch_size: int = 8,
) -> Path:
    """The cache folder for ``data``, built if missing or stale (from the hidden states that
    distillation kept, where ``model_name`` made them)."""
    from exporter.heads import backbone_fingerprint
    from training.distill import read_records, states_dir

    folder = Path(cache) if cache else Path(str(data) + ".hidden")
    weights = backbone_fingerprint(model)
    fp = _fingerprint(str(model_folder), data, max_len, weights)
    if cache_is_valid(folder, fp):
        log.info("reusing hidden-state cache %s", folder)
        return folder
    records = read_records(data)
    examples = split_examples(build_examples(records, max_len=max_len))
    if not examples["train"]:
        raise MedusaError(f"{data}: no training examples (every record is empty or in a held-out split"
                          f"{dropped(records, max_len, None)})")  # fmt: skip
    log.info("caching last hidden states: %s", ", ".join(f"{s} {len(v)}" for s, v in examples.items()))
    return build_cache(model, examples, folder, fingerprint=fp, states=states_dir(data), model_name=model_name,
                       weights=weights, batch_size=batch_size)  # fmt: skip


# ---------------------------------------------------------------------------- loss and accuracy


def head_weights(num_heads: int) -> torch.Tensor:
    return HEAD_DECAY ** torch.arange(num_heads, dtype=torch.float32)


def medusa_loss(head_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k 0.8**k * CE_k`` and the per-head CE [K]. ``head_logits`` [N, K, V], ``labels`` [N, K]."""
    K = head_logits.shape[-2]
    per_head = torch.stack(
        [
            F.cross_entropy(head_logits[:, k], labels[:, k], ignore_index=IGNORE)
            if (labels[:, k] != IGNORE).any()
            else head_logits.new_zeros(())
            for k in range(K)
        ]
    )
    return (head_weights(K).to(per_head.device) * per_head).sum(), per_head.detach()


def projected_loss(
    blocks_out: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    vocab_map: torch.Tensor | None = None,
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Medusa loss with a shared projection, computing logits only where labels exist.

    ``blocks_out`` [N, K, H]; ``weight`` [V', H] (the lm_head rows of the training vocabulary);
    ``vocab_map`` maps a token id to its row in ``weight`` (None: identity, V' = V).
    ``teacher``: (hidden [N, K, H], mask [N, K]): where the mask is set, head k's target is the
    distribution ``softmax(teacher_hidden @ weight.T)`` (soft cross-entropy, i.e. KL up to a
    constant) instead of the one-hot label; elsewhere the label.
    """
    K = blocks_out.shape[1]
    losses = []
    for k in range(K):
        sel = labels[:, k] != IGNORE
        if not sel.any():
            losses.append(blocks_out.new_zeros(()))
            continue
        target = labels[sel, k] if vocab_map is None else vocab_map[labels[sel, k]]
        logits = blocks_out[sel, k] @ weight.T
        if teacher is None:
            losses.append(F.cross_entropy(logits, target))
            continue
        soft = teacher[1][sel, k]
        logp = F.log_softmax(logits, dim=-1)
        with torch.no_grad():
            p = F.softmax(teacher[0][sel, k][soft] @ weight.T, dim=-1)
        per_pos = torch.cat([-(p * logp[soft]).sum(-1), F.nll_loss(logp[~soft], target[~soft], reduction="none")])
        losses.append(per_pos.mean())
    per_head = torch.stack(losses)
    return (head_weights(K).to(per_head.device) * per_head).sum(), per_head.detach()


def rank_accuracy(
    heads, lm_head, split: CachedSplit, max_rank: int = 10, chunk: int = 512, paths=None, embed=None
) -> np.ndarray:
    """acc[k][r] = share of positions where rank r of head k is the target, ranked over the full
    vocabulary (heads with a draft vocabulary never rank a token outside it). Hydra heads (``paths``
    from :func:`load_paths`, ``embed`` the input embeddings) read the true path to their node, so
    acc[k][r] is rank r's accuracy given that the path above it was accepted."""
    K = split.labels.shape[1]
    hits = np.zeros((K, max_rank))
    counts = np.zeros(K)
    dev = next(heads.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(split.labels), chunk):
            lab = torch.from_numpy(split.labels[i : i + chunk]).to(dev)
            h = torch.from_numpy(np.asarray(split.hidden[i : i + chunk], dtype=np.float32)).to(dev)
            if paths is not None:
                blocks = heads.blocks(h, torch.from_numpy(paths[i : i + chunk]).to(dev), embed)
                logits = heads.project(blocks, lm_head)
            else:
                logits = heads(h, lm_head) if heads.config.shared_lm_head else heads(h)  # [n, K, V]
            top = logits.topk(max_rank, dim=-1).indices  # [n, K, R]
            valid = lab != IGNORE
            match = (top == lab.unsqueeze(-1)) & valid.unsqueeze(-1)
            hits += match.sum(0).cpu().numpy()
            counts += valid.sum(0).cpu().numpy()
    return hits / np.maximum(counts, 1)[:, None]


def target_vocab(split: CachedSplit) -> np.ndarray:
    """Sorted token ids that occur as a head target in ``split``: the rows of the
    ``--train-vocab data`` softmax, and the heads' draft vocabulary."""
    return np.unique(split.labels[split.labels != IGNORE])


def accuracy_any_and_draft(heads, lm_head, split: CachedSplit, vocab: np.ndarray, max_rank: int = 5):
    """(acc proposing any token, acc with draft vocabulary ``vocab``) on ``split``; the heads
    keep ``vocab`` as their draft vocabulary afterwards."""
    heads.set_draft_vocab(None)
    any_token = rank_accuracy(heads, lm_head, split, max_rank=max_rank)
    heads.set_draft_vocab(torch.from_numpy(vocab))
    return any_token, rank_accuracy(heads, lm_head, split, max_rank=max_rank)


def accuracy_table(acc: np.ndarray) -> str:
    """Per-head top-1 / top-5 from rank accuracies acc[k][r]."""
    return format_accuracy(acc[:, 0], acc[:, :5].sum(1))


def format_accuracy(top1, top5) -> str:
    lines = ["head  top-1  top-5"]
    for k, (a, b) in enumerate(zip(top1, top5)):
        lines.append(f"{k + 1:>4}  {a:.3f}  {b:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- training


def check_splits(data: Path, max_len: int) -> dict[str, int]:
    """Examples per split of ``data``; a MedusaError when there is nothing to train on or no
    held-out example to measure the heads on (too little data), before the backbone loads."""
    from training.data import HELDOUT_PERCENT
    from training.distill import read_records

    records = read_records(data)
    counts = {s: len(v) for s, v in split_examples(build_examples(records, max_len=max_len)).items()}
    if not counts["train"] or not counts["heldout"]:
        raise MedusaError(
            f"{data}: too little data: its {len(records)} records give {counts['train']} training and "
            f"{counts['heldout']} held-out examples ({counts['calib']} more for calibration; records are split by a "
            f"hash of their id, ~{HELDOUT_PERCENT}% held out and as many for calibration{dropped(records, max_len, None)}), "
            "and Medusa-1 needs both (the held-out examples measure the heads): distill more answers, at least ~100 "
            "(`medusa-train distill --num-prompts N`)"
        )
    return counts


def train_medusa1(cfg: Medusa1Config, backbone=None) -> dict:
    """Train heads on the cached hidden states; save them to ``cfg.out``; return the summary."""
    from tqdm import tqdm

    from exporter.heads import (
        HydraHeads,
        MedusaHeads,
        backbone_fingerprint,
        fresh_heads,
        fresh_hydra_heads,
        load_heads,
        save_heads,
    )
    from exporter.models import load_backbone, resolve_model
    from runtime import checks
    from training.distill import DISTILL_FIRST
    from training.files import output_folder, torch_device

    if cfg.num_heads < 1 or cfg.num_layers < 1 or cfg.epochs < 1 or cfg.batch_tokens < 1:
        raise MedusaError("num_heads, num_layers, epochs and batch_tokens must be at least 1")
    checks.integer("max_steps", cfg.max_steps, 0, rule=">= 0 (0: no limit)")
    checks.integer("max_train_tokens", cfg.max_train_tokens, 0, rule=">= 0 (0: every cached train position)")
    checks.real("lr", cfg.lr, 0.0, min_open=True)
    device = torch_device(cfg.device)
    output_folder(cfg.out, "--out")  # a file there is named now, not after the training
    if cfg.head_type not in HEAD_TYPES:
        raise MedusaError(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {cfg.head_type!r}")
    hydra = cfg.head_type == "hydra"
    if hydra and not cfg.shared_lm_head:
        raise MedusaError("Hydra heads share the backbone's lm_head (drop --own-lm-head)")
    if cfg.train_vocab not in ("data", "full"):
        raise MedusaError(f"train_vocab must be 'data' or 'full', got {cfg.train_vocab!r}")
    if cfg.soft_targets and not cfg.shared_lm_head:
        raise MedusaError("soft targets need the shared lm_head (the backbone's distribution is lm_head(hidden))")
    if cfg.init_heads is not None and not Path(cfg.init_heads).exists():
        raise MedusaError(f"--init-heads {cfg.init_heads}: Medusa heads not found (no such folder)")
    if not Path(cfg.data).is_file():
        raise MedusaError(f"distilled data {cfg.data} {not_a_file(cfg.data, DISTILL_FIRST)}")
    if backbone is None:
        resolve_model(cfg.model)  # a missing model is named first; loading it waits for the data check
    check_splits(Path(cfg.data), cfg.max_len)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    model, _, folder = backbone if backbone is not None else load_backbone(cfg.model)
    H, V = model.config.hidden_size, model.config.vocab_size
    init = None
    if cfg.init_heads is not None:  # checked before the hidden-state cache, the long part, is built
        init = load_heads(cfg.init_heads, hidden_size=H, vocab_size=V)
        if not init.config.shared_lm_head or not cfg.shared_lm_head:
            raise MedusaError(
                f"--init-heads {cfg.init_heads}: heads that share the backbone's lm_head go on training here "
                + ("(these have their own)" if not init.config.shared_lm_head else "(drop --own-lm-head)")
            )
        init.config.meta = {}  # load_heads' layout/source, the earlier run's keys: this run's summary replaces them
        kind = "hydra" if isinstance(init, HydraHeads) else "medusa"
        ours = (cfg.num_heads, cfg.num_layers, cfg.head_type)
        if (init.config.num_heads, init.config.num_layers, kind) != ours:
            raise MedusaError(
                f"--init-heads {cfg.init_heads}: {init.config.num_heads} {kind} heads of {init.config.num_layers} "
                f"block(s), and this run asks for {cfg.num_heads} {cfg.head_type} heads of {cfg.num_layers}: "
                "give the same --num-heads, --num-layers and --head-type"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    cache = prepare_cache(model, str(folder), Path(cfg.data), cfg.cache, cfg.max_len, model_name=cfg.model,
                          batch_size=8 if device.type == "cpu" else 64)  # fmt: skip
    cache_s = time.time() - t0
    cache_meta = json.loads((Path(cache) / "cache.json").read_text())
    train = load_split(cache, "train", cfg.num_heads)
    heldout = load_split(cache, "heldout", cfg.num_heads)
    rows = np.flatnonzero((train.labels != IGNORE).any(1))
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_train_tokens and len(rows) > cfg.max_train_tokens:
        rows = np.sort(rng.choice(rows, cfg.max_train_tokens, replace=False))
    lm_head = model.lm_head
    heads: MedusaHeads | HydraHeads
    if init is not None:
        heads = init.to(device).train()
    elif hydra:
        heads = fresh_hydra_heads(cfg.num_heads, H, V, cfg.num_layers).to(device).train()
    else:
        heads = fresh_heads(cfg.num_heads, H, V, cfg.num_layers, cfg.shared_lm_head, lm_head=lm_head).to(device).train()
    embed, train_paths, held_paths = None, None, None
    if hydra:
        embed = model.get_input_embeddings().weight.detach()
        train_paths, held_paths = load_paths(cache, "train", cfg.num_heads), load_paths(cache, "heldout", cfg.num_heads)

    # heads gone on from: their held-out accuracy as they were (their own draft vocabulary), before it changes
    acc0 = rank_accuracy(heads.eval(), lm_head, heldout, paths=held_paths, embed=embed) if init is not None else None
    weight, vocab_map = lm_head.weight.detach(), None
    if init is not None and not (cfg.train_vocab == "data" and cfg.draft_vocab):
        heads.set_draft_vocab(None)  # --train-vocab full / --no-draft-vocab: they may propose any token, as asked
    if cfg.shared_lm_head and cfg.train_vocab == "data":
        used = target_vocab(train)
        if init is not None and init.draft_vocab is not None:  # the tokens they may propose stay ranked
            used = np.union1d(used, init.draft_vocab.cpu().numpy())
        used_ids = torch.from_numpy(used).to(device)
        vocab_map = torch.full((V,), -1, dtype=torch.long, device=device)
        vocab_map[used_ids] = torch.arange(len(used), device=device)
        weight = weight[used_ids].contiguous()
        if cfg.draft_vocab:
            heads.set_draft_vocab(used_ids)
    opt = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_tokens)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warm = max(1, total_steps // 20)
    # linear warm-up then cosine decay (the official Medusa schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    history = []
    if acc0 is None:
        acc0 = rank_accuracy(heads.eval(), lm_head, heldout, paths=held_paths, embed=embed)
    print(f"held-out accuracy before training ({heldout.num_examples} examples):\n{accuracy_table(acc0)}")
    step, t_train = 0, time.time()
    bar = tqdm(total=total_steps, desc="medusa1", unit="step", dynamic_ncols=True, disable=quiet())
    for epoch in range(cfg.epochs):
        heads.train()
        perm = rng.permutation(rows)
        for i in range(0, len(perm), cfg.batch_tokens):
            if step >= total_steps:
                break
            idx = np.sort(perm[i : i + cfg.batch_tokens])
            h = torch.from_numpy(np.asarray(train.hidden[idx], dtype=np.float32)).to(device)
            lab = torch.from_numpy(train.labels[idx]).to(device)
            if cfg.shared_lm_head:
                teacher = None
                if cfg.soft_targets:
                    trows, tmask = teacher_rows(train, idx)
                    th = np.asarray(train.hidden[trows.ravel()], dtype=np.float32).reshape(*trows.shape, -1)
                    teacher = (torch.from_numpy(th).to(device), torch.from_numpy(tmask).to(device))
                if isinstance(heads, HydraHeads):  # hydra
                    assert train_paths is not None and embed is not None  # loaded with the Hydra heads above
                    blocks_out = heads.blocks(h, torch.from_numpy(train_paths[idx]).to(device), embed)
                else:
                    blocks_out = heads.blocks(h)
                loss, per_head = projected_loss(blocks_out, lab, weight, vocab_map, teacher)
            else:
                loss, per_head = medusa_loss(heads(h), lab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", h1=f"{per_head[0].item():.2f}")
            bar.update(1)
        acc = rank_accuracy(heads.eval(), lm_head, heldout, paths=held_paths, embed=embed)
        history.append(
            {
                "epoch": epoch + 1,
                "step": step,
                "top1": acc[:, 0].round(4).tolist(),
                "top5": acc[:, :5].sum(1).round(4).tolist(),
            }
        )
        tqdm.write(f"epoch {epoch + 1}: held-out accuracy\n{accuracy_table(acc)}")
        if step >= total_steps:
            break
    bar.close()
    train_s = time.time() - t_train
    summary = {
        "method": "hydra (sequentially dependent heads, frozen backbone, cached hidden states, teacher forcing)"
        if hydra
        else "medusa-1 (frozen backbone, cached hidden states)",
        "backbone": cfg.model,
        "backbone_fingerprint": backbone_fingerprint(model),  # export warns when the heads meet another
        "data": str(cfg.data),
        "train_examples": train.num_examples,
        "heldout_examples": heldout.num_examples,
        "train_positions_used": int(len(rows)),
        "steps": step,
        "epochs": cfg.epochs,
        "batch_tokens": cfg.batch_tokens,
        "lr": cfg.lr,
        "train_vocab": cfg.train_vocab if cfg.shared_lm_head else "full",
        "train_vocab_size": int(weight.shape[0]),
        "draft_vocab_size": heads.config.draft_vocab_size,  # 0: the heads may propose any token
        "loss": "sum_k 0.8^k CE_k (head k: token t+k+2, assistant tokens only)"
        + ("; target = the backbone's distribution for that token where cached (soft CE)" if cfg.soft_targets else ""),
        "heldout_top1": acc[:, 0].round(4).tolist(),
        "heldout_top5": acc[:, :5].sum(1).round(4).tolist(),
        "heldout_top1_untrained": acc0[:, 0].round(4).tolist(),
        **({"init_heads": str(cfg.init_heads)} if cfg.init_heads is not None else {}),
        "history": history,
        "cache_seconds": round(cache_s, 1),
        "cache_built": cache_meta.get("built_unix", 0) >= t0,
        "cache_examples_from_states": cache_meta.get("from_states"),
        "cache_examples_computed": cache_meta.get("computed"),
        "train_seconds": round(train_s, 1),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "config": {k: str(v) for k, v in asdict(cfg).items()},
    }
    save_heads(heads.cpu().eval(), cfg.out, meta=summary)
    print(f"saved heads to {cfg.out} ({step} steps, {train_s:.0f} s)")
    return summary
