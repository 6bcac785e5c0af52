"""Property-based fuzzing of the public API (hypothesis).

Random types and values for every parameter of ``runtime.load``, ``generate`` and ``stream``,
random tree specs (lists, files, names) and random damage to a copy of an exported artifact
(truncate, delete, swap, append to, flip bytes in a file; edit or replace medusa_config.json).
The property, for every input: a valid result or a :class:`MedusaError`, never another
exception, never a hang (each call within ``BOUND_S``), and nothing left on disk.

Fast form (CI, every ``pytest`` run): a fixed number of examples per property, derandomized,
so a run is deterministic and the file takes well under a minute on 2 cores. Long form, on
demand, with fresh random inputs each run::

    MEDUSA_FUZZ_EXAMPLES=2000 python -m pytest -q tests/runtime/test_fuzz.py

Hypothesis prints the failing input and how to reproduce it; no example database is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import runtime  # noqa: E402
from runtime.artifact import file_digest  # noqa: E402
from runtime.errors import ArtifactError, MedusaError  # noqa: E402

LONG = int(os.environ.get("MEDUSA_FUZZ_EXAMPLES", "0") or 0)
BOUND_S = 30.0  # one call on the tiny artifact takes milliseconds; this only catches hangs
CONTEXT = 64  # the fuzzed generator's cache: bounds every decode however many tokens are asked for
VOCAB = 49152  # the tiny artifact's vocabulary (the SmolLM2 tokenizer's)


def fuzz(examples: int):
    """Settings of one property: ``examples`` in CI (derandomized), MEDUSA_FUZZ_EXAMPLES on demand."""
    return settings(
        max_examples=LONG or examples,
        derandomize=not LONG,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
        print_blob=True,
    )


@pytest.fixture(scope="module")
def gen(tiny):
    return runtime.load(tiny["artifact"], backend="onnxruntime", threads=1, max_context=CONTEXT)


@pytest.fixture(scope="module")
def listing(tiny):
    """The artifact's files and sizes: no call may write into it."""
    return sorted((p.name, p.stat().st_size) for p in tiny["artifact"].iterdir())


def bounded(fn):
    """(result, exception) of ``fn()`` run in a thread; a test failure if it outlives BOUND_S."""
    box: dict = {}

    def run():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MedusaWarning is a valid outcome; not the property
                box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    start = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(BOUND_S)
    assert not t.is_alive(), f"a call ran past {BOUND_S} s (a hang)"
    assert time.monotonic() - start < BOUND_S
    return box.get("value"), box.get("error")


def medusa_error_or_none(error):
    """The property: nothing but a MedusaError (with a one-line message) escapes."""
    hypothesis.event("ok" if error is None else type(error).__name__)
    if error is None:
        return
    if not isinstance(error, MedusaError):
        raise AssertionError(f"{type(error).__name__} escaped instead of a MedusaError: {error}") from error
    assert str(error) and "\n" not in str(error).strip(), repr(str(error))


# ---------------------------------------------------------------------------- strategies

hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=2),  # lone surrogates
    st.binary(max_size=4),
    st.lists(st.integers(min_value=-5, max_value=10**6), max_size=3),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([np.int64(3), np.float32("nan"), np.float64(0.5), np.array([1, 2]), object(), (1, "a")]),
)


def either(valid):
    return st.one_of(valid, hostile)


ranks = st.one_of(
    st.integers(min_value=0, max_value=4),
    st.integers(min_value=-2, max_value=12),
    st.sampled_from([VOCAB - 1, VOCAB, 2**62, 2**64]),
    st.booleans(),
    st.floats(0, 3),
)
raw_paths = st.lists(st.lists(ranks, max_size=5), max_size=10)


def prefix_closed(paths):
    out = {tuple(p[:k]) for p in paths for k in range(1, len(p) + 1)}
    return [list(p) for p in sorted(out)]


valid_paths = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), min_size=1, max_size=12).map(prefix_closed)
tree_specs = st.one_of(
    st.none(),
    st.sampled_from(["chain_1", "chain_3", "cpu_8", "mc_sim_7b_63", "no_such_tree"]),
    valid_paths,
    raw_paths,
    hostile,
)
tree_docs = st.one_of(
    st.fixed_dictionaries({"name": st.text(max_size=5), "paths": valid_paths}),
    valid_paths,
    st.fixed_dictionaries({"paths": st.one_of(raw_paths, hostile)}),
    raw_paths,
    hostile,
    st.fixed_dictionaries({"name": st.text(max_size=5)}),
)

texts = st.text(min_size=0, max_size=40)
valid_prompts = st.one_of(
    st.text(min_size=1, max_size=40),
    st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=12),
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": texts}),
        min_size=1,
        max_size=3,
    ),
)
prompts = st.one_of(
    valid_prompts,
    texts,
    hostile,
    st.lists(
        st.fixed_dictionaries({"role": either(st.just("user")), "content": either(texts)}), min_size=0, max_size=2
    ),
)

VALID = {
    "max_new_tokens": st.integers(min_value=1, max_value=8),
    "temperature": st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=3.0)),
    "epsilon": st.floats(min_value=0.001, max_value=1.0),
    "delta": st.floats(min_value=0.0, max_value=2.0),
    "tree": st.one_of(st.none(), st.sampled_from(["chain_1", "chain_3", "cpu_8", "mc_sim_7b_63"]), valid_paths),
    "stop": st.one_of(
        st.just(()), st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)
    ),
    "seed": st.one_of(st.none(), st.integers(min_value=0, max_value=2**64)),
    "medusa": st.booleans(),
    "acceptance": st.sampled_from(["exact", "typical"]),
    "top_k": st.integers(min_value=0, max_value=60),
    "top_p": st.floats(min_value=0.01, max_value=1.0),
    "lookup": st.integers(min_value=0, max_value=6),
    "drafts": st.sampled_from(["coupled", "top", "sampled"]),
}
valid_kwargs = st.fixed_dictionaries({"prompt": valid_prompts}, optional=VALID)


def _one_bad(args):
    kw, name, value = args
    return {**kw, name: value}


# a third of the inputs valid throughout, a third with one hostile argument (each argument's own
# check), a third anything at all (tree specs and prompts of every kind included)
decode_kwargs = st.one_of(
    valid_kwargs,
    st.tuples(valid_kwargs, st.sampled_from(["prompt", *VALID]), st.one_of(hostile, tree_specs, prompts)).map(_one_bad),
    st.fixed_dictionaries(
        {"prompt": prompts}, optional={**{k: either(v) for k, v in VALID.items()}, "tree": tree_specs}
    ),
)


def check_generation(out, kw):
    assert isinstance(out, runtime.Generation)
    assert all(isinstance(t, int) and 0 <= t < VOCAB for t in out.tokens)
    n = kw.get("max_new_tokens", 256)
    assert 1 <= len(out.tokens) <= min(n, CONTEXT)
    assert out.stats.finish_reason in ("eos", "length", "stop_string", "context")


# ---------------------------------------------------------------------------- properties


@fuzz(60)
@given(kw=decode_kwargs)
def test_generate_gives_a_result_or_a_medusa_error(gen, tiny, listing, kw):
    out, error = bounded(lambda: gen.generate(**kw))
    medusa_error_or_none(error)
    if error is None:
        check_generation(out, kw)
    assert sorted((p.name, p.stat().st_size) for p in tiny["artifact"].iterdir()) == listing


@fuzz(50)
@given(kw=decode_kwargs, read=st.integers(min_value=0, max_value=4))
def test_stream_gives_chunks_or_a_medusa_error_and_never_blocks(gen, kw, read):
    stream, error = bounded(lambda: gen.stream(**kw))
    medusa_error_or_none(error)
    if error is None:

        def consume(stream=stream):
            chunks = []
            for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == read:  # stop half way: the generator must stay usable
                    break
            return chunks

        chunks, error = bounded(consume)
        medusa_error_or_none(error)
        if error is None:
            assert all(isinstance(c, runtime.api.TextChunk) and isinstance(c.text, str) for c in chunks)
    # whatever the stream did, another call goes through, with the tokens it gives alone
    other, error = bounded(lambda: gen.generate([5, 6, 7], max_new_tokens=3))
    assert error is None and other.tokens == gen.generate([5, 6, 7], max_new_tokens=3).tokens
    del stream


LOAD_VALID = {
    "backend": st.sampled_from(["auto", "onnxruntime", "tensorrt"]),
    "device": st.sampled_from(["auto", "cpu", "cuda"]),
    "threads": st.one_of(st.none(), st.integers(min_value=1, max_value=2)),
    "max_context": st.one_of(st.none(), st.integers(min_value=2, max_value=400)),
    "tree": st.one_of(st.none(), st.sampled_from(["chain_2", "cpu_8"]), valid_paths),
    "prefill_chunk": st.integers(min_value=0, max_value=600),
    "verify": st.booleans(),
}
load_kwargs = st.one_of(
    st.fixed_dictionaries({}, optional=LOAD_VALID),
    st.tuples(
        st.fixed_dictionaries({}, optional=LOAD_VALID),
        st.sampled_from(list(LOAD_VALID)),
        st.one_of(hostile, tree_specs),
    ).map(_one_bad),
    st.fixed_dictionaries({}, optional={**{k: either(v) for k, v in LOAD_VALID.items()}, "tree": tree_specs}),
)


@fuzz(30)
@given(kw=load_kwargs)
def test_load_gives_a_generator_or_a_medusa_error(tiny, kw):
    kw = {"threads": 1, **kw}
    g, error = bounded(lambda: runtime.load(tiny["artifact"], **kw))
    medusa_error_or_none(error)
    if error is None:
        out, error = bounded(lambda: g.generate("Hi there", max_new_tokens=3))
        medusa_error_or_none(error)  # a 2-token context cannot hold the prompt: ContextLengthError


@fuzz(30)
@given(doc=tree_docs, name=st.sampled_from(["t.json", "t", "t.txt"]), garbage=st.sampled_from([False] * 5 + [True]))
def test_tree_files_give_a_tree_or_a_medusa_error(gen, tmp_path_factory, doc, name, garbage):
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        path = folder / name
        try:
            text = json.dumps(doc)
        except (TypeError, ValueError):  # not JSON-able (bytes, nan is fine): write its repr
            text = repr(doc)
        path.write_bytes(os.urandom(12) if garbage else text.encode("utf-8", "surrogatepass"))
        out, error = bounded(lambda: gen.generate([5, 6, 7], max_new_tokens=3, tree=str(path)))
        medusa_error_or_none(error)
    finally:
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------- artifact damage

FILES = [
    "model.onnx",
    "heads.onnx",
    "heads_int8.onnx",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "medusa_config.json",
]
json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-3, max_value=10**6), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
damage = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(min_value=0.0, max_value=0.999)),
    st.tuples(st.just("delete"), st.sampled_from(FILES), st.just(0)),
    st.tuples(st.just("flip"), st.sampled_from(FILES), st.floats(min_value=0.0, max_value=0.999)),
    st.tuples(st.just("append"), st.sampled_from(FILES), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("swap"), st.sampled_from(FILES), st.sampled_from(FILES)),
    st.tuples(st.just("edit"), st.integers(min_value=0, max_value=10**6), json_values),
    st.tuples(st.just("config"), st.just(""), json_values),
)


def leaves(node, path=()):
    """Every (path, value) of a JSON document's leaves and containers."""
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, path + (i,))


def apply(art: Path, op) -> None:
    """Damage ``art`` in place."""
    kind, target, arg = op
    path = art / target if isinstance(target, str) and target else None
    if kind in ("truncate", "delete", "flip", "append", "swap") and not path.exists():
        return
    if kind == "truncate":
        os.truncate(path, int(path.stat().st_size * arg))
    elif kind == "delete":
        path.unlink()
    elif kind == "flip" and path.stat().st_size:
        with open(path, "r+b") as f:
            f.seek(int(path.stat().st_size * arg))
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x5A]))
    elif kind == "append":
        with open(path, "ab") as f:
            f.write(arg)
    elif kind == "swap" and (art / arg).exists() and target != arg:
        shutil.copyfile(art / arg, path)
    elif kind == "edit":
        cfg_path = art / "medusa_config.json"
        try:
            raw = json.loads(cfg_path.read_text())
        except (ValueError, OSError):
            return
        paths = [p for p in leaves(raw) if p]
        if not paths:
            return
        where = paths[target % len(paths)]
        node = raw
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = arg
        cfg_path.write_text(json.dumps(raw))
    elif kind == "config":
        (art / "medusa_config.json").write_text(json.dumps(arg))


def changed_at_same_size(art: Path, original: Path) -> bool:
    """Whether a file the export checksummed still has its size but other bytes."""
    for name in FILES[:-1]:
        a, b = art / name, original / name
        if a.exists() and a.stat().st_size == b.stat().st_size and file_digest(a) != file_digest(b):
            return True
    return False


@fuzz(40)
@given(ops=st.lists(damage, min_size=1, max_size=3), verify=st.booleans())
def test_damaged_artifacts_load_or_give_a_medusa_error(tiny, tmp_path_factory, ops, verify):
    base = tmp_path_factory.getbasetemp() / "damage"
    base.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base))
    try:
        art = work / "a"
        shutil.copytree(tiny["artifact"], art)
        for op in ops:
            apply(art, op)
        flipped = changed_at_same_size(art, tiny["artifact"])
        before = sorted(p.name for p in art.iterdir())
        g, error = bounded(lambda: runtime.load(art, threads=1, verify=verify))
        medusa_error_or_none(error)
        if flipped and verify:
            assert isinstance(error, ArtifactError), "a changed byte must fail verify=True"
        if error is None:
            out, error = bounded(lambda: g.generate("Hi there", max_new_tokens=3))
            # without verify a same-size change inside a weight decodes (other tokens): a valid result
            medusa_error_or_none(error)
        assert sorted(p.name for p in art.iterdir()) == before  # loading writes nothing
    finally:
        shutil.rmtree(work)
    assert list(base.iterdir()) == []  # nothing left behind
