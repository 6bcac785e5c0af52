"""ONNX export: tiny random Llama, Mistral, Qwen2 and Qwen3 backbones with Medusa heads.

Each export is validated by exporter.validate (ONNX Runtime against the eager
BackboneStep/HeadsStep on a prefill, a decode step and mc_sim_7b_63 / chain_3 tree steps,
batch 1 and 2, empty and non-empty cache); these tests check that validation ran every
case and passed, and what the files on disk look like: onnx.checker, names, dtypes,
named dynamic axes, external data, atomicity and --force.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_LLAMA, capture_logs, make_tiny_causal_lm, random_heads

from exporter.export import ExportOptions, backbone_io, export_artifact, heads_io, tracing_patches
from exporter.heads import fresh_heads
from exporter.step import BackboneStep, kv_names
from exporter.validate import validate_artifact
from runtime.artifact import read_artifact
from runtime.errors import ArtifactError, MedusaError, ValidationError

# TINY_LLAMA without head_dim: hidden_size // num_attention_heads = 8 (the portable graph takes any)
TINY = {k: v for k, v in TINY_LLAMA.items() if k != "head_dim"}


def tiny_model(arch: str, seed: int = 0):
    return make_tiny_causal_lm(arch, seed, config=TINY)


# arch -> (heads, head layers, shared lm_head): every head layout the loader produces
ARCHS = {
    "llama": (3, 1, True),
    "mistral": (2, 1, False),
    "qwen2": (4, 2, True),
    "qwen3": (2, 2, False),
    "phi3": (3, 1, False),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, wordlevel_tokenizer):
    """Factory: one validated float32 export per architecture, cached for the module."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model = tiny_model(arch)
            k, layers, shared = ARCHS[arch]
            heads = random_heads(model, k, layers, shared)
            out = tmp_path_factory.mktemp(f"export-{arch}") / "artifact"
            with capture_logs() as logs:
                export_artifact(model, heads, out, ExportOptions(graph="portable"), tokenizer=wordlevel_tokenizer)
            cache[arch] = {"out": out, "model": model, "heads": heads, "log": logs}
        return cache[arch]

    return get


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_export_validates_every_case(exported, arch):
    """ORT matches PyTorch: prefill, decode, both trees, batch 1 and 2, empty and non-empty cache."""
    e = exported(arch)
    log = "\n".join(e["log"])
    assert "validation passed" in log and "FAIL" not in log
    for b in (1, 2):
        assert f"prefill b={b} new=8" in log
        assert f"decode b={b} past=8 new=1" in log
        for tree in ("mc_sim_7b_63", "chain_3"):
            assert f"tree {tree} b={b} past=8" in log
            assert f"tree {tree} b={b} empty cache" in log
        assert f"heads b={b}" in log
    for line in e["log"]:
        if "PASS" in line and "top-1" not in line:
            assert "max|diff|" in line
    # the summary in the config
    cfg = json.loads((e["out"] / "medusa_config.json").read_text())
    v = cfg["provenance"]["validation"]
    assert v["passed"] and not v["failures"]
    assert set(v["max_abs_diff"]) == {"logits", "hidden_states", "present", "medusa_logits"}
    assert max(v["max_abs_diff"].values()) < 1e-4


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_graph_names_dtypes_and_named_axes(exported, arch):
    e = exported(arch)
    out, model = e["out"], e["model"]
    c = model.config
    kv_heads, head_dim = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    k = ARCHS[arch][0]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    onnx.checker.check_model(str(out / "heads.onnx"), full_check=True)

    g = onnx.load(str(out / "model.onnx")).graph
    past, present = kv_names(c.num_hidden_layers)
    assert [i.name for i in g.input] == ["input_ids", "position_ids", "tree_mask", *past]
    assert [o.name for o in g.output] == ["logits", "hidden_states", *present]
    T = onnx.TensorProto
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output]}
    assert types["input_ids"] == types["position_ids"] == T.INT64
    assert types["tree_mask"] == T.BOOL
    assert all(types[n] == T.FLOAT for n in ["logits", "hidden_states", *past, *present])
    shapes = {v.name: dims(v) for v in [*g.input, *g.output]}
    assert shapes["input_ids"] == shapes["position_ids"] == ["batch", "new_tokens"]
    assert shapes["tree_mask"] == ["batch", "new_tokens", "new_tokens"]
    for n in past:
        assert shapes[n] == ["batch", "past_sequence", kv_heads, head_dim]
    for n in present:
        assert shapes[n] == ["batch", "new_tokens", kv_heads, head_dim]
    assert shapes["logits"] == ["batch", "new_tokens", c.vocab_size]
    assert shapes["hidden_states"] == ["batch", "new_tokens", c.hidden_size]
    # every op is in the default domain at a TensorRT-10-parsable opset; no exotic ops
    assert {(o.domain, o.version) for o in onnx.load(str(out / "model.onnx")).opset_import} == {("", 18)}
    assert {n.op_type for n in g.node} <= {
        "Add",
        "Cast",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Cos",
        "Div",
        "Equal",
        "Expand",
        "Gather",
        "Identity",
        "MatMul",
        "Mul",
        "Neg",
        "Pow",
        "Range",
        "ReduceMean",
        "Reshape",
        "Shape",
        "Sigmoid",
        "Sin",
        "Slice",
        "Softmax",
        "Sqrt",
        "Transpose",
        "Unsqueeze",
        "Where",
        "Gemm",
        "Sub",
        "Squeeze",
    }

    h = onnx.load(str(out / "heads.onnx")).graph
    assert [i.name for i in h.input] == ["hidden_states"] and [o.name for o in h.output] == ["medusa_logits"]
    assert dims(h.input[0]) == ["batch", c.hidden_size]
    assert dims(h.output[0]) == ["batch", k, c.vocab_size]

    # medusa_config.json: what the runtime reads instead of guessing
    cfg = read_artifact(out)
    b_in, b_out, b_axes = backbone_io(c.num_hidden_layers)
    assert cfg.backbone.inputs == b_in and cfg.backbone.outputs == b_out and cfg.backbone.dynamic_axes == b_axes
    assert (cfg.heads.inputs, cfg.heads.outputs, cfg.heads.dynamic_axes) == heads_io()
    for name, axes in cfg.backbone.dynamic_axes.items():  # leading dims are the named dynamic ones
        assert shapes[name][: len(axes)] == axes
    m = cfg.model
    assert (m.architecture, m.num_layers, m.num_kv_heads, m.head_dim, m.hidden_size, m.vocab_size) == (
        model.config.architectures[0],
        2,
        kv_heads,
        head_dim,
        c.hidden_size,
        c.vocab_size,
    )
    assert (m.num_medusa_heads, m.medusa_num_layers, m.medusa_shared_lm_head) == ARCHS[arch]
    assert cfg.dtype == "float32" and cfg.opset == 18
    assert cfg.default_tree == ("chain_2" if k == 2 else "chain_3" if k == 3 else "cpu_8")
    assert cfg.default_tree_paths and all(isinstance(p, list) for p in cfg.default_tree_paths)
    prov = cfg.provenance
    assert prov["heads"]["layout"] == "test" and prov["heads"]["num_heads"] == k
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(prov["versions"])
    assert prov["export_options"]["opset"] == 18 and "created" in prov
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / f).is_file(), f


def test_graph_runs_prefill_then_decode_like_the_runtime(exported):
    """One graph: a causal prefill on an empty cache, then single-token steps on its output."""
    import onnxruntime as ort

    e = exported("llama")
    model, out = e["model"], e["out"]
    c = model.config
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    past_names, _ = kv_names(c.num_hidden_layers)
    ids = np.array([[5, 17, 42, 99, 3]], dtype=np.int64)
    n = ids.shape[1]
    cache = [np.zeros((1, 0, 2, 8), np.float32) for _ in past_names]
    feed = {
        "input_ids": ids,
        "position_ids": np.arange(n)[None],
        "tree_mask": np.tril(np.ones((n, n), bool))[None],
        **dict(zip(past_names, cache)),
    }
    logits, hidden, *presents = sess.run(None, feed)
    cache = presents
    tokens = [int(logits[0, -1].argmax())]
    for t in range(4):
        feed = {
            "input_ids": np.array([[tokens[-1]]]),
            "position_ids": np.array([[n + t]]),
            "tree_mask": np.ones((1, 1, 1), bool),
            **dict(zip(past_names, cache)),
        }
        logits, hidden, *presents = sess.run(None, feed)
        assert presents[0].shape == (1, 1, 2, 8)  # present = the new entries only
        cache = [np.concatenate([p, q], axis=1) for p, q in zip(cache, presents)]
        tokens.append(int(logits[0, -1].argmax()))
    with torch.inference_mode():
        ref = model.generate(
            torch.from_numpy(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            attention_mask=torch.ones_like(torch.from_numpy(ids)),
        )
    assert tokens == ref[0, n:].tolist()


def test_tracing_patches_restore_everything(exported):
    from transformers.integrations import sdpa_attention

    model = tiny_model("llama", seed=3)
    before = (
        torch.nn.functional.scaled_dot_product_attention,
        sdpa_attention.use_gqa_in_sdpa,
        model.config._attn_implementation,
    )
    model.train()
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
    try:
        with tracing_patches(model):
            assert torch.nn.functional.scaled_dot_product_attention is not before[0]
            assert not model.training and "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
        assert (
            torch.nn.functional.scaled_dot_product_attention,
            sdpa_attention.use_gqa_in_sdpa,
            model.config._attn_implementation,
        ) == before
        assert model.training and os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    finally:
        os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
    # and after a whole export the eager step is bit-identical
    e = exported("llama")
    model = e["model"]
    x = (
        torch.tensor([[1, 2, 3]]),
        torch.tensor([[0, 1, 2]]),
        torch.tril(torch.ones(1, 3, 3, dtype=torch.bool)),
        *[torch.zeros(1, 0, 2, 8) for _ in range(4)],
    )
    with torch.inference_mode():
        a = BackboneStep(model)(*x)
        with tracing_patches(model):
            pass
        b = BackboneStep(model)(*x)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_fp16_export(tmp_path, wordlevel_tokenizer):
    """fp16: weights, logits, hidden states and KV in fp16; ids int64, mask bool; no constant
    that fp16 cannot hold (finfo(float32).min); validated against the fp16 eager model."""
    model = tiny_model("llama", seed=4)
    heads = random_heads(model, 2)
    out = tmp_path / "fp16"
    with capture_logs() as logs:
        export_artifact(
            model, heads, out, ExportOptions(graph="portable", dtype="float16"), tokenizer=wordlevel_tokenizer
        )
    assert any("validation passed" in s for s in logs)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not converted
    T = onnx.TensorProto
    for f in ("model.onnx", "heads.onnx"):
        m = onnx.load(str(out / f))
        types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
        for name, t in types.items():
            if name in ("input_ids", "position_ids"):
                assert t == T.INT64
            elif name == "tree_mask":
                assert t == T.BOOL
            else:
                assert t == T.FLOAT16, name
        assert {i.data_type for i in m.graph.initializer if i.data_type in (T.FLOAT, T.FLOAT16)} == {T.FLOAT16}
        for node in m.graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in (T.FLOAT, T.FLOAT16):
                    v = onnx.numpy_helper.to_array(a.t)
                    finite = v[np.isfinite(v)]
                    assert not finite.size or np.abs(finite).max() <= 65504, (node.name, v)
    assert read_artifact(out).dtype == "float16"


def test_external_data_with_a_low_threshold(tmp_path, wordlevel_tokenizer):
    import onnxruntime as ort

    model = tiny_model("qwen2", seed=5)
    heads = random_heads(model, 2)
    out = tmp_path / "ext"
    export_artifact(
        model,
        heads,
        out,
        ExportOptions(graph="portable", external_data_threshold_mb=0.01),
        tokenizer=wordlevel_tokenizer,
    )
    for f in ("model.onnx", "heads.onnx"):
        data = out / (f + ".data")
        assert data.is_file() and data.stat().st_size > (out / f).stat().st_size
        m = onnx.load(str(out / f), load_external_data=False)
        ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert ext and {e.value for t in ext for e in t.external_data if e.key == "location"} == {f + ".data"}
        onnx.checker.check_model(str(out / f))
        ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    cfg = read_artifact(out)
    assert set(cfg.provenance["files"]) == {"model.onnx", "model.onnx.data", "heads.onnx", "heads.onnx.data"}
    assert cfg.provenance["validation"]["passed"]


def test_existing_folder_is_refused_without_force(exported, wordlevel_tokenizer, tmp_path):
    e = exported("llama")
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="already exists"):
        export_artifact(
            e["model"], e["heads"], out, ExportOptions(graph="portable", validate=False), tokenizer=wordlevel_tokenizer
        )
    assert (out / "keep.txt").read_text() == "mine"
    force = ExportOptions(graph="portable", validate=False, force=True)
    # a folder that is not an earlier artifact is never replaced, even with force (it may be a user's data)
    with pytest.raises(ArtifactError, match="not a medusa-trt artifact"):
        export_artifact(e["model"], e["heads"], out, force, tokenizer=wordlevel_tokenizer)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "medusa_config.json").write_text("{}")  # an earlier artifact, but holding a file no export writes
    with pytest.raises(ArtifactError, match=r"holds files medusa-export did not write \(keep.txt\)"):
        export_artifact(e["model"], e["heads"], out, force, tokenizer=wordlevel_tokenizer)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    (out / "model.onnx").write_text("an earlier export's graph")  # what an export wrote: replaced whole
    export_artifact(e["model"], e["heads"], out, force, tokenizer=wordlevel_tokenizer)
    assert (out / "model.onnx").read_bytes() != b"an earlier export's graph" and (
        out / "medusa_config.json"
    ).stat().st_size > 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp or backup folders left


def test_failed_validation_leaves_nothing(exported, wordlevel_tokenizer, tmp_path, monkeypatch):
    import exporter.validate

    e = exported("llama")

    def broken(*a, **k):
        raise ValidationError(["prefill b=1: logits max|diff| 1 > tol 0.001"])

    monkeypatch.setattr(exporter.validate, "validate_artifact", broken)
    out = tmp_path / "art"
    with pytest.raises(ValidationError, match="logits"):
        export_artifact(e["model"], e["heads"], out, ExportOptions(graph="portable"), tokenizer=wordlevel_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing_and_keeps_the_old_artifact(
    exported, wordlevel_tokenizer, tmp_path, monkeypatch
):
    import exporter.export

    e = exported("llama")
    out = tmp_path / "art"
    out.mkdir()
    (out / "model.onnx").write_text("previous artifact")
    (out / "medusa_config.json").write_text("{}")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter.export, "export_heads", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_artifact(
            e["model"], e["heads"], out, ExportOptions(graph="portable", force=True), tokenizer=wordlevel_tokenizer
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert sorted(p.name for p in out.iterdir()) == ["medusa_config.json", "model.onnx"]
    assert (out / "model.onnx").read_text() == "previous artifact"


def test_validation_catches_a_graph_that_differs(exported, tmp_path):
    """Validation is not vacuous: weights changed after export -> every differing output listed."""
    import copy

    e = exported("mistral")
    model = copy.deepcopy(e["model"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(ValidationError) as info:
        validate_artifact(e["out"], model, e["heads"], trees=("chain_3",), batches=(1,))
    failures = [str(f) for f in info.value.failures]
    text = str(info.value)
    assert any("logits" in f for f in failures) and any("hidden_states" in f for f in failures)
    assert "prefill b=1" in text and "tree chain_3 b=1" in text
    # layer 0's cache does not depend on layer 1: those presents still pass
    assert not any("present.0." in f for f in failures)


def test_bad_options_are_user_errors(exported, wordlevel_tokenizer, tmp_path):
    e = exported("llama")
    for opts, msg in (
        (ExportOptions(graph="portable", opset=13), "opset 13"),
        (ExportOptions(graph="portable", dtype="bfloat16"), "bfloat16"),
        (ExportOptions(graph="portable", tree="cpu_8"), "needs 4 Medusa heads"),
        (ExportOptions(graph="portable", max_context=10**6), "max_position_embeddings"),
    ):
        with pytest.raises(MedusaError, match=msg):
            export_artifact(e["model"], e["heads"], tmp_path / "x", opts, tokenizer=wordlevel_tokenizer)
    assert list(tmp_path.iterdir()) == []
    wrong = fresh_heads(2, 16, 128)
    with pytest.raises(MedusaError, match="do not fit"):
        export_artifact(
            e["model"], wrong, tmp_path / "x", ExportOptions(graph="portable"), tokenizer=wordlevel_tokenizer
        )


def test_sliding_window_caps_max_context(tmp_path, wordlevel_tokenizer):
    """Mistral with a sliding window: transformers' cache keeps window-1 positions, so the
    contract holds up to there; the artifact says so instead of failing past it."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**{**TINY, "sliding_window": 32})
    config.architectures = ["MistralForCausalLM"]
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    heads = random_heads(model, 2)
    with capture_logs() as logs:
        out = export_artifact(
            model, heads, tmp_path / "a", ExportOptions(graph="portable", validate=False), tokenizer=wordlevel_tokenizer
        )
    assert read_artifact(out).model.max_context == 31
    assert any("sliding_window 32" in s for s in logs)
    with pytest.raises(MedusaError, match="sliding-window"):
        export_artifact(
            model,
            heads,
            tmp_path / "b",
            ExportOptions(graph="portable", max_context=100),
            tokenizer=wordlevel_tokenizer,
        )


def test_unsupported_model_class_is_a_user_error(tmp_path, wordlevel_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=128)).eval()
    with pytest.raises(MedusaError, match="GPT2LMHeadModel is not supported"):
        export_artifact(
            model,
            fresh_heads(2, 32, 128),
            tmp_path / "a",
            ExportOptions(graph="portable"),
            tokenizer=wordlevel_tokenizer,
        )


def test_int8_heads_graph_proposes_like_the_float_heads(tiny):
    """heads_int8.onnx is written for float32 artifacts and picked by ONNX Runtime on the CPU;
    its top-1 proposals agree with the float heads on (almost) every hidden state."""
    import numpy as np
    import onnxruntime as ort

    import runtime
    from runtime.artifact import read_artifact

    art = tiny["artifact"]  # the session's fused float32 export (conftest)
    cfg = read_artifact(art)
    assert cfg.heads_int8 is not None and (art / cfg.heads_int8.file).is_file()
    assert (art / cfg.heads_int8.file).stat().st_size < 0.5 * (art / cfg.heads.file).stat().st_size
    f32 = ort.InferenceSession(str(art / cfg.heads.file), providers=["CPUExecutionProvider"])
    i8 = ort.InferenceSession(str(art / cfg.heads_int8.file), providers=["CPUExecutionProvider"])
    hidden = np.random.default_rng(0).standard_normal((64, cfg.model.hidden_size)).astype(np.float32)
    a = f32.run(None, {"hidden_states": hidden})[0].argmax(-1)
    b = i8.run(None, {"hidden_states": hidden})[0].argmax(-1)
    assert (a == b).mean() > 0.9
    gen = runtime.load(art, backend="onnxruntime", threads=1)
    assert gen.backend.heads_file == cfg.heads_int8.file


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own-projection"])
def test_draft_vocab_heads_export(tmp_path, wordlevel_tokenizer, shared):
    """Heads with a draft vocabulary export and validate; heads.onnx holds only the draft rows
    of the projection (no vocabulary-sized weight is left after constant folding), proposes
    only draft tokens, and greedy Medusa through the runtime still equals plain decoding."""
    import onnxruntime as ort

    import runtime

    model = tiny_model("llama", seed=6)
    draft = sorted(np.random.default_rng(0).choice(TINY["vocab_size"], 40, replace=False).tolist())
    weights = {}
    for name, ids in (("full", None), ("draft", draft)):
        heads = random_heads(model, 3, shared=shared)
        heads.set_draft_vocab(ids)
        with capture_logs() as logs:
            export_artifact(
                model, heads, tmp_path / name, ExportOptions(graph="portable"), tokenizer=wordlevel_tokenizer
            )
        assert any("validation passed" in s for s in logs)
        g = onnx.load(str(tmp_path / name / "heads.onnx")).graph
        weights[name] = [tuple(i.dims) for i in g.initializer if len(i.dims) == 2]
    V, H, n_proj = TINY["vocab_size"], TINY["hidden_size"], 1 if shared else 3
    assert sum(V in d for d in weights["full"]) == n_proj
    assert not any(V in d for d in weights["draft"])
    assert sorted(d for d in weights["draft"] if len(draft) in d) == [(H, len(draft))] * n_proj
    sess = ort.InferenceSession(str(tmp_path / "draft" / "heads.onnx"), providers=["CPUExecutionProvider"])
    hidden = np.random.default_rng(1).standard_normal((8, TINY["hidden_size"])).astype(np.float32)
    logits = sess.run(None, {"hidden_states": hidden})[0]
    assert logits.shape == (8, 3, TINY["vocab_size"])
    assert set(logits.argmax(-1).flatten().tolist()) <= set(draft)
    outside = np.setdiff1d(np.arange(TINY["vocab_size"]), draft)
    assert (logits[..., outside] == np.finfo(np.float32).min).all()
    # validation compares the draft logits with a real tolerance and checks the filler exactly
    report = validate_artifact(tmp_path / "draft", model, heads, trees=("chain_3",), batches=(1,))
    draft_checks = [c for c in report.checks if c.output == "medusa_logits[draft]"]
    filler_checks = [c for c in report.checks if c.output == "medusa_logits[other tokens]"]
    assert len(draft_checks) == len(filler_checks) == 2 and all(c.passed and c.tol < 1 for c in draft_checks)
    assert all(c.passed for c in filler_checks) and "medusa_logits" in report.summary()["max_abs_diff"]
    import copy

    bad = copy.deepcopy(heads)
    with torch.no_grad():
        bad.heads[0][0].linear.weight.add_(0.05)
    with pytest.raises(ValidationError) as info:
        validate_artifact(tmp_path / "draft", model, bad, trees=("chain_3",), batches=(1,))
    assert {f.output for f in info.value.failures} == {"medusa_logits[draft]"}
    gen = runtime.load(tmp_path / "draft", backend="onnxruntime", threads=1)
    prompt = [1, 5, 9, 14, 30, 7]
    med = gen.generate(prompt, max_new_tokens=24, tree="chain_3")
    assert med.tokens == gen.generate(prompt, max_new_tokens=24, medusa=False).tokens


def test_draft_vocab_heads_fp16_export(tmp_path, wordlevel_tokenizer):
    """float16: the filler is float16's lowest finite value (-65504), the draft logits are
    validated against the float32 truth with a real tolerance, and a perturbed head fails."""
    import copy

    import onnxruntime as ort

    model = tiny_model("llama", seed=7)
    heads = random_heads(model, 2)
    draft = list(range(0, TINY["vocab_size"], 3))
    heads.set_draft_vocab(draft)
    out = tmp_path / "fp16"
    export_artifact(model, heads, out, ExportOptions(graph="portable", dtype="float16"), tokenizer=wordlevel_tokenizer)
    sess = ort.InferenceSession(str(out / "heads.onnx"), providers=["CPUExecutionProvider"])
    hidden = np.random.default_rng(2).standard_normal((4, TINY["hidden_size"])).astype(np.float16)
    logits = sess.run(None, {"hidden_states": hidden})[0]
    assert logits.dtype == np.float16
    outside = np.setdiff1d(np.arange(TINY["vocab_size"]), draft)
    assert (logits[..., outside] == np.float16(-65504)).all() and np.isfinite(logits).all()
    report = validate_artifact(out, model, heads, trees=("chain_3",), batches=(1,))
    checks = [c for c in report.checks if c.output == "medusa_logits[draft]"]
    assert checks and all(c.passed and c.tol < 1 for c in checks)
    bad = copy.deepcopy(heads)
    with torch.no_grad():
        bad.heads[1][0].linear.bias.add_(0.5)
    with pytest.raises(ValidationError) as info:
        validate_artifact(out, model, bad, trees=("chain_3",), batches=(1,))
    assert {f.output for f in info.value.failures} == {"medusa_logits[draft]"}


def test_an_fp16_pytorch_run_that_overflows_widens_no_tolerance():
    """float16 validation allows a graph FP16_FACTOR times PyTorch fp16's own distance from the float32 truth;
    where PyTorch's fp16 run overflowed (NaN: an infinite distance) the plain tolerance holds, so a graph with
    NaN logits fails instead of passing against an infinite tolerance."""
    from exporter.validate import FP16_FACTOR, _diff, _tol, fp16_tolerance

    truth = np.linspace(-4, 4, 12, dtype=np.float32).reshape(3, 4)
    overflowed = truth.astype(np.float16)
    overflowed[1, 2] = np.nan
    d_torch = _diff(overflowed, truth)
    assert d_torch == float("inf")
    tol = fp16_tolerance(truth, d_torch, "float16")
    assert tol == _tol(truth, "float16") and np.isfinite(tol)
    assert _diff(np.full_like(overflowed, np.nan), truth) > tol  # an all-NaN graph output fails
    close = truth.astype(np.float16)
    assert fp16_tolerance(truth, _diff(close, truth) + 0.5, "float16") == max(
        _tol(truth, "float16"), FP16_FACTOR * (_diff(close, truth) + 0.5))  # fmt: skip
