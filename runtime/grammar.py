"""Structured output: OpenAI's ``response_format`` (``json_object``, ``json_schema``) as a mask on the
backbone's logits, through Medusa's tree as well as plain decoding.

A :class:`Grammar` is the compiled format (llguidance, the constraint engine vLLM, SGLang and
llama.cpp use: JSON schemas to a grammar, a token mask per position in about 0.1 ms for a
49k vocabulary). Each decode makes its own :class:`GrammarMask`, which the decode loop treats as
it treats penalties (:class:`runtime.decode.Penalties`): the tokens emitted so far are consumed
(``add``), and every row a step computes is masked by what the grammar allows after that row's own
path (``apply``): the root's row after the text so far, a tree node's row after its ancestors'
drafted tokens and its own. The backbone's target is then the masked distribution, so:

* greedy Medusa emits exactly plain greedy decoding's tokens under the same format (a node is
  accepted where the masked argmax of its parent's row is its token, which is what plain
  decoding with the mask would emit); exact sampling keeps the masked law; typical acceptance
  reads the masked logits too;
* a drafted node the grammar does not allow is never accepted (its parent's masked row gives
  its token no probability), so its row is left as it is.

Where a step reads the drawn tokens alone (greedy, coupled sampling; no penalties, no log-probabilities),
the masks go to the engine with the rows (``Backend.forward_argmax(allowed=...)``, :meth:`GrammarMask.masks`):
an engine that screens its lm_head ranks each row's allowed tokens alone (the mask in the screen's
ranking, runtime.onnxrt.screen_ranking) and takes the best allowed candidate, which beats the bound
above every other allowed token; a row the bound leaves open reruns the call in float, masked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ConfigError, MedusaError

FORMATS = ("text", "json_object", "json_schema", "grammar")


def require_llguidance():
    try:
        import llguidance
    except ImportError:
        raise MedusaError(
            "response_format (structured output) needs llguidance: pip install 'medusa-trt[structured]'"
        ) from None
    return llguidance


def spec_of(response_format: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """What ``response_format`` asks for as ``("json", the schema's JSON text)`` or ``("lark", a
    grammar)``, None for free text, or a ConfigError naming what is wrong. OpenAI's shapes:
    ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON object), ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``; and ``{"type": "grammar",
    "grammar": LARK}``, llguidance's Lark grammar (vLLM's ``guided_grammar``; regular expressions
    as ``/.../`` tokens, JSON schemas inline as ``%json {...}``)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ConfigError(f"response_format must be a mapping, got a {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in FORMATS:
        raise ConfigError(f"response_format: type {kind!r} is not one of {', '.join(FORMATS)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json", json.dumps({"type": "object"})
    if kind == "grammar":
        lark = response_format.get("grammar")
        if not isinstance(lark, str) or not lark.strip():
            raise ConfigError('response_format: type "grammar" needs "grammar": a Lark grammar (llguidance\'s)')
        return "lark", lark
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
        raise ConfigError('response_format: json_schema must be {"name": ..., "schema": {...}}')
    return "json", json.dumps(dict(spec.get("schema", {})))  # OpenAI's schema is optional: any JSON then


class Grammar:
    """A compiled format for one tokenizer; :meth:`mask` gives a decode its own matcher."""

    def __init__(self, tokenizer, grammar: str, eos_token_ids: Sequence[int]):
        self._tokenizer, self._grammar, self.eos = tokenizer, grammar, tuple(eos_token_ids)

    @classmethod
    def build(cls, lltokenizer, spec: tuple[str, str], eos_token_ids: Sequence[int]) -> Grammar:
        """``spec`` (:func:`spec_of`) compiled for ``lltokenizer`` (:func:`lltokenizer`), or a
        ConfigError with llguidance's reason (a schema feature it does not take, a malformed grammar)."""
        llg = require_llguidance()
        kind, text = spec
        what = "the schema" if kind == "json" else "the grammar"
        try:
            grammar = (llg.LLMatcher.grammar_from_json_schema(text) if kind == "json"
                       else llg.LLMatcher.grammar_from_lark(text))  # fmt: skip
        except Exception as e:  # its errors are plain exceptions carrying the reason
            raise ConfigError(f"response_format: {what} does not compile: {e}") from None
        problem = llg.LLMatcher.validate_grammar(grammar, lltokenizer)
        if problem:
            raise ConfigError(f"response_format: {what} does not compile: {problem}")
        return cls(lltokenizer, grammar, eos_token_ids)

    def mask(self, vocab: int) -> GrammarMask:
        llg = require_llguidance()
        matcher = llg.LLMatcher(self._tokenizer, self._grammar, log_level=0)
        return GrammarMask(matcher, vocab, self.eos, known=int(self._tokenizer.vocab_size))


def lltokenizer(folder: str | Path, eos_token_ids: Sequence[int]):
    """llguidance's view of the artifact's ``tokenizer.json`` (~0.5 s to build: build it once)."""
    llg = require_llguidance()
    text = (Path(folder) / "tokenizer.json").read_text()
    return llg.LLTokenizer(text, eos_token=list(eos_token_ids) or None)


class GrammarMask:
    """One decode's matcher: consumes what is emitted, masks what is verified (see the module doc)."""

    masks_only = True  # what it does to logits is a mask (runtime.decode: a step may draw through the screen)

    def __init__(self, matcher, vocab: int, eos: Sequence[int], known: int | None = None):
        self.matcher, self.vocab, self.eos = matcher, vocab, tuple(eos)
        # the tokenizer's tokens: a model's vocabulary may be padded past them (Qwen2.5: 151,936 logits for
        # 151,665 tokens), and llguidance turns a path holding such an id into an error state for good
        self.known = vocab if known is None else min(vocab, int(known))

    def add(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            if self.matcher.is_error():  # (llguidance reports an error state as stopped too)
                raise MedusaError(f"structured output: the grammar is in an error state: {self.matcher.get_error()}")
            if self.matcher.is_stopped():  # the format is complete and its end consumed
                return
            if not self.matcher.consume_token(int(t)):
                raise MedusaError(
                    f"structured output: the grammar refused emitted token {t}: {self.matcher.get_error()}"
                )

    def forced(self) -> list[int]:
        """The tokens the grammar forces next (after what was consumed; [] where it allows a choice):
        llguidance's fast-forward tokens, a certain draft."""
        if self.matcher.is_stopped() or self.matcher.is_error():
            return []
        return [int(t) for t in self.matcher.compute_ff_tokens()]

    def allowed(self) -> np.ndarray:
        """The mask after what was consumed: one bool per token of the vocabulary."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(self.vocab, dtype=bool)
        n = min(self.vocab, len(bits))
        allowed[:n] = bits[:n].astype(bool)
        if self.matcher.is_accepting():  # the format is complete: the model's own end of turn too
            allowed[[e for e in self.eos if e < self.vocab]] = True
        return allowed

    def masks(self, rows: int, tree=None, tokens: np.ndarray | None = None) -> np.ndarray:
        """bool ``[rows, vocab]``: what each row allows (rows of ``tree``'s nodes, ``tokens`` their
        tokens: row v after the root's text and v's own path; no tree: every row as the next token
        after what was consumed). A node the grammar does not allow is never accepted (its parent's
        masked row gives its token nothing): its row, moot, allows every token."""
        if tree is None or tokens is None:
            return np.broadcast_to(self.allowed(), (rows, self.vocab))
        out = np.ones((tree.num_nodes, self.vocab), dtype=bool)
        for v in range(tree.num_nodes):
            path = [int(t) for t in tokens[1:][tree.attn_mask[v, 1:]]]  # below the root, in depth order
            if any(t >= self.known for t in path):  # a padding id: no text, the grammar refuses it (unasked)
                continue
            taken = self.matcher.try_consume_tokens(path) if path else 0
            if taken == len(path):
                out[v] = self.allowed()
            if taken:
                self.matcher.rollback(taken)
        return out

    def apply(self, logits: np.ndarray, tree=None, tokens: np.ndarray | None = None) -> np.ndarray:
        """The masked copy of ``logits`` (the rows :meth:`masks` describes): disallowed tokens -inf."""
        out = np.array(logits, dtype=np.float32)
        out[~self.masks(len(out), tree, tokens)] = -np.inf
        return out
