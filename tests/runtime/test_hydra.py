"""Hydra heads (issue 13): the module, its export and validation, level-by-level drafting, and
lossless greedy decoding with them on every backend that runs them (PyTorch reference, ONNX
Runtime one sequence a call, the batch engine), with random, oracle and always-wrong drafts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import hf_greedy, make_tiny_llama

from exporter.heads import HeadsConfig, HydraHeads, fresh_hydra_heads, load_heads, save_heads
from exporter.torch_backend import TorchBackend
from runtime.backend import Backend
from runtime.decode import DecodeConfig, decode, draft_tree, hydra_candidates
from runtime.errors import CheckpointError, MedusaError
from runtime.tree import build_tree, load_tree

K = 3
TREE = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]], name="hydra_test")


def random_hydra(model, num_heads=K, layers=2, seed=5, std=0.05, draft=None) -> HydraHeads:
    c = model.config
    heads = fresh_hydra_heads(num_heads, c.hidden_size, c.vocab_size, layers)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in heads.parameters():
            p.data.normal_(0.0, std)
    if draft is not None:
        heads.set_draft_vocab(torch.as_tensor(draft))
    heads.config.meta = {"layout": "test", "source": "random"}
    return heads.eval()


def prompt_for(seed: int, length: int = 9, vocab: int = 128) -> list[int]:
    return np.random.default_rng(300 + seed).integers(3, vocab, size=length).tolist()


# ---------------------------------------------------------------------------- the module


def test_fresh_hydra_heads_are_the_lm_head_and_rows_pick_their_head():
    model = make_tiny_llama(0)
    lm, emb = model.lm_head, model.get_input_embeddings().weight
    h = torch.randn(4, model.config.hidden_size)
    paths = torch.randint(0, 128, (4, K))
    with torch.inference_mode():
        fresh = fresh_hydra_heads(K, model.config.hidden_size, model.config.vocab_size)
        torch.testing.assert_close(fresh(h, paths, torch.tensor([1, 2, 3, 1]), lm, emb), lm(h))
        heads = random_hydra(model)
        lens = torch.tensor([1, 2, 3, 2])
        out = heads(h, paths, lens, lm, emb)
        blocks = heads.blocks(h, paths, emb)  # [N, K, H]: head k on the first k+1 path tokens
        for n, d in enumerate(lens.tolist()):
            torch.testing.assert_close(out[n], lm(blocks[n, d - 1]))
        # a row's tokens past its length are not read
        other = paths.clone()
        other[0, 1:] = 7
        other[1, 2:] = 9
        torch.testing.assert_close(heads(h, other, lens, lm, emb)[:2], out[:2])
        # ... and the ones within it are
        other = paths.clone()
        other[1, 1] = (paths[1, 1] + 1) % 128
        assert not torch.allclose(heads(h, other, lens, lm, emb)[1], out[1])


def test_path_tokens_outside_the_draft_vocabulary_read_a_zero_embedding():
    model = make_tiny_llama(0)
    emb = model.get_input_embeddings().weight
    heads = random_hydra(model, draft=list(range(0, 128, 2)))
    with torch.inference_mode():
        e = heads.path_embeddings(torch.tensor([[4, 5, 6]]), emb)[0]
    torch.testing.assert_close(e[0], emb[4])
    assert torch.count_nonzero(e[1]) == 0
    torch.testing.assert_close(e[2], emb[6])


def test_hydra_heads_save_and_load_with_their_kind_and_draft_vocabulary(tmp_path):
    model = make_tiny_llama(0)
    heads = random_hydra(model, draft=list(range(3, 120)))
    save_heads(heads, tmp_path / "h", meta={"note": "x"})
    stored = json.loads((tmp_path / "h" / "medusa_heads.json").read_text())
    assert stored["kind"] == "hydra" and stored["num_heads"] == K
    back = load_heads(tmp_path / "h", hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size)
    assert isinstance(back, HydraHeads) and back.config.num_layers == 2 and back.config.meta["note"] == "x"
    assert back.draft_vocab.tolist() == list(range(3, 120))
    h, paths, lens = torch.randn(3, 32), torch.randint(0, 128, (3, K)), torch.tensor([1, 3, 2])
    lm, emb = model.lm_head, model.get_input_embeddings().weight
    with torch.inference_mode():
        torch.testing.assert_close(back(h, paths, lens, lm, emb), heads(h, paths, lens, lm, emb))
    with pytest.raises(CheckpointError, match="hidden size is 32, the backbone's 64"):
        load_heads(tmp_path / "h", hidden_size=64, vocab_size=128)


def test_a_hydra_checkpoint_with_a_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_tiny_llama(0)
    save_heads(random_hydra(model), tmp_path / "h")
    f = tmp_path / "h" / "medusa_heads.safetensors"
    sd = load_file(f)
    sd["1.input.weight"] = sd["1.input.weight"][:, :-1].contiguous()
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"1\.input\.weight has shape \(32, 95\), expected \(32, 96\)"):
        load_heads(tmp_path / "h", hidden_size=32, vocab_size=128)


def test_hydra_config_is_refused_by_the_medusa_module():
    with pytest.raises(ValueError, match="kind 'hydra'"):
        HydraHeads(HeadsConfig(2, 1, 8, 16, True, kind="medusa"))


# ---------------------------------------------------------------------------- drafting


def test_level_by_level_drafting_equals_a_direct_pytorch_computation():
    """Every node's token is the rank the tree gives it of head depth-1, run directly on the
    hidden state and the node's path (its ancestors' tokens, root first)."""
    model = make_tiny_llama(0)
    heads = random_hydra(model, std=0.3)
    backend = TorchBackend(model, heads)
    prompt = prompt_for(0)
    n = len(prompt)
    backend.forward(np.array(prompt), np.arange(n), np.tril(np.ones((n, n), dtype=bool)))
    hidden = torch.from_numpy(backend.hidden_states()[n - 1])
    root = 17
    tokens, _ = draft_tree(backend, n - 1, root, TREE)
    lm, emb = model.lm_head, model.get_input_embeddings().weight
    for node in range(1, TREE.num_nodes):
        path, p = [], node
        while p > 0:
            p = int(TREE.parent[p])
            path.insert(0, int(tokens[p]))
        depth = len(path)
        ids = torch.tensor([path + [0] * (K - depth)])
        with torch.inference_mode():
            logits = heads(hidden[None], ids, torch.tensor([depth]), lm, emb)[0]
        ranked = torch.argsort(logits, descending=True, stable=True)
        assert tokens[node] == int(ranked[int(TREE.node_rank[node])]), node
    assert tokens[0] == root


def test_drafting_makes_one_call_per_depth_with_a_row_per_parent():
    calls = []

    def draft(paths, lens):
        calls.append((paths.copy(), lens.copy()))
        out = np.zeros((len(paths), 50), dtype=np.float32)
        for i, p in enumerate(paths):  # rank r of the row's head: token 10 * depth + r + the parent's token % 3
            d = int(lens[i])
            for r in range(3):
                out[i, 10 * d + r + int(p[d - 1]) % 3] = 10 - r
        return out

    tokens = hydra_candidates(5, TREE, draft, K)
    assert [len(c[0]) for c in calls] == [1, 2, 2]  # the root; nodes [0], [1]; nodes [0,0], [0,1]
    assert [c[1].tolist() for c in calls] == [[1], [2, 2], [3, 3]]
    assert calls[0][0].tolist() == [[5, 0, 0]]
    # depth 1: ranks 0 and 1 of head 0 on the root (5 % 3 = 2): tokens 12, 13
    assert tokens[1:3].tolist() == [12, 13]
    assert calls[1][0].tolist() == [[5, 12, 0], [5, 13, 0]]
    assert calls[2][0][:, :2].tolist() == [[5, 12], [5, 12]] and sorted(calls[2][0][:, 2].tolist()) == sorted(
        tokens[[i for i in range(TREE.num_nodes) if TREE.position_ids[i] == 2 and i in TREE.parent[4:]]].tolist()
    )


# ---------------------------------------------------------------------------- lossless greedy


class OracleHydra(Backend):
    """A real backend whose Hydra drafts come from the backbone itself: a row's logits favour
    the token greedy decoding would emit after the row's path (``wrong``: rank it last, so no
    rank of any tree is ever right)."""

    def __init__(self, inner: TorchBackend, model, wrong: bool = False):
        self.inner, self.spec, self.model, self.wrong = inner, inner.spec, model, wrong
        self.context: list[int] = []

    cache_len = property(lambda self: self.inner.cache_len)
    max_context = property(lambda self: self.inner.max_context)

    def reset(self):
        self.inner.reset()
        self.context = []

    def _forward(self, input_ids, position_ids, tree_mask, logits=None):
        self._ids = np.asarray(input_ids).tolist()
        return self.inner.forward(input_ids, position_ids, tree_mask, logits=logits)

    def commit(self, keep):
        self.context += [self._ids[i] for i in np.asarray(keep)]
        self.inner.commit(keep)

    def head_logits(self, index):
        raise AssertionError("Hydra heads are never asked for Medusa logits")

    def draft_logits(self, index, path_ids, path_len):
        out = np.zeros((len(path_ids), self.spec.vocab_size), dtype=np.float32)
        for i, (p, d) in enumerate(zip(path_ids, path_len)):
            seq = torch.tensor([self.context + p[:d].tolist()])
            with torch.inference_mode():
                nxt = int(self.model(seq).logits[0, -1].argmax())
            if self.wrong:  # every other token ahead of the true one (ties would rank it anywhere)
                out[i] = np.arange(self.spec.vocab_size, 0, -1, dtype=np.float32)
                out[i, nxt] = -1.0
            else:
                out[i, nxt] = 1.0
        return out


@pytest.mark.parametrize("drafts", ["random", "oracle", "wrong"])
def test_greedy_with_hydra_heads_equals_plain_greedy(drafts):
    model = make_tiny_llama(0)
    heads = random_hydra(model)
    inner = TorchBackend(model, heads)
    backend = inner if drafts == "random" else OracleHydra(inner, model, wrong=drafts == "wrong")
    tree = load_tree("chain_3") if drafts == "oracle" else TREE
    for seed in range(2):
        prompt = prompt_for(seed)
        ref = hf_greedy(model, prompt, 30)
        res = decode(backend, prompt, DecodeConfig(max_new_tokens=30, lookup=0), tree)
        assert res.tokens == ref
        if drafts == "oracle":  # every draft is right: a chain of 3 emits 4 tokens a step
            assert res.stats.mean_accepted > 3.5, res.stats.accept_hist
        if drafts == "wrong":
            assert res.stats.mean_accepted == 1.0


@pytest.mark.parametrize("drafts", ["random", "oracle"])
def test_coupled_sampling_with_hydra_heads_draws_plain_samplings_tokens(drafts):
    """Hydra heads drafting level by level under the coupling noise: plain sampling's tokens."""
    model = make_tiny_llama(0)
    inner = TorchBackend(model, random_hydra(model))
    backend = inner if drafts == "random" else OracleHydra(inner, model, wrong=False)
    multi = 0
    for seed in range(3):
        prompt = prompt_for(seed)
        kw = dict(max_new_tokens=24, temperature=0.8, seed=seed, lookup=2)
        plain = decode(backend, prompt, DecodeConfig(medusa=False, **kw)).tokens
        res = decode(backend, prompt, DecodeConfig(**kw), load_tree("chain_3"))
        assert res.tokens == plain
        multi += sum(v for k, v in res.stats.accept_hist.items() if k > 1)
    assert multi > 0  # drafts were accepted


def _tokenizer():
    from transformers import AutoTokenizer

    from exporter.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m")))


@pytest.fixture(scope="module")
def hydra_artifact(tmp_path_factory):
    """A tiny random Llama (the SmolLM2 tokenizer's vocabulary) with 3 random Hydra heads and a
    draft vocabulary, exported fused with validation (the Hydra heads graph against PyTorch)."""
    from exporter.export import ExportOptions, export_artifact

    tok = _tokenizer()
    model = make_tiny_llama(0, vocab_size=len(tok), eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    heads = random_hydra(model, std=0.02, draft=list(range(0, len(tok), 3)))
    out = tmp_path_factory.mktemp("hydra") / "art"
    export_artifact(model, heads, out, ExportOptions(validate=True, tree="chain_3"), tokenizer=tok)
    return {"artifact": out, "model": model, "heads": heads}


def test_hydra_export_is_validated_and_describes_its_heads_graph(hydra_artifact):
    cfg = json.loads((hydra_artifact["artifact"] / "medusa_config.json").read_text())
    assert cfg["model"]["medusa_head_type"] == "hydra"
    assert cfg["heads"]["inputs"] == ["hidden_states", "path_ids", "path_len"]
    assert cfg["heads"]["outputs"] == ["draft_logits"]
    v = cfg["provenance"]["validation"]
    assert v["passed"] and "draft_logits" in v["max_abs_diff"], v
    assert cfg["provenance"]["heads"]["kind"] == "hydra"


def test_onnx_runtime_draft_logits_equal_pytorch(hydra_artifact):
    import runtime

    gen = runtime.load(hydra_artifact["artifact"])
    ref = TorchBackend(hydra_artifact["model"], hydra_artifact["heads"])
    prompt = np.array(prompt_for(1, vocab=4000))
    n = len(prompt)
    mask = np.tril(np.ones((n, n), dtype=bool))
    for b in (gen.backend, ref):
        b.reset()
        b.forward(prompt, np.arange(n), mask)
    paths = np.array([[5, 0, 0], [5, 6, 0], [5, 6, 7], [9, 8, 0]])
    lens = np.array([1, 2, 3, 2])
    got, want = gen.backend.draft_logits(n - 1, paths, lens), ref.draft_logits(n - 1, paths, lens)
    assert got.shape == want.shape == (4, gen.spec.vocab_size)
    draft = hydra_artifact["heads"].draft_vocab.numpy()
    # the CPU serves the int8 heads graph: proposals, not outputs. Its rows agree closely, but how
    # closely depends on the CPU's int8 kernels (AVX2 without VNNI saturates some u8 x s8 products):
    # the top draft is the same and nearly every logit within 5% of the largest
    assert (got.argmax(-1) == want.argmax(-1)).all()
    close = np.abs(got[:, draft] - want[:, draft]) <= 0.05 * np.abs(want[:, draft]).max()
    assert close.mean() > 0.995, close.mean()
    # the float heads graph (what TensorRT and the GPU run) equals PyTorch to float rounding
    from runtime.artifact import read_artifact
    from runtime.onnxrt import FusedOnnxRuntimeBackend

    folder = hydra_artifact["artifact"]
    fp = FusedOnnxRuntimeBackend(folder, read_artifact(folder), threads=1, heads_int8=False)
    fp.forward(prompt, np.arange(n), mask)
    np.testing.assert_allclose(fp.draft_logits(n - 1, paths, lens), want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("max_batch", [None, 3], ids=["one-sequence", "batch-engine"])
def test_hydra_artifact_decodes_greedy_equal_to_plain(hydra_artifact, max_batch):
    import threading

    import runtime

    # batch engine: no step budgets (three sequences at once start above a light load, where the
    # load-aware budgets keep plain steps until they have estimates: runtime/batch.py)
    gen = runtime.load(hydra_artifact["artifact"], **({"max_batch": max_batch, "budgets": None} if max_batch else {}))
    try:
        prompts = [prompt_for(s, vocab=4000) for s in range(3)]
        refs = [hf_greedy(hydra_artifact["model"], p, 24) for p in prompts]
        outs: list = [None] * 3

        def run(i):
            outs[i] = gen.generate(prompts[i], max_new_tokens=24, tree=TREE, lookup=2)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for out, ref in zip(outs, refs):
            assert out.tokens == ref
    finally:
        gen.close()


def test_the_artifact_seal_covers_the_head_type(hydra_artifact, tmp_path):
    from runtime.artifact import read_artifact
    from runtime.errors import ArtifactError

    art = tmp_path / "art"
    shutil.copytree(hydra_artifact["artifact"], art)
    cfg = json.loads((art / "medusa_config.json").read_text())
    cfg["model"]["medusa_head_type"] = "medusa"
    (art / "medusa_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="edited after export"):
        read_artifact(art)
    cfg["model"]["medusa_head_type"] = "eagle"
    (art / "medusa_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="medusa_head_type must be one of medusa, hydra"):
        read_artifact(art)


def test_medusa_artifacts_keep_their_seal(tiny):
    """An artifact exported before the head type existed has no such field: its digest is unchanged."""
    from runtime.artifact import config_digest, read_artifact

    cfg = read_artifact(tiny["artifact"])
    assert cfg.model.medusa_head_type == "medusa"
    assert cfg.provenance["config_sha256"] == config_digest(cfg)
    raw = json.loads((tiny["artifact"] / "medusa_config.json").read_text())
    raw["model"].pop("medusa_head_type", None)
    import dataclasses

    from runtime.artifact import GraphSpec, ModelSpec

    old = dataclasses.replace(cfg, model=ModelSpec(**raw["model"]), backbone=GraphSpec(**raw["backbone"]))
    assert config_digest(old) == config_digest(cfg)


def test_tensorrt_plan_holds_the_hydra_inputs_and_the_backend_refuses_hydra(hydra_artifact, tmp_path, monkeypatch):
    from exporter.export import ExportOptions, export_artifact
    from exporter.trt_plan import make_plan
    from runtime.artifact import read_artifact
    from runtime.trt_backend import TensorRTBackend

    art = tmp_path / "portable"
    model, heads = hydra_artifact["model"], hydra_artifact["heads"]
    export_artifact(model, heads, art, ExportOptions(validate=True, graph="portable", tree="chain_3"),
                    tokenizer=_tokenizer())  # fmt: skip
    cfg = read_artifact(art)
    assert cfg.provenance["validation"]["passed"]
    plan = make_plan(cfg)
    assert set(plan.heads.inputs) == {"hidden_states", "path_ids", "path_len"}
    assert plan.heads.inputs["path_ids"][1] == K
    (profile,) = plan.heads.profiles
    assert max(r.max for r in profile.axes.values()) >= plan.tree_nodes
    import runtime.trt_backend as trt_backend

    for name in ("require_tensorrt", "require_gpu", "require_cudart"):  # as if on a GPU machine with TensorRT
        monkeypatch.setattr(trt_backend, name, lambda: None)
    with pytest.raises(MedusaError, match="Hydra heads run on ONNX Runtime"):
        TensorRTBackend.from_artifact(art)


def test_unrolled_drafting_graph_drafts_what_level_by_level_drafting_does(hydra_artifact):
    """scripts/bench_unrolled_drafts: one graph unrolling a tree's levels (top-k inside) gives the
    runtime's level-by-level tokens on every hidden state it checks, and the report names both timings."""
    import runtime
    from runtime.tree import load_tree
    from scripts import bench_unrolled_drafts as B

    gen = runtime.load(hydra_artifact["artifact"], threads=1)
    tree = load_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2]])
    texts = ["Name three rivers in Europe.", "Write a haiku about the sea, then explain it."]
    r = B.measure(gen, hydra_artifact["model"], hydra_artifact["heads"], tree, texts, 6, 3, 1, 1, 16)
    assert r["states"] >= 10 and r["same"] == r["states"], r
    assert r["int8"] is True  # the CPU runs heads_int8.onnx; the unrolled graph is quantized the same way
    lines = "\n".join(B.report(r))
    assert f"same tokens: {r['states']}/{r['states']}" in lines and "unrolling saves" in lines
    # the module itself, in torch, against hydra_candidates on the float heads
    import torch

    from runtime.decode import hydra_candidates

    model, heads = hydra_artifact["model"], hydra_artifact["heads"]
    module = B.unrolled_module(heads, model.lm_head, model.get_input_embeddings(), tree)
    hidden = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = module(hidden, torch.tensor([17])).numpy()

        def draft(paths, lens):
            rows = hidden.expand(len(paths), -1)
            return heads(
                rows,
                torch.from_numpy(paths),
                torch.from_numpy(lens),
                model.lm_head,
                model.get_input_embeddings().weight,
            ).numpy()

        want = hydra_candidates(17, tree, draft, heads.config.num_heads)
    np.testing.assert_array_equal(got, want)
