"""The rules for what users pass in, in one place.

Every public entry point checks its arguments here, before any work: ``runtime.load`` /
``MedusaGenerator``, ``generate`` and ``stream`` (runtime/api.py), :class:`runtime.decode.DecodeConfig`,
and the command lines (medusa-run, medusa-export, medusa-train). A value of the wrong type, out
of range, not finite (NaN, infinity) or not valid text raises a :class:`ConfigError` (a
:class:`MedusaError`) whose one-line message names the argument, what was given and what to
give instead. Two rules hold everywhere: a bool is not an integer (``max_new_tokens=True`` is
a mistake, not 1) and a float is not an integer (``max_new_tokens=2.5`` is refused, not
rounded). numpy integers and floats are accepted wherever Python's are.

numpy only; nothing here imports torch, ONNX Runtime or the exporter.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ConfigError, TreeError

MAX_THREADS = 1024
# a tree's attention mask is [nodes, nodes]: past this many nodes it costs gigabytes and can
# never be verified within any context this runtime sizes
MAX_TREE_NODES = 16384


def show(value, typed: bool = False) -> str:
    """``value`` for a message: its repr, cut at 60 characters, with its type when that helps
    (an integer of thousands of digits, which Python will not even print, by its size)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and abs(int(value)).bit_length() > 128:
        return f"an integer of {abs(int(value)).bit_length()} bits"
    try:
        text = repr(value)
    except ValueError:  # a container holding such an integer
        return f"a {type(value).__name__} holding an integer too large to print"
    if len(text) > 60:
        text = text[:57] + "..."
    plain = (int, float, str, list, tuple, dict, type(None), np.integer, np.floating)
    if typed or isinstance(value, (bool, np.bool_)) or not isinstance(value, plain):
        text += f" ({type(value).__name__})"
    return text


def _rule(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]"
    if minimum is not None:
        return f">= {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return ""


def _kind(kind: str, rule: str) -> str:
    return f"{kind} {rule}" if rule else kind


def _as_int(value) -> int | None:
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (float, np.floating)):
        return None
    try:
        return operator.index(value)  # int, numpy integers, anything with __index__
    except TypeError:
        return None


def integer(
    name: str,
    value,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    rule: str | None = None,
    optional: bool = False,
) -> int | None:
    """``value`` as an int within [minimum, maximum] (None passes when ``optional``)."""
    if value is None and optional:
        return None
    rule = rule if rule is not None else _rule(minimum, maximum)
    v = _as_int(value)
    if v is None:
        raise ConfigError(f"{name} must be {_kind('an integer', rule)}, got {show(value)}")
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ConfigError(f"{name} must be {_kind('an integer', rule)}, got {show(v)}")
    return v


def real(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_open: bool = False,
    rule: str | None = None,
    optional: bool = False,
) -> float | None:
    """``value`` as a finite float within the bounds (``min_open``: the minimum itself is excluded)."""
    if value is None and optional:
        return None
    if rule is None:
        rule = _rule(minimum, maximum).replace(">=", ">" if min_open else ">=")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be {_kind('a number', rule)}, got {show(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int past float range
        v = math.inf
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be {_kind('a finite number', rule)}, got {v}")
    if minimum is not None and (v < minimum or (min_open and v == minimum)):
        raise ConfigError(f"{name} must be {rule}, got {value!r}")
    if maximum is not None and v > maximum:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")
    return v


def flag(name: str, value) -> bool:
    """A real bool (a string such as "no" is truthy: refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {show(value)}")
    return bool(value)


def choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {show(value)}")
    return value


def text(name: str, value) -> str:
    """A str that is valid Unicode (no lone surrogates, which no tokenizer can encode)."""
    if not isinstance(value, str):
        hint = " (decode bytes with .decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
        raise ConfigError(f"{name} must be a string{hint}, got {show(value, typed=True)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"{name} holds a lone surrogate {value[e.start]!r} at character {e.start}, which is not valid Unicode "
            "text: remove it (or decode the source bytes with errors='replace')"
        ) from None
    return value


def folder(name: str, value) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name} must be a folder path (str or pathlib.Path), got {show(value)}")
    return Path(value)


# ---------------------------------------------------------------------------- the API's arguments


def threads(value) -> int | None:
    return integer(
        "threads", value, 1, MAX_THREADS, optional=True, rule=f"in [1, {MAX_THREADS}] (or None: the library's default)"
    )


def max_context(value) -> int | None:
    return integer(
        "max_context",
        value,
        2,
        optional=True,
        rule=">= 2 (the prompt and one new token; or None: the artifact's context)",
    )


def seed(value) -> int | None:
    return integer("seed", value, 0, optional=True, rule=">= 0 (or None: a fresh random seed)")


def stop_strings(value) -> tuple[str, ...]:
    """A string or a list of strings, none empty (an empty stop string would match at once)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    elif not isinstance(value, (list, tuple)):
        raise ConfigError(f"stop must be a string or a list of strings, got {show(value)}")
    out = []
    for s in value:
        text("stop", s)
        if not s:
            raise ConfigError("stop strings must not be empty (an empty string matches at once): drop it")
        out.append(s)
    return tuple(out)


def token_ids(values, vocab_size: int) -> list[int]:
    ids = []
    for i, t in enumerate(values):
        v = _as_int(t)
        if v is None:
            raise ConfigError(f"prompt token ids must be integers, got {show(t)} at position {i}")
        ids.append(v)
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        raise ConfigError(f"prompt token ids must lie in [0, {vocab_size}); got {show(min(ids))}..{show(max(ids))}")
    return ids


def chat_messages(messages) -> list[dict]:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"chat messages must be dicts with 'role' and 'content', got {show(m)} at position {i}")
        text(f"message {i}'s role", m["role"])
        if m["content"] is not None or not m.get("tool_calls"):  # an assistant's tool calls may come without text
            text(f"message {i}'s content", m["content"])
    return list(messages)


def prompt(value, vocab_size: int) -> tuple[str, Any]:
    """("text", str) | ("chat", messages) | ("ids", token ids), checked."""
    if isinstance(value, str):
        text("prompt", value)
        if not value:
            raise ConfigError("the prompt is empty")
        return "text", value
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise ConfigError(
            "the prompt is bytes: decode it to a str (prompt.decode('utf-8')); token ids go in a list of ints"
        )
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ConfigError(f"a prompt of token ids must be 1-D, got an array of shape {value.shape}")
        value = list(value)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(
            "prompt must be a string, a list of chat messages ({'role': ..., 'content': ...}) "
            f"or a list of token ids, got {show(value)}"
        )
    if not value:
        raise ConfigError("the prompt is empty")
    if all(isinstance(m, dict) for m in value):
        return "chat", chat_messages(value)
    if any(isinstance(m, dict) for m in value):
        raise ConfigError("prompt mixes chat messages with other items: give a list of messages or a list of token ids")
    return "ids", token_ids(value, vocab_size)


def tree(spec, num_heads: int | None, vocab_size: int | None):
    """A tree argument (a name in tree_configs, a JSON file, a list of paths or a Tree) as a
    :class:`runtime.tree.Tree` checked against the model: every rank names a token of the
    vocabulary and the depth fits the Medusa heads; every problem is a TreeError / ConfigError."""
    from runtime.tree import Tree, _read_tree_file, build_tree, load_tree

    if isinstance(spec, (list, tuple)):
        spec = build_tree(tree_paths(spec, vocab_size, "custom"), name="custom", num_heads=num_heads)
    elif isinstance(spec, (str, os.PathLike)):
        import tree_configs

        if not (isinstance(spec, str) and spec in tree_configs.available()) and os.path.isfile(spec):
            name, paths = _read_tree_file(Path(spec))
            spec = build_tree(tree_paths(paths, vocab_size, name), name=name, num_heads=num_heads)
    elif not isinstance(spec, Tree):
        raise ConfigError(
            "tree must be a name from tree_configs, a JSON file, a list of paths such as "
            f"[[0], [0, 0], [1]] or a Tree, got {show(spec)}"
        )
    t = load_tree(spec, num_heads=num_heads)  # names and missing files (a TreeError); a Tree is re-validated
    tree_paths([list(p) for p in t.paths], vocab_size, t.name)
    return t


def tree_paths(paths, vocab_size: int | None, name: str = "tree") -> list:
    """Shape and ranks of a tree's paths, before any buffer is built: a rank must name a token
    of the vocabulary (a head's top-k cannot reach past it), and the tree must be small enough
    to build (:data:`MAX_TREE_NODES`). The remaining rules (prefixes, depth) are runtime.tree's."""
    if not isinstance(paths, (list, tuple)) or not paths:
        raise TreeError(f"{name}: expected a non-empty list of paths such as [[0], [0, 0], [1]], got {show(paths)}")
    if len(paths) + 1 > MAX_TREE_NODES:
        raise TreeError(
            f"{name}: {len(paths) + 1} nodes; a tree holds at most {MAX_TREE_NODES} (its attention mask "
            "is nodes x nodes, and each step verifies every node): use a smaller tree"
        )
    for p in paths:
        if not isinstance(p, (list, tuple)) or not p:
            raise TreeError(f"{name}: path {show(p)} is not a non-empty list of ranks")
        for r in p:
            v = _as_int(r)
            if v is None:
                raise TreeError(f"{name}: path {show(p)} has a rank that is not an integer: {show(r)}")
            if v < 0:
                raise TreeError(f"{name}: path {show(p)} has a negative rank {show(v)}")
            if vocab_size is not None and v >= vocab_size:
                raise TreeError(
                    f"{name}: path {show(p)} asks for rank {show(v)} of a head's proposals, but the vocabulary "
                    f"has {vocab_size} tokens (ranks 0..{vocab_size - 1})"
                )
    return list(paths)
