"""Training examples from distilled records, deterministic splits, and the heads' targets.

An example is ``prompt_ids + response_ids`` with ``assistant[t] = True`` on the response
tokens: every loss in this package is taken only where the *target* is an assistant token.

Targets (the paper's offsets): at position ``t`` the backbone predicts token ``t+1``;
Medusa head ``k`` (0-based) predicts token ``t+k+2``.

Splits are by record id (a hash, not the file order), so adding records never moves an
old one to another split: ``train``, ``heldout`` (accuracy reports) and ``calib``
(tree selection).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

IGNORE = -100  # torch's cross_entropy ignore_index
SPLITS = ("train", "heldout", "calib")
HELDOUT_PERCENT = 5
CALIB_PERCENT = 5
MAX_CACHED_HEADS = 8  # hidden states are kept for enough prompt positions to train up to 8 heads


def first_cached_position(response_start: int) -> int:
    """First position whose hidden state a head (up to MAX_CACHED_HEADS) can use: head k at t
    predicts t+k+2, so only the last MAX_CACHED_HEADS + 1 prompt positions reach an answer token."""
    return max(0, response_start - 1 - MAX_CACHED_HEADS)


@dataclass
class Example:
    id: str
    tokens: np.ndarray  # int64 [L]: prompt then response
    response_start: int  # first assistant token

    @property
    def assistant(self) -> np.ndarray:
        mask = np.zeros(len(self.tokens), dtype=bool)
        mask[self.response_start :] = True
        return mask


def sample_id(prompt: str, k: int) -> str:
    """The record id of prompt ``prompt``'s ``k``-th sampled answer (``medusa-train distill --samples N``)."""
    return f"{prompt}@{k}"


def prompt_id(record_id: str) -> str:
    """The prompt a record answers: its id without a :func:`sample_id` suffix."""
    return record_id.split("@", 1)[0]


def split_of(record_id: str, heldout_percent: int = HELDOUT_PERCENT, calib_percent: int = CALIB_PERCENT) -> str:
    """``train`` / ``heldout`` / ``calib`` from a hash of the id (stable across runs and files).
    A prompt's sampled answers ``ID@1 .. ID@N`` (``medusa-train distill --samples N``) go where ``ID``
    goes: the held-out prompts stay unseen whatever was sampled for them."""
    bucket = int(hashlib.sha1(prompt_id(record_id).encode()).hexdigest()[:8], 16) % 100
    if bucket < heldout_percent:
        return "heldout"
    if bucket < heldout_percent + calib_percent:
        return "calib"
    return "train"


def build_examples(records: list[dict], max_len: int | None = None) -> list[Example]:
    """Examples from distilled records; ``max_len`` truncates the response end."""
    out = []
    for r in records:
        if not r["response_ids"]:
            continue
        tokens = np.asarray(list(r["prompt_ids"]) + list(r["response_ids"]), dtype=np.int64)
        if max_len is not None:
            tokens = tokens[:max_len]
        start = len(r["prompt_ids"])
        if start >= len(tokens):
            continue
        out.append(Example(r["id"], tokens, start))
    return out


def dropped(records: list[dict], max_len: int | None, flag: str | None = "--max-len") -> str:
    """Why records gave no example, for a message: those with an empty answer and those whose prompt
    fills ``max_len`` (no answer token left within it; ``flag``: the option that raises it); "" when
    none was dropped."""
    empty = sum(1 for r in records if not r["response_ids"])
    long = sum(1 for r in records if r["response_ids"] and max_len is not None and len(r["prompt_ids"]) >= max_len)
    parts = [f"{empty} with an empty answer"] if empty else []
    limit = f"{flag} {max_len} tokens or longer (raise {flag})" if flag else f"{max_len} tokens or longer"
    parts += [f"{long} whose prompt is {limit}"] if long else []
    return f"; {len(records)} records, {' and '.join(parts)} gave none" if parts else ""


def split_examples(examples: list[Example]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for e in examples:
        out[split_of(e.id)].append(e)
    return out


def head_labels(tokens: np.ndarray, assistant: np.ndarray, positions: np.ndarray, num_heads: int) -> np.ndarray:
    """Labels [len(positions), num_heads]: head k at position t -> tokens[t+k+2], IGNORE
    where that index is past the end or not an assistant token."""
    positions = np.asarray(positions, dtype=np.int64)
    target = positions[:, None] + np.arange(num_heads)[None, :] + 2  # [P, K]
    inside = target < len(tokens)
    safe = np.where(inside, target, 0)
    ok = inside & assistant[safe]
    return np.where(ok, tokens[safe], IGNORE)


def next_token_labels(tokens: np.ndarray, assistant: np.ndarray) -> np.ndarray:
    """Labels [L]: position t -> tokens[t+1] where that is an assistant token, else IGNORE."""
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    labels[:-1] = np.where(assistant[1:], tokens[1:], IGNORE)
    return labels
