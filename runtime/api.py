"""``runtime.load(artifact)`` and the generator object users call in production.

    import runtime
    gen = runtime.load("artifacts/smollm2-135m-medusa")
    out = gen.generate([{"role": "user", "content": "Name three rivers."}], max_new_tokens=128)
    print(out.text, out.stats.mean_accepted, out.stats.tokens_per_s)
    for piece in gen.stream("Once upon a time"):
        print(piece.text, end="", flush=True)

Concurrency contract. One loaded generator holds one KV cache and one lock. ``generate``
holds the lock for its whole call; a ``stream`` holds it only while it computes a step, never
while its consumer handles a chunk, so a half-read or slow stream never blocks another call.
A call that finds the cache holding another stream's sequence first saves that sequence
(a copy of the used part of the cache, or on backends that cannot copy it, its tokens to
re-run) and puts its own back, so every call sees only its own sequence: greedy outputs
are the tokens it gives when run alone, and a seeded sampled call draws the same tokens (with
one exception: a dynamic tree whose step follows another call's takes a plain step, which draws
fewer random numbers, so under interleaving its sampled tokens hold to a seed only with the default
coupled drafts, whose every draw is tied to its position).
Calls from several threads are therefore safe and serialized step by step (one engine, no
parallel speed-up: load one generator per thread for that); one stream must be read by one
consumer at a time. Each switch between interleaved calls costs a copy of the used cache out
and another in (SmolLM2, 1,000 cached tokens: ~50 ms), or, on backends that cannot copy their
cache (TensorRT), a prefill that rebuilds it up to floating-point rounding. A stream that is
dropped before its end holds no lock and nothing in
the generator: its saved copy goes with it when it is closed or garbage-collected. Arguments
are checked when ``stream`` is called, before the first chunk is asked for.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from runtime import checks
from runtime.artifact import ArtifactConfig, read_artifact
from runtime.backend import Backend
from runtime.datastore import FILE as DATASTORE_FILE
from runtime.datastore import Datastore
from runtime.decode import (
    DEFAULT_PREFILL_CHUNK,
    GREEDY_BELOW,
    DecodeConfig,
    DecodeStats,
    TokenLogprob,
    check_fits,
    check_prefill_chunk,
    check_tree,
    common_prefix,
    decode_steps,
    prefill,
)
from runtime.dynamic import (
    CALIBRATION_FILE,
    DEFAULT_COST,
    DYNAMIC,
    Calibration,
    CostModel,
    DynamicTree,
    parse_dynamic,
    read_calibration,
)
from runtime.errors import ArtifactError, ConfigError, MedusaError, MedusaWarning, TreeError
from runtime.profile import PROFILE_FILE
from runtime.tokenizer import StreamDecoder, Tokenizer
from runtime.tree import Tree, build_tree

log = logging.getLogger("medusa_trt.runtime")

BACKENDS = ("auto", "onnxruntime", "tensorrt")
GRAMMAR_CACHE = 64  # compiled response formats a generator keeps (the oldest goes first)
DEVICES = ("auto", "cpu", "cuda")

Prompt = str | Sequence[int] | Sequence[dict]

# generate() and stream() spell out their decoding options as keyword arguments; each default
# is DecodeConfig's (one place: tests/project/test_cli_defaults.py checks the signatures).
_DEFAULTS = DecodeConfig()


def _decode_args(args: dict) -> dict:
    """``generate``'s / ``stream``'s arguments (their ``locals()`` on entry) for ``_plan``."""
    return {k: v for k, v in args.items() if k != "self"}


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    stats: DecodeStats
    logprobs: list[TokenLogprob] | None = None  # one per token where ``logprobs=`` asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's tokens 1 .. n-1 (``prompt_logprobs=True``)


@dataclass
class TextChunk:
    """One streamed piece: the text and tokens accepted by one step; ``stats``, the call's
    DecodeStats: one object, updated in place as the call goes on (copy it to keep one step's
    figures; final, ``finish_reason`` included, once the iteration has ended); the tokens'
    log-probabilities where ``logprobs=`` asked for them."""

    text: str
    tokens: list[int]
    stats: DecodeStats
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # the first chunk's, with ``prompt_logprobs=True``


def choose_backend(folder: Path, config: ArtifactConfig, device: str = "auto") -> tuple[str, str]:
    """``auto``'s choice and why: TensorRT only where the artifact is portable with Medusa heads, has
    built engines, tensorrt and cuda-python are installed and a GPU is visible (and the device is
    not the CPU); else ONNX Runtime."""
    from runtime.trt_backend import cuda_device_count

    if config.flavour != "portable":
        return "onnxruntime", f"the {config.flavour} graph runs on ONNX Runtime"
    if device == "cpu":
        return "onnxruntime", "device cpu"
    if config.model.medusa_head_type != "medusa":  # engines may be built (the plan covers them), not run
        return "onnxruntime", "Hydra heads: the TensorRT backend runs Medusa heads only"
    if not _has_engines(folder):
        return "onnxruntime", "no TensorRT engine built in the artifact"
    if not _has_tensorrt():
        return "onnxruntime", "engines built, but tensorrt is not installed"
    if not _has_cudart():
        return "onnxruntime", "engines built, but cuda-python is not installed"
    if cuda_device_count() < 1:
        return "onnxruntime", "engines built, but no CUDA GPU is visible"
    return "tensorrt", "engines built, tensorrt installed, GPU visible"


def make_backend(
    folder: Path, config: ArtifactConfig, backend: str, device: str, threads: int | None, max_context: int | None
) -> Backend:
    if backend == "auto":
        backend, why = choose_backend(folder, config, device)
        log.info("backend auto: %s (%s)", backend, why)
    if backend == "onnxruntime":
        if config.flavour == "fused":
            from runtime.onnxrt import FusedOnnxRuntimeBackend

            return FusedOnnxRuntimeBackend(folder, config, device=device, threads=threads, max_context=max_context)
        from runtime.onnxrt import OnnxRuntimeBackend

        return OnnxRuntimeBackend(folder, config, device=device, threads=threads, max_context=max_context)
    if backend == "tensorrt":
        if config.flavour != "portable":
            raise MedusaError(
                f"{folder} holds the {config.flavour} graph (ONNX Runtime's com.microsoft fused ops), which TensorRT's "
                "ONNX parser does not take: export with --graph portable for TensorRT, or use backend='onnxruntime'"
            )
        from runtime.trt_backend import TensorRTBackend

        if device == "cpu":
            raise MedusaError(
                "backend='tensorrt' runs on a GPU: use device='cuda' (or 'auto'), or backend='onnxruntime'"
            )
        return TensorRTBackend.from_artifact(folder, config, max_context=max_context, device=0)
    raise MedusaError(f"unknown backend {backend!r}: use auto, onnxruntime or tensorrt")


def _has_engines(folder: Path) -> bool:
    """Engines built by ``medusa-export build-engine`` or by the written trtexec.sh."""
    from runtime.plan import PLAN_FILE, PlanError, read_plan

    if not (folder / PLAN_FILE).is_file():
        return False
    try:
        plan = read_plan(folder)
    except PlanError:
        return False
    return all((folder / g.engine).is_file() for g in (plan.backbone, plan.heads))


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def _has_cudart() -> bool:
    import importlib.util

    try:
        return (
            importlib.util.find_spec("cuda.bindings") is not None or importlib.util.find_spec("cuda.cudart") is not None
        )
    except ModuleNotFoundError:  # no ``cuda`` package at all
        return False


class _Claim:
    """One call's sequence in the generator's single KV cache (the module's concurrency contract).

    Between two steps of the decode loop the cache holds ``ids`` + every emitted token but
    the last (the next step's root is not cached yet). ``saved``: the copy taken when
    another call displaced this one; ``done``: finished, failed or dropped (never saved);
    ``failed``: a step raised (what the cache holds is not known); ``left``: the backend's cache
    length and forward count after its last step; ``reuse``: how many of ``ids`` the cache held
    when it started.
    """

    __slots__ = ("ids", "emitted", "saved", "done", "failed", "left", "reuse", "__weakref__")

    def __init__(self, ids: list[int]):
        self.ids = list(ids)
        self.emitted: list[int] = []
        self.saved: object = None
        self.done = False
        self.failed = False
        self.left: tuple[int, int] = (-1, -1)
        self.reuse = 0

    @property
    def cached(self) -> list[int]:
        return self.ids + self.emitted[:-1]

    def record(self, tokens: list[int], backend) -> None:
        """A step emitted ``tokens``; the backend's cache length and forward count after it."""
        self.emitted.extend(tokens)
        self.left = (backend.cache_len, backend.forwards)

    def held(self, cache_len: int) -> list[int]:
        """The tokens whose entries fill the cache's first ``cache_len`` positions, as far as this
        call knows them: its prompt and the accepted tokens it emitted (a step a stop string or the
        length trimmed may have committed more, which the emitted tokens do not say)."""
        tokens = self.ids + self.emitted
        return tokens[: min(cache_len, len(tokens))]


class _Replay:
    """A saved sequence for backends that cannot copy their cache: its tokens, re-run on restore."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens


class MedusaGenerator:
    def __init__(
        self,
        folder: str | Path,
        backend: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        max_context: int | None = None,
        tree: str | Sequence | Tree | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        verify: bool = False,
        reuse_prefix: bool = True,
    ):
        # every argument before loading: a bad value fails fast, in one line (runtime/checks.py)
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)
        self.reuse_prefix = checks.flag("reuse_prefix", reuse_prefix)
        self.folder = checks.folder("artifact folder", folder)
        backend = checks.choice("backend", backend, BACKENDS)
        device = checks.choice("device", device, DEVICES)
        threads = checks.threads(threads)
        max_context = checks.max_context(max_context)
        self.config = read_artifact(self.folder, verify=checks.flag("verify", verify))
        self.tokenizer = Tokenizer(self.folder)
        # response_format: llguidance's tokenizer (built at the first request for one) and compiled formats
        self._lltokenizer: Any = None
        self._grammars: dict[str, Any] = {}
        self._grammar_lock = threading.Lock()
        tokens = self.tokenizer.vocab_size
        if tokens > self.spec.vocab_size:
            raise ArtifactError(
                f"{self.folder}: tokenizer.json holds {tokens} tokens but the model's vocabulary is "
                f"{self.spec.vocab_size}: the tokenizer is not this model's (swapped?); re-export"
            )
        if max_context is not None and max_context > self.spec.max_context:
            warnings.warn(
                f"max_context {max_context} exceeds the artifact's context of {self.spec.max_context} "
                f"tokens: the cache holds {self.spec.max_context}",
                MedusaWarning,
                stacklevel=3,
            )
        self.backend = self._make_backend(backend, device, threads, max_context)
        # calls of more rows than the latency profile found the lm_head screen paying for go through the float lm_head
        self._limit_screen(self.cost_model.screen_max_rows)
        if not (self.folder / PROFILE_FILE).is_file():
            log.info("%s has no %s: drafts are sized by the built-in cost model and every call screens its lm_head; "
                     "`medusa-run profile %s` measures this machine (~40 s)", self.folder, PROFILE_FILE,
                     self.folder)  # fmt: skip
        # the lookup branch's drafts where the context repeats nothing (runtime/datastore.py); read
        # once, checked against the vocabulary: a malformed or foreign file fails the load, in one line
        store = self.folder / DATASTORE_FILE
        self.datastore = Datastore.load(store, self.spec.vocab_size) if store.is_file() else None
        self.backend_name = getattr(self.backend, "name", "onnxruntime")
        self._lock = threading.Lock()
        # the _Claim whose sequence the backend's cache holds (kept once done: its prompt and answer
        # may begin the next call's prompt, see _reusable)
        self._holder: _Claim | None = None
        self.default_tree = self._artifact_tree() if tree is None else self._tree(tree)
        # exact sampling's own tree, recorded at export; a tree given to load() serves every mode
        self.sampling_tree = (
            self._recorded_tree(self.config.sampling_tree, self.config.sampling_tree_paths)
            if tree is None and self.config.sampling_tree
            else None
        )
        if self.default_tree.num_nodes >= self.backend.max_context:
            self._warn_tree_too_big(self.default_tree, self.backend.max_context - 1, stacklevel=3)
        if tree is not None:  # a tree given here serves greedy calls: one that cannot is named now, not at each
            try:
                check_tree(self.backend, _DEFAULTS, self.default_tree)
            except MedusaError:
                self.close()
                raise

    def _make_backend(self, backend: str, device: str, threads: int | None, max_context: int | None) -> Backend:
        return make_backend(self.folder, self.config, backend, device, threads, max_context)

    def close(self) -> None:
        """Free what the generator holds beyond memory (the batch engine's thread); idempotent."""

    @property
    def spec(self):
        return self.config.model

    def _artifact_tree(self) -> Tree:
        """The tree recorded at export (its paths are stored, so it loads even if renamed)."""
        return self._recorded_tree(self.config.default_tree, self.config.default_tree_paths)

    def _recorded_tree(self, name: str, paths_recorded: list) -> Tree:
        try:
            if paths_recorded:
                paths = checks.tree_paths(paths_recorded, self.spec.vocab_size, name)
                return build_tree(paths, name=name, num_heads=self.spec.num_medusa_heads)
            return checks.tree(name, self.spec.num_medusa_heads, self.spec.vocab_size)
        except TreeError as e:
            raise ArtifactError(f"{self.folder / 'medusa_config.json'}: the tree {name!r} does not fit: {e}") from None

    def _tree(self, tree) -> Tree | DynamicTree:
        """A tree argument (a name, a JSON file, a list of paths or a Tree), checked against this
        model: its ranks against the vocabulary and its depth against the Medusa heads."""
        if tree is None:
            return self.default_tree
        if isinstance(tree, DynamicTree):
            return tree
        if isinstance(tree, str) and tree.partition("@")[0].partition(":")[0] == DYNAMIC:
            return parse_dynamic(tree, self.spec.num_medusa_heads, *self._dynamic_inputs)
        return checks.tree(tree, self.spec.num_medusa_heads, self.spec.vocab_size)

    @functools.cached_property  # read once per generator, not per request
    def _dynamic_inputs(self) -> tuple[CostModel, Calibration | None]:
        """What dynamic trees size themselves by: the artifact's latency profile (``medusa-run profile``
        writes it; else the built-in CPU default) and the drafts' measured hit rates (``medusa-run
        calibrate`` writes them; None: each call starts from the heads' raw probabilities)."""
        cal = self.folder / CALIBRATION_FILE
        return self.cost_model, read_calibration(cal) if cal.is_file() else None

    def _limit_screen(self, rows: int | None) -> None:
        self.backend.screen_max_rows = rows

    @functools.cached_property
    def cost_model(self) -> CostModel:
        """The engine's step cost by tokens verified: the artifact's latency profile (``medusa-run
        profile`` writes it) or the built-in CPU default. Sizes dynamic trees and the lookup branch."""
        profile = self.folder / PROFILE_FILE
        return CostModel.from_profile(profile) if profile.is_file() else DEFAULT_COST

    @staticmethod
    def _warn_tree_too_big(tree: Tree | DynamicTree, room: int, stacklevel: int) -> None:
        if isinstance(tree, DynamicTree):  # it grows each step's tree within the room there is
            return
        warnings.warn(
            f"tree {tree.name!r} has {tree.num_nodes} nodes but at most {room} fit in the context after the prompt: "
            "every step decodes plain (one token a step, no Medusa speed-up); use a smaller tree or a longer context",
            MedusaWarning,
            stacklevel=stacklevel + 1,
        )

    def grammar(self, response_format: Mapping[str, Any] | None):
        """``response_format`` compiled for this model (a :class:`runtime.grammar.Grammar`, cached by
        its JSON), or None for free text; a ConfigError names what is wrong with it."""
        from runtime import grammar

        spec = grammar.spec_of(response_format)
        if spec is None:
            return None
        key = f"{spec[0]}:{spec[1]}"
        with self._grammar_lock:
            if key not in self._grammars:
                if self._lltokenizer is None:  # ~0.5 s, once
                    self._lltokenizer = grammar.lltokenizer(self.folder, self.spec.eos_token_ids)
                if len(self._grammars) >= GRAMMAR_CACHE:
                    self._grammars.pop(next(iter(self._grammars)))
                self._grammars[key] = grammar.Grammar.build(self._lltokenizer, spec, self.spec.eos_token_ids)
            return self._grammars[key]

    def encode(
        self,
        prompt: Prompt,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """A prompt string (encoded as is), chat messages (chat template applied, with
        ``chat_template_kwargs`` as more template variables, e.g. ``{"enable_thinking": False}``, and
        ``tools`` as the functions it lists) or token ids."""
        kind, value = checks.prompt(prompt, self.spec.vocab_size)
        for name, given in (("chat_template_kwargs", chat_template_kwargs), ("tools", tools)):
            if given is not None and kind != "chat":
                raise ConfigError(f"{name} applies to chat messages only, and the prompt is not a chat")
        if kind == "text":
            ids = self.tokenizer.encode(value)
        elif kind == "chat":
            ids = self.tokenizer.apply_chat_template(value, template_kwargs=chat_template_kwargs, tools=tools)
        else:
            ids = value
        if not ids:
            raise ConfigError("the prompt is empty (it encodes to no tokens)")
        return ids

    def _plan(
        self,
        prompt,
        max_new_tokens,
        temperature,
        epsilon,
        delta,
        tree,
        stop,
        seed,
        medusa,
        acceptance,
        top_k,
        top_p,
        lookup,
        drafts,
        datastore,
        lookup_max,
        lookup_sizing,
        logprobs,
        prompt_logprobs,
        presence_penalty,
        frequency_penalty,
        chat_template_kwargs,
        tools,
        response_format,
        cancel=None,
    ):
        """(prompt ids, DecodeConfig, tree): the one path under stream() and generate(). Every
        argument is checked here, at the call, before anything runs."""
        ids = self.encode(prompt, chat_template_kwargs, tools)
        grammar = self.grammar(response_format)
        cfg = DecodeConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            acceptance=acceptance,
            top_k=top_k,
            top_p=top_p,
            epsilon=epsilon,
            delta=delta,
            medusa=medusa,
            lookup=lookup,
            lookup_max=lookup_max,
            lookup_sizing=lookup_sizing,
            drafts=drafts,
            datastore=datastore,
            seed=seed,
            eos_token_ids=tuple(self.spec.eos_token_ids),
            stop_strings=stop,
            prefill_chunk=self.prefill_chunk,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            grammar=grammar,
            cancel=cancel,
        )
        t = self._tree(tree) if cfg.medusa else None
        if (
            tree is None
            and self.sampling_tree is not None
            and cfg.medusa
            and cfg.temperature >= GREEDY_BELOW
            and cfg.acceptance == "exact"
        ):
            t = self.sampling_tree
        check_fits(self.backend, ids)  # at the call: the events run nothing until asked
        check_tree(self.backend, cfg, t)  # the tree against this engine and the decoding asked for, likewise
        room = self.backend.max_context - len(ids)
        if t is not None and t.num_nodes > room:
            self._warn_tree_too_big(t, room, stacklevel=3)
        return ids, cfg, t

    def _stream_events(self, ids, cfg, tree):
        """The decode loop's events for one stream, a step at a time under the lock."""
        claim = _Claim(ids)
        events = decode_steps(
            self.backend, ids, cfg, tree, self.tokenizer.decode, self.datastore, self.cost_model, lambda: claim.reuse
        )
        return self._steps(claim, events)

    def _generate_events(self, ids, cfg, tree):
        """The decode loop's events for one generate call, the lock held throughout."""
        claim = _Claim(ids)
        with self._lock:  # the whole call: it ends on its own, so it blocks others for its length only
            self._take_cache(claim)
            try:
                for event in decode_steps(
                    self.backend, ids, cfg, tree, self.tokenizer.decode, self.datastore, self.cost_model, claim.reuse
                ):
                    claim.record(event.tokens, self.backend)
                    yield event
            except BaseException:
                claim.failed = True
                raise
            finally:
                claim.done = True

    def _take_cache(self, claim: _Claim) -> None:
        """Under the lock: make the backend's cache hold ``claim``'s sequence. The call that
        holds it now is saved first (unless it is done), then ``claim``'s saved copy is put
        back; a claim that has not started learns how much of its prompt the cache holds
        (``claim.reuse``: the decode loop truncates the cache to it, or resets it)."""
        holder = self._holder
        if holder is claim:
            if claim.emitted and self.backend.cache_len != len(claim.cached):
                # the backend was driven directly (gen.backend) since this claim's last step
                self._put_back(_Replay(claim.cached))
            return
        if not claim.emitted and claim.saved is None:  # starting: the cache may hold a prefix of its prompt
            claim.reuse = self._reusable(claim.ids, holder)
        if holder is not None and not holder.done and holder.emitted:
            holder.saved = self.backend.snapshot() or _Replay(holder.cached)
        self._holder = claim
        if claim.saved is not None:
            saved, claim.saved = claim.saved, None
            self._put_back(saved)

    def _reusable(self, ids: list[int], holder: _Claim | None) -> int:
        """How many of ``ids``' first tokens the cache holds now (at most all but the last, whose
        logits the prefill must compute): what the call that held the cache last left of its prompt
        and answer, where it ended cleanly (or is between two steps) and nothing drove the backend
        since. 0 with ``reuse_prefix`` off or a backend that cannot keep a prefix."""
        if not (self.reuse_prefix and self.backend.keeps_prefix) or holder is None or holder.failed:
            return 0
        n = self.backend.cache_len
        if (n, self.backend.forwards) != holder.left:  # the backend was driven directly since its last step
            return 0
        return min(common_prefix(holder.held(n), ids), len(ids) - 1)

    def _put_back(self, saved) -> None:
        backend = self.backend
        if not isinstance(saved, _Replay):
            backend.restore(saved)
            # the restored cache's last hidden state is gone (a call between may have reset the cache and
            # ended before any forward): counted as a call, so a dynamic tree drafts from a new one
            backend.forwards += 1
            return
        # re-run the tokens as a (chunked) prefill: the cache the decode loop left, up to rounding
        backend.reset()
        prefill(backend, saved.tokens, self.prefill_chunk, want_logits=False)

    def _steps(self, claim: _Claim, events):
        """The decode loop's events, one step at a time under the lock (the stream's path)."""
        try:
            while True:
                if claim.done:  # the loop's last event came: it computes nothing more (no cache to restore)
                    return
                with self._lock:
                    self._take_cache(claim)
                    try:
                        event = next(events, None)
                    except BaseException:
                        claim.done = claim.failed = True
                        raise
                    if event is None:
                        claim.done = True
                        return
                    claim.record(event.tokens, self.backend)
                    if event.stats.finish_reason:  # the last event: a stop may have trimmed the step's tokens,
                        claim.done = True  # so the cache no longer matches them; nothing more to decode
                yield event  # the lock is free while the consumer handles the chunk
        finally:  # finished, failed, closed or collected: nothing of it is kept
            claim.done = True
            claim.saved = None

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = _DEFAULTS.max_new_tokens,
        temperature: float = _DEFAULTS.temperature,
        epsilon: float = _DEFAULTS.epsilon,
        delta: float = _DEFAULTS.delta,
        tree=None,
        stop: Sequence[str] | str = _DEFAULTS.stop_strings,
        seed: int | None = _DEFAULTS.seed,
        medusa: bool = _DEFAULTS.medusa,
        acceptance: str = _DEFAULTS.acceptance,
        top_k: int = _DEFAULTS.top_k,
        top_p: float = _DEFAULTS.top_p,
        lookup: int = _DEFAULTS.lookup,
        drafts: str = _DEFAULTS.drafts,
        datastore: bool = _DEFAULTS.datastore,
        lookup_max: int = _DEFAULTS.lookup_max,
        lookup_sizing: str = _DEFAULTS.lookup_sizing,
        logprobs: int | None = _DEFAULTS.logprobs,
        prompt_logprobs: bool = _DEFAULTS.prompt_logprobs,
        presence_penalty: float = _DEFAULTS.presence_penalty,
        frequency_penalty: float = _DEFAULTS.frequency_penalty,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        response_format: Mapping[str, Any] | None = None,
        cancel=None,
    ) -> Iterator[TextChunk]:
        """Yield text as it is accepted (one chunk per step). Arguments are checked at this call;
        the lock is held only while a step computes (see the module's concurrency contract).
        ``cancel``: a ``threading.Event``; once set (from any thread), the stream raises
        :class:`runtime.errors.Cancelled` before its next engine call, between prompt chunks too."""
        ids, cfg, t = self._plan(**_decode_args(locals()))
        return self._chunks(self._stream_events(ids, cfg, t))

    def _chunks(self, steps) -> Iterator[TextChunk]:
        text = StreamDecoder(self.tokenizer)
        event = None
        for event in steps:
            yield TextChunk(text.push(event.tokens), event.tokens, event.stats, event.logprobs, event.prompt_logprobs)
        tail = text.flush()
        if tail and event is not None:
            yield TextChunk(tail, [], event.stats, [] if event.logprobs is not None else None)

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = _DEFAULTS.max_new_tokens,
        temperature: float = _DEFAULTS.temperature,
        epsilon: float = _DEFAULTS.epsilon,
        delta: float = _DEFAULTS.delta,
        tree=None,
        stop: Sequence[str] | str = _DEFAULTS.stop_strings,
        seed: int | None = _DEFAULTS.seed,
        medusa: bool = _DEFAULTS.medusa,
        acceptance: str = _DEFAULTS.acceptance,
        top_k: int = _DEFAULTS.top_k,
        top_p: float = _DEFAULTS.top_p,
        lookup: int = _DEFAULTS.lookup,
        drafts: str = _DEFAULTS.drafts,
        datastore: bool = _DEFAULTS.datastore,
        lookup_max: int = _DEFAULTS.lookup_max,
        lookup_sizing: str = _DEFAULTS.lookup_sizing,
        logprobs: int | None = _DEFAULTS.logprobs,
        prompt_logprobs: bool = _DEFAULTS.prompt_logprobs,
        presence_penalty: float = _DEFAULTS.presence_penalty,
        frequency_penalty: float = _DEFAULTS.frequency_penalty,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> Generation:
        """Decode a whole answer: text, tokens and statistics (text decoded once, at the end).

        ``temperature`` 0 decodes greedily (Medusa's output equals plain greedy decoding's).
        Above 0 it samples from the backbone's distribution at that temperature (after
        ``top_k`` / ``top_p`` cuts): ``acceptance="exact"`` (the default) keeps exactly the law
        plain sampling gives (how: ``drafts``);
        ``"typical"`` is Medusa's typical acceptance (``epsilon``, ``delta``): accepts more,
        but the output no longer follows the backbone's distribution.

        ``drafts`` (exact sampling): ``"coupled"`` (the default) draws every token by the
        Gumbel-max trick with noise fixed per position and lets the heads rank their drafts under
        the same noise, so for a ``seed`` the tokens are exactly plain sampling's (``medusa=False``
        with the same ``drafts``: ``drafts`` also picks plain sampling's sampler, and typical
        acceptance samples as ``"top"`` does), and on the same text more drafts are accepted than
        the heads' top-k (:class:`runtime.decode.PositionNoise`); ``"top"`` verifies each head's
        top-k as fixed candidates by the rejection walk, ``"sampled"`` draws each node from its
        head's distribution at the temperature and accepts it with min(1, p/q). All three keep the
        backbone's law. Seeded sampled output differs from versions before coupled sampling.

        ``lookup``: draft tokens per Medusa step copied from the context (where its latest
        n-gram occurred before), as one more branch of the tree; 0 turns it off. Lossless
        like every draft: the backbone verifies it. ``datastore``: where the context repeats
        nothing, that branch drafts from the artifact's ``datastore.npz`` (the model's own answers
        to other prompts, :mod:`runtime.datastore`) if it has one; False: never. ``lookup_max``
        (fixed trees): the most tokens that branch drafts (<= ``lookup``: always ``lookup``).
        ``lookup_sizing``: ``"cost"`` (the default) verifies as many of them as pay for their rows,
        by the latency profile (:attr:`cost_model`) and the draft's hit rates so far in the call
        (:class:`runtime.lookup.DraftSizer`), so runs the context repeats word for word are drafted
        further ahead; ``"grow"``: the branch grows by 2 tokens after a step that accepted its
        whole draft and shrinks by 1 after one that did not, between ``lookup`` and ``lookup_max``.

        ``logprobs``: None (the default) or k in 0 .. 20: ``.logprobs`` then holds, per token, its
        log-probability under the backbone (softmax of its logits at temperature 1, before
        temperature, ``top_k`` or ``top_p``) and the k likeliest tokens there. Medusa's verification
        computes those logits anyway (the accepted path's rows), so they are plain decoding's, up to
        floating-point rounding; each costs a softmax over the vocabulary (~0.6 ms for 49,152 tokens).
        ``prompt_logprobs=True``: ``.prompt_logprobs`` likewise for the prompt's tokens 1 .. n-1 (the
        prefill computes every row of the prompt; scoring a text without generating: ``max_new_tokens=1``).

        ``presence_penalty`` / ``frequency_penalty`` (OpenAI's, in [-2, 2]): every logit minus the first
        if its token was generated before, minus the second times its count (generated tokens only, as
        vLLM). Medusa verifies against the penalized logits, each tree node penalized by its own path,
        so greedy Medusa still emits plain greedy decoding's tokens under the same penalties.

        ``chat_template_kwargs`` (a chat prompt only): more variables for the model's chat template,
        as transformers and vLLM pass them, e.g. ``{"enable_thinking": False}`` for Qwen3. ``tools`` (a
        chat prompt only): the functions the model may call, OpenAI's / transformers' JSON schemas, for
        the chat template to list (one that does not read ``tools`` is refused); the answer's calls:
        ``runtime.toolcalls.split_tool_calls(result.text)`` (Hermes-format models: Qwen2.5, Qwen3).

        ``response_format`` (OpenAI's): ``{"type": "json_object"}`` (any JSON object) or ``{"type":
        "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` constrains the answer to that
        format, as ``{"type": "grammar", "grammar": LARK}`` does to a grammar of llguidance's Lark
        (llguidance's mask on every position's logits, each tree node's after its own path:
        greedy Medusa still emits plain greedy decoding's tokens under the same format;
        :mod:`runtime.grammar`); ``{"type": "text"}`` or None: free text. Needs the ``structured``
        extra; constrained steps compute every row's float logits (no lm_head screen).
        """
        ids, cfg, t = self._plan(**_decode_args(locals()))
        tokens: list[int] = []
        lps: list[TokenLogprob] | None = [] if cfg.logprobs is not None else None
        stats = DecodeStats()
        scored = None
        for event in self._generate_events(ids, cfg, t):
            tokens.extend(event.tokens)
            if lps is not None and event.logprobs is not None:
                lps.extend(event.logprobs)
            if event.prompt_logprobs is not None:  # the first event's
                scored = event.prompt_logprobs
            stats = event.stats
        return Generation(self.tokenizer.decode(tokens), tokens, len(ids), stats, lps, scored)


def load(
    artifact_dir: str | Path,
    backend: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    max_context: int | None = None,
    tree=None,
    prefill_chunk: int | None = None,
    verify: bool = False,
    max_batch: int | None = None,
    budgets="auto",
    reuse_prefix: bool = True,
) -> MedusaGenerator:
    """Load an artifact folder written by ``medusa-export``.

    max_batch: None (the default) decodes one sequence per engine call (concurrent calls take
    turns, see the concurrency contract); N >= 1 serves up to N concurrent ``generate`` /
    ``stream`` calls (from N threads) with their steps batched into one engine call each, through
    the artifact's ``batch.onnx`` (runtime/batch.py; ONNX Runtime on the CPU). Greedy answers are
    the ones each call gives alone. ``budgets`` (max_batch only): how many tokens a step may
    verify by load: ``"auto"`` (from a cost profile timed at load, ~2 s, and the acceptance seen),
    a list (``budgets[k]`` when k + 1 sequences decode) or None (no limit).

    backend: ``auto`` (TensorRT where the artifact has engines, tensorrt imports and a GPU is
    visible, else ONNX Runtime; logged, and kept in ``.backend_name``), ``onnxruntime`` or ``tensorrt``. device (ONNX Runtime): auto, cpu, cuda.
    prefill_chunk: prompt tokens per prefill call (0: the whole prompt at once; None: 512, with
    ``max_batch`` 128, so that the others wait for one chunk at a time); bounds the prefill's memory
    for long prompts. Every load checks the config, that each file it names
    exists, parses and has the size the export recorded, and that the graphs' sizes match the
    config; ``verify=True`` also checks every file's sha256 (about 0.5 s for SmolLM2-135M).
    reuse_prefix: a call whose prompt begins with what an earlier call's prompt and answer were
    (the next turn of a chat, the same system prompt) keeps those cache entries and prefills only
    the rest (``stats.cached_prompt_tokens``): the previous call's, or with ``max_batch`` a free
    slot's (the one whose chat the prompt continues, see ``BatchEngine._choose_slot``); False:
    every call prefills its whole prompt.
    """
    backend = checks.choice("backend", backend, BACKENDS)  # checked whichever path loads
    device = checks.choice("device", device, DEVICES)
    if prefill_chunk is not None:
        prefill_chunk = check_prefill_chunk(prefill_chunk)
    if max_batch is not None:
        max_batch = cast(int, checks.integer("max_batch", max_batch, 1))
        if backend == "tensorrt":
            raise MedusaError(
                "max_batch batches through batch.onnx on ONNX Runtime; backend='tensorrt' runs one sequence"
            )
        if device == "cuda":
            raise MedusaError("max_batch runs batch.onnx on the CPU provider here: use device='cpu' or 'auto'")
        from runtime.batch import load_batched

        return load_batched(artifact_dir, max_batch, threads=threads, max_context=max_context, tree=tree,
                            prefill_chunk=prefill_chunk, verify=verify, budgets=budgets,
                            reuse_prefix=reuse_prefix)  # fmt: skip
    return MedusaGenerator(
        artifact_dir,
        backend=backend,
        device=device,
        threads=threads,
        max_context=max_context,
        tree=tree,
        prefill_chunk=DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk,
        verify=verify,
        reuse_prefix=reuse_prefix,
    )
