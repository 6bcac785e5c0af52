"""Issue 15's cases for the runtime, one regression test each: every bad input a one-line
MedusaError (or correct behaviour), no hang, nothing left behind.

The numbered sections follow the issue: 1 half-read streams, 2 NaN / infinity / floats,
3 silent wrong output, 4 raw exceptions (API, artifacts, medusa-run's command line),
7 trees that cannot fit. ``API_CASES`` and ``ARTIFACT_CASES`` are docs/usage.md's "input / what
happens" table. The exporter's cases (4 checkpoints and medusa-export's command line,
5 interrupted exports) are in tests/exporter/test_export_hardening.py, the training's
(4 medusa-train's command line, 6 distillation resume) in tests/training/test_train_cli.py
and tests/training/test_distill.py.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import threading
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import runtime  # noqa: E402
from runtime.errors import (  # noqa: E402
    ArtifactError,
    ConfigError,
    ContextLengthError,
    MedusaError,
    MedusaWarning,
    TreeError,
)

PROMPTS = ["Write a haiku about rivers.", "What is 17 times 23?", "List three prime numbers."]


@pytest.fixture(scope="module")
def alone(gen):
    """Each prompt's greedy tokens (tree cpu_8) and a seeded sample, decoded alone."""
    return {
        p: (
            gen.generate(p, max_new_tokens=24, tree="cpu_8").tokens,
            gen.generate(p, max_new_tokens=24, tree="cpu_8", temperature=0.9, seed=5).tokens,
        )
        for p in PROMPTS
    }


def within(seconds: float, fn):
    """``fn()``'s result, or a test failure (not a hung test run) after ``seconds``."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s (a hang)"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------------- 1. streams


def test_half_read_stream_does_not_block_other_calls(gen, alone):
    s = gen.stream(PROMPTS[0], max_new_tokens=24, tree="cpu_8")
    first = next(s)
    other = within(60, lambda: gen.generate(PROMPTS[1], max_new_tokens=24, tree="cpu_8"))
    assert other.tokens == alone[PROMPTS[1]][0]
    rest = within(60, lambda: [t for c in s for t in c.tokens])
    assert first.tokens + rest == alone[PROMPTS[0]][0]  # the stream resumed on its own cache


@pytest.mark.parametrize("tree", ["cpu_8", "dynamic"])
@pytest.mark.parametrize("sampled", [False, True])
def test_interleaved_streams_equal_each_run_alone(gen, alone, sampled, tree):
    """Streams taking turns on one generator (and a whole call between their steps) give what
    each gives alone. A dynamic tree drafts from the last forward's hidden state at the start of
    its next step: where another call ran forwards since, that step is plain (the state is not its
    own), not an error."""
    kw = dict(max_new_tokens=24, tree=tree, **({"temperature": 0.9, "seed": 5} if sampled else {}))
    want = {p: alone[p][int(sampled)] for p in PROMPTS}
    if tree != "cpu_8":  # (greedy tokens do not depend on the tree; sampled ones may, by the logits' last bits)
        want = {p: gen.generate(p, **kw).tokens for p in PROMPTS}
    streams = {p: gen.stream(p, **kw) for p in PROMPTS}
    got = {p: [] for p in PROMPTS}
    while streams:  # one chunk of each in turn: every step finds another stream's sequence in the cache
        for p, s in list(streams.items()):
            chunk = next(s, None)
            if chunk is None:
                del streams[p]
            else:
                got[p].extend(chunk.tokens)
        gen.generate(PROMPTS[2], max_new_tokens=3)  # and a whole call in between
    assert got == want


def test_streams_from_threads_with_slow_consumers(gen, alone):
    results, errors = {}, []

    def consume(p):
        try:
            toks = []
            for c in gen.stream(p, max_new_tokens=24, tree="cpu_8"):
                toks.extend(c.tokens)
                time.sleep(0.002)  # a slow consumer: others must progress meanwhile
            results[p] = toks
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=consume, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == {p: alone[p][0] for p in PROMPTS}


def test_backend_without_snapshot_replays_the_sequence(tiny, alone):
    g = runtime.load(tiny["artifact"], backend="onnxruntime", threads=1)
    g.backend.snapshot = lambda: None  # as a backend that cannot copy its cache (TensorRT's device cache)
    a, b = g.stream(PROMPTS[0], max_new_tokens=24, tree="cpu_8"), g.stream(PROMPTS[1], max_new_tokens=24, tree="cpu_8")
    got_a, got_b = list(next(a).tokens), list(next(b).tokens)
    for c in a:
        got_a.extend(c.tokens)
    for c in b:
        got_b.extend(c.tokens)
    assert (got_a, got_b) == (alone[PROMPTS[0]][0], alone[PROMPTS[1]][0])


def test_abandoned_stream_frees_everything(gen, alone):
    s = gen.stream(PROMPTS[0], max_new_tokens=24, tree="cpu_8")
    next(s)
    claim = s.gi_frame.f_locals["steps"].gi_frame.f_locals["claim"]
    assert gen.generate(PROMPTS[1], max_new_tokens=24, tree="cpu_8").tokens == alone[PROMPTS[1]][0]
    assert claim.saved is not None  # displaced: its cache copy lives in the stream, not the generator
    ref = weakref.ref(claim)
    del s, claim
    gc.collect()
    assert ref() is None
    assert gen.generate(PROMPTS[0], max_new_tokens=24, tree="cpu_8").tokens == alone[PROMPTS[0]][0]


def test_stream_checks_its_arguments_at_the_call(gen, tiny, monkeypatch):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        gen.stream("hi", max_new_tokens=float("nan"))  # not at the first next()
    with pytest.raises(ContextLengthError, match="context holds"):
        gen.stream(list(range(5, 5 + 300)), max_new_tokens=2)
    with pytest.raises(MedusaError, match="drafts='sampled' needs a fixed tree"):  # the tree against the decoding
        gen.stream("hi", tree="dynamic", temperature=0.7, drafts="sampled")
    import runtime.api

    # an engine exact with chains only (int8 / int4 graphs): a branching tree is named at the call, and
    # a branching tree given to load() (which greedy calls use) at the load
    make = runtime.api.make_backend

    def chains_only(*args, **kw):
        backend = make(*args, **kw)
        backend.exact_branching = False
        return backend

    monkeypatch.setattr(runtime.api, "make_backend", chains_only)
    chains = runtime.load(tiny["artifact"], threads=1)
    with pytest.raises(MedusaError, match="tree 'cpu_8' branches"):
        chains.stream("hi", tree="cpu_8")
    assert chains.generate("hi", tree="chain_2", max_new_tokens=4).tokens == gen.generate("hi", max_new_tokens=4).tokens
    with pytest.raises(MedusaError, match="tree 'cpu_8' branches"):
        runtime.load(tiny["artifact"], threads=1, tree="cpu_8")


# ---------------------------------------------------------------------------- 2-4. the API's arguments

# (what is passed, keyword arguments of generate(), the error, a fragment of its message): the table in docs/usage.md
API_CASES = [
    ("max_new_tokens=nan", dict(max_new_tokens=float("nan")), ConfigError, "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens=inf", dict(max_new_tokens=float("inf")), ConfigError, "max_new_tokens must be an integer"),
    ("max_new_tokens=2.5", dict(max_new_tokens=2.5), ConfigError, "got 2.5"),
    ("max_new_tokens=True", dict(max_new_tokens=True), ConfigError, r"got True \(bool\)"),
    ("max_new_tokens='5'", dict(max_new_tokens="5"), ConfigError, "max_new_tokens must be an integer"),
    ("temperature=nan", dict(temperature=float("nan")), ConfigError, "temperature must be a finite number >= 0"),
    ("temperature=inf", dict(temperature=float("inf")), ConfigError, "temperature must be a finite number"),
    ("temperature=-1", dict(temperature=-1), ConfigError, "temperature must be >= 0"),
    ("epsilon='x'", dict(epsilon="x"), ConfigError, r"epsilon must be a number in \(0, 1\]"),
    ("epsilon=nan", dict(epsilon=float("nan")), ConfigError, "epsilon must be a finite number"),
    ("delta=inf", dict(delta=float("inf")), ConfigError, "delta must be a finite number"),
    ("top_p=nan", dict(top_p=float("nan")), ConfigError, "top_p must be a finite number"),
    ("top_k=2.0", dict(top_k=2.0), ConfigError, "top_k must be an integer"),
    ("seed=-1", dict(seed=-1), ConfigError, "seed must be an integer >= 0"),
    ("seed='x'", dict(seed="x"), ConfigError, "seed must be an integer >= 0"),
    ("stop=''", dict(stop=""), ConfigError, "stop strings must not be empty"),
    ("stop=[1]", dict(stop=[1]), ConfigError, r"stop must be a string, got 1 \(int\)"),
    ("stop=b'x'", dict(stop=b"x"), ConfigError, "stop must be a string or a list of strings"),
    ("medusa='no'", dict(medusa="no"), ConfigError, "medusa must be True or False"),
    ("acceptance=1", dict(acceptance=1), ConfigError, "acceptance must be one of exact, typical"),
    ("prompt=b'Hi'", dict(prompt=b"Hi"), ConfigError, "the prompt is bytes"),
    ("prompt=None", dict(prompt=None), ConfigError, "prompt must be a string, a list of chat messages"),
    ("prompt=''", dict(prompt=""), ConfigError, "the prompt is empty"),
    ("prompt=[True, 5]", dict(prompt=[True, 5]), ConfigError, "token ids must be integers"),
    ("prompt=[10**30]", dict(prompt=[10**30]), ConfigError, r"token ids must lie in \[0, 49152\)"),
    (
        "chat content 5",
        dict(prompt=[{"role": "user", "content": 5}]),
        ConfigError,
        "message 0's content must be a string",
    ),
    ("chat message without role", dict(prompt=[{"content": "x"}]), ConfigError, "'role' and 'content'"),
    ("lone surrogate", dict(prompt="a\ud800b"), ConfigError, "lone surrogate"),
    ("tree=5", dict(tree=5), ConfigError, "tree must be a name from tree_configs"),
    ("tree rank = vocabulary", dict(tree=[[49152]]), TreeError, "asks for rank 49152 .* vocabulary has 49152 tokens"),
    ("tree rank 2**62", dict(tree=[[2**62]]), TreeError, "asks for rank 4611686018427387904"),
    ("tree unknown name", dict(tree="no_such_tree"), TreeError, "unknown tree"),
    (
        "tree deeper than the heads",
        dict(tree=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]),
        TreeError,
        "needs 5 Medusa heads, but the model has 4",
    ),
    ("prompt longer than the context", dict(prompt=list(range(5, 305))), ContextLengthError, "context holds 256"),
    # integers Python will not print (over 4,300 digits): named by their size
    ("max_new_tokens=-10**5000", dict(max_new_tokens=-(10**5000)), ConfigError, "got an integer of 16610 bits"),
    ("seed=-10**5000", dict(seed=-(10**5000)), ConfigError, "seed must be .*got an integer of 16610 bits"),
    ("token id 10**5000", dict(prompt=[10**5000]), ConfigError, r"got an integer of 16610 bits\.\.an integer"),
    (
        "tree rank 10**5000",
        dict(tree=[[10**5000]]),
        TreeError,
        "path a list holding an integer too large to print asks for rank an integer of 16610 bits",
    ),
    # sizes that allocated what they asked for (a lookup_max of 1e9 was killed for memory at 22 GB)
    ("lookup_max=10**9", dict(lookup_max=10**9), ConfigError, r"lookup_max must be .*in \[0, 1024\]"),
    ("lookup=10**9", dict(lookup=10**9), ConfigError, r"lookup must be .*in \[0, 1024\]"),
    ("tree=dynamic:10**12", dict(tree="dynamic:999999999999"), ConfigError, "1 to 1024"),
    ("tree=dynamic:superscript", dict(tree="dynamic:\u00b2"), ConfigError, "1 to 1024"),
]


@pytest.mark.parametrize("label,kw,error,match", API_CASES, ids=[c[0] for c in API_CASES])
def test_generate_and_stream_refuse_bad_arguments(gen, label, kw, error, match):
    kw = {"prompt": "Hi there", "max_new_tokens": 4, **kw}
    for call in (gen.generate, gen.stream):
        with pytest.raises(error, match=match) as info:
            call(**kw)
        assert "\n" not in str(info.value)


def test_paths_the_system_refuses_are_named_not_raised(gen, tmp_path, monkeypatch):
    """A name too long for the file system (pathlib's is_dir/is_file raise OSError on it) and a tree
    file that cannot be read are MedusaErrors naming the path."""
    import pathlib

    long = str(tmp_path / ("x" * 300))
    with pytest.raises(ArtifactError, match="does not exist"):
        runtime.load(long)
    with pytest.raises(TreeError, match="unknown tree"):
        gen.generate("hi", max_new_tokens=2, tree=long)
    with pytest.raises(TreeError, match="does not exist"):
        gen.generate("hi", max_new_tokens=2, tree=long + ".json")
    tree = tmp_path / "t.json"
    tree.write_text('{"paths": [[0]]}')

    def refused(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "read_bytes", refused)
    with pytest.raises(TreeError, match=r"cannot read .*t.json: Permission denied"):
        gen.generate("hi", max_new_tokens=2, tree=str(tree))


def test_stop_none_and_numpy_values_work(gen):
    a = gen.generate("Hi there", max_new_tokens=np.int64(4), temperature=np.float32(0.0), stop=None, seed=np.int64(3))
    b = gen.generate(np.array(gen.encode("Hi there")), max_new_tokens=4)
    assert a.tokens == b.tokens and len(a.tokens) == 4


def test_tree_file_errors(gen, tmp_path):
    cases = {"paths5.json": {"paths": 5}, "huge.json": {"paths": [[2**70]]}, "strs.json": {"paths": [["a"]]}}
    for name, doc in cases.items():
        (tmp_path / name).write_text(json.dumps(doc))
        with pytest.raises(TreeError, match=name.split(".")[0]):
            gen.generate("hi", max_new_tokens=2, tree=str(tmp_path / name))
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TreeError, match=r"bin.json: line 1 is not UTF-8 text \(byte 0xff\)"):
        gen.generate("hi", max_new_tokens=2, tree=tmp_path / "bin.json")


LOAD_CASES = [
    ("max_context=-5", dict(max_context=-5), "max_context must be an integer >= 2"),
    ("max_context=2.0", dict(max_context=2.0), "max_context must be an integer"),
    ("threads='x'", dict(threads="x"), r"threads must be an integer in \[1, 1024\]"),
    ("threads=0", dict(threads=0), "threads must be an integer"),
    ("backend=5", dict(backend=5), "backend must be one of auto, onnxruntime, tensorrt"),
    ("device=None", dict(device=None), "device must be one of auto, cpu, cuda"),
    ("prefill_chunk=-1", dict(prefill_chunk=-1), "prefill_chunk must be an integer >= 0"),
    ("verify='yes'", dict(verify="yes"), "verify must be True or False"),
    ("tree=[[10**6]]", dict(tree=[[10**6]]), "asks for rank 1000000"),
]


@pytest.mark.parametrize("batched", [False, True], ids=["one-sequence", "max_batch"])
@pytest.mark.parametrize("label,kw,match", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_refuses_bad_arguments(tiny, label, kw, match, batched):
    with pytest.raises(MedusaError, match=match):
        runtime.load(tiny["artifact"], **{**(dict(max_batch=1, budgets=None, threads=1) if batched else {}), **kw})


def test_a_prefill_chunk_asked_for_is_the_one_used(tiny):
    """None takes each path's default (512; 128 with max_batch, so that the others wait for one chunk
    at a time); a chunk given is used as given, 512 included (it used to read as "the default")."""
    one = runtime.load(tiny["artifact"], threads=1)
    batched = runtime.load(tiny["artifact"], threads=1, max_batch=1, budgets=None)
    asked = runtime.load(tiny["artifact"], threads=1, max_batch=1, budgets=None, prefill_chunk=512)
    try:
        assert (one.prefill_chunk, batched.prefill_chunk, asked.prefill_chunk) == (512, 128, 512)
    finally:
        for g in (one, batched, asked):
            g.close()


def test_load_folder_types_and_max_context_cap(tiny):
    with pytest.raises(ConfigError, match="artifact folder must be a folder path"):
        runtime.load(None)
    with pytest.warns(MedusaWarning, match="max_context 100000 exceeds the artifact's context of 256"):
        g = runtime.load(tiny["artifact"], max_context=100000, threads=1)
    assert g.backend.max_context == 256


# ---------------------------------------------------------------------------- 4. artifacts


def _copy(tiny, tmp_path) -> Path:
    art = tmp_path / "a"
    shutil.copytree(tiny["artifact"], art)
    return art


def _edit_config(art: Path, fn, unseal: bool = False) -> None:
    path = art / "medusa_config.json"
    raw = json.loads(path.read_text())
    fn(raw)
    if unseal:  # an artifact from before the config was sealed: the graph checks answer
        raw["provenance"].pop("config_sha256")
    path.write_text(json.dumps(raw))


def _unrecord(art: Path, name: str) -> None:
    _edit_config(
        art, lambda raw: (raw["provenance"]["checksums"].pop(name), raw["provenance"]["files"].pop(name, None))
    )


ARTIFACT_CASES = [
    (
        "model.onnx truncated",
        lambda a: os.truncate(a / "model.onnx", 1000),
        r"model.onnx is 1000 bytes but the export wrote \d+: the file is truncated",
    ),
    (
        "model.onnx truncated, size not recorded (older export)",
        lambda a: (os.truncate(a / "model.onnx", 1000), _unrecord(a, "model.onnx")),
        r"model.onnx in .* cannot be loaded by ONNX Runtime \(InvalidProtobuf",
    ),
    (
        "model.onnx swapped for heads.onnx",
        lambda a: shutil.copy(a / "heads.onnx", a / "model.onnx"),
        "model.onnx is .* bytes but the export wrote",
    ),
    ("heads.onnx deleted", lambda a: (a / "heads.onnx").unlink(), "heads.onnx is missing"),
    (
        "tokenizer.json corrupt",
        lambda a: ((a / "tokenizer.json").write_text("{not json"), _unrecord(a, "tokenizer.json")),
        "tokenizer.json: not a readable tokenizer",
    ),
    (
        "chat_template.jinja broken",
        lambda a: ((a / "chat_template.jinja").write_text("{% for %}"), _unrecord(a, "chat_template.jinja")),
        "the chat template does not parse",
    ),
    (
        "config is a JSON list",
        lambda a: (a / "medusa_config.json").write_text("[1, 2]"),
        "must hold a JSON object, found a list",
    ),
    (
        "config field of a wrong type",
        lambda a: _edit_config(a, lambda r: r["model"].update(num_layers="2")),
        "model.num_layers must be an integer >= 1, got '2'",
    ),
    (
        "config sizes edited",
        lambda a: _edit_config(a, lambda r: r["model"].update(vocab_size=50000)),
        "were edited after export",
    ),
    (
        "config vocabulary not the graph's (unsealed)",
        lambda a: _edit_config(a, lambda r: r["model"].update(vocab_size=50000), unseal=True),
        "logits has vocabulary size 49152 in the graph but medusa_config.json says 50000",
    ),
    (
        "more Medusa heads in the config than in the graph (unsealed)",
        lambda a: _edit_config(a, lambda r: r["model"].update(num_medusa_heads=5), unseal=True),
        "medusa_logits has Medusa heads count 4 in the graph but medusa_config.json says 5",
    ),
    (
        "layers not the graph's (unsealed)",
        lambda a: _edit_config(a, lambda r: r["model"].update(num_layers=3), unseal=True),
        "graph I/O does not match the fused contract for 3 layers",
    ),
    (
        "config field this runtime does not know (a newer medusa-trt's)",
        lambda a: _edit_config(a, lambda r: r.update(newfield=1), unseal=True),
        r"fields this runtime does not know \(newfield\): written by a newer medusa-trt \(upgrade it\)",
    ),
    (
        "format_version true (a bool, not a version)",
        lambda a: _edit_config(a, lambda r: r.update(format_version=True), unseal=True),
        r"incompatible exporter \(format_version True",
    ),
    (
        "a recorded size that is not an integer",
        lambda a: _edit_config(a, lambda r: r["provenance"]["checksums"]["model.onnx"].update(bytes="1000")),
        r"malformed provenance record for 'model.onnx'",
    ),
    (
        "config of a newer format version",
        lambda a: _edit_config(a, lambda r: r.update(format_version=99)),
        r"format_version 99, this runtime reads \d+\); upgrade medusa-trt to load it",
    ),
    (
        "graph file outside the folder",
        lambda a: _edit_config(a, lambda r: r["backbone"].update(file="../x.onnx")),
        "backbone.file must be a file name inside the artifact folder",
    ),
]


@pytest.mark.parametrize("label,damage,match", ARTIFACT_CASES, ids=[c[0] for c in ARTIFACT_CASES])
def test_damaged_artifacts_are_named_at_load(tiny, tmp_path, label, damage, match):
    art = _copy(tiny, tmp_path)
    damage(art)
    with pytest.raises(ArtifactError, match=match) as info:
        runtime.load(art, threads=1)
    assert "\n" not in str(info.value)


def test_more_heads_in_the_config_than_a_symbolic_heads_axis_makes(tiny, tmp_path, monkeypatch):
    """Real exports declare medusa_logits' heads axis symbolic (it comes out of a scatter; the tiny
    export's is a number): the load runs the heads graph once to count them, so an unsealed config
    claiming more heads is named at load, not an IndexError at the first deep tree."""
    from types import SimpleNamespace

    import runtime.onnxrt

    class SymbolicHeads:
        def __init__(self, session):
            self.session = session

        def get_outputs(self):
            return [SimpleNamespace(name=o.name, type=o.type, shape=[o.shape[0], "heads", *o.shape[2:]])
                    for o in self.session.get_outputs()]  # fmt: skip

        def __getattr__(self, name):
            return getattr(self.session, name)

    real = runtime.onnxrt.open_sessions
    monkeypatch.setattr(
        runtime.onnxrt, "open_sessions", lambda *a: (lambda b, h, f: (b, SymbolicHeads(h), f))(*real(*a))
    )
    art = _copy(tiny, tmp_path)
    runtime.load(art, threads=1).close()  # the right count loads
    _edit_config(art, lambda r: r["model"].update(num_medusa_heads=5), unseal=True)
    with pytest.raises(
        ArtifactError, match="medusa_logits has Medusa heads count 4 in the graph but medusa_config.json says 5"
    ):
        runtime.load(art, threads=1)


def test_verify_checks_every_files_sha256(tiny, tmp_path):
    art = _copy(tiny, tmp_path)
    cfg = json.loads((art / "medusa_config.json").read_text())
    assert set(cfg["provenance"]["checksums"]) == {p.name for p in art.iterdir() if p.name != "medusa_config.json"}
    runtime.load(art, threads=1, verify=True)  # intact
    with open(art / "heads.onnx", "r+b") as f:  # same size, one byte changed inside a weight
        f.seek(os.path.getsize(art / "heads.onnx") - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    runtime.load(art, threads=1)  # sizes only: loads
    with pytest.raises(ArtifactError, match="heads.onnx does not match the sha256 the export recorded"):
        runtime.load(art, threads=1, verify=True)


def test_chat_templates_render_as_transformers_renders_them(tiny, tmp_path):
    """Templates written for transformers' environment: `if tools` (undefined in ours before: every
    chat call failed), {% continue %} (the load failed), the special tokens and strftime_now, and a
    missing message field rendering empty."""
    from runtime.tokenizer import Tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny["artifact"] / name, folder / name)
    (folder / "chat_template.jinja").write_text(
        "{%- if tools %}[tools]{% endif %}{% if documents is not none %}[docs]{% endif %}"
        "{%- for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "<{{ m.role }}{{ m.name }}>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{%- if add_generation_prompt %}<assistant>{% endif %}{{ strftime_now('') }}"
    )
    tok = Tokenizer(folder)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    eos = json.loads((folder / "tokenizer_config.json").read_text())["eos_token"]
    assert tok.decode(tok.apply_chat_template(messages), skip_special_tokens=False) == f"<user>hi{eos}<assistant>"
    (folder / "chat_template.jinja").write_text("{{ raise_exception('no system turn') }}")
    with pytest.raises(MedusaError, match="chat template: no system turn"):
        Tokenizer(folder).apply_chat_template(messages)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tiny, tmp_path):
    art = _copy(tiny, tmp_path)
    _edit_config(art, lambda r: r["model"].update(vocab_size=1000), unseal=True)
    with pytest.raises(ArtifactError, match="tokenizer.json holds 49152 tokens but the model's vocabulary is 1000"):
        runtime.load(art, threads=1)


# ---------------------------------------------------------------------------- 4. command lines


def _one_line_error(capsys, rc, prog):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--temperature", "nan"], "temperature must be a finite number"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
        (["--stop", ""], "stop strings must not be empty"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--threads", "0"], "threads must be an integer"),
        (["--max-context", "-5"], "max_context must be an integer >= 2"),
        (["--tree", "TREEFILE"], "expected a non-empty list of paths"),
    ],
)
def test_medusa_run_generate_bad_args_one_line(tiny, tmp_path, capsys, args, match):
    from runtime.cli import main

    tree = tmp_path / "t.json"
    tree.write_text(json.dumps({"paths": 5}))
    args = [str(tree) if a == "TREEFILE" else a for a in args]
    line = _one_line_error(
        capsys, main(["generate", str(tiny["artifact"]), "hi", "--threads", "1", *args]), "medusa-run"
    )
    assert match in line


PROMPT_FILES = [  # (file name, bytes, the one-line error): every way a prompt file goes wrong
    (
        "nonutf.jsonl",
        b'\xff\xfe{"prompt": "hi"}\n',
        "nonutf.jsonl: line 1 is not UTF-8 text (byte 0xff) (it starts with a UTF-16 byte-order mark)",
    ),
    (
        "latin1.jsonl",
        b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n',
        "latin1.jsonl: line 2 is not UTF-8 text (byte 0xe9)",
    ),
    ("empty.json", b"[]", "empty.json holds no prompts"),
    ("turns.jsonl", b'{"turns": "Write a poem"}\n', "'turns' must be a non-empty list of strings"),
    ("null.jsonl", b'{"prompt": null}\n', "null.jsonl: line 1: the prompt must be a string"),
    ("blank.jsonl", b'{"prompt": "  "}\n', "null.jsonl: line 1: the prompt is empty".replace("null", "blank")),
    ("input.json", b'[{"instruction": "Say hi", "input": 5}]', "record 0: expected an object with an 'instruction'"),
    ("badjson.jsonl", b'{"prompt": "hi"}\n{"prompt": \n', "badjson.jsonl:2: not valid JSON"),
]


@pytest.mark.parametrize("name,data,match", PROMPT_FILES, ids=[c[0] for c in PROMPT_FILES])
def test_prompt_files_are_checked_in_one_line(tmp_path, name, data, match):
    from runtime.bench import load_prompts

    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(MedusaError) as info:
        load_prompts(path)
    assert match in str(info.value) and "\n" not in str(info.value)


def test_prompt_file_limits_are_checked(tmp_path):
    from runtime.bench import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(3)))
    assert [p.text for p in load_prompts(path, limit=2)] == ["p0", "p1"]
    for kw, match in ((dict(limit=0), "--limit must be >= 1, got 0"), (dict(limit=-1), "--limit must be >= 1"),
                      (dict(skip=-1), "--skip must be >= 0"), (dict(per_category=0), "--per-category")):  # fmt: skip
        with pytest.raises(MedusaError, match=match):
            load_prompts(path, **kw)
    with pytest.raises(MedusaError, match="is a folder, not a file"):
        load_prompts(tmp_path)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["profile", "ART", "--sizes", "1", "2", "--repeats", "0"], "--repeats must be an integer >= 1"),
        (["profile", "ART", "--sizes", "4", "8"], "--sizes must include 1"),
        (["profile", "ART", "--sizes", "0", "1"], "--sizes must be an integer >= 1"),
        (["profile", "ART", "--cached", "-5"], "--cached must be an integer >= 0"),
        (["profile", "ART", "--sizes", "1", "20000"], "exceed the artifact's context"),
        (["profile", "ART", "-o", "TMP"], "is a folder: give a file name"),
        (["profile", "ART", "-o", "TMP/nodir/p.json"], "nodir does not exist"),
        (["bench", "ART", "--prompts", "PROMPTS", "--limit", "0"], "--limit must be >= 1"),
        (["bench", "ART", "--prompts", "PROMPTS", "--json", "TMP/nodir/x.json"], "nodir does not exist"),
        (["bench", "ART", "--prompts", "PROMPTS", "--plot", "TMP/out.xyz"], "the name must end in .png"),
        (["bench", "ART", "--prompts", "PROMPTS", "--peer-model", "TMP"], "give --peer too"),
        (["bench", "ART", "--prompts", "PROMPTS", "--peer", "hf", "--peer-model", "TMP"], "not a Hugging Face model"),
        (["bench", "ART", "--prompts", "TMP"], "is a folder, not a file"),
        (["calibrate", "ART", "--prompts", "PROMPTS", "-o", "TMP"], "is a folder: give a file name"),
        (["generate", "ART", ""], "the prompt is empty"),
        (["generate", "ART", "caf\udce9"], "the prompt is not UTF-8 text"),  # argv's bytes b"caf\xe9"
        (["generate", "ART", "hi", "--no-medusa", "--tree", "nosuch"], "--tree has no effect with --no-medusa"),
        (["generate", "ART/medusa_config.json", "hi"], "is a file, not an artifact folder"),
        (["serve", "ART", "--plain", "--tree", "chain_2"], "--tree has no effect with --plain"),
        (["serve", "ART", "--max-batch", "1000"], "--max-batch must be an integer in [1, 256]"),
        (["generate", "ART", "hi", "--tree", "TMP"], "is a folder, not a file"),
        (["bench", "ART", "--prompts", "PROMPTS", "--json", "/proc/b.json"], "cannot write in /proc"),
        (["profile", "ART", "-o", "/proc/p.json"], "cannot write in /proc"),
    ],
)
def test_medusa_run_bad_files_and_flags_one_line(tiny, tmp_path, capsys, argv, match):
    """Each is refused before any work, in one line, and writes nothing (a bench or profile's output
    paths are checked before the run, not after it)."""
    from runtime.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    subst = {"ART": str(tiny["artifact"]), "TMP": str(tmp_path), "PROMPTS": str(prompts)}
    argv = [subst.get(a, a) for a in argv]
    argv = [a.replace("ART/", f"{tiny['artifact']}/").replace("TMP/", f"{tmp_path}/") for a in argv]
    before = sorted(tmp_path.rglob("*"))
    line = _one_line_error(capsys, main([*argv, "--threads", "1"]), "medusa-run")
    assert match in line, line
    assert sorted(tmp_path.rglob("*")) == before


def test_default_outputs_and_the_plot_extra_are_checked_before_the_work(tiny, tmp_path, capsys, monkeypatch):
    """profile and calibrate write into the artifact by default: that path is checked before the
    measurement as -o is; bench --plot without matplotlib is named before the bench, not after it;
    a write that still fails at the end is one line (atomic_file), not a traceback."""
    import importlib.util

    import runtime.cli
    from runtime.cli import main
    from runtime.dynamic import CALIBRATION_FILE
    from runtime.paths import atomic_file
    from runtime.profile import PROFILE_FILE

    art = tmp_path / "art"
    shutil.copytree(tiny["artifact"], art)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    monkeypatch.setattr(runtime.cli, "_load", lambda *a, **k: pytest.fail("loaded before the output was checked"))
    for command, name in ((["profile", str(art)], PROFILE_FILE),
                          (["calibrate", str(art), "--prompts", str(prompts)], CALIBRATION_FILE)):  # fmt: skip
        (art / name).mkdir()
        line = _one_line_error(capsys, main([*command, "--threads", "1"]), "medusa-run")
        assert f"{art / name} is a folder" in line, line
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "matplotlib" else find(m, *a))
    argv = ["bench", str(art), "--prompts", str(prompts), "--plot", str(tmp_path / "b.png"), "--threads", "1"]
    assert "--plot needs matplotlib" in _one_line_error(capsys, main(argv), "medusa-run")
    with pytest.raises(MedusaError, match="cannot write /proc/x.json"), atomic_file("/proc/x.json") as f:
        f.write("{}")


def test_sigterm_stops_a_bench_like_ctrl_c(tiny, tmp_path, repo_root):
    """SIGTERM during a medusa-run command (here a bench) stops it as Ctrl-C does, every finally
    run (a peer's temporary build folder goes): one line and exit 143, not a silent death."""
    import subprocess
    import sys

    from conftest import sigterm_after

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about rivers, part {i}."}) + "\n" for i in range(200)))
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "bench", str(tiny["artifact"]), "--prompts", str(prompts), "--threads",
         "1", "--json", str(tmp_path / "b.json"), "-v"],
        cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen, err = sigterm_after(proc, "backend auto:")  # the engine is chosen: the bench's minute of decoding starts
    assert proc.returncode == 143, seen + err
    assert err.strip().splitlines()[-1] == "medusa-run: terminated (SIGTERM)", err
    assert "Traceback" not in err and not (tmp_path / "b.json").exists()


def test_medusa_run_warns_in_one_line(tiny, capsys):
    from runtime.cli import main

    assert (
        main(
            [
                "generate",
                str(tiny["artifact"]),
                "hi",
                "--max-new-tokens",
                "2",
                "--max-context",
                "60",
                "--tree",
                "mc_sim_7b_63",
                "--verify",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "medusa-run: warning: tree 'mc_sim_7b_63' has 64 nodes but at most" in err


# ---------------------------------------------------------------------------- 7. trees that cannot fit


def test_ten_thousand_node_tree_warns_and_decodes_plain(gen):
    big = [[r] for r in range(9999)]  # 10,000 nodes: never fits a 256-token context
    with pytest.warns(MedusaWarning, match=r"has 10000 nodes but at most \d+ fit .* every step decodes plain"):
        out = gen.generate(PROMPTS[0], max_new_tokens=8, tree=big)
    assert out.tokens == gen.generate(PROMPTS[0], max_new_tokens=8, medusa=False).tokens
    assert set(out.stats.accept_hist) == {1}  # plain steps only, as the warning says
    with pytest.raises(TreeError, match="a tree holds at most 16384"):
        gen.generate(PROMPTS[0], max_new_tokens=2, tree=[[r] for r in range(20000)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tree that fits: no warning
        gen.generate(PROMPTS[0], max_new_tokens=4, tree="cpu_8")


def test_numbers_in_messages_are_finite():
    from runtime import checks

    with pytest.raises(ConfigError, match="x must be a finite number"):
        checks.real("x", 10**400)
    assert checks.real("x", 3) == 3.0 and not math.isnan(checks.real("x", np.float16(1)))


def test_weights_linked_from_outside_the_folder_are_named_as_such(tmp_path):
    """A copied artifact whose weights file is a symlink to elsewhere: ONNX Runtime refuses external
    data outside the model's folder, which the load reported as a damaged file to re-export."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from runtime.errors import ArtifactError
    from runtime.onnxrt import _session

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    elsewhere, art = tmp_path / "elsewhere", tmp_path / "art"
    elsewhere.mkdir()
    art.mkdir()
    onnx.save_model(model, str(elsewhere / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)  # fmt: skip
    (art / "model.onnx").write_bytes((elsewhere / "model.onnx").read_bytes())
    (art / "model.onnx.data").symlink_to(elsewhere / "model.onnx.data")
    (art / "batch.onnx").write_bytes((elsewhere / "model.onnx").read_bytes())  # another graph on the same weights
    options = ort.SessionOptions()
    assert _session(ort, elsewhere / "model.onnx", options, ["CPUExecutionProvider"]) is not None  # the files are fine
    for graph in ("model.onnx", "batch.onnx"):
        with pytest.raises(ArtifactError) as e:
            _session(ort, art / graph, options, ["CPUExecutionProvider"])
        text = str(e.value)
        assert "model.onnx.data, a link to outside the artifact folder" in text and "copy the file" in text, graph
        assert "damaged" not in text
