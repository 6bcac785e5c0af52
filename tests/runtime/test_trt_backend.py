"""The TensorRT backend without TensorRT: buffer sizes, KV compaction, engine checks, the
orchestration on a numpy engine, the glue on stand-ins for tensorrt and cuda-python, and
the error when tensorrt is missing."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from trt_fakes import (
    ReferenceBackend,
    ToyEngine,
    ToyStagedBackend,
    fake_config,
    fake_tensorrt_runtime,
    smollm2_config,
    write_fake_artifact,
)

from exporter.trt_plan import Limits, make_plan
from runtime import trt_backend
from runtime.decode import DecodeConfig, decode
from runtime.errors import ArtifactError, BackendUnavailableError, MedusaError
from runtime.tree import load_tree
from runtime.trt_backend import (
    ALIGN,
    EngineDescription,
    TensorRTBackend,
    aligned_rows,
    check_engine,
    compaction_runs,
    describe_engine,
    expected_description,
    plan_buffers,
    require_tensorrt,
)

# ---------------------------------------------------------------------------- buffers


@pytest.mark.parametrize(
    "rows, row_bytes", [(2048, 384), (513, 384), (7, 320), (100, 240), (5, 14), (1, 256), (3, 1024)]
)
def test_aligned_rows(rows, row_bytes):
    got = aligned_rows(rows, row_bytes)
    assert got >= rows and (got * row_bytes) % ALIGN == 0
    # the smallest such count: one step less is either too few rows or misaligned
    assert all((r * row_bytes) % ALIGN for r in range(rows, got))


def test_smollm2_buffer_sizes():
    plan = make_plan(smollm2_config(), Limits(max_context=2048))
    layout = plan_buffers(plan)
    b = layout.buffers
    fp16 = 2
    assert b["cache_k"].shape == (30, 2048, 3, 64) and b["cache_k"].nbytes == 30 * 2048 * 3 * 64 * fp16
    # staging: the largest forward (a 512-token prompt chunk), padded so each layer starts on
    # 256 bytes (a row is 3 * 64 * 2 = 384 bytes: rows come in pairs)
    assert b["stage_v"].shape == (30, 512, 3, 64)
    assert b["logits"].shape == (512, 49152) and b["logits"].nbytes == 512 * 49152 * fp16
    assert b["tree_mask"].shape == (512 * 512,) and b["tree_mask"].dtype == "bool"
    assert b["input_ids"].dtype == "int64" and b["input_ids"].shape == (512,)
    assert b["heads_out"].shape == (1, 4, 49152)
    assert "hidden_store" not in b  # one engine call per forward: the heads read hidden_states
    kv_bytes = 2 * 30 * (2048 + 512) * 3 * 64 * fp16
    assert layout.total_bytes == kv_bytes + sum(x.nbytes for k, x in b.items() if k[:5] not in ("cache", "stage"))


@pytest.mark.parametrize(
    "kv_heads, head_dim, dtype, ctx",
    [(3, 64, "float16", 999), (1, 20, "float32", 77), (5, 24, "float16", 100), (2, 8, "float32", 64)],
)
def test_every_layer_of_cache_and_staging_starts_aligned(kv_heads, head_dim, dtype, ctx):
    cfg = fake_config(kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, max_context=ctx)
    plan = make_plan(cfg, Limits(max_prompt=ctx // 3))
    itemsize = 2 if dtype == "float16" else 4
    for name in ("cache_k", "cache_v", "stage_k", "stage_v"):
        layers, rows, kv, hd = plan_buffers(plan).buffers[name].shape
        assert (rows * kv * hd * itemsize) % ALIGN == 0, name
    assert plan_buffers(plan).buffers["cache_k"].shape[1] >= ctx


def test_buffers_sit_at_aligned_non_overlapping_offsets_of_one_arena():
    layout = plan_buffers(make_plan(smollm2_config(dtype="float32"), Limits(max_context=1000, max_prompt=100)))
    spans = sorted((layout.offsets[n], layout.offsets[n] + b.nbytes) for n, b in layout.buffers.items())
    assert all(start % ALIGN == 0 for start, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= layout.arena_bytes < spans[-1][1] + ALIGN


def test_buffer_capacity_bounds():
    plan = make_plan(fake_config(), Limits())
    assert plan_buffers(plan, capacity=20).capacity == 20
    with pytest.raises(MedusaError, match=r"cache capacity must lie in \[2, 64\]"):
        plan_buffers(plan, capacity=65)


# ---------------------------------------------------------------------------- compaction


def test_a_chain_is_one_copy():
    assert compaction_runs([0, 1, 2, 3]) == [(0, 0, 4)]
    assert compaction_runs(list(range(512))) == [(0, 0, 512)]


def test_a_tree_path_copies_each_contiguous_run():
    # nodes 0, 1 are adjacent, then the path jumps to 4 and 9
    assert compaction_runs([0, 1, 4, 9]) == [(0, 0, 2), (4, 2, 1), (9, 3, 1)]
    assert compaction_runs([0, 3, 4, 5]) == [(0, 0, 1), (3, 1, 3)]
    assert compaction_runs([]) == []


@pytest.mark.parametrize("keep", [[1, 0], [0, 0], [-1, 2]])
def test_compaction_refuses_unordered_keep(keep):
    with pytest.raises(MedusaError, match="distinct, non-negative and increasing"):
        compaction_runs(keep)


def test_compaction_moves_exactly_the_kept_rows():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        keep = np.sort(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False))
        stage, cache = rng.normal(size=(n, 3)), np.zeros((n, 3))
        for src, dst, count in compaction_runs(keep):
            cache[dst : dst + count] = stage[src : src + count]
        np.testing.assert_array_equal(cache[: len(keep)], stage[keep])
        runs = compaction_runs(keep)
        assert len(runs) == 1 + int(np.sum(np.diff(keep) != 1)) if len(keep) else runs == []


# ---------------------------------------------------------------------------- engine checks


def test_an_engine_built_from_the_plan_passes(exported):
    """An engine as TensorRT would build it from the exported ONNX files and the plan passes
    the check. Its description is read (describe_engine) from a fake engine whose I/O comes
    from the ONNX files (trt_fakes.onnx_io: names, modes, dtypes, static dims; independent of
    expected_description) and whose profiles are the plan's, so this can fail: the graph's
    dtypes or shapes differing from the plan's do (test_a_graph_unlike_the_plan_is_caught...)."""
    folder, cfg = exported
    plan = make_plan(cfg, Limits(max_prompt=16, opt_prompt=8, max_tree_nodes=20, opt_context=32))
    trt = fake_tensorrt_runtime(plan, None, {}, folder)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for which in ("backbone", "heads"):
        engine = runtime.deserialize_cuda_engine(json.dumps({"which": which}).encode())
        desc = describe_engine(engine, trt)
        want = expected_description(plan, which)
        assert desc.num_profiles == want.num_profiles == (3 if which == "backbone" else 1)
        assert sorted((t.name, t.mode, t.dtype) for t in desc.tensors) == sorted(
            (t.name, t.mode, t.dtype) for t in want.tensors
        )
        check_engine(desc, plan, which, f"{which}.engine")


def test_engine_differences_are_all_listed():
    plan = make_plan(smollm2_config(), Limits(max_context=2048))
    desc = expected_description(plan)
    desc.tensors = [t for t in desc.tensors if t.name != "present.3.value"]
    mask = desc.tensor("tree_mask")
    mask.dtype = "INT64"
    past = desc.tensor("past_key_values.0.key")
    past.profiles[1] = ((1, 1, 3, 64), (1, 256, 3, 64), (1, 2048, 3, 64))
    with pytest.raises(ArtifactError) as err:
        check_engine(desc, plan, "backbone", "model.engine")
    text = str(err.value)
    assert "model.engine was not built from this trt_plan.json (3 difference(s)" in text
    assert "no output tensor present.3.value" in text
    assert "tree_mask: input INT64, expected input BOOL" in text
    assert "past_key_values.0.key profile 1: min/opt/max" in text and "(1, 1984, 3, 64)" in text


def test_engine_with_other_profiles_or_vocab():
    plan = make_plan(smollm2_config(), Limits(max_context=2048))
    desc = expected_description(plan)
    desc.num_profiles = 2
    desc.tensor("logits").shape = (-1, -1, 32000)
    with pytest.raises(
        ArtifactError, match=r"2 optimization profiles, the plan has 3[\s\S]*logits: shape \(-1, -1, 32000\)"
    ):
        check_engine(desc, plan, "backbone", "model.engine")
    heads = expected_description(plan, "heads")
    assert [t.name for t in heads.tensors] == ["hidden_states", "medusa_logits"]
    assert heads.tensor("medusa_logits").shape == (-1, 4, 49152)
    assert EngineDescription([], 1).tensor("x") is None


# ---------------------------------------------------------------------------- orchestration


def _pair(max_context=48, max_prompt=12, max_tree_nodes=12, tree="cpu_8", seed=0, dtype="float32"):
    cfg = fake_config(max_context=max_context, tree=tree, dtype=dtype)
    plan = make_plan(cfg, Limits(max_prompt=max_prompt, max_tree_nodes=max_tree_nodes))
    engine = ToyEngine(layers=2, kv_heads=1, head_dim=8, hidden=16, vocab=64, heads=4, seed=seed)
    return ReferenceBackend(engine, cfg.model, max_context), ToyStagedBackend(engine, cfg.model, plan), plan


def _same_cache(ref: ReferenceBackend, staged: ToyStagedBackend):
    n = ref.cache_len
    assert staged.cache_len == n
    np.testing.assert_allclose(staged.buf["cache_k"][:, :n], ref.cache.keys[:, 0, :n], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(staged.buf["cache_v"][:, :n], ref.cache.values[:, 0, :n], rtol=1e-6, atol=1e-6)


def _step(ref, staged, ids, pos, mask, keep, head_index):
    a, b = ref.forward(ids, pos, mask), staged.forward(ids, pos, mask)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(staged.head_logits(head_index), ref.head_logits(head_index), rtol=1e-6, atol=1e-6)
    ref.commit(keep)
    staged.commit(keep)
    _same_cache(ref, staged)


def test_prefill_then_tree_steps_match_the_host_cache_reference():
    ref, staged, plan = _pair()
    rng = np.random.default_rng(1)
    tree = load_tree("cpu_8")
    n = 10
    _step(ref, staged, rng.integers(0, 64, n), np.arange(n), np.tril(np.ones((n, n), dtype=bool)), np.arange(n), n - 1)
    # accepted paths: a chain prefix (one run), a jump (several runs), the root alone
    for path in ([0, 1, 4], [0, 2, 5], [0], [0, 1, 4, 7, 8]):
        pos = staged.cache_len + tree.position_ids
        _step(ref, staged, rng.integers(0, 64, tree.num_nodes), pos, tree.attn_mask, np.array(path), path[-1])
    assert [plan.backbone.profiles[p].name for p, _, _ in staged.calls] == ["prefill"] + ["verify"] * 4


def test_truncate_keeps_a_prefix_and_the_next_prompt_continues_from_it():
    """Prefix reuse on the staged backend: after truncate(n) the rest of a new prompt prefills over
    the kept entries, on the prefill profile, and matches the host-cache reference that prefilled
    only those n tokens; a truncate past the cache is refused."""
    ref, staged, plan = _pair()
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 64, 10)
    cfg = DecodeConfig(max_new_tokens=6, temperature=0.0, medusa=False)
    decode(staged, prompt, cfg)
    assert staged.keeps_prefix and staged.cache_len > 10
    nxt = np.r_[prompt[:7], rng.integers(0, 64, 4)]
    kept = decode(staged, nxt, cfg, reuse=7)
    assert kept.stats.cached_prompt_tokens == 7 and staged.calls[-kept.stats.steps - 1][1:] == (7, 4)
    assert kept.tokens == decode(ref, nxt, cfg).tokens
    with pytest.raises(MedusaError, match="truncate"):
        staged.truncate(staged.cache_len + 1)


def test_the_backend_declares_what_one_call_takes_and_refuses_more():
    _, staged, plan = _pair()  # context 48, prompt chunks <= 12, trees <= 12
    assert [staged.max_new_tokens(p) for p in (0, 36, 37, 47, 48)] == [12, 12, 1, 1, 0]
    n = 13
    with pytest.raises(MedusaError, match="takes at most 12 new tokens on a cache of 0, got 13"):
        staged.forward(np.arange(n), np.arange(n), np.tril(np.ones((n, n), dtype=bool)))
    assert staged.calls == []  # refused before any engine call


def test_the_loop_chunks_a_long_prompt_by_the_backends_limit_and_matches():
    ref, staged, plan = _pair()
    prompt = list(np.random.default_rng(2).integers(0, 64, 30))  # > max_prompt 12: chunks of 12, 12, 6
    cfg = DecodeConfig(max_new_tokens=1, temperature=0.0, medusa=False)
    assert decode(staged, prompt, cfg).tokens == decode(ref, prompt, cfg).tokens
    assert [c[1:] for c in staged.calls] == [(0, 12), (12, 12), (24, 6)]
    _same_cache(ref, staged)


def test_greedy_decoding_to_the_end_of_the_context_matches_and_is_lossless():
    """Near the context end the verify profile no longer reaches: the loop takes plain steps
    there (the backend said so), to the last position."""
    ref, staged, plan = _pair(max_context=48)
    tree = load_tree("cpu_8", num_heads=4)
    prompt = list(np.random.default_rng(4).integers(0, 64, 20))  # > max_prompt: chunked
    cfg = DecodeConfig(max_new_tokens=100, temperature=0.0)
    want = decode(ref, prompt, cfg, tree)
    got = decode(staged, prompt, cfg, tree)
    assert got.tokens == want.tokens and got.stats.finish_reason == "context"
    plain = decode(staged, prompt, DecodeConfig(max_new_tokens=100, medusa=False), tree)
    assert plain.tokens == got.tokens  # Medusa greedy == plain greedy
    names = [plan.backbone.profiles[p].name for p, _, _ in staged.calls]
    assert {"prefill", "verify", "decode"} <= set(names)
    past_of_decode = [past for p, past, n in staged.calls if plan.backbone.profiles[p].name == "decode"]
    assert max(past_of_decode) == 47  # the last position was reached on the decode profile


def test_backend_errors():
    _, staged, _ = _pair()
    with pytest.raises(RuntimeError, match="commit\\(\\) without a forward"):
        staged.commit([0])
    with pytest.raises(RuntimeError, match="head_logits\\(\\) before any forward"):
        staged.head_logits(0)
    with pytest.raises(MedusaError, match=r"tree_mask \(2, 2\); expected \[n\], \[n\], \[n, n\]"):
        staged.forward([1, 2, 3], [0, 1, 2], np.ones((2, 2), dtype=bool))
    with pytest.raises(MedusaError, match="exceed the cache capacity of 48 tokens"):
        staged.forward(np.zeros(49, dtype=np.int64), np.arange(49), np.tril(np.ones((49, 49), dtype=bool)))
    with pytest.raises(MedusaError, match=r"input_ids must lie in \[0, 64\)"):
        staged.forward([1, 64], [0, 1], np.tril(np.ones((2, 2), dtype=bool)))
    with pytest.raises(MedusaError, match="every new token must see itself"):
        staged.forward([1, 2], [0, 1], np.zeros((2, 2), dtype=bool))
    staged.forward([1, 2], [0, 1], np.tril(np.ones((2, 2), dtype=bool)))
    with pytest.raises(MedusaError, match=r"indices must lie in \[0, 2\)"):
        staged.commit([0, 2])
    with pytest.raises(MedusaError, match=r"head_logits\(5\): the last forward had 2 tokens"):
        staged.head_logits(5)
    staged.commit([0, 1])
    staged.reset()
    assert staged.cache_len == 0


# ---------------------------------------------------------------------------- without tensorrt


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError


def test_backend_without_tensorrt_gives_one_clear_error(tmp_path, no_tensorrt):
    folder = write_fake_artifact(tmp_path / "art", fake_config())
    with pytest.raises(BackendUnavailableError) as err:
        TensorRTBackend.from_artifact(folder)
    msg = str(err.value)
    assert msg.startswith("TensorRT is not installed") and "pip install tensorrt" in msg and "\n" not in msg


def test_old_tensorrt_and_missing_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(BackendUnavailableError, match="TensorRT 8.6.1 is too old: medusa-trt needs >= 10.0"):
        require_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.8.0.43"))
    assert require_tensorrt().__version__ == "10.8.0.43"
    monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: 0)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU is visible"):
        TensorRTBackend.from_artifact("anywhere")


def test_cuda_device_count_without_a_driver_is_zero(monkeypatch):
    import ctypes

    def no_library(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert trt_backend.cuda_device_count() == 0


# ---------------------------------------------------------------------------- a real exported graph


@pytest.fixture(scope="module")
def exported(tiny_portable):
    """The session's portable tiny export (conftest ``tiny_portable``: 96-token context, tree
    cpu_8) and its config. Read-only: tests that write engines into it use ``engine_folder``."""
    from runtime.artifact import read_artifact

    return tiny_portable["artifact"], read_artifact(tiny_portable["artifact"])


def test_orchestration_on_the_exported_graph_matches_the_onnxruntime_backend(exported):
    """The staged backend, its engine calls confined to the plan's profiles, on the real
    model.onnx: same tokens as the project's ONNX Runtime backend, chunked prefill and plain
    steps at the context end included; Medusa greedy == plain greedy."""
    from trt_fakes import OrtEngine

    from runtime.onnxrt import OnnxRuntimeBackend

    folder, cfg = exported
    plan = make_plan(cfg, Limits(max_prompt=16, opt_prompt=8, max_tree_nodes=20, opt_context=32))
    staged = ToyStagedBackend(OrtEngine(folder, cfg), cfg.model, plan)
    reference = OnnxRuntimeBackend(folder, cfg, device="cpu", threads=1)
    tree = load_tree("cpu_8", num_heads=4)
    prompt = list(np.random.default_rng(5).integers(3, 128, 37))  # > max_prompt: chunks 16 + 16 + 5
    cfg_greedy = DecodeConfig(max_new_tokens=200, temperature=0.0)
    want = decode(reference, prompt, cfg_greedy, tree)
    got = decode(staged, prompt, cfg_greedy, tree)
    # the cache fills up (96 positions); the last token needs no cache entry
    assert got.tokens == want.tokens and got.stats.finish_reason == "context" and len(got.tokens) == 96 - 37 + 1
    assert got.stats.mean_accepted > 1  # multi-token steps took part
    assert decode(staged, prompt, DecodeConfig(max_new_tokens=200, medusa=False), tree).tokens == got.tokens
    assert {plan.backbone.profiles[p].name for p, _, _ in staged.calls} == {"prefill", "verify", "decode"}


# ---------------------------------------------------------------------------- the TensorRT glue


@pytest.fixture
def fake_gpu(monkeypatch):
    """Stand-ins for cuda-python (host memory, bounds-checked copies) and a 'visible' GPU."""
    from trt_fakes import fake_cudart

    log: dict = {}
    monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: 1)
    cudart = fake_cudart(log)
    log["blocks"] = cudart.blocks
    monkeypatch.setattr(trt_backend, "require_cudart", lambda: cudart)
    return log


@pytest.fixture
def engine_folder(exported, tmp_path):
    """A copy of the exported portable artifact (its ONNX files give the fake engines their I/O)."""
    import shutil

    folder, cfg = exported
    copy = tmp_path / "art"
    shutil.copytree(folder, copy)
    return copy, cfg


def test_tensorrt_glue_on_stand_ins_matches_the_onnxruntime_backend(engine_folder, monkeypatch, fake_gpu):
    """TensorRTBackend itself (addresses, pitches, shapes, profiles, copies) against stand-ins
    for ``tensorrt`` (I/O read from the exported model.onnx, computed by ONNX Runtime on the
    tensors at the bound addresses) and cuda-python (every copy bounds-checked)."""
    from trt_fakes import OrtEngine, fake_tensorrt_runtime, write_fake_engines

    from runtime.onnxrt import OnnxRuntimeBackend

    folder, cfg = engine_folder
    plan = make_plan(cfg, Limits(max_prompt=16, opt_prompt=8, max_tree_nodes=20, opt_context=32))
    write_fake_engines(folder, plan)
    log: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_runtime(plan, OrtEngine(folder, cfg), log, folder))
    backend = TensorRTBackend.from_artifact(folder)
    ref = OnnxRuntimeBackend(folder, cfg, device="cpu", threads=1)
    tree = load_tree("cpu_8", num_heads=4)
    prompt = list(np.random.default_rng(4).integers(3, 128, 37))
    greedy = DecodeConfig(max_new_tokens=200, temperature=0.0)
    want = decode(ref, prompt, greedy, tree)
    got = decode(backend, prompt, greedy, tree)
    assert got.tokens == want.tokens and got.stats.finish_reason == "context"
    assert got.stats.mean_accepted > 1  # multi-token steps took part: compaction copies were exercised
    assert decode(backend, prompt, DecodeConfig(max_new_tokens=200, medusa=False), tree).tokens == got.tokens
    profiles = {(which, p) for which, p, _ in log["calls"]}
    assert profiles == {("backbone", 0), ("backbone", 1), ("backbone", 2), ("heads", 0)}
    first = log["calls"][0][2]  # the first prefill chunk: an empty cache
    assert first["past_key_values.0.key"][1] == 0 and first["tree_mask"] == (1, 16, 16)
    assert any(kind == "2d" for kind, _, _ in fake_gpu["copies"])
    # the heads' output is the caller's to keep (the loop holds it across steps, other streams run between)
    backend.reset()
    backend.forward([5, 6], [0, 1], np.tril(np.ones((2, 2), dtype=bool)))
    kept = backend.head_logits(1)
    snapshot = kept.copy()
    backend.head_logits(0)
    np.testing.assert_array_equal(kept, snapshot)
    backend.close()
    assert not fake_gpu["blocks"]  # every allocation released
    with pytest.raises(MedusaError, match="was closed"):
        backend.forward([5], [2], np.ones((1, 1), dtype=bool))


def test_tensorrt_glue_refuses_a_corrupt_or_foreign_engine(engine_folder, monkeypatch, fake_gpu):
    from trt_fakes import OrtEngine, fake_tensorrt_runtime, write_fake_engines

    folder, cfg = engine_folder
    plan = make_plan(cfg, Limits(max_prompt=12, max_tree_nodes=12))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_runtime(plan, OrtEngine(folder, cfg), {}, folder))
    with pytest.raises(MedusaError, match="has no trt_plan.json: build an engine first"):
        TensorRTBackend.from_artifact(folder)
    write_fake_engines(folder, plan)
    (folder / "heads.engine").unlink()
    with pytest.raises(ArtifactError, match="heads.engine is missing: build it with `medusa-export build-engine"):
        TensorRTBackend.from_artifact(folder)
    write_fake_engines(folder, plan)
    (folder / "model.engine").write_text('{"which": "corrupt"}')
    with pytest.raises(ArtifactError, match="could not load this engine"):
        TensorRTBackend.from_artifact(folder)
    other = make_plan(cfg, Limits(max_prompt=10, max_tree_nodes=12))  # the engine was built from another plan
    write_fake_engines(folder, plan)
    other.write(folder)
    with pytest.raises(ArtifactError, match="model.engine was not built from this trt_plan.json"):
        TensorRTBackend.from_artifact(folder)


def test_a_graph_unlike_the_plan_is_caught_by_the_engine_check(engine_folder, monkeypatch, fake_gpu):
    """The fake engine's I/O comes from the ONNX file, so the check can fail: an ONNX file
    whose tree_mask is int64 (not the contract's bool) gives an engine the backend refuses."""
    import onnx
    from trt_fakes import fake_tensorrt_runtime, write_fake_engines

    folder, cfg = engine_folder
    plan = make_plan(cfg, Limits(max_prompt=12, max_tree_nodes=12))
    write_fake_engines(folder, plan)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    next(i for i in model.graph.input if i.name == "tree_mask").type.tensor_type.elem_type = onnx.TensorProto.INT64
    onnx.save(model, str(folder / "signature_changed.onnx"))
    (folder / "model.onnx").unlink()
    (folder / "signature_changed.onnx").rename(folder / "model.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_runtime(plan, None, {}, folder))
    with pytest.raises(ArtifactError, match="tree_mask: input INT64, expected input BOOL"):
        TensorRTBackend.from_artifact(folder, config=cfg)


def test_auto_picks_tensorrt_only_with_engines_tensorrt_and_a_gpu(engine_folder, monkeypatch):
    from trt_fakes import write_fake_engines

    from runtime.api import choose_backend

    folder, cfg = engine_folder
    assert choose_backend(folder, cfg) == ("onnxruntime", "no TensorRT engine built in the artifact")
    write_fake_engines(folder, make_plan(cfg, Limits(max_prompt=12, max_tree_nodes=12)))
    monkeypatch.setattr("runtime.api._has_tensorrt", lambda: False)
    assert choose_backend(folder, cfg)[1] == "engines built, but tensorrt is not installed"
    monkeypatch.setattr("runtime.api._has_tensorrt", lambda: True)
    monkeypatch.setattr("runtime.api._has_cudart", lambda: False)
    assert choose_backend(folder, cfg)[1] == "engines built, but cuda-python is not installed"
    monkeypatch.setattr("runtime.api._has_cudart", lambda: True)
    monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: 0)
    assert choose_backend(folder, cfg)[1] == "engines built, but no CUDA GPU is visible"
    monkeypatch.setattr(trt_backend, "cuda_device_count", lambda: 2)
    assert choose_backend(folder, cfg)[0] == "tensorrt"
    assert choose_backend(folder, cfg, device="cpu") == ("onnxruntime", "device cpu")
    import dataclasses

    hydra = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, medusa_head_type="hydra"))
    assert choose_backend(folder, hydra) == ("onnxruntime", "Hydra heads: the TensorRT backend runs Medusa heads only")


def test_has_cudart_is_false_without_the_package(monkeypatch):
    from runtime.api import _has_cudart

    monkeypatch.setitem(sys.modules, "cuda", None)
    assert _has_cudart() is False


def test_without_cuda_python_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(BackendUnavailableError, match="pip install cuda-python"):
        trt_backend.require_cudart()


def test_importing_the_tensorrt_modules_loads_nothing_heavy(repo_root):
    import subprocess

    code = ("import sys, runtime.trt_backend, exporter.trt_plan, exporter.trt_cli, exporter.trt_build\n"
            "print([m for m in ('torch', 'tensorrt', 'onnxruntime', 'transformers') if m in sys.modules])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_profiling_and_the_bench_divergence_check_take_calls_the_backend_allows():
    """medusa-run profile fills its cache, and the bench's divergence check replays a prompt, in
    calls no larger than the backend declares (a TensorRT engine's prompt chunk: 12 here)."""
    import types

    from runtime.bench import _divergence
    from runtime.profile import profile_tree_sizes

    ref, staged, plan = _pair()
    prof = profile_tree_sizes(staged, sizes=[1, 4, 9], cached=30, repeats=1, warmup=0)
    assert prof["cached_tokens"] == 30 and set(prof["ms"]) == {"1", "4", "9"}
    assert [c[1:] for c in staged.calls[:3]] == [(0, 12), (12, 12), (24, 6)]
    ids = list(np.random.default_rng(6).integers(0, 64, 20))
    plain = decode(ref, ids, DecodeConfig(max_new_tokens=6, medusa=False)).tokens
    other = plain[:3] + [(plain[3] + 1) % 64] + plain[4:]
    gen = types.SimpleNamespace(backend=staged, prefill_chunk=512)
    got = _divergence(gen, ids, plain, other)
    assert got["position"] == 3 and got["plain_token"] == plain[3] and got["top2_gap"] >= 0
