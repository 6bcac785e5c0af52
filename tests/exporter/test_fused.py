"""The fused graph (exporter/fused.py) and its runtime (runtime.onnxrt.FusedOnnxRuntimeBackend).

* export: tiny Llama, Mistral, Qwen2 and Qwen3 (head_dim 16: GroupQueryAttention takes multiples of
  16) with random Medusa heads, validated against PyTorch; what the graph is made of;
* the in-place KV cache: a tree step + ``commit`` of a non-contiguous path leaves the cache a
  plain step-by-step decode (and the PyTorch reference) writes; capacity and empty-cache errors;
* decoding: greedy Medusa == plain greedy == Hugging Face on every architecture, with small
  prefill chunks and up to the end of a small context (tests/runtime/test_runtime_ort.py covers the
  Llama ``tiny`` export with whole / 4-token prefills and mc_sim_7b_63 at the context end);
* int8 / int4 (MatMulNBits): chains only, lossless against plain decoding of the same graph,
  one-token steps run as two rows;
* fp16; TensorRT refusing fused artifacts; format_version 1 configs.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from conftest import TINY_LLAMA, capture_logs, hf_greedy, make_tiny_causal_lm, make_tiny_llama, random_heads  # noqa: E402

import runtime  # noqa: E402
from exporter.export import ExportOptions, export_artifact  # noqa: E402
from exporter.fused import FUSED_OPSET, MS_DOMAIN  # noqa: E402
from exporter.heads import fresh_heads  # noqa: E402
from runtime.artifact import (  # noqa: E402
    CONFIG_FILE,
    FUSED_CACHE_START,
    SCREEN_INPUT,
    SCREEN_NOISE,
    SCREEN_OUTPUTS,
    fused_io_names,
    read_artifact,
)
from runtime.errors import ContextLengthError, MedusaError  # noqa: E402
from runtime.tree import load_tree  # noqa: E402

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")
NUM_HEADS = 4
PROMPTS = [np.random.default_rng(100 + i).integers(3, 128, size=n).tolist() for i, n in enumerate((5, 9, 14))]
CHAT = [
    "Write a haiku about rivers.",
    "What is 17 times 23?",
    "List three prime numbers.",
    "Tell me a story about a cat.",
]


def tiny_model(arch: str, seed: int = 0, **overrides):
    overrides.setdefault("eos_token_id", None)  # decode to the length asked: Hugging Face's reference does
    model = make_tiny_causal_lm(arch, seed, qwen2_bias_std=0.3, **overrides)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, wordlevel_tokenizer):
    """Factory: per architecture a validated fused export (default options) and an unvalidated
    portable export of the same model and heads, cached for the module."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model = tiny_model(arch)
            heads = random_heads(model, NUM_HEADS)
            root = tmp_path_factory.mktemp(f"fused-{arch}")
            with capture_logs() as logs:
                export_artifact(model, heads, root / "fused", ExportOptions(), tokenizer=wordlevel_tokenizer)
            export_artifact(
                model,
                heads,
                root / "portable",
                ExportOptions(graph="portable", validate=False),
                tokenizer=wordlevel_tokenizer,
            )
            cache[arch] = {
                "fused": root / "fused",
                "portable": root / "portable",
                "model": model,
                "heads": heads,
                "log": logs,
            }
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_export):
    """Factory: ``tiny_export`` (SmolLM2 vocabulary) quantized to int4 / int8, cached."""
    cache = {}

    def get(precision: str):
        if precision not in cache:
            out = tmp_path_factory.mktemp(f"q-{precision}") / "art"
            cache[precision] = tiny_export(out, seed=3, initializer_range=0.15, graph="fused", precision=precision)
        return cache[precision]

    return get


def backend_for(folder, max_context=None):
    from runtime.onnxrt import FusedOnnxRuntimeBackend

    return FusedOnnxRuntimeBackend(folder, read_artifact(folder), device="cpu", threads=1, max_context=max_context)


def causal(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n), dtype=bool))


def prefill(backend, ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    logits = backend.forward(ids, np.arange(len(ids)), causal(len(ids))).copy()
    backend.commit(np.arange(len(ids)))
    return logits


def step(backend, token: int) -> np.ndarray:
    """One plain decode step (committed); the logits copied (the backend reuses its buffers)."""
    pos = backend.cache_len
    logits = backend.forward(np.array([token]), np.array([pos]), np.ones((1, 1), dtype=bool)).copy()
    backend.commit(np.array([0]))
    return logits[0]


def multi_steps(stats) -> int:
    return sum(v for k, v in stats.accept_hist.items() if k > 1)


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_export_validates_every_case(exported, arch):
    e = exported(arch)
    log = "\n".join(e["log"])
    assert "writing the fused backbone" in log
    assert "validation passed" in log and "FAIL" not in log
    for b in (1, 2):
        assert f"prefill b={b} new=8" in log
        assert f"decode b={b} past=8 new=1" in log
        for tree in ("mc_sim_7b_63", "chain_3"):
            assert f"tree {tree} b={b} past=8" in log
        # a chain on an empty cache is a prefill (positions 0..n-1): the fused graph takes it;
        # a branching tree there is refused by the runtime, so validation does not run it
        assert f"tree chain_3 b={b} empty cache" in log
        assert f"tree mc_sim_7b_63 b={b} empty cache" not in log
        assert f"heads b={b} (after prefill)" in log and f"heads b={b} (after decode)" in log
    v = read_artifact(e["fused"]).provenance["validation"]
    assert v["passed"] and not v["failures"]
    assert set(v["max_abs_diff"]) == {"logits", "hidden_states", "present", "medusa_logits"}
    assert max(v["max_abs_diff"].values()) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_graph_structure(exported, arch):
    e = exported(arch)
    c = e["model"].config
    L, nq, nkv, D = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    fused = onnx.load(str(e["fused"] / "model.onnx"))
    portable = onnx.load(str(e["portable"] / "model.onnx"))
    nodes = fused.graph.node
    assert len(nodes) < len(portable.graph.node) / 5, (len(nodes), len(portable.graph.node))
    ops = Counter((n.domain or "", n.op_type) for n in nodes)
    assert ops[(MS_DOMAIN, "GroupQueryAttention")] == L
    assert ops[(MS_DOMAIN, "SkipSimplifiedLayerNormalization")] == 2 * L  # every norm but the first, + final
    assert sum(v for (d, op), v in ops.items() if op == "GroupQueryAttention") == L  # none in another domain
    assert {o.domain: o.version for o in fused.opset_import} == {"": FUSED_OPSET, MS_DOMAIN: 1}
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert (attrs["num_heads"], attrs["kv_num_heads"], attrs["do_rotary"]) == (nq, nkv, 1)
    assert attrs["local_window_size"] == (c.sliding_window if arch == "mistral" else -1)
    assert attrs["scale"] == pytest.approx(D**-0.5)
    # the cache bound in place: past_key_values.{i}.* in, present.{i}.* out of layer i's attention
    for i, node in enumerate(gqa):
        assert list(node.input[3:5]) == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert list(node.output[1:]) == [f"present.{i}.key", f"present.{i}.value"]
    inits = {t.name: t for t in fused.graph.initializer}
    qkv = onnx.numpy_helper.to_array(inits["model.layers.0.self_attn.qkv_proj.weight_t"])
    assert qkv.shape == (c.hidden_size, (nq + 2 * nkv) * D)
    assert onnx.numpy_helper.to_array(inits["model.layers.0.mlp.gate_up_proj.weight_t"]).shape == (
        c.hidden_size,
        2 * c.intermediate_size,
    )
    bias_adds = [n for n in nodes if n.op_type == "Add" and n.name.endswith("qkv_proj/bias")]
    if arch == "qwen2":
        assert len(bias_adds) == L
        sd = e["model"].state_dict()
        for i in range(L):
            want = torch.cat([sd[f"model.layers.{i}.self_attn.{p}_proj.bias"] for p in "qkv"]).numpy()
            got = onnx.numpy_helper.to_array(inits[f"model.layers.{i}.self_attn.qkv_proj.bias"])
            assert np.array_equal(got, want)
            assert np.abs(want).max() > 0.1  # the biases are not zeros: validation saw them
    else:
        assert bias_adds == []
    # Qwen3: one RMSNorm over each head of Q and one of K per layer, with the model's own weights
    qk_norms = [n for n in nodes if n.op_type == "SimplifiedLayerNormalization" and "_norm" in n.name.split("/")[-1]]
    assert ops[("", "SimplifiedLayerNormalization")] == 1 + len(qk_norms)  # the first input norm, + Qwen3's
    if arch == "qwen3":
        assert sorted(n.name for n in qk_norms) == sorted(
            f"model.layers.{i}.self_attn/{part}_norm" for i in range(L) for part in "qk"
        )
        sd = e["model"].state_dict()
        for i in range(L):
            for part in "qk":
                want = sd[f"model.layers.{i}.self_attn.{part}_norm.weight"].numpy()
                got = onnx.numpy_helper.to_array(inits[f"model.layers.{i}.self_attn.{part}_norm.weight"])
                assert got.shape == (D,) and np.array_equal(got, want)
                assert np.abs(want - 1).max() > 0.1  # not transformers' ones: validation saw them
    else:
        assert qk_norms == []
    want_in, want_out = fused_io_names(L)
    # the lm_head screen's optional input and its outputs follow the contract's (docs/graph_contract.md)
    assert [i.name for i in fused.graph.input] == [*want_in, SCREEN_INPUT, SCREEN_NOISE]
    assert [o.name for o in fused.graph.output] == [*want_out, *SCREEN_OUTPUTS]
    assert SCREEN_INPUT in inits  # its default, 0: no row screened unless asked
    assert not onnx.numpy_helper.to_array(inits[SCREEN_NOISE]).any()  # and no noise: greedy's ranking
    cfg = read_artifact(e["fused"])
    assert (cfg.flavour, cfg.precision, cfg.dtype, cfg.opset) == ("fused", "fp32", "float32", FUSED_OPSET)
    assert (cfg.backbone.inputs, cfg.backbone.outputs) == (want_in, want_out)
    assert cfg.heads_int8 is not None  # int8 heads for the CPU, as for portable float32 artifacts
    assert read_artifact(e["portable"]).flavour == "portable"


# ---------------------------------------------------------------------------- the in-place cache


def _nodes_path(tree) -> np.ndarray:
    """The longest retrieve row whose nodes are not 0, 1, 2, ... (entries must move)."""
    rows = [r[r >= 0] for r in tree.retrieve_indices]
    rows = [r for r in rows if not np.array_equal(r, np.arange(len(r)))]
    return max(rows, key=len)


@pytest.mark.parametrize("tree_name", ["cpu_4", "cpu_8", "mc_sim_7b_63"])
def test_commit_moves_tree_rows_to_where_plain_decoding_writes_them(exported, tree_name):
    from exporter.torch_backend import TorchBackend

    e = exported("llama")
    tree = load_tree(tree_name)
    path = _nodes_path(tree)
    assert len(path) >= 3 and not np.array_equal(path, np.arange(len(path)))
    rng = np.random.default_rng(7)
    prompt = rng.integers(3, 128, size=11)
    tokens = rng.integers(3, 128, size=tree.num_nodes)

    fused = backend_for(e["fused"])
    prefill(fused, prompt)
    L = fused.cache_len
    tree_logits = fused.forward(tokens, L + tree.position_ids, tree.attn_mask).copy()
    before = fused.kv.copy()
    fused.commit(path)
    n = L + len(path)
    assert fused.cache_len == n
    # exactly the moved rows changed, each to the entry of the node it keeps
    expect = before.copy()
    expect[..., L:n, :] = before[..., L + path, :]
    assert np.array_equal(fused.kv[..., :n, :], expect[..., :n, :])
    assert np.array_equal(fused.kv[..., n:, :], before[..., n:, :])

    # the same accepted tokens decoded one at a time on a second backend
    plain = backend_for(e["fused"])
    prefill(plain, prompt)
    plain_logits = np.stack([step(plain, t) for t in tokens[path]])
    assert plain.cache_len == n
    np.testing.assert_allclose(fused.kv[:, :, 0, :, :n], plain.kv[:, :, 0, :, :n], rtol=0, atol=1e-5)
    np.testing.assert_allclose(tree_logits[path], plain_logits, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fused.head_logits(int(path[-1])), plain.head_logits(0), rtol=0, atol=1e-4)

    # and as the PyTorch reference computes them (the shared-buffer path validation does not run)
    ref = TorchBackend(e["model"], e["heads"])
    prefill(ref, prompt)
    ref.forward(tokens, L + tree.position_ids, tree.attn_mask)
    ref.commit(path)
    ref_kv = np.stack([np.stack([ref.cache.keys[i, 0, :n], ref.cache.values[i, 0, :n]]) for i in range(2)])
    np.testing.assert_allclose(fused.kv[:, :, 0, :, :n], ref_kv.transpose(0, 1, 3, 2, 4), rtol=0, atol=1e-4)

    # the next step reads the moved entries: all three agree
    nxt = int(rng.integers(3, 128))
    a, b, r = step(fused, nxt), step(plain, nxt), ref.forward(np.array([nxt]), np.array([n]), np.ones((1, 1), bool))[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    np.testing.assert_allclose(a, r, rtol=0, atol=1e-4)
    assert np.argmax(a) == np.argmax(b) == np.argmax(r)


@pytest.mark.parametrize("tree_name, keep", [("cpu_8", [0, 1]), ("chain_3", [0, 1, 2, 3]), ("cpu_8", [0])])
def test_commit_of_a_contiguous_prefix_moves_nothing(exported, tree_name, keep):
    e = exported("llama")
    tree = load_tree(tree_name)
    rng = np.random.default_rng(3)
    fused = backend_for(e["fused"])
    prefill(fused, rng.integers(3, 128, size=6))
    L = fused.cache_len
    fused.forward(rng.integers(3, 128, size=tree.num_nodes), L + tree.position_ids, tree.attn_mask)
    before = fused.kv.copy()
    fused.commit(np.array(keep))
    assert fused.cache_len == L + len(keep)
    assert np.array_equal(fused.kv, before)
    with pytest.raises(RuntimeError, match="without a forward"):
        fused.commit(np.array([0]))


def test_forward_beyond_the_capacity_is_a_context_error(exported):
    e = exported("llama")
    fused = backend_for(e["fused"], max_context=16)
    assert fused.max_context == 16 and fused.kv.shape[4] == 16
    with pytest.raises(ContextLengthError, match="capacity of 16"):
        fused.forward(np.arange(3, 20), np.arange(17), causal(17))
    assert fused.cache_len == 0
    prefill(fused, np.arange(3, 15))  # 12 cached
    tree = load_tree("cpu_4")  # 5 nodes: one too many
    with pytest.raises(ContextLengthError, match="12 cached \\+ 5 new tokens exceed the cache capacity of 16"):
        fused.forward(np.arange(3, 8), 12 + tree.position_ids, tree.attn_mask)
    assert fused.cache_len == 12
    chain = load_tree("chain_3")  # 4 nodes fill the buffer to its last row
    logits = fused.forward(np.arange(3, 7), 12 + chain.position_ids, chain.attn_mask)
    assert logits.shape == (4, 128) and np.isfinite(logits).all()
    fused.commit(np.arange(4))
    assert fused.cache_len == 16
    with pytest.raises(ContextLengthError):
        fused.forward(np.array([5]), np.array([16]), np.ones((1, 1), bool))
    # a larger runtime cap than the artifact's is clamped to it
    assert backend_for(e["fused"], max_context=10**6).max_context == read_artifact(e["fused"]).model.max_context


def test_a_tree_on_an_empty_cache_is_refused(exported):
    e = exported("llama")
    fused = backend_for(e["fused"])
    tree = load_tree("cpu_8")
    with pytest.raises(MedusaError, match="empty cache must be a prefill at positions 0..n-1"):
        fused.forward(np.arange(3, 3 + tree.num_nodes), tree.position_ids, tree.attn_mask)
    with pytest.raises(MedusaError, match="empty cache"):
        fused.forward(np.array([5, 6]), np.array([4, 5]), causal(2))
    # a chain there is a prefill: positions 0..n-1, taken
    chain = load_tree("chain_3")
    assert fused.forward(np.arange(3, 7), chain.position_ids, chain.attn_mask).shape == (4, 128)


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_medusa_equals_plain_and_hf_on_every_architecture(exported, arch):
    """Mistral, Qwen2 and Qwen3 fused graphs decode like Hugging Face (test_runtime_ort covers Llama),
    here with 3-token prefill chunks (later chunks run over a non-empty in-place cache)."""
    e = exported(arch)
    gen = runtime.load(e["fused"], backend="onnxruntime", threads=1, prefill_chunk=3)
    assert type(gen.backend).__name__ == "FusedOnnxRuntimeBackend"
    multi = 0
    for ids in PROMPTS:
        ref = hf_greedy(e["model"], ids, 24)
        plain = gen.generate(ids, max_new_tokens=24, medusa=False)
        assert plain.tokens == ref
        for tree in ("chain_3", "cpu_8", "mc_sim_7b_63"):
            med = gen.generate(ids, max_new_tokens=24, tree=tree)
            assert med.tokens == ref, (tree, ids)
            multi += multi_steps(med.stats)
    assert multi > 0  # some steps accepted candidates: the comparison covers commits of tree paths


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tree", ["cpu_8", "chain_3"])
def test_decoding_to_the_end_of_a_small_context(exported, monkeypatch, arch, tree):
    """max_context 24 at load: tree steps, then plain steps once the tree no longer fits, up to
    the last cache row; identical to Hugging Face, prefill in chunks of 3."""
    e = exported(arch)
    gen = runtime.load(e["fused"], backend="onnxruntime", threads=1, max_context=24, prefill_chunk=3)
    sizes = []
    checked = gen.backend._checked  # every engine call's inputs: forward and forward_argmax (the screen)

    def spy(ids, pos, mask):
        sizes.append(len(ids))
        return checked(ids, pos, mask)

    monkeypatch.setattr(gen.backend, "_checked", spy)
    t = load_tree(tree)
    for ids in PROMPTS[1:]:
        sizes.clear()
        out = gen.generate(ids, max_new_tokens=100, tree=tree)
        assert out.stats.finish_reason == "context"
        assert len(ids) + len(out.tokens) == 24 + 1
        assert out.tokens == hf_greedy(e["model"], ids, len(out.tokens))
        chunks = -(-len(ids) // 3)
        assert sizes[:chunks] == [3] * (len(ids) // 3) + ([len(ids) % 3] if len(ids) % 3 else [])
        assert t.num_nodes in sizes[chunks:]
        if tree == "cpu_8":  # at most 5 of the last 9 rows can be filled by a tree step
            assert sizes[-1] == 1 and sizes[chunks:].index(1) > sizes[chunks:].index(t.num_nodes)
        assert gen.backend.cache_len == 24


# ---------------------------------------------------------------------------- int8 / int4


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_artifact(quantized, precision):
    q = quantized(precision)
    cfg = read_artifact(q["artifact"])
    assert (cfg.flavour, cfg.precision, cfg.dtype) == ("fused", precision, "float32")
    assert cfg.default_tree == "chain_1"
    info = cfg.provenance["quantization"]
    assert info["bits"] == (4 if precision == "int4" else 8) and info["op"] == "com.microsoft.MatMulNBits"
    graph = onnx.load(str(q["artifact"] / cfg.backbone.file))
    ops = Counter(n.op_type for n in graph.graph.node)
    assert ops["MatMulNBits"] == info["matmuls_quantized"] > 0
    assert {n.domain for n in graph.graph.node if n.op_type == "MatMulNBits"} == {MS_DOMAIN}
    assert ops["GroupQueryAttention"] == cfg.model.num_layers
    assert [i.name for i in graph.graph.input] == fused_io_names(cfg.model.num_layers)[0]
    gen = runtime.load(q["artifact"], backend="onnxruntime", threads=1)
    assert type(gen.backend).__name__ == "FusedOnnxRuntimeBackend"
    assert gen.backend.min_rows == 2 and gen.backend.exact_branching is False
    assert gen.default_tree.name == "chain_1"


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_chains_are_lossless_against_plain_decoding(quantized, precision):
    q = quantized(precision)
    gen = runtime.load(q["artifact"], backend="onnxruntime", threads=1)
    chunked = runtime.load(q["artifact"], backend="onnxruntime", threads=1, prefill_chunk=3)
    multi = 0
    for text in CHAT:
        ids = gen.encode([{"role": "user", "content": text}])
        plain = gen.generate(ids, max_new_tokens=30, medusa=False).tokens
        for tree in ("chain_1", "chain_2", "chain_3"):
            med = gen.generate(ids, max_new_tokens=30, tree=tree)
            assert med.tokens == plain, (precision, tree, text)
            multi += multi_steps(med.stats)
        # chunks of 3 (a last chunk of 1 token is padded to 2 rows): Medusa still equals plain
        assert (
            chunked.generate(ids, max_new_tokens=30, tree="chain_3").tokens
            == chunked.generate(ids, max_new_tokens=30, medusa=False).tokens
        )
    assert multi > 0


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_chains_to_the_end_of_the_context(quantized, precision):
    """To the end of the context: the buffer keeps one slot beyond the context asked for, for the pad
    row, so even the last one-token step runs as two rows, and Medusa stays lossless."""
    q = quantized(precision)
    gen = runtime.load(q["artifact"], backend="onnxruntime", threads=1)
    ids = gen.encode(CHAT[1])
    cap = len(ids) + 14
    small = runtime.load(q["artifact"], backend="onnxruntime", threads=1, max_context=cap)
    plain = small.generate(ids, max_new_tokens=100, medusa=False)
    assert small.backend.max_context == cap  # the pad row's slot comes on top
    assert plain.stats.finish_reason == "context" and len(ids) + len(plain.tokens) == cap + 1  # the last needs no slot
    rows = []
    real_run = small.backend.backbone.run_with_iobinding
    small.backend.backbone = _Spy(small.backend.backbone, lambda io: rows.append(small.backend._bound[0].shape[1]))
    small.generate(ids, max_new_tokens=100, medusa=False)
    small.backend.backbone = small.backend.backbone.inner
    assert rows and min(rows) == 2, rows  # prefill and every one-token step, the last included
    del real_run
    multi = 0
    for tree in ("chain_2", "chain_3"):
        med = small.generate(ids, max_new_tokens=100, tree=tree)
        assert med.tokens == plain.tokens
        multi += multi_steps(med.stats)
    assert multi > 0


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_refuses_branching_trees_for_greedy(quantized, precision):
    q = quantized(precision)
    gen = runtime.load(q["artifact"], backend="onnxruntime", threads=1)
    for tree in ("cpu_8", "mc_sim_7b_63", [[0], [1]]):
        with pytest.raises(MedusaError, match="chain trees only"):
            gen.generate("Hello there.", max_new_tokens=8, tree=tree)
    with pytest.raises(MedusaError, match="chain trees only"):
        runtime.load(q["artifact"], backend="onnxruntime", threads=1, tree="cpu_8").generate("Hi", max_new_tokens=4)
    # exact sampling promises plain sampling's law: refused too; typical acceptance (lossy) takes any tree
    with pytest.raises(MedusaError, match="chain trees only"):
        gen.generate("Hello there.", max_new_tokens=8, tree="cpu_8", temperature=0.7, seed=1)
    out = gen.generate("Hello there.", max_new_tokens=8, tree="cpu_8", temperature=0.7, seed=1, acceptance="typical")
    assert 1 <= len(out.tokens) <= 8


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_lookup_keeps_chains_for_exact_sampling(quantized, precision, monkeypatch):
    """Lookup drafts on a chain-only engine: the step's tree stays a chain for greedy and exact
    sampling, and may branch only for typical acceptance."""
    import runtime.decode as decode_mod

    q = quantized(precision)
    gen = runtime.load(q["artifact"], backend="onnxruntime", threads=1)
    seen = []
    real = decode_mod.graft_chain

    def spy(tree, tokens, drafts, branching=True):
        seen.append(branching)
        return real(tree, tokens, drafts, branching=branching)

    monkeypatch.setattr(decode_mod, "graft_chain", spy)
    ids = gen.encode(CHAT[0])
    # top_k=1: the sampling path (temperature > 0, its acceptance) on the greedy answer, which repeats
    # itself on this tiny random model, so lookup drafts (random samples over 49k tokens never repeat)
    for kw, want in (
        (dict(), False),
        (dict(temperature=0.7, top_k=1), False),
        (dict(temperature=0.7, top_k=1, acceptance="typical"), True),
    ):
        seen.clear()
        # (the grow schedule grafts every draft; cost sizing may cut a doubtful one to nothing)
        gen.generate(ids + ids, max_new_tokens=32, tree="chain_1", seed=0, lookup_sizing="grow", **kw)
        assert seen and set(seen) == {want}, (kw, seen)


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_one_token_steps_run_as_two_rows(quantized, exported, precision):
    q = quantized(precision)
    b = backend_for(q["artifact"])
    assert b.min_rows == 2
    rng = np.random.default_rng(5)
    vocab = b.spec.vocab_size
    prompt = rng.integers(3, vocab, size=9)
    prefill(b, prompt)
    L = b.cache_len
    tok, nxt = (int(x) for x in rng.integers(3, vocab, size=2))
    b.kv[..., L + 1, :] = 123.0  # the padding row writes its entry here
    one = b.forward(np.array([tok]), np.array([L]), np.ones((1, 1), bool)).copy()
    assert one.shape == (1, vocab)
    assert not np.any(b.kv[..., L + 1, :] == 123.0)  # a second row ran
    two = b.forward(np.array([tok, nxt]), np.array([L, L + 1]), causal(2)).copy()
    assert np.array_equal(one[0], two[0])
    b.commit(np.array([0]))
    assert b.cache_len == L + 1
    # an empty cache: a one-token prompt runs as a 2-token prefill
    b.reset()
    one = b.forward(np.array([tok]), np.array([0]), np.ones((1, 1), bool)).copy()
    two = b.forward(np.array([tok, nxt]), np.arange(2), causal(2)).copy()
    assert np.array_equal(one[0], two[0])
    # a context asked for is the context given: the pad row's slot comes on top, where the rotary
    # tables have room (the whole context keeps it inside them)
    assert backend_for(q["artifact"], max_context=32).max_context == 32
    assert backend_for(q["artifact"]).max_context == b.spec.max_context - 1
    # float graphs run one row: nothing is written past the token
    f = backend_for(exported("llama")["fused"])
    assert f.min_rows == 1 and f.exact_branching is True
    prefill(f, prompt % 128)
    f.kv[..., L + 1, :] = 123.0
    f.forward(np.array([tok % 128]), np.array([L]), np.ones((1, 1), bool))
    assert np.all(f.kv[..., L + 1, :] == 123.0)


def test_quantized_export_option_errors(exported, wordlevel_tokenizer, tmp_path):
    e = exported("llama")
    for opts, match in (
        (ExportOptions(precision="int4", tree="cpu_8"), "branches"),
        (ExportOptions(precision="int8", tree="mc_sim_7b_63"), "chain_1 .. chain_5"),
        (ExportOptions(precision="int4", graph="portable"), "--graph fused"),
        (ExportOptions(precision="int8", graph="portable"), "MatMulNBits"),
        (ExportOptions(precision="int4", dtype="float16"), "contradicts"),
        # an explicit float32 contradicts fp16 too (float32 is no longer taken for "not given")
        (ExportOptions(precision="fp16", dtype="float32"), "--dtype float32 contradicts --precision fp16"),
    ):
        with pytest.raises(MedusaError, match=match):
            export_artifact(e["model"], e["heads"], tmp_path / "x", opts, tokenizer=wordlevel_tokenizer)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- fp16


@pytest.fixture(scope="module")
def fp16(exported, wordlevel_tokenizer, tmp_path_factory):
    e = exported("llama")
    with capture_logs() as logs:
        out = export_artifact(
            e["model"],
            e["heads"],
            tmp_path_factory.mktemp("fp16") / "art",
            ExportOptions(dtype="float16"),
            tokenizer=wordlevel_tokenizer,
        )
    return {"artifact": out, "log": logs, "model": e["model"], "heads": e["heads"]}


def test_fp16_fused_export_validates_and_decodes_losslessly(fp16, wordlevel_tokenizer, tmp_path):
    """ONNX Runtime's CPU provider runs the fp16 fused graph; it validates against PyTorch fp16
    and greedy Medusa equals plain decoding of it."""
    out, model = fp16["artifact"], fp16["model"]
    log = "\n".join(fp16["log"])
    assert "writing the fused backbone (2 layers, float16)" in log
    assert "validation passed" in log and "FAIL" not in log
    assert "tree mc_sim_7b_63 b=2 past=8" in log and "decode b=2 past=8 new=1" in log
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not converted
    cfg = read_artifact(out)
    assert (cfg.flavour, cfg.precision, cfg.dtype, cfg.heads_int8) == ("fused", "fp16", "float16", None)
    m = onnx.load(str(out / "model.onnx"))
    T = onnx.TensorProto
    types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
    assert types.pop("input_ids") == types.pop("position_ids") == types.pop("cache_lengths") == T.INT64
    assert types.pop("num_logits") == T.INT64
    assert types.pop("tree_mask") == T.BOOL
    assert set(types.values()) == {T.FLOAT16}
    assert {i.data_type for i in m.graph.initializer if i.data_type in (T.FLOAT, T.FLOAT16)} == {T.FLOAT16}
    # precision="fp16" is the same export
    export_artifact(
        model,
        fp16["heads"],
        tmp_path / "fp16b",
        ExportOptions(precision="fp16", validate=False),
        tokenizer=wordlevel_tokenizer,
    )
    assert read_artifact(tmp_path / "fp16b").precision == "fp16"
    assert (tmp_path / "fp16b" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()

    gen = runtime.load(out, backend="onnxruntime", threads=1, prefill_chunk=4)
    assert gen.backend.kv.dtype == np.float16 and gen.backend.exact_branching
    multi = 0
    for ids in PROMPTS:
        plain = gen.generate(ids, max_new_tokens=24, medusa=False)
        for tree in ("cpu_8", "chain_3"):
            med = gen.generate(ids, max_new_tokens=24, tree=tree)
            assert med.tokens == plain.tokens
            multi += multi_steps(med.stats)
        # fp16 rounding may in principle flip a near-tie; on this model it does not in 8 tokens
        assert plain.tokens[:8] == hf_greedy(model, ids, 8)
    assert multi > 0  # some steps accepted candidates


def test_fp16_attention_and_cache_stay_fp16_on_the_cpu_provider(fp16, tmp_path):
    """The CPU provider has fp16 kernels for GroupQueryAttention and (Skip)SimplifiedLayerNormalization:
    it inserts no Cast around the cache, so past_key_values.* / present.* are the bound fp16 buffers
    GroupQueryAttention updates in place. (It does insert Casts around every MatMul, which has no
    fp16 CPU kernel: the weights are upcast to fp32 when the session loads.)"""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # cast insertion still runs
    opts.optimized_model_filepath = str(tmp_path / "as_run.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(fp16["artifact"] / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    g = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph  # its weights: model.onnx.data
    casts = [n for n in g.node if n.op_type == "Cast"]
    cast_io = {name for n in casts for name in (*n.input, *n.output)}
    names_in, names_out = fused_io_names(2)
    assert not cast_io & set(names_in[FUSED_CACHE_START:] + names_out[2:])  # the cache is never converted
    for op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization"):
        nodes = [n for n in g.node if n.op_type == op]
        assert nodes
        for n in nodes:  # their cache and residual tensors are fp16 end to end
            assert all(not name.startswith("InsertedPrecisionFreeCast_") for name in (*n.input, *n.output)), n.name
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    for i, n in enumerate(gqa):
        assert list(n.input[3:5]) == names_in[FUSED_CACHE_START + 2 * i : FUSED_CACHE_START + 2 + 2 * i]
        assert list(n.output[1:]) == names_out[2 + 2 * i : 4 + 2 * i]


# ---------------------------------------------------------------------------- TensorRT, compatibility


def test_tensorrt_refuses_fused_artifacts(exported, monkeypatch):
    import runtime.api as api
    from exporter.trt_plan import make_plan
    from runtime.onnxrt import FusedOnnxRuntimeBackend, OnnxRuntimeBackend
    from runtime.plan import PlanError

    e = exported("llama")
    folder = e["fused"]
    cfg = read_artifact(folder)
    with pytest.raises(PlanError, match="--graph portable"):
        make_plan(cfg)
    with pytest.raises(MedusaError, match="--graph portable"):
        api.make_backend(folder, cfg, "tensorrt", "auto", None, None)
    with pytest.raises(MedusaError, match="TensorRT's ONNX parser does not take"):
        runtime.load(folder, backend="tensorrt")
    assert isinstance(api.make_backend(folder, cfg, "auto", "auto", 1, None), FusedOnnxRuntimeBackend)
    # even with engines and tensorrt present, auto keeps a fused artifact on ONNX Runtime
    monkeypatch.setattr(api, "_has_engines", lambda folder: True)
    monkeypatch.setattr(api, "_has_tensorrt", lambda: True)
    assert isinstance(api.make_backend(folder, cfg, "auto", "auto", 1, None), FusedOnnxRuntimeBackend)
    # the portable artifact of the same model plans fine
    assert make_plan(read_artifact(e["portable"])) is not None
    monkeypatch.setattr(api, "_has_engines", lambda folder: False)
    pcfg = read_artifact(e["portable"])
    assert type(api.make_backend(e["portable"], pcfg, "auto", "auto", 1, None)) is OnnxRuntimeBackend


def test_format_version_1_reads_as_portable_fp32(exported, tmp_path):
    e = exported("llama")
    old = tmp_path / "v1"
    shutil.copytree(e["portable"], old)
    raw = json.loads((old / CONFIG_FILE).read_text())
    del raw["flavour"], raw["precision"]
    raw["format_version"] = 1
    (old / CONFIG_FILE).write_text(json.dumps(raw))
    cfg = read_artifact(old)
    assert (cfg.flavour, cfg.precision, cfg.format_version) == ("portable", "fp32", 1)
    gen = runtime.load(old, backend="auto", threads=1)
    assert type(gen.backend).__name__ == "OnnxRuntimeBackend"
    ids = PROMPTS[0]
    assert gen.generate(ids, max_new_tokens=12, medusa=False).tokens == hf_greedy(e["model"], ids, 12)
    # an unknown flavour or precision is refused, naming the file
    from runtime.errors import ArtifactError

    for key, value in (("flavour", "mystery"), ("precision", "int3")):
        bad = json.loads((e["portable"] / CONFIG_FILE).read_text())
        bad[key] = value
        (old / CONFIG_FILE).write_text(json.dumps(bad))
        with pytest.raises(ArtifactError, match=f"unknown .*{value}"):
            read_artifact(old)


# ---------------------------------------------------------------------------- short contexts (a fixed bug)


@pytest.mark.parametrize(
    "arch, options, overrides",
    [
        pytest.param("llama", dict(max_context=48), {}, id="llama-max_context48"),
        pytest.param("llama", dict(max_context=24, precision="int4"), {}, id="llama-int4-max_context24"),
        pytest.param("qwen3", dict(max_context=24, precision="int4"), {}, id="qwen3-int4-max_context24"),
        pytest.param("mistral", {}, dict(sliding_window=32), id="mistral-sliding_window32"),
    ],
)
def test_fused_export_with_a_context_below_72(wordlevel_tokenizer, tmp_path, arch, options, overrides):
    """A fused export whose max_context is below 72 tokens (``--max-context``, or the cap at
    sliding_window - 1) must export as the portable graph does and decode to its end.

    A regression test: the fused graph's rotary tables hold max_context rows and
    GroupQueryAttention requires ``cos_cache`` rows >= cache + new tokens of a call, while
    validation ran an 8-token prefill + mc_sim_7b_63's 64 nodes (72) and the int4/int8 check a
    32-token prompt, so such exports used to die inside ONNX Runtime (INVALID_ARGUMENT: cos_cache
    dimension 0 shall not be less than total_sequence_length); validation now fits its calls to
    the context. The runtime itself never exceeds max_context."""
    model = tiny_model(arch, eos_token_id=None, **overrides)  # no EOS: decode to the end of the context
    heads = random_heads(model, NUM_HEADS)
    out = export_artifact(model, heads, tmp_path / "small", ExportOptions(**options), tokenizer=wordlevel_tokenizer)
    cfg = read_artifact(out)
    cap = options.get("max_context") or overrides["sliding_window"] - 1
    assert cfg.model.max_context == cap and cfg.provenance["validation"]["passed"]
    gen = runtime.load(out, backend="onnxruntime", threads=1)
    ids = PROMPTS[1]
    tree = "chain_3" if "precision" in options else "cpu_8"
    plain = gen.generate(ids, max_new_tokens=100, medusa=False)
    res = gen.generate(ids, max_new_tokens=100, tree=tree)
    quantized_pad = 0 if "precision" in options else 1  # int8/int4 keep one slot for the pad row
    assert res.stats.finish_reason == "context" and len(ids) + len(res.tokens) == cap + quantized_pad
    assert res.tokens == plain.tokens
    if "precision" not in options:
        assert res.tokens == hf_greedy(model, ids, len(res.tokens))


@pytest.mark.parametrize(
    "arch, overrides, words",
    [
        # Phi-4-mini's layout: transformers 5 keeps the factor in rope_parameters, not on the config
        ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor 0.5: the fused graph rotates whole heads"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ("llama", {"head_dim": 8}, "head_dim 8: ONNX Runtime's GroupQueryAttention needs a multiple of 16"),
    ],
)  # fmt: skip
def test_what_the_fused_graph_cannot_build_is_named_and_the_portable_graph_exports(
    wordlevel_tokenizer, tmp_path, arch, overrides, words
):
    model = tiny_model(arch, **overrides)
    heads = random_heads(model, 2)
    with pytest.raises(MedusaError, match=words + r".*--graph portable"):
        export_artifact(model, heads, tmp_path / "fused", ExportOptions(), tokenizer=wordlevel_tokenizer)
    assert not (tmp_path / "fused").exists()
    out = export_artifact(
        model, heads, tmp_path / "portable", ExportOptions(graph="portable"), tokenizer=wordlevel_tokenizer
    )
    assert read_artifact(out).provenance["validation"]["passed"]
    gen = runtime.load(out, backend="onnxruntime", threads=1)
    ids = PROMPTS[0]
    assert gen.generate(ids, max_new_tokens=12, tree="chain_2").tokens == hf_greedy(model, ids, 12)


def test_longrope_exports_within_its_short_context_and_is_refused_past_it(wordlevel_tokenizer, tmp_path):
    """Phi-3's LongRoPE rotates by its short factors up to original_max_position_embeddings and by its long
    ones past it; the fused graph holds one table, so a context past the short one is refused (naming the
    flag that fits; the portable graph, which cannot trace the switch, is refused too), and one within it
    validates and decodes like Hugging Face to its end."""
    half = TINY_LLAMA["head_dim"] // 2
    rope = {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.2 * i for i in range(half)],
        "long_factor": [3.0 + 0.5 * i for i in range(half)],
        "rope_theta": 10000.0,
    }
    model = tiny_model("phi3", rope_parameters=rope, original_max_position_embeddings=40, max_position_embeddings=160)
    heads = random_heads(model, NUM_HEADS)
    with pytest.raises(MedusaError, match=r"original_max_position_embeddings \(40\).*--max-context 40 or less"):
        export_artifact(model, heads, tmp_path / "long", ExportOptions(), tokenizer=wordlevel_tokenizer)
    assert not (tmp_path / "long").exists()
    with pytest.raises(MedusaError, match=r"LongRoPE does not trace to ONNX.*--max-context 40 or less"):
        export_artifact(model, heads, tmp_path / "p", ExportOptions(graph="portable"), tokenizer=wordlevel_tokenizer)
    out = export_artifact(
        model, heads, tmp_path / "short", ExportOptions(max_context=40), tokenizer=wordlevel_tokenizer
    )
    assert read_artifact(out).provenance["validation"]["passed"]
    gen = runtime.load(out, backend="onnxruntime", threads=1)
    ids = PROMPTS[1]
    res = gen.generate(ids, max_new_tokens=100, tree="cpu_8")
    assert res.stats.finish_reason == "context"
    assert res.tokens == hf_greedy(model, ids, len(res.tokens))


class _Spy:
    """Wraps an ONNX Runtime session: ``run_with_iobinding`` reports to ``hook`` first."""

    def __init__(self, inner, hook):
        self.inner, self.hook = inner, hook

    def run_with_iobinding(self, io):
        self.hook(io)
        return self.inner.run_with_iobinding(io)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_export_with_external_data(tmp_path, precision, wordlevel_tokenizer):
    """The float graph is compared with the quantized one (validation on) while both keep their
    tensors in model.onnx.data: the quantizer must not delete or overwrite the float graph's file."""
    model = make_tiny_llama(seed=7)
    heads = fresh_heads(2, model.config.hidden_size, model.config.vocab_size)
    out = export_artifact(
        model,
        heads,
        tmp_path / precision,
        ExportOptions(precision=precision, external_data_threshold_mb=0.01),
        tokenizer=wordlevel_tokenizer,
    )
    cfg = read_artifact(out)
    assert (out / "model.onnx.data").is_file() and not (out / ".float").exists()
    assert cfg.provenance["quantization"]["check"]["tokens"] > 1
    gen = runtime.load(out, backend="onnxruntime", threads=1)
    multi = 0
    for ids in ([5, 6, 7], [9, 3, 3, 9, 3]):
        med = gen.generate(ids, max_new_tokens=12, tree="chain_2")
        assert med.tokens == gen.generate(ids, max_new_tokens=12, medusa=False).tokens
        multi += multi_steps(med.stats)
    assert multi > 0  # the repetitive prompt's lookup drafts were accepted


def test_prefill_computes_only_the_logits_it_reads(exported):
    """forward(..., logits=k) runs the lm_head on the last k rows: a prompt chunk asks for none
    (or the last row of the last chunk); the rows it returns equal the full computation's."""
    be = backend_for(exported("llama")["fused"])
    assert be.partial_logits
    ids = np.array(PROMPTS[1], dtype=np.int64)
    n = len(ids)
    full = np.array(be.forward(ids, np.arange(n), causal(n)))
    assert full.shape[0] == n
    last = np.array(be.forward(ids, np.arange(n), causal(n), logits=1))
    none = np.array(be.forward(ids, np.arange(n), causal(n), logits=0))
    assert last.shape == (1, full.shape[1]) and none.shape == (0, full.shape[1])
    np.testing.assert_allclose(last[0], full[-1], atol=1e-5)
    # hidden states (the heads' input) are there for every row either way
    assert be._hidden.shape[0] == n


@pytest.mark.parametrize("which", ["float32", "float16"])
def test_validation_catches_a_fused_graph_that_differs(exported, fp16, which):
    """The fused flavour's validation (and fp16's wider tolerance, twice PyTorch's own fp16 error) is
    not vacuous: weights changed after export -> the logits and hidden states of every case fail."""
    import copy

    import torch

    from exporter.validate import ValidationError, validate_artifact

    e = exported("llama") if which == "float32" else fp16
    folder = e["fused"] if which == "float32" else e["artifact"]
    model = copy.deepcopy(e["model"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(ValidationError) as info:
        validate_artifact(folder, model, e["heads"], trees=("chain_3",), batches=(1,))
    failures = [str(f) for f in info.value.failures]
    assert any("logits" in f for f in failures) and any("hidden_states" in f for f in failures), failures
    assert "tree chain_3 b=1" in str(info.value)
    # the unchanged model passes the same checks
    assert validate_artifact(folder, e["model"], e["heads"], trees=("chain_3",), batches=(1,)).ok


# ---------------------------------------------------------------------------- the lm_head screen


def _screen_call(backend, ids, pos, mask, noise=None):
    """One call with float logits and the screen for every row (the backend's own binding;
    ``noise``: ``screen_noise``, T g)."""
    n = len(ids)
    outs = backend._run(np.asarray(ids, np.int64), np.asarray(pos, np.int64), np.asarray(mask, bool), n, n, noise)
    return {k: np.array(v[0]) for k, v in outs.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
def test_lm_head_screen_bounds_every_draw_it_does_not_score(exported, arch, temperature):
    """The screen's exact scores are the float logits of its candidates, and its bound is above the
    float logit of every other token (greedy, temperature 0) or, with coupled sampling's T g fed as
    ``screen_noise``, above every other token's ``logit + T g``, on every row: a prefill and a tree
    step over it (a tiny model's random weights are no int8 blocks, so the bound's weight-error term
    is exercised too). A row the backend settles is the float path's draw (runtime.backend.draw_argmax);
    the noise changes the candidates (the check is not greedy's again)."""
    from runtime.backend import draw_argmax

    e = exported(arch)
    backend = runtime.load(e["fused"]).backend
    assert backend.screens_argmax and backend.screens_noise
    rng = np.random.default_rng(5)
    V = backend.spec.vocab_size
    t = temperature or 1.0
    settled = moved = 0
    for trial in range(4):
        backend.reset()
        n = 12 + trial
        prompt = rng.integers(0, V, n)
        calls = [(prompt, np.arange(n), np.tril(np.ones((n, n), dtype=bool)))]
        tree = load_tree("cpu_8", num_heads=NUM_HEADS)
        calls.append((rng.integers(0, V, tree.num_nodes), n + tree.position_ids, tree.attn_mask))
        for ids, pos, mask in calls:
            g = -np.log(rng.standard_exponential((len(ids), V))).astype(np.float32) if temperature else None
            out = _screen_call(backend, ids, pos, mask)
            if g is not None:
                plain_cand = out["screen_ids"]
                out = _screen_call(backend, ids, pos, mask, g * np.float32(t))
                moved += int((out["screen_ids"] != plain_cand).any(1).sum())
            logits, cand = out["logits"], out["screen_ids"]
            np.testing.assert_allclose(out["screen_logits"], np.take_along_axis(logits, cand, 1), rtol=1e-5, atol=1e-5)
            others = logits.copy() if g is None else logits + np.float32(t) * g
            np.put_along_axis(others, cand, -np.inf, 1)
            assert (others.max(1) <= out["screen_bound"]).all()
            # and through the backend's own call: a settled row is the float path's draw, else -1
            best = backend._forward_argmax(*(np.asarray(a) for a in (ids, pos, mask)), len(ids), g, t)
            sure = best >= 0
            assert np.array_equal(best[sure], draw_argmax(logits, g, t)[sure])
            settled += int(sure.sum())
            if len(ids) == n:
                backend.commit(np.arange(n))
    assert settled > 0  # some rows settle even on a random tiny model (the checks above are not vacuous)
    assert moved > 0 or not temperature


@pytest.fixture(scope="module")
def wide(tmp_path_factory, wordlevel_tokenizer):
    """A tiny Llama of hidden size 96 (three int8 blocks a row: a kernel that quantized a row as one
    block would move the product off the documented bound), untied lm_head, exported."""
    model = tiny_model("llama", seed=4, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                       intermediate_size=128, tie_word_embeddings=False)  # fmt: skip
    heads = random_heads(model, NUM_HEADS)
    out = export_artifact(model, heads, tmp_path_factory.mktemp("wide") / "a", ExportOptions(),
                          tokenizer=wordlevel_tokenizer)  # fmt: skip
    return {"fused": out, "model": model}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "wide"])
def test_lm_head_screen_ranks_by_the_documented_bound(exported, wide, arch):
    """The graph's bound is the (K+1)-th largest of screen_reference's upper bounds (the formula
    exporter.fused documents), to float rounding: no term of it is missing or extra."""
    from exporter.fused import screen_reference, screen_weights

    e = wide if arch == "wide" else exported(arch)
    backend = runtime.load(e["fused"]).backend
    assert backend.screens_argmax  # the load's own check passed
    w = e["model"].lm_head.weight.detach().float().numpy()
    t = screen_weights(w)
    rng = np.random.default_rng(9)
    backend.reset()
    n = 14
    ids = rng.integers(0, w.shape[0], n)
    out = _screen_call(backend, ids, np.arange(n), np.tril(np.ones((n, n), dtype=bool)))
    upper = screen_reference(backend.hidden_states(), t)
    K = out["screen_ids"].shape[1]
    want = -np.sort(-upper, axis=1)[:, K]
    np.testing.assert_allclose(out["screen_bound"], want, rtol=1e-5, atol=2e-5)
    # coupled sampling's noise is added to that bound before the ranking
    backend.truncate(0)
    tg = 0.8 * -np.log(rng.standard_exponential((n, w.shape[0]))).astype(np.float32)
    noisy = _screen_call(backend, ids, np.arange(n), np.tril(np.ones((n, n), dtype=bool)), tg)
    want = -np.sort(-(upper + tg), axis=1)[:, K]
    np.testing.assert_allclose(noisy["screen_bound"], want, rtol=1e-5, atol=2e-5)
    # the activation term is not negligible here: it moves the bound by more than the tolerance
    assert (upper - screen_reference(backend.hidden_states(), {**t, "norm": t["norm"] * 0}) > 1e-3).all()
    if arch == "wide":  # untied: the candidates' float rows are the lm_head's own, gathered from its copy
        inits = {i.name for i in onnx.load(str(e["fused"] / "model.onnx"), load_external_data=False).graph.initializer}
        assert "lm_head.weight" in inits
        for ids in PROMPTS[:2]:
            assert runtime.load(e["fused"]).generate(ids, max_new_tokens=12, tree="cpu_8").tokens == hf_greedy(
                e["model"], ids, 12
            )


def test_strip_screen_leaves_the_contract_alone(exported, wide):
    """exporter.quantize's first step: no screen node, input, output or initializer is left (the
    untied model's gathered copy of the lm_head included), and the graph still runs."""
    from exporter.fused import strip_screen

    for folder in (exported("llama")["fused"], wide["fused"]):
        proto = strip_screen(onnx.load(str(folder / "model.onnx")))
        g = proto.graph
        L = read_artifact(folder).model.num_layers
        assert [i.name for i in g.input] == fused_io_names(L)[0]
        assert [o.name for o in g.output] == fused_io_names(L)[1]
        assert not [n.name for n in g.node if n.name.startswith("screen")]
        left = [
            t.name for t in g.initializer if t.name.startswith("screen") or t.name in (SCREEN_INPUT, "lm_head.weight")
        ]
        assert left == []
        used = {x for n in g.node for x in n.input}
        assert all(t.name in used for t in g.initializer)
        import onnxruntime as ort

        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_screen_whose_bound_fails_at_load_is_turned_off(exported, monkeypatch):
    """The load checks the bound against float logits (another ONNX Runtime build's int8 kernel could
    quantize rows otherwise): a bound that does not hold turns the screen off, with a warning."""
    from runtime.onnxrt import FusedOnnxRuntimeBackend

    real = FusedOnnxRuntimeBackend._run

    def low(self, ids, pos, mask, k, screened):
        outs = real(self, ids, pos, mask, k, screened)
        outs["screen_bound"][:] -= 50.0  # below some unscored token's logit
        return outs

    monkeypatch.setattr(FusedOnnxRuntimeBackend, "_run", low)
    with capture_logs() as logs:
        gen = runtime.load(exported("llama")["fused"])
    assert not gen.backend.screens_argmax and gen.backend.screened_graph
    assert any("did not hold" in line for line in logs)
    monkeypatch.setattr(FusedOnnxRuntimeBackend, "_run", real)
    assert runtime.load(exported("llama")["fused"]).backend.screens_argmax


def test_lm_head_screen_bound_is_sound_against_adversarial_rows():
    """screen_reference's upper bound is above x . w_i for rows and weights built to make each error
    term as large as it can be: weights aligned with the rounding residual of x (the activation term)
    and weights far from int8 blocks (the weight term), with outliers in x; and each term is needed."""
    from exporter.fused import SCREEN_BLOCK, screen_reference, screen_weights

    rng = np.random.default_rng(3)
    H, V, R = 4 * SCREEN_BLOCK, 96, 24
    x = rng.standard_normal((R, H)) * np.where(rng.random((R, H)) < 0.05, 40.0, 1.0)  # outlier dimensions
    blocks = x.reshape(R, -1, SCREEN_BLOCK)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    residual = (x - (np.rint(blocks / scale) * scale).reshape(R, H)).astype(np.float32)
    w = rng.standard_normal((V, H)).astype(np.float32) * 0.05
    w[:R] = residual / np.linalg.norm(residual, axis=1, keepdims=True) * 0.5  # row r: aligned with x_r's residual
    w[R : 2 * R] += rng.choice([-1, 1], (R, H)).astype(np.float32) * 0.004  # far from int8 blocks
    t = screen_weights(w)
    upper = screen_reference(x, t)
    exact = x @ w.astype(np.float64).T
    assert (upper >= exact).all()
    # without the activation term the aligned rows break the bound; without the weight term, the others
    no_act = (
        upper - np.linalg.norm(x - (np.rint(blocks / scale) * scale).reshape(R, H), axis=1, keepdims=True) * t["norm"]
    )
    assert (no_act[np.arange(R), np.arange(R)] < exact[np.arange(R), np.arange(R)]).any()
    no_w = upper - np.linalg.norm(x, axis=1, keepdims=True) * t["err"]
    assert (no_w < exact).any()


@pytest.mark.parametrize("unsettled", ["none", "every", "odd"])
def test_greedy_through_the_screen_equals_float_logits_and_hf(exported, monkeypatch, unsettled):
    """Greedy decoding through the screen (prefill, plain steps, trees) gives Hugging Face's tokens,
    also where the screen settles no row or every other one (settle_argmax runs the call again in
    float: the cache entries it rewrites and the hidden states the heads read are the same)."""
    from runtime.onnxrt import FusedOnnxRuntimeBackend

    e = exported("llama")
    gen = runtime.load(e["fused"], backend="onnxruntime", threads=1, prefill_chunk=4)
    backend = gen.backend
    assert backend.screens_argmax
    real = FusedOnnxRuntimeBackend._forward_argmax
    calls = []

    def forward_argmax(self, ids, pos, mask, rows, noise=None, temperature=1.0, allowed=None):
        best = real(self, ids, pos, mask, rows, noise, temperature, allowed)
        calls.append(len(best))
        if unsettled == "every":
            best[:] = -1
        elif unsettled == "odd":
            best[1::2] = -1
        return best

    monkeypatch.setattr(FusedOnnxRuntimeBackend, "_forward_argmax", forward_argmax)
    for ids in PROMPTS:
        ref = hf_greedy(e["model"], ids, 20)
        assert gen.generate(ids, max_new_tokens=20, medusa=False).tokens == ref
        for tree in ("cpu_8", "chain_3"):
            assert gen.generate(ids, max_new_tokens=20, tree=tree).tokens == ref, (tree, unsettled)
    assert calls  # the greedy calls went through the screen
    if unsettled == "every":
        assert backend.screen_fallbacks >= len(calls)  # every call settled its path's last row in float
    backend.screens_argmax = False  # the float lm_head: the same tokens
    for ids in PROMPTS:
        assert gen.generate(ids, max_new_tokens=20, tree="cpu_8").tokens == hf_greedy(e["model"], ids, 20)


@pytest.mark.parametrize("unsettled", ["none", "every", "odd"])
def test_coupled_sampling_through_the_screen_draws_the_float_paths_tokens(exported, monkeypatch, unsettled):
    """Coupled sampling (the default at temperature > 0) through the screen: for a seed, plain
    sampling and Medusa (fixed and dynamic trees) give the tokens they give from float logits,
    also where the screen settles no row or every other one (settle_argmax then draws from the
    float row with the call's noise)."""
    from runtime.onnxrt import FusedOnnxRuntimeBackend

    e = exported("llama")
    gen = runtime.load(e["fused"], backend="onnxruntime", threads=1, prefill_chunk=4)
    backend = gen.backend
    real = FusedOnnxRuntimeBackend._forward_argmax
    noisy = []

    def forward_argmax(self, ids, pos, mask, rows, noise=None, temperature=1.0, allowed=None):
        best = real(self, ids, pos, mask, rows, noise, temperature, allowed)
        noisy.append(noise is not None)
        if unsettled == "every":
            best[:] = -1
        elif unsettled == "odd":
            best[1::2] = -1
        return best

    def sample(prompt, seed, **kw):
        return gen.generate(prompt, max_new_tokens=20, temperature=0.9, seed=seed, **kw).tokens

    runs = [(ids, seed, kw) for ids in PROMPTS[:2] for seed in (0, 1) for kw in
            ({"medusa": False}, {"tree": "cpu_8"}, {"tree": "chain_3"}, {"tree": "dynamic"})]  # fmt: skip
    backend.screens_noise = False  # the float lm_head first
    want = [sample(ids, seed, **kw) for ids, seed, kw in runs]
    assert all(w == want[i - i % 4] for i, w in enumerate(want))  # Medusa's tokens are plain sampling's
    assert want[0] != want[4]  # and the seed matters
    backend.screens_noise = True
    monkeypatch.setattr(FusedOnnxRuntimeBackend, "_forward_argmax", forward_argmax)
    got = [sample(ids, seed, **kw) for ids, seed, kw in runs]
    assert got == want
    assert noisy and all(noisy)  # every sampled call went through the screen with its noise
    if unsettled == "every":
        assert backend.screen_fallbacks >= len(noisy)


def test_an_artifact_without_the_screen_decodes_from_float_logits(wordlevel_tokenizer, tmp_path):
    """--no-lm-head-screen (and artifacts exported before the screen): the graph has the contract's
    I/O alone, the backend computes float logits, greedy is unchanged."""
    model = tiny_model("llama", seed=3)
    heads = random_heads(model, NUM_HEADS)
    out = export_artifact(
        model, heads, tmp_path / "a", ExportOptions(lm_head_screen=False, validate=False), tokenizer=wordlevel_tokenizer
    )
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    want_in, want_out = fused_io_names(model.config.num_hidden_layers)
    assert [i.name for i in graph.input] == want_in and [o.name for o in graph.output] == want_out
    gen = runtime.load(out)
    assert not gen.backend.screens_argmax and not gen.backend.screened_graph
    for ids in PROMPTS[:2]:
        assert gen.generate(ids, max_new_tokens=16, tree="cpu_8").tokens == hf_greedy(model, ids, 16)
