"""Medusa heads: fresh heads are the identity; every published layout loads; bad ones fail clearly.

Checkpoints are built here, in a temporary folder, in each layout's own key scheme (not by
calling save_heads), then loaded back through ``load_heads``.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from exporter.heads import (
    HEADS_CONFIG,
    HEADS_WEIGHTS,
    MedusaHeads,
    ResBlock,
    fresh_heads,
    heads_config_from_state_dict,
    load_heads,
    save_heads,
)
from exporter.step import HeadsStep
from runtime.errors import CheckpointError, MedusaError

H, V = 16, 40  # hidden size, vocabulary


@pytest.fixture
def lm_head():
    torch.manual_seed(0)
    return nn.Linear(H, V, bias=False)


def official_state_dict(num_heads=5, num_layers=1, proj=True, hidden=H, vocab=V, seed=1) -> dict:
    """Random tensors under the official Medusa-1 keys (what medusa_lm_head.pt holds)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(num_heads):
        for j in range(num_layers):
            sd[f"{i}.{j}.linear.weight"] = torch.randn(hidden, hidden, generator=g) * 0.1
            sd[f"{i}.{j}.linear.bias"] = torch.randn(hidden, generator=g) * 0.1
        if proj:
            sd[f"{i}.{num_layers}.weight"] = torch.randn(vocab, hidden, generator=g) * 0.1
    return sd


def reference_logits(sd: dict, hidden: torch.Tensor, num_heads: int, num_layers: int, lm_head=None) -> torch.Tensor:
    """The official head maths written out: n x (x + SiLU(W x + b)), then the projection."""
    out = []
    for i in range(num_heads):
        x = hidden
        for j in range(num_layers):
            x = x + torch.nn.functional.silu(x @ sd[f"{i}.{j}.linear.weight"].T + sd[f"{i}.{j}.linear.bias"])
        w = sd.get(f"{i}.{num_layers}.weight")
        out.append(x @ w.T if w is not None else lm_head(x))
    return torch.stack(out, dim=-2)


# ---------------------------------------------------------------------------- fresh heads


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("shared", [True, False])
def test_fresh_heads_are_the_identity(num_layers, shared, lm_head):
    heads = fresh_heads(4, H, V, num_layers=num_layers, shared_lm_head=shared, lm_head=lm_head)
    blocks = [m for m in heads.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 4 * num_layers
    for b in blocks:  # weight *and* bias are zero (the official code leaves the bias random)
        assert torch.count_nonzero(b.linear.weight) == 0
        assert torch.count_nonzero(b.linear.bias) == 0
    hidden = torch.randn(3, H)
    with torch.no_grad():
        logits = heads(hidden, lm_head)
        assert logits.shape == (3, 4, V)
        torch.testing.assert_close(heads.blocks(hidden), hidden[:, None, :].expand(3, 4, H), rtol=0, atol=0)
        for k in range(4):
            torch.testing.assert_close(logits[:, k], lm_head(hidden), rtol=0, atol=1e-6)
    if not shared:  # an own projection starts as a copy of lm_head, not as the same tensor
        for head in heads.heads:
            assert head[-1].weight.data_ptr() != lm_head.weight.data_ptr()


def test_blocks_are_distinct_objects():
    heads = fresh_heads(3, H, V, num_layers=2)
    blocks = [m for m in heads.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 6 and len({id(b) for b in blocks}) == 6
    ptrs = {p.data_ptr() for b in blocks for p in b.parameters()}
    assert len(ptrs) == 12, "a parameter is shared between blocks"
    with torch.no_grad():  # changing one block leaves every other block untouched
        heads.heads[0][0].linear.weight.fill_(1.0)
    assert sum(int(torch.count_nonzero(b.linear.weight) > 0) for b in blocks) == 1


def test_shared_heads_need_lm_head():
    heads = fresh_heads(2, H, V)
    with pytest.raises(ValueError, match="lm_head"):
        heads(torch.zeros(1, H))


def test_state_dict_uses_official_keys_and_round_trips_inside_a_parent(lm_head):
    heads = MedusaHeads(heads_config_from_state_dict(official_state_dict(2, 2), "test"))
    heads.load_state_dict(official_state_dict(2, 2))
    assert set(heads.state_dict()) == set(official_state_dict(2, 2))
    # Nested in a parent module (the exported HeadsStep, a training wrapper), the keys must
    # agree with named_parameters so that the parent can reload its own state dict.
    step = HeadsStep(heads, lm_head)
    sd = step.state_dict()
    assert set(sd) == {n for n, _ in step.named_parameters()}
    other = HeadsStep(fresh_heads(2, H, V, num_layers=2, shared_lm_head=False), nn.Linear(H, V, bias=False))
    other.load_state_dict(sd)
    x = torch.randn(2, H)
    with torch.no_grad():
        torch.testing.assert_close(other(x), step(x))


# ---------------------------------------------------------------------------- layouts


def _check_loaded(heads: MedusaHeads, sd: dict, num_heads: int, num_layers: int, lm_head=None):
    assert heads.config.num_heads == num_heads and heads.config.num_layers == num_layers
    assert heads.config.hidden_size == H and heads.config.vocab_size == V
    hidden = torch.randn(5, H)
    with torch.no_grad():
        torch.testing.assert_close(heads(hidden, lm_head), reference_logits(sd, hidden, num_heads, num_layers, lm_head))


def test_medusa1_pt(tmp_path, lm_head):
    sd = official_state_dict(num_heads=5, num_layers=1)
    torch.save(sd, tmp_path / "medusa_lm_head.pt")
    # the official Medusa-1 config says 2 heads for checkpoints holding 5
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    for path in (tmp_path, tmp_path / "medusa_lm_head.pt"):
        heads = load_heads(path, hidden_size=H, vocab_size=V)
        _check_loaded(heads, sd, 5, 1)
        assert heads.config.shared_lm_head is False
        assert heads.config.meta["layout"] == "medusa1-pt"


def test_medusa1_pt_two_layers(tmp_path):
    sd = official_state_dict(num_heads=3, num_layers=2)
    torch.save(sd, tmp_path / "medusa_lm_head.pt")
    _check_loaded(load_heads(tmp_path, hidden_size=H, vocab_size=V), sd, 3, 2)


class _Payload:
    """Unpickling this object runs code: it creates the folder ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    probe = tmp_path / "probe_ran"
    pickle.loads(pickle.dumps(_Payload(str(probe))))  # the payload is real: plain pickle runs it
    assert probe.is_dir()

    marker = tmp_path / "payload_ran"
    sd = official_state_dict(num_heads=2)
    sd["evil"] = _Payload(str(marker))
    torch.save(sd, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(CheckpointError, match=r"medusa_lm_head\.pt: cannot be read as a weights-only"):
        load_heads(tmp_path, hidden_size=H, vocab_size=V)
    assert not marker.exists(), "loading a head checkpoint ran code from the pickle"


def test_medusa1_safetensors_without_projection(tmp_path, lm_head):
    sd = official_state_dict(num_heads=4, num_layers=1, proj=False)
    save_file(sd, str(tmp_path / "medusa_lm_head.safetensors"))
    heads = load_heads(tmp_path, hidden_size=H, vocab_size=V)
    assert heads.config.shared_lm_head is True
    assert heads.config.meta["layout"] == "medusa1-safetensors"
    _check_loaded(heads, sd, 4, 1, lm_head=lm_head)
    with pytest.raises(CheckpointError, match="share the backbone's lm_head.*vocabulary size is needed"):
        load_heads(tmp_path)


def _medusa2_folder(folder, sd, config_heads=2, fmt="safetensors"):
    folder.mkdir(exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": H,
        "vocab_size": V,
        "medusa_num_heads": config_heads,
        "medusa_num_layers": 1,
    }
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(7)
    full = {
        "model.embed_tokens.weight": torch.randn(V, H, generator=g),
        "model.norm.weight": torch.ones(H),
        "lm_head.weight": torch.randn(V, H, generator=g),
        **{f"medusa_head.{k}": v for k, v in sd.items()},
    }
    if fmt == "safetensors":  # two shards, heads split across them
        keys = sorted(full)
        save_file({k: full[k] for k in keys[::2]}, str(folder / "model-00001-of-00002.safetensors"))
        save_file({k: full[k] for k in keys[1::2]}, str(folder / "model-00002-of-00002.safetensors"))
    else:
        torch.save(full, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_medusa2_full_model(tmp_path, fmt):
    sd = official_state_dict(num_heads=5, num_layers=1)
    folder = _medusa2_folder(tmp_path / "medusa2", sd, config_heads=2, fmt=fmt)
    heads = load_heads(folder, hidden_size=H, vocab_size=V)
    assert heads.config.meta["layout"] == "medusa2-full-model"
    _check_loaded(heads, sd, 5, 1)  # 5 from the weights, not 2 from config.json


def test_medusa2_folder_without_heads(tmp_path):
    folder = _medusa2_folder(tmp_path / "m", {}, config_heads=3)
    with pytest.raises(CheckpointError, match="declares Medusa heads but no 'medusa_head.\\*' tensors"):
        load_heads(folder, hidden_size=H, vocab_size=V)


@pytest.mark.parametrize("shared", [True, False])
def test_save_load_round_trip_with_meta(tmp_path, shared, lm_head):
    sd = official_state_dict(num_heads=3, num_layers=2, proj=not shared)
    heads = MedusaHeads(heads_config_from_state_dict(sd, "test"))
    heads.config.vocab_size = V
    heads.load_state_dict(sd)
    save_heads(heads, tmp_path / "out", meta={"data": "alpaca_5000", "steps": 10})
    assert (tmp_path / "out" / HEADS_WEIGHTS).is_file()
    written = json.loads((tmp_path / "out" / HEADS_CONFIG).read_text())
    assert written["num_heads"] == 3 and written["num_layers"] == 2 and written["shared_lm_head"] is shared
    assert written["meta"]["data"] == "alpaca_5000" and "format_version" in written

    back = load_heads(tmp_path / "out", hidden_size=H, vocab_size=V)
    assert back.config.meta["data"] == "alpaca_5000" and back.config.meta["steps"] == 10
    assert back.config.meta["layout"] == "medusa-trt"
    assert back.config.shared_lm_head is shared
    _check_loaded(back, sd, 3, 2, lm_head=lm_head if shared else None)


def test_float16_file_is_half_the_size_and_loads_as_float32(tmp_path):
    sd = official_state_dict(num_heads=3, num_layers=2, proj=False)
    heads = MedusaHeads(heads_config_from_state_dict(sd, "test"))
    heads.config.vocab_size = V
    heads.load_state_dict(sd)
    save_heads(heads, tmp_path / "f32")
    save_heads(heads, tmp_path / "f16", dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f16" / HEADS_WEIGHTS), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    s32, s16 = ((tmp_path / d / HEADS_WEIGHTS).stat().st_size for d in ("f32", "f16"))
    assert s16 < s32
    back = load_heads(tmp_path / "f16", hidden_size=H, vocab_size=V)
    for k, v in back.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, sd[k].to(torch.float16).float())


def test_dtype_on_load(tmp_path):
    torch.save(official_state_dict(2), tmp_path / "medusa_lm_head.pt")
    heads = load_heads(tmp_path, hidden_size=H, vocab_size=V, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in heads.parameters())


# ---------------------------------------------------------------------------- errors


def test_hidden_size_mismatch_names_both_shapes(tmp_path):
    torch.save(official_state_dict(2, hidden=24), tmp_path / "medusa_lm_head.pt")
    with pytest.raises(CheckpointError, match=r"\[24, 24\].*hidden size is 16.*\[16, 16\]"):
        load_heads(tmp_path, hidden_size=H, vocab_size=V)


def test_vocab_mismatch_names_both_shapes(tmp_path):
    torch.save(official_state_dict(2, vocab=50), tmp_path / "medusa_lm_head.pt")
    with pytest.raises(CheckpointError, match=r"projection is \[50, 16\].*lm_head is \[40, 16\]"):
        load_heads(tmp_path, hidden_size=H, vocab_size=V)


def _write_sd(path, sd):
    if path.suffix == ".pt":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))


BAD_CHECKPOINTS = [
    pytest.param({"foo.weight": torch.zeros(2, 2)}, r"unexpected key 'foo\.weight'", id="foreign-keys"),
    pytest.param({}, r"holds no Medusa head tensors", id="no-tensors"),
    pytest.param(
        {**official_state_dict(2), "0.0.linear.bias": torch.zeros(H + 1)},
        r"tensor 0\.0\.linear\.bias has shape \(17,\), expected \(16,\)",
        id="inconsistent-shape",
    ),
    pytest.param(
        {k: v for k, v in official_state_dict(3).items() if not k.startswith("1.")},
        r"head indices \[0, 2\] are not 0\.\.2",
        id="missing-head",
    ),
    pytest.param(
        {k: v for k, v in official_state_dict(2).items() if k != "1.1.weight"},
        r"heads differ in layer count or projection",
        id="projection-on-one-head-only",
    ),
    pytest.param(
        {"0.0.linear.weight": torch.zeros(H), "0.0.linear.bias": torch.zeros(H)},
        r"tensor 0\.0\.linear\.weight has shape \(16,\), expected \[H, H\]",
        id="one-dimensional-block",
    ),
]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("sd, match", BAD_CHECKPOINTS)
def test_wrong_keys_or_shapes(tmp_path, sd, match, suffix):
    path = tmp_path / f"medusa_lm_head{suffix}"
    _write_sd(path, sd)
    with pytest.raises(CheckpointError, match=match):
        load_heads(tmp_path, hidden_size=H, vocab_size=V)


@pytest.mark.parametrize(
    "sd, match",
    [
        ({"0.0.linear.weight": 3}, r"found str '0\.0\.linear\.weight' -> int"),
        ({1: torch.zeros(2)}, r"found int 1 -> Tensor"),
    ],
)
def test_a_pickle_of_other_things_is_a_checkpoint_error(tmp_path, sd, match):
    torch.save(sd, tmp_path / "medusa_lm_head.pt")
    with pytest.raises(CheckpointError, match=match):
        load_heads(tmp_path, hidden_size=H, vocab_size=V)


def test_hydra_heads_without_their_input_layer_are_a_checkpoint_error(tmp_path):
    import json

    save_file({"0.blocks.0.linear.weight": torch.zeros(H, H), "0.blocks.0.linear.bias": torch.zeros(H)},
              str(tmp_path / "medusa_heads.safetensors"))  # fmt: skip
    (tmp_path / "medusa_heads.json").write_text(json.dumps({"kind": "hydra"}))
    with pytest.raises(CheckpointError, match=r"Hydra tensor 0\.input\.weight is missing"):
        load_heads(tmp_path, hidden_size=H, vocab_size=V)


def test_unknown_layouts_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: .*nothing_here does not exist"):
        load_heads(tmp_path / "nothing_here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no Medusa heads found \(looked for medusa_heads\.safetensors"):
        load_heads(empty)
    txt = tmp_path / "heads.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match=r"unknown head checkpoint type '\.txt'"):
        load_heads(txt)
    plain = tmp_path / "plain_model"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"plain_model: a model folder without Medusa heads"):
        load_heads(plain)


@pytest.mark.parametrize("name", ["medusa_lm_head.pt", "medusa_lm_head.safetensors", HEADS_WEIGHTS])
def test_corrupt_file_is_a_checkpoint_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_heads(tmp_path, hidden_size=H, vocab_size=V)


def test_corrupt_json_is_a_checkpoint_error(tmp_path):
    m2 = tmp_path / "m2"
    m2.mkdir()
    (m2 / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_heads(m2)
    ours = tmp_path / "ours"
    save_heads(fresh_heads(2, H, V), ours)
    (ours / HEADS_CONFIG).write_text("{broken")
    with pytest.raises(CheckpointError, match=r"medusa_heads\.json"):
        load_heads(ours, hidden_size=H, vocab_size=V)


def test_checkpoint_error_is_a_medusa_error():
    assert issubclass(CheckpointError, MedusaError)


# ---------------------------------------------------------------------------- draft vocabulary


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own-projection"])
def test_draft_vocab_restricts_proposals_and_round_trips(tmp_path, shared, lm_head):
    """Inside the draft vocabulary the logits are the full projection's; outside, the lowest
    finite value (never proposed); the float16 file keeps the ids exact, the json their count."""
    sd = official_state_dict(num_heads=3, num_layers=2, proj=not shared)
    heads = MedusaHeads(heads_config_from_state_dict(sd, "test"))
    heads.config.vocab_size = V
    heads.load_state_dict(sd)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(3))
    full = heads(x, lm_head) if shared else heads(x)
    draft = [0, 3, 4, 17, 38, 39]
    heads.set_draft_vocab(draft)
    out = heads(x, lm_head) if shared else heads(x)
    assert out.shape == full.shape == (5, 3, V)
    torch.testing.assert_close(out[..., draft], full[..., draft])
    outside = [t for t in range(V) if t not in draft]
    assert (out[..., outside] == torch.finfo(out.dtype).min).all()
    assert set(out.argmax(-1).flatten().tolist()) <= set(draft)

    save_heads(heads, tmp_path / "d", dtype=torch.float16)
    assert json.loads((tmp_path / "d" / HEADS_CONFIG).read_text())["draft_vocab_size"] == len(draft)
    back = load_heads(tmp_path / "d", hidden_size=H, vocab_size=V)
    assert back.draft_vocab.tolist() == draft and back.config.draft_vocab_size == len(draft)
    again = back(x, lm_head) if shared else back(x)
    assert (again.argmax(-1) == out.argmax(-1)).float().mean() > 0.9  # float16 weights
    back.set_draft_vocab(None)
    assert back.config.draft_vocab_size == 0 and "draft_vocab" not in back.state_dict()
    torch.testing.assert_close(back(x, lm_head) if shared else back(x), full, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "ids, match",
    [
        ([], "empty"),
        ([3, 2, 5], "sorted and distinct"),
        ([1, 1, 2], "sorted and distinct"),
        ([0, V], rf"must lie in \[0, {V}\), got 0..{V}"),
        ([-1, 4], r"must lie in"),
    ],
)
def test_bad_draft_vocab_is_a_checkpoint_error(tmp_path, ids, match):
    heads = fresh_heads(2, H, V)
    with pytest.raises(CheckpointError, match=match):
        heads.set_draft_vocab(ids)
    # the same ids written into a file are refused on load, naming the file
    sd = {k: v for k, v in official_state_dict(num_heads=2, proj=False).items()}
    sd["draft_vocab"] = torch.tensor(ids, dtype=torch.long)
    (tmp_path / "h").mkdir()
    save_file(sd, str(tmp_path / "h" / HEADS_WEIGHTS))
    with pytest.raises(CheckpointError, match=match):
        load_heads(tmp_path / "h", hidden_size=H, vocab_size=V)


def test_float_draft_vocab_in_a_file_is_refused(tmp_path):
    sd = official_state_dict(num_heads=2, proj=False)
    sd["draft_vocab"] = torch.tensor([1.0, 2.0])
    (tmp_path / "h").mkdir()
    save_file(sd, str(tmp_path / "h" / HEADS_WEIGHTS))
    with pytest.raises(CheckpointError, match=r"'draft_vocab' must be a 1-D integer tensor"):
        load_heads(tmp_path / "h", hidden_size=H, vocab_size=V)


def test_draft_rows_cache_follows_weight_and_vocab_changes(lm_head):
    """The gathered draft rows are reused between inference calls, but an in-place change of
    the projection or a new draft vocabulary is seen at once (same result as the full projection)."""
    heads = fresh_heads(2, H, V, lm_head=lm_head)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(5))

    def check(draft):
        with torch.inference_mode():
            out = heads(x, lm_head)
        full = lm_head(heads.blocks(x)).detach()
        torch.testing.assert_close(out[..., draft], full[..., draft])

    heads.set_draft_vocab([1, 2, 30])
    check([1, 2, 30])
    check([1, 2, 30])  # from the cache
    with torch.no_grad():
        lm_head.weight.mul_(-2.0)
    check([1, 2, 30])
    heads.set_draft_vocab([0, 7, 8, 39])
    check([0, 7, 8, 39])
    out = heads(x, lm_head)  # autograd path: no cache, gradients reach the projection
    out[..., [0, 7]].sum().backward()
    assert lm_head.weight.grad is not None and lm_head.weight.grad[[0, 7]].abs().sum() > 0


# ---------------------------------------------------------------------------- keeping the first heads


@pytest.mark.parametrize("shared", [True, False])
def test_first_heads_draft_what_the_first_heads_drafted(shared, lm_head):
    from exporter.heads import first_heads

    sd = official_state_dict(num_heads=4, num_layers=2, proj=not shared)
    heads = MedusaHeads(heads_config_from_state_dict(sd, "test"))
    heads.config.vocab_size = V
    heads.load_state_dict(sd)
    heads.set_draft_vocab([0, 3, 4, 17, 38, 39])
    heads.config.meta = {"source": "t"}
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(3))
    full = heads(x, lm_head) if shared else heads(x)
    for k in (1, 3):
        kept = first_heads(heads, k)
        out = kept(x, lm_head) if shared else kept(x)
        assert out.shape == (5, k, V) and kept.config.num_heads == k
        torch.testing.assert_close(out, full[:, :k])
        assert kept.draft_vocab.tolist() == heads.draft_vocab.tolist()
        assert kept.config.meta == {"source": "t", "kept_heads": f"{k} of 4"}
    assert first_heads(heads, 4) is heads
    for k in (0, 5):
        with pytest.raises(CheckpointError, match="these heads have 4"):
            first_heads(heads, k)


def test_first_hydra_heads_draft_what_the_first_heads_drafted():
    from exporter.heads import first_heads, fresh_hydra_heads

    torch.manual_seed(0)
    heads = fresh_hydra_heads(3, H, V, num_layers=2)
    for p in heads.parameters():
        p.data.normal_(0.0, 0.3)
    embed, head = torch.randn(V, H), nn.Linear(H, V, bias=False)
    kept = first_heads(heads, 2)
    hidden = torch.randn(4, H)
    paths = torch.randint(0, V, (4, 3))
    lens = torch.tensor([1, 2, 1, 2])
    torch.testing.assert_close(kept(hidden, paths[:, :2], lens, head, embed), heads(hidden, paths, lens, head, embed))


def test_the_backbone_fingerprint_tells_another_model_and_export_warns_on_it(tmp_path, wordlevel_tokenizer):
    """The same weights in float32 and float16 give one fingerprint, another model of the same sizes
    another (a merged LoRA's too); heads whose meta records another backbone export with a warning naming both, heads of
    this one (and fresh heads, which record none) without."""
    import logging

    from conftest import capture_logs, make_tiny_llama

    from exporter.export import ExportOptions, export_artifact
    from exporter.heads import backbone_fingerprint, fresh_heads

    model, other = make_tiny_llama(0), make_tiny_llama(1)
    assert backbone_fingerprint(model) == backbone_fingerprint(make_tiny_llama(0).half())
    assert backbone_fingerprint(model) != backbone_fingerprint(other)
    merged = make_tiny_llama(0)  # a merged LoRA: attention and MLP moved, lm_head and norms as they were
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if "q_proj" in name or "down_proj" in name:
                p.add_(0.01 * torch.randn_like(p))
    assert backbone_fingerprint(merged) != backbone_fingerprint(model)
    options = ExportOptions(graph="portable", tree="chain_2", validate=False, batch_graph=False)
    for i, (trained_on, warned) in enumerate(
        [(backbone_fingerprint(other), True), (backbone_fingerprint(model), False), (None, False)]
    ):
        heads = fresh_heads(2, model.config.hidden_size, model.config.vocab_size)
        heads.config.meta = {"backbone": "tiny-1"} | ({"backbone_fingerprint": trained_on} if trained_on else {})
        with capture_logs(level=logging.WARNING) as logs:
            export_artifact(model, heads, tmp_path / f"a{i}", options, tokenizer=wordlevel_tokenizer)
        said = [line for line in logs if "trained on another backbone" in line]
        assert bool(said) == warned, logs
        if warned:
            assert "tiny-1" in said[0] and backbone_fingerprint(model) in said[0], said
