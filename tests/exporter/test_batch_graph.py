"""``batch.onnx``: written next to every fused float export, its weights read from model.onnx's
own data file, validated against model.onnx sequence by sequence; a graph that lets a token see
past its own cache fails that validation."""

from __future__ import annotations

import shutil

import onnx
import pytest

torch = pytest.importorskip("torch")

from conftest import capture_logs, make_tiny_causal_lm, random_heads  # noqa: E402

import runtime  # noqa: E402
from exporter import fused  # noqa: E402
from exporter.export import ExportOptions, export_artifact  # noqa: E402
from exporter.validate import validate_batch_graph  # noqa: E402
from runtime.artifact import read_artifact  # noqa: E402
from runtime.errors import ValidationError  # noqa: E402


@pytest.fixture(scope="module")
def exports(tmp_path_factory, wordlevel_tokenizer):
    cache = {}

    def get(arch: str, dtype: str = "float32"):
        if (arch, dtype) not in cache:
            model = make_tiny_causal_lm(arch, 0)
            model.generation_config.eos_token_id = None
            heads = random_heads(model, 3)
            out = tmp_path_factory.mktemp(f"batch-{arch}-{dtype}") / "art"
            with capture_logs() as logs:
                export_artifact(model, heads, out, ExportOptions(dtype=dtype), tokenizer=wordlevel_tokenizer)
            cache[(arch, dtype)] = {"artifact": out, "model": model, "log": logs}
        return cache[(arch, dtype)]

    return get


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_every_fused_export_gets_a_validated_batch_graph_sharing_its_weights(exports, arch):
    e = exports(arch)
    out = e["artifact"]
    cfg = read_artifact(out)
    assert cfg.batch is not None and cfg.batch.file == "batch.onnx"
    v = cfg.provenance["batch_validation"]
    assert v["passed"] and v["checks"] >= 12, v  # 4 sequences x (logits, hidden, present, top-1)
    proto = onnx.load(str(out / "batch.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"
    }
    weights = sum(int(next(e.value for e in t.external_data if e.key == "length")) for t in external)
    assert (out / "batch.onnx").stat().st_size < weights / 5  # the weights are not in the graph
    assert "validating batch.onnx against model.onnx" in "\n".join(e["log"])
    ops = {n.op_type for n in proto.graph.node}
    assert "GroupQueryAttention" not in ops and {"RotaryEmbedding", "FusedMatMul", "Softmax"} <= ops
    # fold.onnx beside it: validated, the same weights, GroupQueryAttention in If branches by batch size
    assert cfg.fold is not None and cfg.fold.file == "fold.onnx" and cfg.fold_max_batch == fused.FOLD_MAX_BATCH
    assert cfg.fold.inputs == cfg.batch.inputs and cfg.fold.outputs == cfg.batch.outputs
    v = cfg.provenance["fold_validation"]
    assert v["passed"] and v["checks"] >= 12, v
    fold = onnx.load(str(out / "fold.onnx"), load_external_data=False)
    assert {e.value for t in fold.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"} == {"model.onnx.data"}  # fmt: skip
    # the weights are not in the graph: what it holds inline is norms and constants (its If branches make the
    # file itself a fifth of a tiny model's weights)
    inline = sum(t.ByteSize() for t in fold.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    assert inline < weights / 20, (inline, weights)
    heads = set()

    def walk(nodes):
        for n in nodes:
            if n.op_type == "GroupQueryAttention":
                heads.add(next(a.i for a in n.attribute if a.name == "num_heads"))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g.node)

    walk(fold.graph.node)
    nq = e["model"].config.num_attention_heads
    assert heads == {b * nq for b in range(2, fused.FOLD_MAX_BATCH + 1)}


def test_fp16_batch_graph_validates_and_decodes_like_the_one_sequence_graph(exports):
    e = exports("llama", "float16")
    cfg = read_artifact(e["artifact"])
    assert cfg.dtype == "float16" and cfg.provenance["batch_validation"]["passed"]
    ids = [5, 9, 14, 30, 77, 3]
    single = runtime.load(e["artifact"], threads=1).generate(ids, max_new_tokens=20, tree="chain_3")
    batched = runtime.load(e["artifact"], threads=1, max_batch=2, budgets=None)
    try:
        assert batched.generate(ids, max_new_tokens=20, tree="chain_3").tokens == single.tokens
    finally:
        batched.close()


def test_validation_catches_a_batch_graph_that_sees_past_a_sequences_cache(exports, tmp_path, monkeypatch):
    """Swap cache_lengths for the buffer's capacity inside the bias (every cache entry visible,
    the stale ones past a sequence's length included): validation must fail on it."""
    e = exports("llama")
    art = tmp_path / "art"
    shutil.copytree(e["artifact"], art)
    original = fused._batch_bias

    def leaky(g, group, past0, npdt, zero, one, n_new):
        out = original(g, group, past0, npdt, zero, one, n_new)
        full = g.op("Expand", ["capacity/out0", g.op("Shape", ["cache_lengths"])], name="leak")
        for node in g.nodes:
            if node.op_type == "Unsqueeze" and "cache_lengths" in node.input:
                node.input[list(node.input).index("cache_lengths")] = full
        return out

    monkeypatch.setattr(fused, "_batch_bias", leaky)
    cfg = read_artifact(art)
    fused.write_batch_graph(e["model"], art, "model.onnx", "float32", cfg.model.max_context)
    with pytest.raises(ValidationError, match="batch graph, tree"):
        validate_batch_graph(art, "model.onnx", "batch.onnx", "float32", cfg.model.max_context)
    monkeypatch.setattr(fused, "_batch_bias", original)
    fused.write_batch_graph(e["model"], art, "model.onnx", "float32", cfg.model.max_context)
    assert validate_batch_graph(art, "model.onnx", "batch.onnx", "float32", cfg.model.max_context).ok


def test_validation_catches_a_folded_graph_that_sees_past_a_sequences_cache(exports, tmp_path, monkeypatch):
    """In fold.onnx a shorter sequence's rows sit beside the gap between its cache length and the
    call's longest (where stale entries lie): a bias that let it see there must fail validation."""
    e = exports("llama")
    art = tmp_path / "art"
    shutil.copytree(e["artifact"], art)
    original = fused._fold_inputs

    def leaky(g, *args):
        out = original(g, *args)
        for node in g.nodes:  # "a cache entry" becomes "any column before the new tokens"
            if node.op_type == "Less" and node.input[0].startswith("Range") and "Unsqueeze" in node.input[1]:
                node.input[1] = g.op("Unsqueeze", ["fold/place/out0", g.const("const/leak_axes", [1])], name="leak")
        return out

    monkeypatch.setattr(fused, "_fold_inputs", leaky)
    cfg = read_artifact(art)
    fused.write_batch_graph(
        e["model"], art, "model.onnx", "float32", cfg.model.max_context, folded=fused.FOLD_MAX_BATCH
    )
    with pytest.raises(ValidationError, match="folded batch graph"):
        validate_batch_graph(art, "model.onnx", "fold.onnx", "float32", cfg.model.max_context, folded=True)
    monkeypatch.setattr(fused, "_fold_inputs", original)
    fused.write_batch_graph(
        e["model"], art, "model.onnx", "float32", cfg.model.max_context, folded=fused.FOLD_MAX_BATCH
    )
    assert validate_batch_graph(art, "model.onnx", "fold.onnx", "float32", cfg.model.max_context, folded=True).ok
