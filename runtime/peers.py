"""onnxruntime-genai as a peer (``medusa-run bench/profile --peer ortgenai``).

Users weigh this runtime against plain decoding with onnxruntime-genai, Microsoft's
generate() loop over ONNX Runtime. To compare like with like, the peer decodes the same
Hugging Face model the artifact was exported from, at the same weight precision, on the
same CPU threads and prompt token ids, and is timed by the same clock as our runs. Its
graph comes from onnxruntime-genai's own model builder (run once, as a subprocess, and
cached), so the comparison is against what a user of that library would actually deploy.

onnxruntime-genai is an optional extra (``pip install -e .[peers]``): it is imported
inside the functions that need it, never at module level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime import hugepages
from runtime.bench import RunResult, _peer_model_path
from runtime.decode import common_prefix
from runtime.errors import MedusaError
from runtime.onnxrt import _bind, _options, _ort
from runtime.profile import round_robin_ms

log = logging.getLogger("medusa_trt.runtime")

NAME = "ortgenai"
MISSING = f"--peer {NAME} needs onnxruntime-genai: pip install -e .[peers]"
# artifact precision -> the model builder's precision for the CPU, where the builder makes
# fp32, int8 and int4 graphs only (its own list of valid combinations)
BUILDER_PRECISION = {"fp32": "fp32", "int8": "int8", "int4": "int4"}
# onnxruntime-genai's n-gram speculation (drafts looked up from earlier in the sequence, prompt
# included, then verified by the model in one call): its n-gram size and drafted tokens per step, the
# best of (3, 4), (3, 8), (4, 6), (5, 8) for SmolLM2-135M on held-out Alpaca prompts of the tuning split
# (2026-12-02, 2 x 24 prompts, 256 tokens, interleaved: 1.274x / 1.277x its plain against 1.220x / 1.255x
# for (3, 4), used until then; docs/results/README.md, session 22)
NGRAM_SIZE = 4
MAX_DRAFT_TOKENS = 6
GRAPH_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
BUILD_LOG = "builder.log"
# the n-gram run's counters kept per prompt (onnxruntime-genai's get_speculative_stats names)
DRAFT_COUNTERS = ("draft_tokens_proposed", "draft_tokens_accepted")


def import_genai():
    """``onnxruntime_genai``, or the one-line MedusaError saying how to install it."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise MedusaError(MISSING) from None
    return onnxruntime_genai


def builder_precision(precision: str) -> str:
    """The builder's ``-p`` for an artifact's ``precision``: the peer must compute as we do."""
    try:
        return BUILDER_PRECISION[precision]
    except KeyError:
        raise MedusaError(
            f"--peer {NAME}: onnxruntime-genai's model builder makes no {precision} graph for the CPU; "
            f"compare an artifact exported with --precision {', '.join(BUILDER_PRECISION)}"
        ) from None


def _cache_key(hf_folder: Path, precision: str, version: str) -> str:
    """Changes whenever the built graph could: another folder, other weights or config (by
    size: cheap, and a re-conversion or fine-tune changes it), precision or builder version."""
    files = sorted(p for p in hf_folder.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    key = {
        "folder": str(hf_folder.resolve()),
        "files": {p.name: p.stat().st_size for p in files},
        "precision": precision,
        "onnxruntime-genai": version,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def build_peer_model(hf_folder: str | Path, precision: str) -> Path:
    """The onnxruntime-genai model folder (graph + genai_config.json) for ``hf_folder`` at the
    artifact's ``precision``: built once with onnxruntime-genai's model builder, then reused.

    It lives in ``$MEDUSA_TRT_CACHE/ortgenai/<name>-<precision>-<key>`` and appears there whole
    or not at all (built in a temporary folder, then renamed), so an interrupted build is
    rebuilt rather than half-used. The builder's output goes to ``builder.log`` in that folder
    and is shown only when the build fails (its whole log then stays beside the folder, in
    ``<folder>.failed.log``).
    """
    from runtime.paths import cache_dir

    og = import_genai()
    hf_folder = Path(hf_folder)
    if not (hf_folder / "config.json").is_file():
        raise MedusaError(
            f"--peer {NAME}: {hf_folder} is not a Hugging Face model folder (no config.json); pass --peer-model DIR"
        )
    target = builder_precision(precision)
    dest = cache_dir() / NAME / f"{hf_folder.name}-{target}-{_cache_key(hf_folder, target, og.__version__)}"
    if (dest / GENAI_CONFIG).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    log.info(
        "building the onnxruntime-genai %s graph of %s with its model builder (once; cached in %s) ...",
        target,
        hf_folder,
        dest,
    )
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_folder),
        "-o",
        str(tmp),
        "-p",
        target,
        "-e",
        "cpu",
        "-c",
        str(tmp / "builder_cache"),
    ]
    # the folder is local: never let the builder (transformers) reach for the Hub
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t = time.perf_counter()
    try:
        with open(tmp / BUILD_LOG, "w") as out:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0 or not (tmp / GENAI_CONFIG).is_file() or not (tmp / GRAPH_FILE).is_file():
            failed = dest.with_name(dest.name + ".failed.log")
            os.replace(tmp / BUILD_LOG, failed)
            tail = "\n".join(failed.read_text(errors="replace").splitlines()[-25:])
            raise MedusaError(
                f"onnxruntime-genai's model builder failed on {hf_folder} (exit code {code}; "
                f"full log: {failed}):\n{tail}"
            )
        shutil.rmtree(tmp / "builder_cache", ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / GENAI_CONFIG).is_file():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s in %.1f s", dest, time.perf_counter() - t)
    return dest


def peer_model_dir(gen, peer_model: str | None = None) -> Path:
    """The peer graph for ``gen``'s artifact: its source model (or ``peer_model``) at its precision.

    Every check a user can fail comes before the build: the package, the device, the precision.
    """
    import_genai()
    providers = getattr(gen.backend, "providers", None) or []
    if not providers or providers[0] != "CPUExecutionProvider":
        raise MedusaError(
            f"--peer {NAME} runs onnxruntime-genai on the CPU: run this side on the CPU too "
            "(--backend onnxruntime --device cpu)"
        )
    precision = builder_precision(gen.config.precision)
    return build_peer_model(_peer_model_path(gen, peer_model), precision)


PEER_WEIGHTS = "onnxruntime-genai's model"


class OrtGenaiPeer:
    """Decoding with onnxruntime-genai (``og.Generator``): greedy, plain or with its n-gram speculation,
    or plain sampling at a temperature."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, huge_pages: bool = False):
        og = import_genai()
        self.og = og
        self.version = f"onnxruntime-genai {og.__version__}"
        self.model_dir = Path(model_dir)
        eos = json.loads((self.model_dir / GENAI_CONFIG).read_text())["model"]["eos_token_id"]
        self.eos_token_ids = set(eos) if isinstance(eos, list) else {eos}
        config = og.Config(str(self.model_dir))
        if threads:
            # the same intra-op threads as our sessions (runtime.onnxrt._options); overlaid at load
            # so the cached folder serves every thread count
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        # as its users run it by default; huge_pages: its weights backed by huge pages as ours are
        # (runtime.hugepages), for a like-for-like run
        with hugepages.backing(PEER_WEIGHTS, on=huge_pages) as self.huge_pages:
            self.model = og.Model(config)
        self.ngram_unavailable = self._ngram_support()

    def _ngram_support(self) -> str | None:
        """None when this onnxruntime-genai speculates with n-grams, else the reason it cannot."""
        params = self.og.GeneratorParams(self.model)
        if not hasattr(params, "set_speculative_options"):
            return f"{self.version} has no GeneratorParams.set_speculative_options"
        try:
            params.set_speculative_options(ngram_size=NGRAM_SIZE, max_draft_tokens=MAX_DRAFT_TOKENS)
        except Exception as e:  # the binding reports unknown options as plain RuntimeErrors
            return f"{self.version} refuses n-gram speculation: {e}"
        return None

    def run(self, ids: Sequence[int], max_new_tokens: int, ngram: bool = False, temperature: float = 0.0,
            seed: int | None = None, json_schema: str | None = None) -> RunResult:  # fmt: skip
        """Decode ``max_new_tokens`` after ``ids`` (fewer when the model's EOS comes first): greedily,
        or, with ``temperature`` > 0, sampling from the whole distribution at that temperature
        (``top_k=0``, ``top_p=1``: the law our plain sampling draws from; ``random_seed`` ``seed``);
        ``json_schema`` (JSON text): constrained to it by its own guidance (llguidance inside), as
        our ``response_format`` constrains ours.

        Timed like ``runtime.bench._run``: from the prompt ids going in to the last token out
        (``first_token_s``: to the first new token).
        Creating the generator (it allocates its KV cache) is left outside the clock, as our
        cache is allocated at load: that favours the peer by a few ms per prompt. The EOS that
        ends a decode is counted, as our decode counts it: onnxruntime-genai does not append it
        to the sequence, but it did generate it (``get_next_tokens``).
        """
        og = self.og
        params = og.GeneratorParams(self.model)
        if temperature > 0:
            # top_k 0: no cut (in 0.18 it draws what top_k = the vocabulary size draws; its default is 50)
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            params.set_search_options(max_length=len(ids) + max_new_tokens, **sampling,
                                      **({} if seed is None else {"random_seed": seed}))  # fmt: skip
        else:
            params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        if ngram:
            params.set_speculative_options(ngram_size=NGRAM_SIZE, max_draft_tokens=MAX_DRAFT_TOKENS)
        if json_schema is not None:
            params.set_guidance("json_schema", json_schema)
        generator = og.Generator(self.model, params)
        t = time.perf_counter()
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        tokens, seconds, first = self._decode(generator, len(ids), max_new_tokens, t)
        stats = generator.get_speculative_stats() if ngram else {}
        drafts = {k: int(stats[k]) for k in DRAFT_COUNTERS if k in stats}
        return RunResult(tokens, seconds, drafts=drafts, first_token_s=first)

    def _decode(
        self, generator, prompt_len: int, max_new_tokens: int, t: float
    ) -> tuple[list[int], float, float | None]:
        """Generate after a prompt of ``prompt_len`` tokens (appended at clock time ``t``) until the
        generator is done or ``max_new_tokens`` came: ``(tokens, seconds, seconds to the first)``, an
        ending EOS counted (see :meth:`run`)."""
        first = None
        while not generator.is_done() and generator.token_count() < prompt_len + max_new_tokens:
            generator.generate_next_token()
            first = first if first is not None else time.perf_counter() - t
        seconds = time.perf_counter() - t
        tokens = [int(x) for x in generator.get_sequence(0)[prompt_len : prompt_len + max_new_tokens]]
        last = int(generator.get_next_tokens()[0])
        if len(tokens) < max_new_tokens and last in self.eos_token_ids:
            tokens.append(last)
        return tokens, seconds, first

    def chat(self, turns: Sequence[Sequence[int]], max_new_tokens: int, ngram: bool = False) -> list[RunResult]:
        """Greedy decoding (``ngram``: with its n-gram speculation) of a conversation's turns on **one**
        generator: each turn's prompt ids (the whole conversation so far, as a chat client resends it)
        rewind the generator to the prefix its sequence shares with them (``Generator.rewind_to``)
        and append the rest (``append_tokens``), so the KV cache of the earlier turns is kept, as our
        prefix reuse keeps ours. (This harness is ours, on onnxruntime-genai's API; its own chat
        example appends each new turn's tokens alone, which keeps the same cache.) Each turn is timed
        like :meth:`run` (its ``seconds``; ``first_token_s``: to its first new token); ``cached`` is the
        prompt tokens the turn kept; ``drafts``: the turn's speculation counters. (One generator has
        one length limit, the longest turn's: a shorter turn's last verification may draft past its
        own ``max_new_tokens``, inside its clock; the next rewind drops those tokens.)"""
        if not turns:
            return []
        if not all(len(t) for t in turns):
            raise MedusaError(f"--peer {NAME}: a chat turn with an empty prompt")
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=max(len(t) for t in turns) + max_new_tokens, do_sample=False)
        if ngram:
            params.set_speculative_options(ngram_size=NGRAM_SIZE, max_draft_tokens=MAX_DRAFT_TOKENS)
        generator = og.Generator(self.model, params)
        out: list[RunResult] = []
        fed = 0  # the sequence's tokens the KV cache holds
        for ids in turns:
            held = [int(x) for x in generator.get_sequence(0)]
            keep = min(common_prefix(held, ids), fed, len(ids) - 1)
            t = time.perf_counter()
            if keep < len(held):
                generator.rewind_to(keep)
            generator.append_tokens(np.asarray(ids[keep:], dtype=np.int32))
            before = generator.get_speculative_stats() if ngram else {}  # (a rewind may reset them)
            tokens, seconds, first = self._decode(generator, len(ids), max_new_tokens, t)
            # the cache holds the prompt and every new token but the last: a last token cut by the length
            # was never fed, and an EOS (fed neither) is not in the sequence
            fed = len(ids) + len(tokens) - 1
            stats = generator.get_speculative_stats() if ngram else {}
            drafts = {k: int(stats[k]) - int(before.get(k, 0)) for k in DRAFT_COUNTERS if k in stats}
            out.append(RunResult(tokens, seconds, first_token_s=first, cached=keep, drafts=drafts))
        return out


# ---------------------------------------------------------------------------- profile


def _np_dtype(ort_type: str):
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    if ort_type not in types:
        raise MedusaError(f"--peer {NAME}: the builder's KV cache is {ort_type}, which this profile does not feed")
    return types[ort_type]


def profile_peer_sizes(
    model_dir: str | Path,
    sizes: Sequence[int],
    cached: int = 256,
    repeats: int = 7,
    warmup: int = 2,
    threads: int | None = None,
) -> dict:
    """Median time of one forward of N new tokens over ``cached`` cached tokens, per N, for the
    builder's graph: the step cost onnxruntime-genai pays per verification (N > 1, its n-gram
    drafts) or plain step (N = 1), to set beside :func:`runtime.profile.profile_tree_sizes`.

    The graph runs with plain ONNX Runtime as onnxruntime-genai runs it on the CPU: the KV cache
    is one buffer per layer bound as both past and present (``past_present_share_buffer``),
    ``attention_mask`` is ones over cache + new tokens (the new tokens attend causally inside
    GroupQueryAttention), and each timed call stages its tokens after the cache without
    growing it.
    """
    model_dir = Path(model_dir)
    ort = _ort()
    genai = json.loads((model_dir / GENAI_CONFIG).read_text())["model"]
    context, vocab, decoder = genai["context_length"], genai["vocab_size"], genai["decoder"]
    layers, kv_heads, head_dim = decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]
    names, outputs = decoder["inputs"], decoder["outputs"]
    cache_names = [
        (names[f"past_{kv}_names"] % i, outputs[f"present_{kv}_names"] % i)
        for kv in ("key", "value")
        for i in range(layers)
    ]
    session = ort.InferenceSession(
        str(model_dir / decoder["filename"]), _options(ort, threads, spin=True), providers=["CPUExecutionProvider"]
    )
    inputs = {i.name: i for i in session.get_inputs()}
    expected = {names["input_ids"], names["attention_mask"], *(past for past, _ in cache_names)}
    if set(inputs) != expected:
        raise MedusaError(
            f"--peer {NAME}: {model_dir / decoder['filename']} takes {sorted(set(inputs) - expected)} "
            "besides input_ids, attention_mask and the KV cache; this profile does not feed those"
        )
    logits_name = outputs["logits"]
    dtype = _np_dtype(inputs[cache_names[0][0]].type)
    if cached + max(sizes) > context:
        cached = context - max(sizes)
    capacity = cached + max(sizes)
    kv = np.zeros((len(cache_names), 1, kv_heads, capacity, head_dim), dtype)
    io = session.io_binding()
    for buf, (past, present) in zip(kv, cache_names):
        io.bind_input(past, "cpu", 0, dtype, list(buf.shape), buf.ctypes.data)
        io.bind_output(present, "cpu", 0, dtype, list(buf.shape), buf.ctypes.data)

    def step(ids: np.ndarray, total: int) -> tuple:
        """A call's host buffers, made before the clock starts (as our backend's are reused)."""
        return ids[None], np.ones((1, total), dtype=np.int64), np.empty((1, len(ids), vocab), dtype)

    def forward(buffers: tuple) -> None:
        ids, mask, logits = buffers
        _bind(io.bind_input, names["input_ids"], ids)
        _bind(io.bind_input, names["attention_mask"], mask)
        _bind(io.bind_output, logits_name, logits)
        session.run_with_iobinding(io)

    rng = np.random.default_rng(0)
    forward(step(rng.integers(0, vocab, cached), cached))  # fills the cache's first `cached` rows
    calls = {n: step(rng.integers(0, vocab, n), cached + n) for n in sizes}
    ms = round_robin_ms(lambda n: forward(calls[n]), sizes, repeats, warmup, rng)
    base = ms[min(sizes)]
    return {
        "name": NAME,
        "version": f"onnxruntime-genai {import_genai().__version__}, onnxruntime {ort.__version__}",
        "model": str(model_dir),
        "cached_tokens": cached,
        "repeats": repeats,
        "ms": {str(n): round(v, 3) for n, v in ms.items()},
        "relative_cost": {str(n): round(v / base, 4) for n, v in ms.items()},
    }
