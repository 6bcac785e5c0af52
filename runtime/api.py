"""``runtime.load(artifact)`` and the generator object users call in production.

    import runtime
    gen = runtime.load("artifacts/smollm2-135m-medusa")
    out = gen.generate([{"role": "user", "content": "Name three rivers."}], max_new_tokens=128)
    print(out.text, out.stats.mean_accepted, out.stats.tokens_per_s)
    for piece in gen.stream("Once upon a time"):
        print(piece.text, end="", flush=True)

One loaded generator holds one KV cache. Concurrent callers are serialized by a lock
(each call runs whole, one after the other), so they never see each other's cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from runtime.artifact import ArtifactConfig, read_artifact
from runtime.backend import Backend
from runtime.decode import (
    DEFAULT_DELTA, DEFAULT_EPSILON, DEFAULT_LOOKUP, DEFAULT_PREFILL_CHUNK, DecodeConfig, DecodeStats, check_prefill_chunk, decode_steps,
)
from runtime.errors import MedusaError
from runtime.tokenizer import StreamDecoder, Tokenizer
from runtime.tree import Tree, build_tree, load_tree

Prompt = str | Sequence[int] | Sequence[dict]


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    stats: DecodeStats


@dataclass
class TextChunk:
    """One streamed piece: the text and tokens accepted by one step; ``stats`` so far."""

    text: str
    tokens: list[int]
    stats: DecodeStats


def make_backend(folder: Path, config: ArtifactConfig, backend: str, device: str, threads: int | None,
                 max_context: int | None) -> Backend:
    if backend == "auto":
        fused = config.flavour == "fused"
        backend = "tensorrt" if not fused and _has_engines(folder) and _has_tensorrt() else "onnxruntime"
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

        return TensorRTBackend.from_artifact(folder, config, max_context=max_context)
    raise MedusaError(f"unknown backend {backend!r}: use auto, onnxruntime or tensorrt")


def _has_engines(folder: Path) -> bool:
    """Engines built by ``medusa-export build-engine`` or by the written trtexec.sh."""
    from exporter.trt_plan import PLAN_FILE, PlanError, read_plan

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


class MedusaGenerator:
    def __init__(self, folder: str | Path, backend: str = "auto", device: str = "auto", threads: int | None = None,
                 max_context: int | None = None, tree: str | Sequence | Tree | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)  # before loading: a bad value fails fast
        self.folder = Path(folder)
        self.config = read_artifact(self.folder)
        self.tokenizer = Tokenizer(self.folder)
        self.backend = make_backend(self.folder, self.config, backend, device, threads, max_context)
        self.default_tree = self._artifact_tree() if tree is None else self._tree(tree)
        self._lock = threading.Lock()

    @property
    def spec(self):
        return self.config.model

    def _artifact_tree(self) -> Tree:
        """The tree recorded at export (its paths are stored, so it loads even if renamed)."""
        if self.config.default_tree_paths:
            return build_tree(self.config.default_tree_paths, name=self.config.default_tree,
                              num_heads=self.spec.num_medusa_heads)
        return load_tree(self.config.default_tree, num_heads=self.spec.num_medusa_heads)

    def _tree(self, tree) -> Tree:
        return self.default_tree if tree is None else load_tree(tree, num_heads=self.spec.num_medusa_heads)

    def encode(self, prompt: Prompt) -> list[int]:
        """A prompt string (encoded as is), chat messages (chat template applied) or token ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif len(prompt) and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.apply_chat_template(list(prompt))
        elif all(isinstance(t, int) or hasattr(t, "__index__") for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise MedusaError("prompt must be a string, a list of chat messages ({'role', 'content'}) or token ids")
        if not ids:
            raise MedusaError("the prompt is empty")
        return ids

    def _events(self, prompt, max_new_tokens, temperature, epsilon, delta, tree, stop, seed, medusa,
                acceptance="exact", top_k=0, top_p=1.0, lookup=DEFAULT_LOOKUP):
        """(prompt ids, the decode loop's events): the one path under stream() and generate()."""
        ids = self.encode(prompt)
        cfg = DecodeConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, acceptance=acceptance, top_k=top_k, top_p=top_p,
            epsilon=epsilon, delta=delta, medusa=medusa, lookup=lookup,
            seed=seed, eos_token_ids=tuple(self.spec.eos_token_ids),
            stop_strings=tuple([stop] if isinstance(stop, str) else stop), prefill_chunk=self.prefill_chunk,
        )
        t = self._tree(tree) if medusa else None
        return ids, decode_steps(self.backend, ids, cfg, t, decode_text=self.tokenizer.decode)

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0,
               epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA, tree=None, stop: Sequence[str] | str = (),
               seed: int | None = None, medusa: bool = True, acceptance: str = "exact", top_k: int = 0,
               top_p: float = 1.0, lookup: int = DEFAULT_LOOKUP) -> Iterator[TextChunk]:
        """Yield text as it is accepted (one chunk per step). Holds the lock while iterating."""
        _, events = self._events(prompt, max_new_tokens, temperature, epsilon, delta, tree, stop, seed, medusa,
                                 acceptance, top_k, top_p, lookup)
        text = StreamDecoder(self.tokenizer)
        with self._lock:
            for event in events:
                yield TextChunk(text.push(event.tokens), event.tokens, event.stats)
        tail = text.flush()
        if tail:
            yield TextChunk(tail, [], event.stats)

    def generate(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0,
                 epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA, tree=None,
                 stop: Sequence[str] | str = (), seed: int | None = None, medusa: bool = True,
                 acceptance: str = "exact", top_k: int = 0, top_p: float = 1.0,
                 lookup: int = DEFAULT_LOOKUP) -> Generation:
        """Decode a whole answer: text, tokens and statistics (text decoded once, at the end).

        ``temperature`` 0 decodes greedily (Medusa's output equals plain greedy decoding's).
        Above 0 it samples from the backbone's distribution at that temperature (after
        ``top_k`` / ``top_p`` cuts): ``acceptance="exact"`` (the default) verifies the tree by
        speculative sampling, so the tokens follow exactly the law plain sampling gives;
        ``"typical"`` is Medusa's typical acceptance (``epsilon``, ``delta``): accepts more,
        but the output no longer follows the backbone's distribution.

        ``lookup``: draft tokens per Medusa step copied from the context (where its latest
        n-gram occurred before), as one more branch of the tree; 0 turns it off. Lossless
        like every draft: the backbone verifies it.
        """
        ids, events = self._events(prompt, max_new_tokens, temperature, epsilon, delta, tree, stop, seed, medusa,
                                   acceptance, top_k, top_p, lookup)
        tokens: list[int] = []
        stats = DecodeStats()
        with self._lock:
            for event in events:
                tokens.extend(event.tokens)
                stats = event.stats
        return Generation(self.tokenizer.decode(tokens), tokens, len(ids), stats)


def load(artifact_dir: str | Path, backend: str = "auto", device: str = "auto", threads: int | None = None,
         max_context: int | None = None, tree=None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> MedusaGenerator:
    """Load an artifact folder written by ``medusa-export``.

    backend: ``auto`` (TensorRT when the artifact has an engine and tensorrt is installed,
    else ONNX Runtime), ``onnxruntime`` or ``tensorrt``. device (ONNX Runtime): auto, cpu, cuda.
    prefill_chunk: prompt tokens per prefill call (0: the whole prompt at once); bounds the
    prefill's memory for long prompts.
    """
    return MedusaGenerator(artifact_dir, backend=backend, device=device, threads=threads, max_context=max_context,
                           tree=tree, prefill_chunk=prefill_chunk)
