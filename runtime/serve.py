"""``medusa-run serve``: an OpenAI-compatible HTTP server over one loaded artifact.

    medusa-run serve artifacts/smollm2-135m-medusa --port 8000 --max-batch 4 --max-queue 16

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m-medusa", messages=[...], temperature=0)

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (server-sent events with
``stream: true``; ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop`` (the text ends before it), usage
counts, ``stream_options.include_usage``, log-probabilities: ``logprobs`` and ``top_logprobs``
(chat), ``logprobs: k`` and ``echo`` (completions: the prompt's tokens scored too; with
``max_tokens: 0``, scored only, as evaluation harnesses ask), ``n`` choices (one sequence each,
choice i seeded ``seed + i``), ``presence_penalty`` / ``frequency_penalty``), ``/v1/models``, ``/health``
and ``/metrics``
(Prometheus text format). FastAPI on uvicorn does the HTTP; this module does the rest.
Log-probabilities are the backbone's (softmax at temperature 1, before temperature and
``top_p``), read from the logits Medusa's verification computes anyway: the ones plain
decoding gives, up to floating-point rounding.

Scheduling. Requests wait in a bounded queue (``--max-queue``; a full queue answers 429 at
once) and ``--max-batch`` workers take them; each worker runs one request's
:meth:`MedusaGenerator.stream`. Where the artifact has a batch graph (``batch.onnx``: fused
float exports), the generator is ``runtime.load(..., max_batch=N)`` (runtime/batch.py): the
running requests' steps, each with its own cache length, tree and acceptance, go to the engine
as **one call** (continuous batching: requests join and leave between steps, a newcomer's
prompt is prefilled a chunk at a time between the others' steps), and each request's tree
budget follows the load (a smaller tree, or plain steps, as more requests decode). Otherwise
(``--batching interleave``, or int8/int4 and portable artifacts) the running requests take turns on the
generator's one KV cache, one engine call per step (runtime/api.py's concurrency contract).
Either way each request sees only its own sequence: greedy answers equal offline ``generate``,
and a seed reproduces a sampled answer (batched: where it runs alone; beside others the logits'
last bits may differ, which a near-tie can turn into another token: runtime/batch.py). To scale
out, ``--ray-replicas N`` serves the same app as a Ray Serve deployment of N processes behind
Ray's HTTP proxy (:func:`serve_ray`). A client that disconnects frees its slot at the next step,
streamed or not. On SIGTERM the server stops accepting connections, answers the queued requests
503 at once and lets the running ones finish (up to ``--graceful-timeout``); those still running
then get a 503 error in OpenAI's body (a stream: as its last event); nothing hangs.

Request forms other OpenAI-compatible servers take are taken too: null for ``temperature``,
``top_p``, ``stream`` (and the other "or null" fields: their defaults), message content as a list
of text parts (joined by newlines), the ``developer`` role (the template's ``system``), any integer
``seed`` (a negative one seeds as ``seed mod 2**64``), a list of prompts (texts or token-id lists:
prompt ``p``'s choice ``j`` is choice ``p * n + j``, as OpenAI's),
``GET /v1/models/{id}``, ``HEAD`` on ``/health`` and ``/v1/models`` (load balancers' probes), a
JSON body whatever its Content-Type (``curl -d`` sends form encoding), and
OpenAI's fields this server has no use for at the values that ask for nothing (``logit_bias: {}``,
``tools: []``, ...; any other value is a 400 naming the field as unsupported). Chat requests also take
OpenAI's ``response_format`` (``json_object``, ``json_schema``: :mod:`runtime.grammar`), vLLM's
``chat_template_kwargs`` (more variables for the chat template: ``{"enable_thinking": false}`` for
Qwen3), and with ``--tool-call-parser hermes`` OpenAI's function calling: ``tools`` go to the chat
template, calls in the answer come back as the message's ``tool_calls`` (:mod:`runtime.toolcalls`),
and the conversation's earlier calls and results (assistant ``tool_calls``, ``tool`` messages) go
back to the template.

Access (:class:`Access`): with ``--api-key`` (or ``MEDUSA_API_KEY``) every request but ``/health``
and ``/metrics`` must send ``Authorization: Bearer KEY``, as OpenAI's API and vLLM's;
``--allowed-origins`` lets browser pages of those origins call the API (CORS).

Errors follow OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed JSON, unknown fields, values of the wrong JSON type (no coercion: ``true`` is not 1),
bad values, empty
prompts and prompts longer than the context, 401 for a missing or wrong API key, 404 for an
unknown model or path, 413 for a body
over ``MAX_BODY_BYTES``, 429 when the queue is full, 503 while shutting down. Server-wide mistakes (a bad ``--tree``, a port in use)
fail at startup, before the banner.
"""

import asyncio
import codecs
import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

from runtime.decode import MAX_LOGPROBS, check_fits
from runtime.errors import Cancelled, ConfigError, ContextLengthError, EngineError, MedusaError
from runtime.reasoning import PARSERS as REASONING_PARSERS
from runtime.reasoning import ThinkSplit, partial_tail
from runtime.tokenizer import check_template_kwargs
from runtime.toolcalls import PARSERS as TOOL_CALL_PARSERS
from runtime.toolcalls import ToolCall, ToolCallSplit, forced_call_grammar

log = logging.getLogger("medusa_trt.runtime")

# DecodeStats.finish_reason -> OpenAI's
FINISH = {"eos": "stop", "stop_string": "stop", "length": "length", "context": "length"}
MAX_STOPS = 4  # OpenAI's limit on stop sequences
RETRY_AFTER_S = 1  # the Retry-After header of a 429 (queue full) or 503 (shutting down), in seconds
COMPLETION_MAX_TOKENS = 16  # /v1/completions' max_tokens where a request gives none (OpenAI's and vLLM's default)
UNION_TAGS = ("str", "int", "float", "bool")  # pydantic's names of a union's members in an error's location
MAX_TOP_LOGPROBS = MAX_LOGPROBS  # chat's top_logprobs at most (OpenAI's limit, 20)
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs at most (OpenAI's limit)
MAX_N = 128  # choices a request at most (OpenAI's limit); each is a sequence of its own, queued at once
MAX_BODY_BYTES = 32 << 20  # a request body declaring more is refused (413) before it is read
DISCONNECT_POLL_S = 0.25  # how often a request that is not streamed checks that its client is still there
CUT_SLACK_S = 2  # at shutdown, after --graceful-timeout: time for the requests cut off to send their errors
GIB = 1 << 30
CACHE_MEMORY_SHARE = 0.9  # of the memory free after loading, what the KV caches at their peak may take
SEED_MODULUS = 1 << 64  # a negative seed (OpenAI takes any integer) seeds as seed mod 2**64
PROMPT_TAIL_TOKENS = 8  # the prompt's last tokens --reasoning-parser reads (does it end inside a <think> block?)


def _json_object(text: str) -> Any:
    """A call's ``arguments`` for the chat template: the object its JSON text states, else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def require_serve():
    """fastapi, uvicorn, prometheus_client, or one MedusaError naming the extra."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MedusaError(
            f"medusa-run serve needs fastapi, uvicorn and prometheus-client ({e.name} is missing): "
            "pip install 'medusa-trt[serve]'"
        ) from None


BATCHING = ("auto", "batch", "interleave")


def load_for_serving(artifact, max_batch: int, batching: str = "auto", **load):
    """The generator a server runs: batched through the artifact's ``batch.onnx``
    (``runtime.load(..., max_batch=max_batch)``) where ``batching`` is ``batch``, or ``auto`` and
    the artifact has one and runs on ONNX Runtime's CPU provider; else one sequence per engine call
    (``interleave``). ``load``: ``runtime.load``'s other arguments."""
    import runtime
    from runtime.artifact import read_artifact

    cpu_ort = check_batching(batching, load.get("backend", "auto"), load.get("device", "auto"))
    config = read_artifact(artifact)
    if batching == "batch" and config.batch is None:
        raise MedusaError(
            f"{artifact} has no batch graph (batch.onnx; fused float artifacts get one at export): re-export it, "
            "or serve with --batching interleave"
        )
    if _batches(batching, config, cpu_ort):
        rest = {k: v for k, v in load.items() if k not in ("backend", "device")}
        return runtime.load(artifact, max_batch=max_batch, **rest)
    return runtime.load(artifact, **load)


def _batches(batching: str, config, cpu_ort: bool) -> bool:
    """Whether load_for_serving loads the batched generator (batch.onnx) for ``batching``."""
    return batching == "batch" or (batching == "auto" and config.batch is not None and cpu_ort)


def check_batching(batching: str, backend: str = "auto", device: str = "auto") -> bool:
    """``batching`` checked against the engine flags, before anything loads; returns whether the
    engine may be ONNX Runtime's CPU provider (what the batch graph runs on). ``batch`` with
    ``--backend tensorrt`` or ``--device cuda`` is refused: it would run on the CPU regardless."""
    if batching not in BATCHING:
        raise MedusaError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
    cpu_ort = backend in ("auto", "onnxruntime") and device in ("auto", "cpu")
    if batching == "batch" and not cpu_ort:
        flag = f"--backend {backend}" if backend not in ("auto", "onnxruntime") else f"--device {device}"
        raise MedusaError(
            f"--batching batch runs the artifact's batch.onnx on ONNX Runtime's CPU provider, not with {flag}: "
            f"drop one of the two (--batching interleave serves with {flag}, one request per engine call)"
        )
    return cpu_ort


def available_memory() -> int | None:
    """Bytes this process could get now without swapping: Linux's MemAvailable, or less where a
    cgroup (a container's memory limit) leaves less; None where neither can be read."""
    free = []
    try:
        with open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
                         "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # fmt: skip
        try:
            with open(limit) as a, open(used) as b:
                cap, now = a.read().strip(), b.read().strip()
            if cap.isdigit() and now.isdigit() and int(cap) < 1 << 60:  # "max" / a huge v1 value: no limit
                free.append(max(0, int(cap) - int(now)))
                break
        except OSError:
            continue
    return min(free) if free else None


def grown_positions(context: int, start: int) -> int:
    """The positions a cache buffer growing by doubling from ``start`` to ``context`` holds at its
    peak: the whole context plus the buffer it is copied from (both resident while copying)."""
    previous, size = 0, start
    while size < context:
        previous, size = size, size * 2
    return context + previous


def cache_peak(gen, max_batch: int):
    """``(peak(sequences, context) -> bytes, sequences, context)`` for a server's KV caches in host
    memory, or None where they are not there (TensorRT's live on the GPU and re-run a paused
    sequence's tokens). Batched (runtime/batch.py): one buffer of ``max_batch`` slots growing to
    the whole context. Interleaved: the generator's buffer growing so, and each paused request's
    copy of its used cache (``snapshot``), up to a whole context each."""
    from runtime.backend import Backend

    engine = getattr(gen, "engine", None)
    if engine is not None:
        per_token = engine.full_cache_bytes // (engine.slots * engine.max_context)
        return _batched_peak(per_token, engine.slots, engine.max_context)
    backend = gen.backend
    if type(backend).snapshot is Backend.snapshot:  # no host copies of paused sequences
        return None
    import numpy as np

    from runtime.onnxrt import _NP_DTYPES, START_CAPACITY

    spec = gen.config.model
    per_token = (
        spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * np.dtype(_NP_DTYPES[gen.config.dtype]).itemsize
    )
    peak = lambda n, c: per_token * ((n - 1) * c + grown_positions(c, START_CAPACITY))
    return peak, max_batch, backend.max_context


def check_cache_memory_early(artifact, max_batch: int, batching: str, load: dict, available: int | None) -> None:
    """:func:`check_cache_memory` before anything loads, where the server will batch
    (:func:`load_for_serving`'s choice): the batch engine's load times its graph at every batch size up
    to ``max_batch`` (minutes for hundreds of slots), so a cache that cannot fit is refused first. The
    cache's peak comes from the config, the memory is what is ``available`` before the weights load:
    so this never refuses what the check after the load would pass, which stays the exact one."""
    import numpy as np

    from runtime.artifact import read_artifact
    from runtime.onnxrt import _NP_DTYPES

    if available is None:
        return
    config = read_artifact(artifact)
    if config.batch is None:  # load_for_serving says what is missing (no batch graph) or serves one a call
        return
    if not _batches(
        batching, config, check_batching(batching, load.get("backend", "auto"), load.get("device", "auto"))
    ):
        return
    spec = config.model
    context = min(load.get("max_context") or spec.max_context, spec.max_context)
    per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * np.dtype(_NP_DTYPES[config.dtype]).itemsize
    _check_peak(_batched_peak(int(per_token), max_batch, context), available)


def _batched_peak(per_token: int, slots: int, context: int):
    """cache_peak's answer for a batch engine: one buffer of ``slots`` slots growing to ``context``."""
    from runtime.batch import MIN_CAPACITY

    return (lambda n, c: per_token * n * grown_positions(c, MIN_CAPACITY)), slots, context


def check_cache_memory(gen, max_batch: int, available: int | None, replicas: int = 1) -> str:
    """The server's KV caches at their peak (every request a whole context; see cache_peak)
    against the memory ``available`` after the weights loaded: more than ``CACHE_MEMORY_SHARE``
    of it is refused at startup, naming the ``--max-context`` / ``--max-batch`` that fit, rather
    than the kernel killing the server once the requests run long. ``replicas``: the Ray Serve
    replicas sharing this machine's memory, each checked against its share (1 / ``replicas``), and
    the error names the most replicas that fit too. Returns the banner's note ("" where the caches
    are not in host memory)."""
    found = cache_peak(gen, max_batch)
    return "" if found is None else _check_peak(found, available, replicas)


def _check_peak(found, available: int | None, replicas: int = 1) -> str:
    """check_cache_memory's rule for ``found`` (cache_peak's answer)."""
    peak, n, context = found
    need = peak(n, context)
    note = f"KV cache up to {need / GIB:.1f} GiB ({n} x {context} tokens)"
    if available is None:
        return note
    total = available * CACHE_MEMORY_SHARE  # what every replica's caches may take together
    if need * replicas <= total:
        return note
    room = total / replicas  # this replica's share
    fits_context = _largest(lambda c: peak(n, c) <= room, context)
    fits_batch = _largest(lambda b: peak(b, context) <= room, n)
    fits_replicas = _largest(lambda r: need * r <= total, replicas - 1)
    ways = [f"--max-context {fits_context} or less"] if fits_context else []
    ways += [f"--max-batch {fits_batch} or less"] if fits_batch else []
    ways += [f"--ray-replicas {fits_replicas} or fewer"] if fits_replicas else []
    shared = f", shared by {replicas} replicas" if replicas > 1 else ""
    raise ConfigError(
        f"--max-batch {n} x --max-context {context}: the KV cache reaches {need / GIB:.1f} GiB once every request "
        f"holds a whole context, and {available / GIB:.1f} GiB is free ({CACHE_MEMORY_SHARE:.0%} of it for the "
        f"cache{shared}): use {' or '.join(ways or ['free memory'])}"
    )


def _largest(fits, top: int) -> int:
    """The largest x in [1, top] with fits(x) (fits monotone: true up to some x), or 0."""
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_decode(decode: dict | None, gen=None) -> None:
    """The server-wide decode arguments (``medusa``, ``tree``, ``lookup``, ...: every request
    decodes with them) checked once, at startup: a bad one is one MedusaError before the server
    serves, not a 400 on every request. Without ``gen``, the values alone (DecodeConfig's rules,
    before anything loads); with it, all of them against the loaded model (the tree among them),
    by a ``gen.stream`` call that is closed before it computes anything."""
    import dataclasses

    from runtime.decode import DecodeConfig

    decode = dict(decode or {})
    names = {f.name for f in dataclasses.fields(DecodeConfig)} - {"tree"}
    DecodeConfig(**{k: v for k, v in decode.items() if k in names})
    if gen is not None:
        try:
            gen.stream([0], max_new_tokens=1, **decode).close()
        except TypeError as e:  # a keyword stream() does not take
            raise MedusaError(f"decode: {e}") from None


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to ``host:port`` (every address the host resolves to, as uvicorn's own binding
    does; port 0: the first address, on a free port) for :func:`serve`: a host that does not
    resolve or a port in use is one MedusaError before anything loads or any banner prints."""
    from runtime import checks

    checks.integer("port", port, 0, 65535, rule="in [0, 65535] (0: any free port)")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise MedusaError(f"cannot serve on host {host!r}: {getattr(e, 'strerror', None) or e}") from None
    infos = list(dict.fromkeys(infos))[: 1 if port == 0 else None]
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.set_inheritable(True)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise MedusaError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    return sockets


@dataclass(frozen=True)
class Access:
    """Who may call the server. ``api_keys``: none, anyone; else every request but ``/health`` and
    ``/metrics`` (open to orchestrators and Prometheus) must carry ``Authorization: Bearer KEY`` with
    one of them (OpenAI's own scheme, and vLLM's ``--api-key``; a missing or wrong key gets 401 in
    OpenAI's error body, which OpenAI's clients raise as ``AuthenticationError``). ``allowed_origins``:
    the web origins whose pages may call the API from a browser (CORS, through Starlette's middleware;
    ``"*"``: any; none: no CORS headers, so browsers refuse cross-origin calls)."""

    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("api_keys", "allowed_origins"):
            value = getattr(self, name)
            if isinstance(value, str | bytes):  # a lone key would otherwise be its characters
                raise ConfigError(f"{name} must be a list of strings, not one string: give ({value!r},)")
            object.__setattr__(self, name, tuple(value))
        for key in self.api_keys:
            if not isinstance(key, str) or not re.fullmatch(r"[\x21-\x7e]+", key):
                raise ConfigError("an API key must be a non-empty string of visible ASCII characters (no spaces)")
        origins = []
        for origin in self.allowed_origins:
            if not isinstance(origin, str) or origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin, re.I):
                raise ConfigError(f"allowed origin {origin!r}: give scheme://host[:port] (as a browser sends "
                                  "it, no path), or *")  # fmt: skip
            origins.append(origin.lower())  # browsers send the scheme and host in lower case
        object.__setattr__(self, "allowed_origins", tuple(origins))

    @functools.cached_property
    def _digests(self) -> tuple[bytes, ...]:
        return tuple(hashlib.sha256(key.encode()).digest() for key in self.api_keys)

    def allows(self, authorization: bytes | None) -> bool:
        """Whether a request with this Authorization header may pass: its token against every key,
        as digests of equal length compared in constant time."""
        if not self.api_keys:
            return True
        scheme, _, token = (authorization or b"").partition(b" ")
        given = hashlib.sha256(token.strip()).digest()
        matches = [hmac.compare_digest(given, digest) for digest in self._digests]
        return scheme.lower() == b"bearer" and any(matches)


def serve_access(api_keys: list[str] | None, allowed_origins: list[str] | None, env_key: str | None) -> Access:
    """``medusa-run serve``'s :class:`Access` from ``--api-key`` (given: these keys; else the
    environment's ``MEDUSA_API_KEY``, where set) and ``--allowed-origins`` (each value may hold
    several, separated by commas)."""
    if api_keys is None and env_key is not None and not env_key.strip():
        raise ConfigError("MEDUSA_API_KEY is set but blank: give the key, or unset it to serve without one")
    keys = api_keys if api_keys is not None else [env_key] if env_key is not None else []
    origins = [o.strip() for value in allowed_origins or [] for o in value.split(",") if o.strip()]
    if allowed_origins and not origins:
        raise ConfigError("--allowed-origins names no origin: give scheme://host[:port], or *")
    return Access(api_keys=tuple(keys), allowed_origins=tuple(dict.fromkeys(origins)))


OPEN_PATHS = ("/health", "/metrics")  # served without an API key: orchestrators' probes and Prometheus


def route_path(scope) -> str:
    """The path the app's router matches: ``scope["path"]`` without the ``root_path`` a mount or a
    proxy's prefix (Ray Serve's ``route_prefix``) put before it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------- scheduling


@dataclass(eq=False)  # compared (and hashed: the scheduler's running set) by identity
class Job:
    """One request: its prompt ids, decode arguments, and the channel its chunks go back on."""

    ids: list[int]
    stream: Any  # the generator's stream, created (and its arguments checked) by the request handler
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    echo: str | None = None  # completions' echo: the prompt's text, sent before the completion's
    score_only: bool = False  # max_tokens 0 with echo: one token decoded (the prefill's), none sent
    stops: list[str] = field(default_factory=list)  # the request's stop strings: the text ends before them
    first_choice: bool = True  # its prompt's first choice (usage counts each prompt once)
    parse_tools: bool = False  # the answer's tool calls go to tool_calls (the request offered tools)
    single_call: bool = False  # parallel_tool_calls false: the answer's first call only

    def send(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()


class Metrics:
    """Prometheus metrics of one server (own registry: several servers in one process stay apart)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("medusa_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.queue_depth = Gauge("medusa_queue_depth", "requests waiting for a worker", registry=r)
        self.batch_size = Gauge("medusa_batch_size", "sequences being decoded (interleaved steps)", registry=r)
        self.tokens = Counter("medusa_generated_tokens", "tokens generated", registry=r)
        self.steps = Counter("medusa_decode_steps", "decode steps (verification or plain calls)", registry=r)
        self.decode_seconds = Counter("medusa_decode_seconds", "time spent decoding, prefill included", registry=r)
        self.tokens_per_s = Gauge("medusa_tokens_per_second", "decode speed of the last finished request", registry=r)
        self.mean_accepted = Gauge("medusa_mean_accepted", "tokens per step of the last finished request", registry=r)
        self.step_time = Histogram("medusa_step_seconds", "time between two chunks of a request (one step)",
                                   buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=r)  # fmt: skip
        self.engine_batch = Gauge("medusa_engine_sequences_per_call",
                                  "mean sequences per batched engine call (batch graph)", registry=r)  # fmt: skip
        self.engine_padding = Gauge("medusa_engine_padded_rows_ratio",
                                    "rows computed / rows asked for in batched calls (padding)", registry=r)  # fmt: skip
        self.ttft = Histogram("medusa_time_to_first_token_seconds", "queue wait + prefill + first step",
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)  # fmt: skip


class Scheduler:
    """A bounded queue and ``max_batch`` worker threads, each running one request's stream."""

    def __init__(self, gen, max_batch: int, max_queue: int, metrics: Metrics):
        self.gen, self.max_batch, self.max_queue, self.metrics = gen, max_batch, max_queue, metrics
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.active = 0
        self.closed = False
        self._running: set[Job] = set()
        self._stopped = False  # the workers were told to exit
        self._threads = [
            threading.Thread(target=self._work, name=f"medusa-serve-{i}", daemon=True) for i in range(max_batch)
        ]
        for t in self._threads:
            t.start()

    def submit(self, *jobs: Job) -> None:
        """Queue a request's jobs (its ``n`` choices), all or none: refused (429) where more than
        ``max_queue`` would then wait beyond the ``max_batch`` running (``max_queue`` 0: a request
        runs at once or is refused)."""
        with self._lock:
            if self.closed:
                raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
            if self.waiting + self.active + len(jobs) > self.max_batch + self.max_queue:
                raise ApiError(
                    429,
                    f"the queue is full ({self.max_queue} requests waiting, {self.active} running): retry later",
                    "rate_limit_error",
                    code="queue_full",
                )
            self.waiting += len(jobs)
            self.metrics.queue_depth.set(self.waiting)
        for job in jobs:
            self._queue.put(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self.waiting -= 1
                self.metrics.queue_depth.set(self.waiting)
                if self.closed:  # refused at shutdown: never started
                    job.send("error", _shutting_down("the request had not started"))
                    continue
                self.active += 1
                self._running.add(job)
                self.metrics.batch_size.set(self.active)
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.active -= 1
                    self._running.discard(job)
                    self.metrics.batch_size.set(self.active)

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():  # the client left while waiting: its handler still waits for an end
            job.stream.close()
            job.send("done", None)
            return
        m = self.metrics
        stats = None
        last = job.enqueued
        try:
            stream = job.stream
            finished = False
            try:
                for chunk in stream:
                    now = time.perf_counter()
                    if stats is None:
                        m.ttft.observe(now - last)
                    elif chunk.tokens:  # (a stream's last chunk may carry only the decoder's held-back text)
                        m.step_time.observe(now - last)
                    last, stats = now, chunk.stats
                    job.send("chunk", chunk)
                    if job.cancelled.is_set():  # disconnected: the slot is free from the next step on
                        break
                finished = not job.cancelled.is_set()
            finally:
                stream.close()
                self._count(stats, finished)  # what was decoded counts, however the request ended
        except Cancelled:  # the client left during the prompt's prefill: its slot is free at the next chunk
            job.send("done", None)
            return
        except EngineError as e:  # the engine's fault, not the request's (the engine logged it)
            code = "engine_stopped" if e.stopped else "engine_error"
            job.send("error", ApiError(503 if e.stopped else 500, str(e), "server_error", code=code))
            return
        except MedusaError as e:
            job.send("error", ApiError(400, str(e)))
            return
        except Exception as e:  # a bug: the client gets a 500-style error, the server keeps serving
            log.exception("request failed")
            job.send("error", ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
            return
        job.send("done", stats)

    def _count(self, stats, finished: bool) -> None:
        """A request's decoding into the counters (``stats``: its last chunk's, None if none came); the
        gauges of the last *finished* request only where it finished."""
        if stats is None:
            return
        m = self.metrics
        m.tokens.inc(stats.new_tokens)
        m.steps.inc(stats.steps)
        m.decode_seconds.inc(stats.total_s)
        if finished:
            m.tokens_per_s.set(stats.tokens_per_s)
            m.mean_accepted.set(stats.mean_accepted)

    def close(self) -> None:
        """The start of a shutdown: refuse new requests (503) and answer the queued ones 503 at once;
        running ones go on (until :meth:`cut`; their threads are not joined: the graceful timeout
        bounds them). Idempotent."""
        refused, stops = [], 0
        with self._lock:
            self.closed = True
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stops += 1
                else:
                    refused.append(job)
            for _ in range(stops):  # a second call: the workers still busy have not read theirs yet
                self._queue.put(None)
            self.waiting -= len(refused)
            self.metrics.queue_depth.set(self.waiting)
            if not self._stopped:
                self._stopped = True
                for _ in self._threads:  # each worker exits when its request is done
                    self._queue.put(None)
        for job in refused:
            job.send("error", _shutting_down("the request had not started"))

    def cut(self) -> None:
        """The end of the graceful period: every request still running gets a 503 error (its handler
        answers with it) and stops at its next step."""
        with self._lock:
            running = list(self._running)
        for job in running:
            job.cancelled.set()
            job.send("error", _shutting_down("the request was cut off at the end of the graceful shutdown period"))


def _shutting_down(what: str) -> ApiError:
    return ApiError(503, f"the server is shutting down: {what}", "server_error", code="shutting_down")


# ---------------------------------------------------------------------------- the app


def create_app(
    gen, model_name: str, max_batch: int = 1, max_queue: int = 16, decode: dict | None = None,
    reasoning_parser: str | None = None, tool_call_parser: str | None = None, access: Access | None = None,
):  # fmt: skip
    """The FastAPI app serving ``gen`` (a loaded :class:`runtime.api.MedusaGenerator`); ``decode``:
    server-wide keyword arguments of ``gen.stream`` (``medusa``, ``tree``, ``lookup``); ``reasoning_parser``:
    None, or ``"think"`` for chat answers' reasoning in a field of its own (:mod:`runtime.reasoning`);
    ``tool_call_parser``: None (requests with ``tools`` are refused), or ``"hermes"`` for function
    calling (:mod:`runtime.toolcalls`); ``access``: API keys and CORS origins (:class:`Access`;
    None: open to anyone, no CORS)."""
    require_serve()
    for what, value, known in (("reasoning_parser", reasoning_parser, REASONING_PARSERS),
                               ("tool_call_parser", tool_call_parser, TOOL_CALL_PARSERS)):  # fmt: skip
        if value not in (None, *known):
            raise ConfigError(f"{what} {value!r}: use one of {', '.join(known)}, or None")
    from contextlib import asynccontextmanager
    from typing import Literal

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, model_validator
    from starlette.exceptions import HTTPException

    if max_batch < 1 or max_queue < 0:
        raise MedusaError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
    if decode:
        check_decode(decode, gen)  # a server-wide mistake fails here, not on every request
    if tool_call_parser and "tools" not in gen.tokenizer.template_variables:
        log.warning("--tool-call-parser %s: the chat template of %s does not render tools; requests with tools get "
                    "400", tool_call_parser, model_name)  # fmt: skip
    metrics = Metrics()
    engine = getattr(gen, "engine", None)
    if engine is not None:  # a batched generator: how full its calls are
        stats = engine.stats
        metrics.engine_batch.set_function(lambda: stats["sequences"] / stats["calls"] if stats["calls"] else 0.0)
        metrics.engine_padding.set_function(lambda: stats["padded_rows"] / stats["rows"] if stats["rows"] else 0.0)
    created = int(time.time())

    class _Strict(BaseModel):
        # strict: JSON's own types only (true is not 1, "8" is not 8, "yes" is not true); an int is a float
        model_config = ConfigDict(extra="forbid", strict=True)

    class TextPart(_Strict):
        type: Literal["text"]
        text: str

    class FunctionCall(_Strict):
        name: str = Field(min_length=1)
        arguments: str  # JSON text, as OpenAI's API returns it

    class ToolCallIn(_Strict):  # an earlier call of the conversation, sent back with the assistant's message
        id: str
        type: Literal["function"]
        function: FunctionCall

    class Message(_Strict):
        # "developer": OpenAI's newer name for the system role (the chat template gets "system"); "tool": a
        # call's result
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[TextPart] | None = None  # a list: OpenAI's content parts (text ones), joined by newlines
        name: str | None = None
        tool_calls: list[ToolCallIn] | None = None
        tool_call_id: str | None = None
        # what OpenAI's (and this server's) assistant messages carry, sent back as a client's history does
        # (`messages.append(choice.message.model_dump())`): a refusal and annotations are not shown to the
        # model; reasoning goes to the template (Qwen3's reads reasoning_content); audio and the deprecated
        # function_call only where null
        refusal: str | None = None
        annotations: list[Any] | None = None
        reasoning_content: str | None = None
        audio: None = None
        function_call: None = None

        @model_validator(mode="after")
        def _content_or_calls(self):
            if self.content is None and not (self.role == "assistant" and self.tool_calls):
                raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
            return self

        def text(self) -> str | None:
            if self.content is None or isinstance(self.content, str):
                return self.content
            return "\n".join(p.text for p in self.content)

        def for_template(self) -> dict[str, Any]:
            """The message as chat templates read it (transformers' and vLLM's form: a call's
            arguments as the object its JSON text states, where it states one)."""
            m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
            if self.tool_calls:
                m["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": _json_object(c.function.arguments)}}
                                   for c in self.tool_calls]  # fmt: skip
            if self.tool_call_id is not None:
                m["tool_call_id"] = self.tool_call_id
            if self.name is not None and self.role == "tool":  # the function's name, which some templates print
                m["name"] = self.name
            if self.reasoning_content is not None:
                m["reasoning_content"] = self.reasoning_content
            return m

    class Function(_Strict):
        name: str = Field(min_length=1, max_length=64)
        description: str | None = None
        parameters: dict[str, Any] | None = None  # a JSON schema, passed to the template as given
        strict: bool | None = None

    class Tool(_Strict):
        type: Literal["function"]
        function: Function

    class StreamOptions(_Strict):
        include_usage: bool = False

    class Common(_Strict):
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        # OpenAI's "... or null" fields take null as unset: temperature 1, top_p 1, stream false, n 1, penalties 0
        temperature: float | None = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
        top_p: float | None = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
        seed: int | None = None  # any integer: a negative one seeds as seed mod 2**64
        stop: str | list[str] | None = None
        stream: bool | None = False
        stream_options: StreamOptions | None = None
        n: int | None = Field(1, ge=1, le=MAX_N)
        user: str | None = None
        presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
        frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
        # OpenAI's fields this server has no use for, taken at the values that ask for nothing (clients
        # send them so); any other value is a 400 naming the field (unsupported), not "unknown field"
        logit_bias: dict[str, float] | None = None
        metadata: dict[str, str] | None = None
        store: bool | None = None  # nothing is stored either way
        service_tier: str | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool | None = None
        top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
        response_format: dict[str, Any] | None = None
        tools: list[Tool] | None = None
        tool_choice: str | dict[str, Any] | None = None
        parallel_tool_calls: bool | None = None
        # vLLM's extension: more variables for the chat template (Qwen3's {"enable_thinking": false})
        chat_template_kwargs: dict[str, Any] | None = None

    class CompletionRequest(Common):
        prompt: str | list[int] | list[str] | list[list[int]]  # lists of texts / of token-id lists: several prompts
        # OpenAI's (and vLLM's) default for completions: 16 (null: up to the context); 0: with echo, score the prompt only
        max_tokens: int | None = Field(COMPLETION_MAX_TOKENS, ge=0)
        echo: bool | None = False
        logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
        best_of: int | None = Field(None, ge=1)
        suffix: str | None = None

    made = threading.Lock()

    def scheduler(app) -> Scheduler:
        """The app's scheduler: made at startup (uvicorn's lifespan), or at the first request where
        the host runs no lifespan."""
        with made:
            if getattr(app.state, "scheduler", None) is None:
                app.state.scheduler = Scheduler(gen, max_batch, max_queue, metrics)
            return app.state.scheduler

    @asynccontextmanager
    async def lifespan(app):
        scheduler(app)
        yield
        scheduler(app).close()  # (already closed where the server's shutdown began: _uvicorn_server)

    app = FastAPI(title="medusa-trt", lifespan=lifespan)

    class BodyGate:
        """Before FastAPI sees a request: a body declaring more than MAX_BODY_BYTES is refused (413)
        unread (nginx's client_max_body_size; a prompt that size is far past any context), and a
        POST body is read as JSON whatever its Content-Type says (``curl -d`` sends form encoding;
        as llama.cpp's server, not a 400 that names a dictionary). Plain ASGI, not Starlette's
        BaseHTTPMiddleware, which would relay every streamed chunk and hide a client's disconnect
        from the handler."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                headers = dict(scope["headers"])
                size = headers.get(b"content-length", b"")
                if size.isdigit() and int(size) > MAX_BODY_BYTES:
                    e = ApiError(413, f"the body is {int(size):,} bytes: at most {MAX_BODY_BYTES:,} are read",
                                 code="request_too_large")  # fmt: skip
                    await error_response(scope["path"], e)(scope, receive, send)
                    return
                if scope["method"] == "POST" and not size.isdigit():  # chunked: counted as it comes
                    body = await self.read_capped(receive)
                    if body is None:
                        e = ApiError(413, f"the body is more than {MAX_BODY_BYTES:,} bytes: at most that is read",
                                     code="request_too_large")  # fmt: skip
                        await error_response(scope["path"], e)(scope, receive, send)
                        return
                    receive = self.replay(body, receive)
                if scope["method"] == "POST" and b"json" not in headers.get(b"content-type", b""):
                    rest = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                    scope = {**scope, "headers": [*rest, (b"content-type", b"application/json")]}
            await self.inner(scope, receive, send)

        @staticmethod
        async def read_capped(receive) -> bytes | None:
            """The whole body, or None once it passes MAX_BODY_BYTES (the rest unread)."""
            chunks, total = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client left: what came (the handler sees it left)
                    break
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                if total > MAX_BODY_BYTES:
                    return None
                if not message.get("more_body", False):
                    break
            return b"".join(chunks)

        @staticmethod
        def replay(body: bytes, receive):
            """``receive`` that gives ``body`` first, then the client's next messages (a disconnect)."""
            sent = False

            async def again():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return again

    access = access or Access()
    served = ("/v1/chat/completions", "/v1/completions", "/v1/models")

    class KeyGate:
        """With API keys: a request without one of them gets 401 before anything else reads it, on
        every path but OPEN_PATHS (FastAPI's /docs and /openapi.json too: fail closed), as the
        router sees the path (under a mount or a proxy's prefix too). CORS preflights, sent without
        credentials, are answered before it, by the CORS middleware. Plain ASGI, as BodyGate."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                await self.inner(scope, receive, send)
                return
            given = dict(scope["headers"]).get(b"authorization")
            path = route_path(scope)
            if path not in OPEN_PATHS and not access.allows(given):
                why = ("Incorrect API key provided." if given is not None else
                       "You didn't provide an API key: send it as Authorization: Bearer KEY (OpenAI's clients: "
                       "api_key=KEY).")  # fmt: skip
                e = ApiError(401, why, code="invalid_api_key")
                if path in served:  # the metrics' endpoint label stays the served paths
                    metrics.requests.labels(path, "401").inc()
                response = JSONResponse(e.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            await self.inner(scope, receive, send)

    # the last added runs first: CORS (a browser's preflight, and its headers on every answer, 401s too),
    # then the key, then the body's size and type
    app.add_middleware(BodyGate)
    if access.api_keys:
        app.add_middleware(KeyGate)
    if access.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(access.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After"], max_age=600)  # fmt: skip

    def error_response(endpoint: str, e: ApiError) -> JSONResponse:
        metrics.requests.labels(endpoint, str(e.status)).inc()
        # a full queue (429) or a server going down (503): when to try again, which OpenAI's clients read
        retry = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=retry)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        # a union (prompt: text or token ids) fails once per member: the member that got furthest tells most
        same = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(first.get("loc", ()))[:2]]
        first = max(same, key=lambda e: len(e.get("loc", ())), default=first)
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and x not in UNION_TAGS and "[" not in str(x)]
        kind = first.get("type", "")
        if kind == "json_invalid":
            msg, loc = f"the body is not valid JSON ({first.get('msg', '')})", []
        elif kind == "extra_forbidden":
            msg = f"unknown field {'.'.join(loc)!r}"
        else:
            msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}"
        return error_response(request.url.path, ApiError(400, msg, param=".".join(loc) or None, code=kind or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """FastAPI's own errors (an unknown path, a body it cannot parse) in OpenAI's body too."""
        if exc.status_code == 404:  # not counted in the metrics: their endpoint label is the served paths
            e = ApiError(404, f"unknown path {request.url.path!r}: this server serves /v1/chat/completions, "
                              "/v1/completions, /v1/models, /health and /metrics", code="not_found")  # fmt: skip
            return JSONResponse(e.body(), status_code=404)
        if exc.status_code == 405:
            e = ApiError(
                405, f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed"
            )
            return JSONResponse(e.body(), status_code=405, headers=exc.headers)
        if exc.status_code == 400:  # FastAPI could not parse the body (not UTF-8, say)
            msg = "the body could not be parsed: it must be JSON in UTF-8"
            return error_response(request.url.path, ApiError(400, msg, code="json_invalid"))
        e = ApiError(
            exc.status_code, str(exc.detail), "server_error" if exc.status_code >= 500 else "invalid_request_error"
        )
        return JSONResponse(e.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        """Anything else a request raises: a 500 in OpenAI's body (the traceback goes to the log), never
        a bare text page."""
        log.exception("%s %s failed", request.method, request.url.path)
        e = ApiError(500, f"internal error ({type(exc).__name__}): see the server's log", "server_error")
        return error_response(request.url.path, e)

    def unknown_model(name) -> ApiError:
        return ApiError(404, f"the model {name!r} does not exist: this server serves {model_name!r}", param="model",
                        code="model_not_found")  # fmt: skip

    unsupported = (  # (field, what it asks for, whether a request asks for it)
        ("logit_bias", "logit_bias (biasing tokens)", lambda r: bool(r.logit_bias)),
        ("tools", "tools (function calling) without a tool-call parser (start the server with --tool-call-parser "
                  "hermes)", lambda r: bool(getattr(r, "tools", None)) and tool_call_parser is None),
        ("best_of", "best_of other than n (every choice is returned)",
         lambda r: getattr(r, "best_of", None) not in (None, r.n or 1)),
        ("suffix", "suffix (insertion)", lambda r: bool(getattr(r, "suffix", None))),
    )  # fmt: skip

    def forced_call(tool_choice, tools, single: bool = False) -> str | None:
        """The grammar of the call ``tool_choice`` forces (``"required"``, or ``{"type": "function",
        "function": {"name": ...}}``), None where it forces none; a 400 naming the field for the rest."""
        if tool_choice in (None, "none", "auto"):
            return None
        name = None
        if isinstance(tool_choice, dict):
            fn = tool_choice.get("function")
            if (
                set(tool_choice) != {"type", "function"}
                or tool_choice["type"] != "function"
                or not (isinstance(fn, dict) and set(fn) == {"name"} and isinstance(fn["name"], str))
            ):
                raise ApiError(400, 'tool_choice: expected "none", "auto", "required" or {"type": "function", '
                                    '"function": {"name": ...}}', param="tool_choice")  # fmt: skip
            name = fn["name"]
        elif tool_choice != "required":
            raise ApiError(400, f'tool_choice {tool_choice!r}: expected "none", "auto", "required" or a function',
                           param="tool_choice")  # fmt: skip
        if not tools:
            raise ApiError(400, "tool_choice forces a call but the request offers no tools", param="tool_choice")
        try:
            return forced_call_grammar(tools, name, single=single)
        except ConfigError as e:
            raise ApiError(400, str(e), param="tool_choice") from None

    def refuse_unsupported(req) -> None:
        """A field of OpenAI's API this server does not implement, set to ask for something: a 400
        naming it (at its "nothing asked" value it is taken: see Common)."""
        for name, what, asks in unsupported:
            if asks(req):
                raise ApiError(400, f"{what} is not supported by this server", param=name, code="unsupported_parameter")

    def prompts_of(prompt) -> list:
        """The request's prompts: a text, token ids or a chat's messages is one; a list of texts or
        of token-id lists (OpenAI's batched completions, as evaluation harnesses send) is several."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]

    def prepare(req, prompt, endpoint: str, loop: asyncio.AbstractEventLoop) -> list[Job]:
        """The request's jobs, one per prompt and choice (``n``; OpenAI's order: prompt ``p``'s choice
        ``j`` is choice ``p * n + j``), every argument checked before any is queued. Runs in a worker
        thread (tokenizing a long prompt must not hold up the event loop)."""
        if req.model not in (None, model_name):
            raise unknown_model(req.model)
        refuse_unsupported(req)
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        param = "messages" if endpoint.endswith("chat/completions") else "prompt"
        # as /v1/completions refuses "" (an assistant's tool calls are content enough)
        if param == "messages" and not any(m["content"] or m.get("tool_calls") for m in prompt):
            raise ApiError(400, "the prompt is empty (every message's content is empty)", param=param)
        prompts = prompts_of(prompt)
        n = req.n or 1
        if n * len(prompts) > max_batch + max_queue:
            what = f"{len(prompts)} prompts x n {n}" if len(prompts) > 1 else f"n {n}"
            raise ApiError(400, f"{what}: at most {max_batch + max_queue} choices a request here (the server's "
                                "--max-batch + --max-queue)", param="n" if len(prompts) == 1 else param)  # fmt: skip
        template_kwargs = getattr(req, "chat_template_kwargs", None)
        try:
            check_template_kwargs(template_kwargs)
        except MedusaError as e:
            raise ApiError(400, str(e), param="chat_template_kwargs") from None
        given = getattr(req, "tools", None)  # [] stays [] (the template sees what the request sent)
        tools = None if given is None else [t.model_dump(exclude_none=True) for t in given]
        if tools and "tools" not in gen.tokenizer.template_variables:
            raise ApiError(400, f"tools: the chat template of {model_name!r} does not render tools, so the model would "
                                "never see them (serve a model trained for function calling)", param="tools")  # fmt: skip
        # calls are parsed where the request offers tools and lets the model call them
        tool_choice = getattr(req, "tool_choice", None)
        parse_tools = bool(tools) and tool_choice != "none"
        response_format = getattr(req, "response_format", None)
        single = getattr(req, "parallel_tool_calls", None) is False  # one call at most
        forced = forced_call(tool_choice, tools, single)
        if forced is not None:  # the answer is made a call by a grammar (what response_format does for JSON)
            if response_format not in (None, {"type": "text"}):
                raise ApiError(400, "tool_choice forces a call, which response_format would constrain too: give one "
                                    "of them", param="response_format")  # fmt: skip
            response_format = {"type": "grammar", "grammar": forced}
        try:  # compiled here (cached by the generator), so that a bad schema names its field
            gen.grammar(response_format)
        except MedusaError as e:  # a forced call's grammar holds the tools' parameter schemas
            raise ApiError(400, str(e), param="response_format" if forced is None else "tools") from None
        limit = getattr(req, "max_completion_tokens", None) or req.max_tokens
        encoded = []
        for p, text in enumerate(prompts):
            which = f"prompt {p}: " if len(prompts) > 1 else ""
            try:
                ids = gen.encode(text, template_kwargs, tools)
                check_fits(gen.backend, ids)  # the decode loop's own check, before the request takes a slot
            except ContextLengthError as e:
                raise ApiError(400, which + str(e), param=param, code="context_length_exceeded") from None
            except MedusaError as e:
                raise ApiError(400, which + str(e), param=param) from None
            if limit and len(ids) + limit > gen.backend.max_context:  # as OpenAI and vLLM: refused, not cut
                field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
                raise ApiError(400, f"{which}this model's maximum context length is {gen.backend.max_context} tokens; "
                                    f"the request asks for {len(ids) + limit} ({len(ids)} in the prompt, {limit} to "
                                    f"generate): shorten the prompt or lower {field}", param=field,
                               code="context_length_exceeded")  # fmt: skip
            encoded.append(ids)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ApiError(400, f"stop: at most {MAX_STOPS} non-empty strings", param="stop")
        echo = bool(getattr(req, "echo", False))
        score_only = req.max_tokens == 0
        if score_only and not echo:
            raise ApiError(
                400, "max_tokens 0 generates nothing: give echo: true to score the prompt", param="max_tokens"
            )
        kwargs: dict[str, Any] = {
            "logprobs": wanted_logprobs(req),
            "prompt_logprobs": echo and req.logprobs is not None,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "stop": stops,
            "presence_penalty": req.presence_penalty or 0.0,
            "frequency_penalty": req.frequency_penalty or 0.0,
            **({"response_format": response_format} if response_format else {}),
            **(decode or {}),
        }
        jobs = []
        for text, ids in zip(prompts, encoded):
            # (limit fits: checked above; null: what the context leaves)
            budget = 1 if score_only else limit or gen.backend.max_context - len(ids)
            # token ids echo with their special tokens shown, as a prompt string shows them (text_offset counts them)
            echoed = (
                (text if isinstance(text, str) else gen.tokenizer.decode(ids, skip_special_tokens=False))
                if echo
                else None
            )
            for j in range(n):  # choice j: seed + j, so a seed reproduces every choice and they differ
                seed = None if req.seed is None else (req.seed + j) % SEED_MODULUS
                cancelled = threading.Event()  # the client left: the stream ends at its next engine call
                try:  # the generator checks its arguments here, before the request takes a queue slot
                    stream = gen.stream(ids, **kwargs, seed=seed, max_new_tokens=budget, cancel=cancelled)
                except MedusaError as e:  # the request field it names (stop, temperature, ...), where it does
                    named = str(e).split(" ", 1)[0]
                    raise ApiError(400, str(e), param=named if named in type(req).model_fields else None) from None
                jobs.append(Job(ids, stream, loop, asyncio.Queue(), cancelled=cancelled, echo=echoed, score_only=score_only,
                                stops=stops, first_choice=j == 0, parse_tools=parse_tools,
                                single_call=single))  # fmt: skip
        return jobs

    async def events(job: Job):
        """(kind, value) pairs from the worker until done or error."""
        while True:
            kind, value = await job.out.get()
            yield kind, value
            if kind in ("done", "error"):
                return

    def wanted_logprobs(req) -> int | None:
        """The alternatives a token the request asks for (None: no log-probabilities)."""
        if isinstance(req, CompletionRequest):
            return req.logprobs
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (req.top_logprobs or 0) if req.logprobs else None

    def usage(choices: list[Choice]) -> dict:
        """OpenAI's usage counts (each prompt's tokens once, whatever ``n``); ``cached_tokens``: the prompt
        tokens whose cache entries the previous request left (prefix reuse: the next turn of a chat;
        each prompt's first choice's)."""
        firsts = [c for c in choices if c.job.first_choice]
        prompt, completion = sum(len(c.job.ids) for c in firsts), sum(c.tokens for c in choices)
        cached = sum(c.stats.cached_prompt_tokens for c in firsts if c.stats is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip

    async def complete(request: Request, req, prompt, chat: bool):
        endpoint = request.url.path
        stamp = int(time.time())  # the response's (every chunk's) "created": when the request came
        try:
            jobs = await asyncio.to_thread(prepare, req, prompt, endpoint, asyncio.get_running_loop())
            scheduler(request.app).submit(*jobs)
        except ApiError as e:
            return error_response(endpoint, e)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(request, jobs, rid, chat, include_usage, stamp),
                                     media_type="text/event-stream")  # fmt: skip
        choices = [Choice(i, job, chat, gen.tokenizer, reasoning_parser) for i, job in enumerate(jobs)]
        left = asyncio.Event()

        async def watch():  # the client leaving frees the request's slots at their next step
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            left.set()
            for job in jobs:
                job.cancelled.set()

        watcher = asyncio.create_task(watch())
        try:
            for c in choices:  # the jobs run side by side; their events wait in their queues
                async for kind, value in events(c.job):
                    if kind == "error":
                        return error_response(endpoint, value)
                    c.take(kind, value)
        finally:
            watcher.cancel()
            for job in jobs:
                job.cancelled.set()  # a no-op when done
        # 499: nginx's "client closed request" (the answer, cut at the step the client left, goes nowhere)
        metrics.requests.labels(endpoint, "499" if left.is_set() else "200").inc()
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": stamp,
            "model": model_name,
            "choices": [c.whole() for c in choices],
            "usage": usage(choices),
            "medusa": _medusa_stats(choices[0].stats),  # the first choice's
        }

    async def sse(request: Request, jobs: list[Job], rid: str, chat: bool, include_usage: bool, stamp: int):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def frame(choices: list, **extra) -> str:
            body = {"id": rid, "object": obj, "created": stamp, "model": model_name, "choices": choices}
            if include_usage:  # OpenAI: every chunk has the field, null but in the last one
                body["usage"] = None
            body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        choices = [Choice(i, job, chat, gen.tokenizer, reasoning_parser) for i, job in enumerate(jobs)]
        merged: asyncio.Queue = asyncio.Queue()  # (choice, kind, value) from every job, as they come

        async def pump(c: Choice):
            async for kind, value in events(c.job):
                await merged.put((c, kind, value))

        pumps = [asyncio.create_task(pump(c)) for c in choices]
        # counted as it ends (the 200 status line went first): 200, the error's status, or 499 for a client that left
        outcome = "499"
        try:
            if chat:
                for c in choices:
                    yield frame([c.piece(None, None, first=True)])
            left = len(choices)
            while left:
                c, kind, value = await merged.get()
                if await request.is_disconnected():
                    return
                if kind == "error":
                    outcome = str(value.status)
                    yield f"data: {json.dumps(value.body())}\n\n"
                    return
                for piece in c.take(kind, value):  # the decode statistics go with the finishing piece
                    yield frame([piece], **({"medusa": _medusa_stats(value)} if piece["finish_reason"] else {}))
                left -= kind == "done"
            if include_usage:
                yield frame([], usage=usage(choices))
            outcome = "200"
            yield "data: [DONE]\n\n"
        finally:  # finished, failed, or the client went away (the response task is cancelled)
            metrics.requests.labels(request.url.path, outcome).inc()
            for task in pumps:
                task.cancel()
            for job in jobs:
                job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest):
        return await complete(request, req, [m.for_template() for m in req.messages], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        return await complete(request, req, req.prompt, chat=False)

    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "medusa-trt"}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])  # HEAD: a load balancer's probe, answered without a body
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def model(model: str):
        if model != model_name:
            return JSONResponse(unknown_model(model).body(), status_code=404)
        return model_card

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request):
        s = scheduler(request.app)
        if s.closed:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        failure = getattr(getattr(gen, "engine", None), "failure", None)
        if failure is not None:  # the batch engine stopped for good: an orchestrator restarts the server
            return JSONResponse({"status": "engine failed", "error": str(failure)}, status_code=503)
        return {"status": "ok", "model": model_name, "running": s.active, "waiting": s.waiting,
                "backend": getattr(gen, "backend_name", "onnxruntime"), "pid": os.getpid()}  # fmt: skip

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics = metrics
    return app


class Choice:
    """One choice of a response (``n`` of them), built from its job's events: the text, token count,
    log-probabilities and statistics so far; ``take`` returns the pieces a stream sends for an
    event, ``whole`` the choice of a response that is not streamed. As OpenAI's, the text ends before
    a stop string: the decode loop stops at the token that completes one, and a stream holds back any
    tail of its text that could begin one until the next chunk tells."""

    def __init__(self, index: int, job: Job, chat: bool, tokenizer, reasoning_parser: str | None = None):
        self.index, self.job, self.chat = index, job, chat
        self.lps = Logprobs(tokenizer, chat)
        self.text: list[str] = [job.echo or ""]
        # --reasoning-parser: the chat answer's reasoning apart (the prompt's last tokens tell whether it opens inside)
        self.split = (
            ThinkSplit(tokenizer.decode(job.ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False))
            if chat and reasoning_parser
            else None
        )
        self.reasoning: list[str] = []
        # --tool-call-parser, where the request offered tools: the answer's calls apart from its content
        self.tool_split = ToolCallSplit() if chat and job.parse_tools else None
        self.calls: list[ToolCall] = []
        self.tokens = 0
        self.stats: Any = None  # the finished stream's DecodeStats
        self._echo = job.echo  # not yet sent (streams send it first)
        self._held = ""  # completion text held back: it may begin a stop string
        self._stopped = False

    def _release(self, text: str, final: bool = False) -> str:
        """The part of the completion's text so far (``text`` new) that may be sent: up to a stop string
        (none of the rest, ever), else all but a tail that could begin one (all of it when ``final``)."""
        if self._stopped or not self.job.stops:
            return "" if self._stopped else text
        buf = self._held + text
        hits = [at for at in (buf.find(stop) for stop in self.job.stops) if at >= 0]
        if hits:
            self._stopped, self._held = True, ""
            return buf[: min(hits)]
        # (a tail no longer than the text: a stop of any length costs what the text does, not what the stop does)
        keep = 0 if final else max(partial_tail(buf, stop) for stop in self.job.stops)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def piece(self, text: str | None, finish: str | None, first: bool = False, logprobs=None, reasoning="",
              calls: tuple[int, list[ToolCall]] = (0, [])) -> dict:  # fmt: skip
        """A streamed piece; ``calls``: (the index of the first, the calls) this piece completes."""
        if self.chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            )
            if reasoning:  # vLLM's field, and its earlier name, which many clients still read
                delta.update(reasoning=reasoning, reasoning_content=reasoning)
            if calls[1]:  # each call whole in one delta (OpenAI's clients join arguments by index either way)
                delta["tool_calls"] = [c.body(calls[0] + k) for k, c in enumerate(calls[1])]
            return {"index": self.index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return {"index": self.index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}

    def take(self, kind: str, value) -> list[dict]:
        """A "chunk" or "done" event; the pieces to stream for it."""
        if kind == "done":
            self.stats = value
            tail, thought, calls = self._split(self._release("", final=True), final=True)
            return [
                *([self.piece(tail, None, reasoning=thought, calls=calls)] if tail or thought or calls[1] else []),
                self.piece(None, self.finish),
            ]
        pieces = []
        scored = self.lps.add_prompt(self.job.ids[0], value.prompt_logprobs)
        if self._echo is not None:  # the prompt first, with its log-probabilities where asked for
            pieces.append(self.piece(self._echo, None, logprobs=scored))
            self._echo = None
        if self.job.score_only:
            return pieces
        text, thought, calls = self._split(self._release(value.text))
        self.tokens += len(value.tokens)
        body = self.lps.add(value.logprobs)
        if text or thought or calls[1] or body is not None:  # a token without text yet has its logprob
            pieces.append(self.piece(text, None, logprobs=body, reasoning=thought, calls=calls))
        return pieces

    def _split(self, text: str, final: bool = False) -> tuple[str, str, tuple[int, list[ToolCall]]]:
        """(content, reasoning, (the index of the first, the calls)) of released text, kept for the whole
        answer; without parsers all content."""
        thought, first, calls = "", len(self.calls), cast(list[ToolCall], [])
        if self.split is not None:
            thought, text = self.split.push(text, final)
            self.reasoning.append(thought)
        if self.tool_split is not None:  # the calls are the answer's, not its reasoning's
            text, calls = self.tool_split.push(text, final)
            if self.job.single_call:  # parallel_tool_calls false: a call past the first is dropped
                calls = calls[: max(0, 1 - len(self.calls))]
            self.calls.extend(calls)
        self.text.append(text)
        return text, thought, (first, calls)

    @property
    def finish(self) -> str:
        if self.calls:  # as OpenAI's and vLLM's: an answer that called a tool ends for the call
            return "tool_calls"
        return FINISH.get(self.stats.finish_reason, "stop") if self.stats else "stop"

    def whole(self) -> dict:
        body, lps = "".join(self.text), self.lps.body()
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": body}
            if self.split is not None:  # None where the answer had no reasoning, as vLLM's
                thought = "".join(self.reasoning) or None
                message.update(reasoning=thought, reasoning_content=thought)
            if self.calls:  # OpenAI's shape: content null where the answer is all calls
                message.update(content=body or None, tool_calls=[c.body() for c in self.calls])
            return {"index": self.index, "message": message, "finish_reason": self.finish, "logprobs": lps}
        return {"index": self.index, "text": body, "finish_reason": self.finish, "logprobs": lps}


class Logprobs:
    """A response's ``logprobs`` in OpenAI's shape, from the decode loop's per-token
    :class:`runtime.decode.TokenLogprob` (None throughout where the request asked for none). Chat:
    ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``; completions: ``{"tokens",
    "token_logprobs", "top_logprobs" (the alternatives and the chosen token, as OpenAI gives them),
    "text_offset"}``. The entries are the returned text's tokens: an echoed prompt's all of them (the
    text shows its special tokens), a completion's without special tokens (the end-of-turn token: the
    text does not show it). ``text_offset``: each token's first character in the returned text, counted
    as the tokens' bytes decode (incrementally: a token ending inside a character is counted with the
    token that completes it)."""

    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat
        self.entries: list | None = None  # chat: content entries; completions: (token, logprob, top, offset)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0  # characters of the returned text so far

    def _text(self, token: int) -> str:
        return self.tok.token_bytes(token).decode("utf-8", errors="replace")

    def _entry(self, token: int, logprob: float) -> dict:
        return {"token": self._text(token), "logprob": logprob, "bytes": list(self.tok.token_bytes(token))}

    def _offset(self, token: int) -> int:
        """``token``'s offset in the returned text; the count moves past it."""
        at = self._chars
        self._chars += len(self._utf8.decode(self.tok.token_bytes(token)))
        return at

    def add_prompt(self, first: int, scored) -> dict | None:
        """Take the prompt's log-probabilities (completions' echo): its first token has none (None,
        as OpenAI gives it), the others the prefill's. The body of those alone (a streamed chunk's)."""
        if scored is None:
            return None
        entries = [(self._text(first), None, None, self._offset(first))]
        return self._shape(self._take(scored, entries, prompt=True))

    def add(self, logprobs) -> dict | None:
        """Take a chunk's log-probabilities; the body of those alone (a streamed chunk's; None where the
        chunk's tokens hold none the text shows)."""
        if logprobs is None:
            return None
        new = self._take(logprobs, [])
        return self._shape(new) if new else None

    def _take(self, logprobs, new: list, prompt: bool = False) -> list:
        for lp in logprobs:
            if not prompt and self.tok.is_special(lp.token):  # not in the completion's text
                continue
            if self.chat:
                new.append({**self._entry(lp.token, lp.logprob),
                            "top_logprobs": [self._entry(t, v) for t, v in lp.top]})  # fmt: skip
            else:
                top = {self._text(t): v for t, v in lp.top}
                top.setdefault(self._text(lp.token), lp.logprob)
                new.append((self._text(lp.token), lp.logprob, top, self._offset(lp.token)))
        if self.entries is None:
            self.entries = []
        self.entries.extend(new)
        return new

    def body(self) -> dict | None:
        """Every chunk's so far (a whole response's)."""
        return None if self.entries is None else self._shape(self.entries)

    def _shape(self, entries: list) -> dict:
        if self.chat:
            return {"content": entries, "refusal": None}
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}  # fmt: skip


def _medusa_stats(stats) -> dict | None:
    """The decode statistics a Medusa server adds to OpenAI's response (clients ignore the field)."""
    if stats is None:
        return None
    return {"steps": stats.steps, "mean_accepted": round(stats.mean_accepted, 3),
            "tokens_per_s": round(stats.tokens_per_s, 2), "finish_reason": stats.finish_reason}  # fmt: skip


def serve(gen, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 1, max_queue: int = 16,
          graceful_timeout: int = 30, decode: dict | None = None,
          sockets: list[socket.socket] | None = None, reasoning_parser: str | None = None,
          tool_call_parser: str | None = None, access: Access | None = None) -> None:  # fmt: skip
    """Run the server until SIGINT/SIGTERM: then it stops listening, answers the queued requests
    503 at once (``/health`` says "shutting down"), lets the running ones finish for up to
    ``graceful_timeout`` seconds and answers those still running then with a 503 error (a stream
    gets it as its last event) before uvicorn closes their connections. ``sockets``: bound by
    :func:`bind` (the caller then knows before this call that it can listen, and on which port;
    else they are bound here)."""
    import uvicorn

    from runtime import checks

    graceful = cast(int, checks.integer("graceful_timeout", graceful_timeout, 0))
    app = create_app(gen, model_name, max_batch=max_batch, max_queue=max_queue, decode=decode,
                     reasoning_parser=reasoning_parser, tool_call_parser=tool_call_parser, access=access)  # fmt: skip
    sockets = bind(host, port) if sockets is None else sockets
    try:
        port = sockets[0].getsockname()[1]
        log.info("serving %s on http://%s:%d/v1 (max_batch %d, max_queue %d)", model_name, host, port, max_batch,
                 max_queue)  # fmt: skip
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=graceful + CUT_SLACK_S)  # fmt: skip
        server = _uvicorn_server(config, app, graceful)
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
    if not server.started:
        raise MedusaError(f"the server on {host}:{port} did not start (see uvicorn's error above)")


def _uvicorn_server(config, app, graceful: int):
    """uvicorn's server, whose shutdown first closes ``app``'s scheduler (the queued requests get
    503 at once) and cuts what still runs ``graceful`` seconds later, before uvicorn's own timeout
    (``CUT_SLACK_S`` later) would cancel the handlers: a 500 without OpenAI's body, a stream broken
    off without an error event."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            sched = getattr(app.state, "scheduler", None)
            if sched is not None:
                sched.close()
                asyncio.get_running_loop().call_later(graceful, sched.cut)
            await super().shutdown(sockets=sockets)

    return Server(config)


# ---------------------------------------------------------------------------- scale-out on Ray Serve


def ray_application(artifact: str, model_name: str, replicas: int, load: dict, max_batch: int = 1,
                    max_queue: int = 16, decode: dict | None = None, gpus_per_replica: float = 0.0,
                    batching: str = "auto", reasoning_parser: str | None = None,
                    tool_call_parser: str | None = None, access: Access | None = None):  # fmt: skip
    """The same app as a Ray Serve deployment of ``replicas`` copies, each its own process and
    engine (the artifact is loaded on the replica), behind Ray's HTTP proxy."""
    from ray import serve as ray_serve

    def build():
        gen = load_for_serving(artifact, max_batch, batching, **load)
        try:  # each replica's caches against its share of the node's memory (all on one node: the worst case)
            check_cache_memory(gen, max_batch, available_memory(), replicas)
        except ConfigError:
            gen.close()
            raise
        return create_app(gen, model_name, max_batch, max_queue, decode, reasoning_parser, tool_call_parser, access)

    deployment = ray_serve.deployment(
        ray_serve.ingress(build)(),
        name="medusa",
        num_replicas=replicas,
        max_ongoing_requests=max_batch + max_queue,  # more wait in Ray's proxy, not in a replica
        ray_actor_options={"num_cpus": 0, "num_gpus": gpus_per_replica},
    )
    return deployment.bind()  # type: ignore[attr-defined]


def replica_error(status) -> str | None:
    """The last line of the exception a failed replica's constructor raised (Ray Serve keeps its
    traceback in the deployment's status message), or None where no deployment failed so."""
    for app in status.applications.values():
        for deployment in app.deployments.values():
            found = re.findall(r"^([\w.]+): (.+)$", deployment.message or "", flags=re.M)
            if found:
                kind, text = found[-1]
                return text if kind.startswith("runtime.errors.") else f"{kind.rsplit('.', 1)[-1]}: {text}"
    return None


def serve_ray(artifact: str, model_name: str, replicas: int, load: dict, host: str = "127.0.0.1",
              port: int = 8000, max_batch: int = 1, max_queue: int = 16, decode: dict | None = None,
              gpus_per_replica: float = 0.0, batching: str = "auto",
              reasoning_parser: str | None = None, tool_call_parser: str | None = None,
              access: Access | None = None) -> None:  # fmt: skip
    """Start a local Ray instance, deploy :func:`ray_application` on ``host:port`` and serve until
    SIGINT/SIGTERM, then shut Serve and Ray down. On a cluster, run the same application with
    ``ray.init(address="auto")`` (one replica a GPU: ``gpus_per_replica=1``; autoscaling: Serve's
    ``autoscaling_config`` on the deployment)."""
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError:
        raise MedusaError("medusa-run serve --ray-replicas needs Ray Serve: pip install 'medusa-trt[ray]'") from None
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose own handler would abort the process
        signal.signal(sig, lambda *_: stop.set())
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        app = ray_application(artifact, model_name, replicas, load, max_batch, max_queue, decode, gpus_per_replica,
                              batching, reasoning_parser, tool_call_parser, access)  # fmt: skip
        try:
            ray_serve.run(app, name="medusa", route_prefix="/")
        except RuntimeError:  # "Deploying application medusa failed": the replica's own error is in its status
            why = replica_error(ray_serve.status())
            if why is None:
                raise
            raise MedusaError(f"the Ray Serve replicas failed to start: {why}") from None
        log.info("serving %s on http://%s:%d/v1 with %d Ray Serve replicas", model_name, host, port, replicas)
        print(f"ready: {replicas} replicas behind Ray's HTTP proxy on http://{host}:{port}/v1", flush=True)
        stop.wait()
    finally:
        ray_serve.shutdown()
        ray.shutdown()
