"""training/medusa2.py: the combined loss and the warm-up (heads only, then the backbone too)."""

from __future__ import annotations

import torch
from train_helpers import VOCAB, tiny_llama
from train_helpers import synthetic_records as _records


def test_medusa2_combined_loss_has_both_terms():
    import torch.nn.functional as F

    from exporter.heads import fresh_heads
    from training.data import IGNORE, build_examples
    from training.medusa2 import combined_loss, make_batch

    model = tiny_llama()
    original = tiny_llama()  # same seed: identical weights
    heads = fresh_heads(3, 32, VOCAB)
    ids, lm, hl = make_batch(build_examples(_records(3)), 3)
    loss, parts = combined_loss(model, heads, ids, lm, hl, 0.5, "kl", original)
    assert abs(parts["backbone"].item()) < 1e-5  # KL of the model to itself
    assert torch.allclose(loss, parts["backbone"] + 0.5 * parts["heads"])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.5)
    loss, parts = combined_loss(model, heads, ids, lm, hl, 0.5, "kl", original)
    assert parts["backbone"].item() > 1e-4 and parts["heads"].item() > 0
    loss_ce, parts_ce = combined_loss(model, heads, ids, lm, hl, 0.0, "ce")
    logits = model(input_ids=ids).logits
    m = lm != IGNORE
    assert torch.allclose(loss_ce, F.cross_entropy(logits[m], lm[m]), atol=1e-5)


def test_medusa2_warmup_trains_heads_only(tmp_path):
    from training.data import build_examples, split_examples
    from training.medusa2 import Medusa2Config, train_medusa2

    examples = split_examples(build_examples(_records(40)))

    def run(steps, warmup):
        model = tiny_llama()
        cfg = Medusa2Config(
            model="tiny",
            out=tmp_path / f"m2_{steps}_{warmup}",
            num_heads=3,
            steps=steps,
            warmup_steps=warmup,
            batch_size=2,
            lr_backbone=1e-3,
            lr_heads=1e-2,
        )
        summary = train_medusa2(cfg, backbone=(model, None, tmp_path), examples=examples)
        return model, summary

    before = tiny_llama().state_dict()
    model, summary = run(steps=3, warmup=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), (
        "warm-up must leave the backbone untouched"
    )
    assert summary["greedy_identical_share"] == 1.0 and summary["drift_prompts"] > 0  # untouched: same answers
    from exporter.heads import load_heads

    heads = load_heads(tmp_path / "m2_3_3" / "heads", hidden_size=32, vocab_size=VOCAB)
    assert any(v.abs().sum() > 0 for v in heads.state_dict().values()), "the heads must have trained"
    # fresh start heads are the identity blocks: the start accuracy is lm_head's, the run's own meta only
    assert summary["start_heads"] == "fresh" and len(summary["heldout_top1_start"]) == 3
    assert heads.config.meta["method"].startswith("medusa-2")
    from exporter.heads import backbone_fingerprint

    assert heads.config.meta["backbone_fingerprint"] == backbone_fingerprint(model)  # the tuned backbone's
    # started from Medusa-1 heads: their meta (epochs, history) does not leak into the new heads' meta
    from exporter.heads import fresh_heads, save_heads

    save_heads(fresh_heads(3, 32, VOCAB), tmp_path / "m1", meta={"method": "medusa-1", "history": [1], "epochs": 9})
    cfg = Medusa2Config(
        model="tiny",
        out=tmp_path / "m2_from_m1",
        heads=str(tmp_path / "m1"),
        num_heads=3,
        steps=1,
        warmup_steps=1,
        batch_size=2,
    )
    s2 = train_medusa2(cfg, backbone=(tiny_llama(), None, tmp_path), examples=examples)
    meta = load_heads(tmp_path / "m2_from_m1" / "heads", hidden_size=32, vocab_size=VOCAB).config.meta
    assert s2["start_heads_method"] == "medusa-1" and meta["start_heads"] == str(tmp_path / "m1")
    assert "history" not in meta and "epochs" not in meta and meta["method"].startswith("medusa-2")
    model, _ = run(steps=4, warmup=2)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), (
        "after warm-up the backbone trains"
    )
    assert (tmp_path / "m2_4_2" / "backbone" / "config.json").is_file()


def test_medusa2_refuses_hydra_heads_in_one_line(tmp_path):
    """Hydra heads draft level by level from the path: Medusa-2's loss is for Medusa heads, so a
    --heads folder of Hydra heads is one MedusaError, not a TypeError deep in the loss."""
    import pytest

    from exporter.heads import fresh_hydra_heads, save_heads
    from runtime.errors import MedusaError
    from training.data import build_examples, split_examples
    from training.medusa2 import Medusa2Config, train_medusa2

    save_heads(fresh_hydra_heads(3, 32, VOCAB), tmp_path / "hydra")
    cfg = Medusa2Config(model="tiny", out=tmp_path / "out", heads=str(tmp_path / "hydra"), num_heads=3, steps=1,
                        batch_size=2)  # fmt: skip
    with pytest.raises(MedusaError, match="holds hydra heads: Medusa-2 trains Medusa heads"):
        train_medusa2(
            cfg, backbone=(tiny_llama(), None, tmp_path), examples=split_examples(build_examples(_records(8)))
        )
