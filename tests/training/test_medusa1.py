"""training/medusa1.py: the Medusa-1 loss (hard and soft targets), the hidden-state cache and
its teacher rows, training runs on a tiny random Llama, and the model card (training/card.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import VOCAB, tiny_llama
from train_helpers import synthetic_records as _records

from runtime.errors import MedusaError

# ---------------------------------------------------------------------------- loss and teacher rows


def test_loss_is_sum_of_0_8_power_k_weighted_head_ce():
    import torch.nn.functional as F

    from training.data import IGNORE
    from training.medusa1 import medusa_loss, projected_loss

    torch.manual_seed(0)
    N, K, H, V = 12, 4, 8, 20
    blocks = torch.randn(N, K, H)
    W = torch.randn(V, H)
    labels = torch.randint(0, V, (N, K))
    labels[:3, 2] = IGNORE
    labels[:, 3] = IGNORE  # a head with no target contributes 0
    loss, per_head = medusa_loss(blocks @ W.T, labels)
    ce = [
        F.cross_entropy((blocks[:, k] @ W.T)[labels[:, k] != IGNORE], labels[labels[:, k] != IGNORE, k])
        for k in range(3)
    ]
    assert torch.allclose(per_head[:3], torch.stack(ce))
    assert per_head[3] == 0
    assert torch.allclose(loss, ce[0] + 0.8 * ce[1] + 0.64 * ce[2])
    loss2, _ = projected_loss(blocks, labels, W)
    assert torch.allclose(loss, loss2, atol=1e-5)
    # restricted training vocabulary: the softmax runs over the given rows only
    used = torch.unique(labels[labels != IGNORE])
    vmap = torch.full((V,), -1, dtype=torch.long)
    vmap[used] = torch.arange(len(used))
    loss3, ph3 = projected_loss(blocks, labels, W[used], vmap)
    sel = labels[:, 0] != IGNORE
    assert torch.allclose(ph3[0], F.cross_entropy(blocks[sel, 0] @ W[used].T, vmap[labels[sel, 0]]))
    assert loss3 < loss  # fewer competitors, smaller CE


def test_soft_targets_loss_is_the_cross_entropy_against_the_teacher_distribution():
    import torch.nn.functional as F

    from training.data import IGNORE
    from training.medusa1 import projected_loss

    torch.manual_seed(1)
    N, K, H, V = 10, 3, 8, 20
    blocks, W = torch.randn(N, K, H), torch.randn(V, H)
    labels = torch.randint(0, V, (N, K))
    labels[:2, 1] = IGNORE
    teacher_h = torch.randn(N, K, H)
    hard, _ = projected_loss(blocks, labels, W)
    # no cached teacher anywhere: the one-hot loss
    none, _ = projected_loss(blocks, labels, W, teacher=(teacher_h, torch.zeros(N, K, dtype=torch.bool)))
    assert torch.allclose(none, hard)
    # a teacher sure of the label: the one-hot loss again
    sure = 1e3 * W[labels.clamp(min=0)] / W[labels.clamp(min=0)].norm(dim=-1, keepdim=True) ** 2
    sure_loss, _ = projected_loss(blocks, labels, W, teacher=(sure, torch.ones(N, K, dtype=torch.bool)))
    assert torch.allclose(sure_loss, hard, atol=1e-4)
    # a real distribution where the mask is set, the label elsewhere
    mask = torch.rand(N, K) < 0.6
    loss, per_head = projected_loss(blocks, labels, W, teacher=(teacher_h, mask))
    for k in range(K):
        sel = labels[:, k] != IGNORE
        logp = F.log_softmax(blocks[sel, k] @ W.T, -1)
        p = F.softmax(teacher_h[sel, k] @ W.T, -1)
        m = mask[sel, k]
        want = torch.where(m, -(p * logp).sum(-1), -logp.gather(1, labels[sel, k, None].clamp(min=0))[:, 0]).mean()
        assert torch.allclose(per_head[k], want, atol=1e-5)
    assert torch.allclose(loss, per_head[0] + 0.8 * per_head[1] + 0.64 * per_head[2])


def test_teacher_rows_hold_the_backbones_prediction_of_each_heads_token(tmp_path):
    """Head k at position t targets token t+k+2; its teacher row is the hidden state at t+k+1
    (the backbone's prediction of that token), in the same example, or masked."""
    from training.data import IGNORE, build_examples, split_examples
    from training.medusa1 import build_cache, cached_positions, load_split, teacher_rows

    model = tiny_llama()
    rng = np.random.default_rng(0)
    records = [
        {
            "id": f"g{i}",
            "prompt_ids": [1] + rng.integers(3, VOCAB, 5 + i % 4).tolist(),
            "response_ids": rng.integers(3, VOCAB, 10 + i % 7).tolist(),
        }
        for i in range(12)
    ]
    examples = split_examples(build_examples(records))
    build_cache(model, examples, tmp_path / "c", dtype=np.float32, batch_size=4)
    K = 3
    split = load_split(tmp_path / "c", "train", num_heads=K)
    rows, mask = teacher_rows(split, np.arange(len(split.labels)))
    assert not mask[split.labels == IGNORE].any()
    assert mask.sum() > 0.7 * (split.labels != IGNORE).sum()  # only an example's last rows miss
    checked, r0 = 0, 0
    for e in examples["train"]:
        with torch.inference_mode():
            fresh = model.model(input_ids=torch.from_numpy(e.tokens)[None]).last_hidden_state[0].numpy()
        a, b = cached_positions(e)
        for r in range(r0, r0 + b - a):
            t = a + r - r0
            for k in range(K):
                if mask[r, k]:
                    np.testing.assert_allclose(split.hidden[rows[r, k]], fresh[t + k + 1], atol=1e-4)
                    assert split.labels[r, k] == e.tokens[t + k + 2]
                    checked += 1
                else:  # the label is ignored, or position t+k+1 is not cached for this example
                    assert split.labels[r, k] == IGNORE or t + k + 1 >= b
        r0 += b - a
    assert checked > 50


# ---------------------------------------------------------------------------- hidden-state cache


@pytest.mark.parametrize("dtype,atol", [(np.float32, 1e-5), (np.float16, 2e-2)])
def test_hidden_cache_equals_backbone_step_hidden_states(tmp_path, dtype, atol):
    from exporter.step import BackboneStep, kv_names
    from training.data import build_examples, split_examples
    from training.medusa1 import build_cache, cached_positions, load_split

    model = tiny_llama()
    examples = split_examples(build_examples(_records(40)))
    build_cache(model, examples, tmp_path / "cache", dtype=dtype, batch_size=3)
    step = BackboneStep(model).eval()
    L = model.config.num_hidden_layers
    kv = model.config.num_key_value_heads
    hd = model.config.hidden_size // model.config.num_attention_heads
    for split in ("train", "heldout"):
        cached = load_split(tmp_path / "cache", split, num_heads=3)
        row = 0
        for e in examples[split]:
            n = len(e.tokens)
            past = [torch.zeros(1, 0, kv, hd) for _ in kv_names(L)[0]]
            with torch.inference_mode():
                _, hidden, *_ = step(
                    torch.from_numpy(e.tokens)[None],
                    torch.arange(n)[None],
                    torch.tril(torch.ones(n, n, dtype=torch.bool))[None],
                    *past,
                )
            a, b = cached_positions(e)
            np.testing.assert_allclose(
                np.asarray(cached.hidden[row : row + b - a], dtype=np.float32),
                hidden[0, a:b].numpy(),
                atol=atol,
                rtol=1e-2,
            )
            row += b - a
        assert row == cached.hidden.shape[0]


# ---------------------------------------------------------------------------- Medusa-1


def test_medusa1_run_beats_fresh_heads(tmp_path):
    from exporter.heads import load_heads
    from training.distill import write_atomic
    from training.medusa1 import Medusa1Config, train_medusa1

    model = tiny_llama()
    data = tmp_path / "d.jsonl"
    write_atomic(data, _records(160))
    cfg = Medusa1Config(
        model="tiny",
        data=data,
        out=tmp_path / "heads",
        num_heads=3,
        lr=1e-2,
        epochs=4,
        batch_tokens=128,
        train_vocab="full",
    )
    summary = train_medusa1(cfg, backbone=(model, None, tmp_path))
    assert summary["heldout_examples"] > 0 and summary["steps"] > 0
    for k in range(3):
        assert summary["heldout_top1"][k] > summary["heldout_top1_untrained"][k] + 0.2, summary
    heads = load_heads(tmp_path / "heads", hidden_size=32, vocab_size=VOCAB)
    assert heads.config.num_heads == 3 and heads.config.meta["heldout_top1"] == summary["heldout_top1"]
    assert len(summary["history"]) == 4  # accuracy after each epoch
    from exporter.heads import backbone_fingerprint

    assert heads.config.meta["backbone_fingerprint"] == backbone_fingerprint(model)  # export checks it

    from training.card import write_card

    card = write_card(tmp_path / "heads", data, command="medusa-train medusa1 ...", machine="test box").read_text()
    assert "160 prompts" in card and "test box" in card and "medusa-train medusa1 ..." in card
    assert "1 residual block each" in card and "float32; loaded as float32" in card
    for k in range(3):  # the card's table is the run's held-out accuracy
        assert f"| {k + 1} | {summary['heldout_top1'][k]:.3f} | {summary['heldout_top5'][k]:.3f} |" in card
    assert card.count("| 4 | ") >= 1 and "--train-vocab full" in card


def test_medusa1_soft_targets_run_learns_the_backbones_distribution(tmp_path):
    """Trained with --soft-targets, the heads' cross-entropy against the backbone's own
    distribution for their tokens falls on the held-out split (what the option teaches)."""
    from exporter.heads import fresh_heads, load_heads
    from training.distill import write_atomic
    from training.medusa1 import Medusa1Config, load_split, projected_loss, teacher_rows, train_medusa1

    model = tiny_llama()
    with torch.no_grad():  # a confident backbone: a random one is near uniform, which a residual head cannot copy
        model.model.norm.weight.mul_(6.0)
    data = tmp_path / "d.jsonl"
    write_atomic(data, _records(160))
    cfg = Medusa1Config(
        model="tiny",
        data=data,
        out=tmp_path / "heads",
        num_heads=2,
        lr=1e-2,
        epochs=3,
        batch_tokens=128,
        soft_targets=True,
        train_vocab="full",
    )
    summary = train_medusa1(cfg, backbone=(model, None, tmp_path))
    assert "backbone's distribution" in summary["loss"] and summary["config"]["soft_targets"] == "True"

    held = load_split(Path(str(data) + ".hidden"), "heldout", num_heads=2)
    idx = np.arange(len(held.labels))
    rows, mask = teacher_rows(held, idx)
    h = torch.from_numpy(np.asarray(held.hidden[idx], dtype=np.float32))
    teacher = (
        torch.from_numpy(np.asarray(held.hidden[rows.ravel()], dtype=np.float32)).reshape(*rows.shape, -1),
        torch.from_numpy(mask),
    )
    labels, W = torch.from_numpy(held.labels), model.lm_head.weight.detach()
    with torch.inference_mode():
        before, _ = projected_loss(
            fresh_heads(2, 32, VOCAB, lm_head=model.lm_head).blocks(h), labels, W, teacher=teacher
        )
        after, _ = projected_loss(
            load_heads(tmp_path / "heads", hidden_size=32, vocab_size=VOCAB).blocks(h), labels, W, teacher=teacher
        )
    assert after < before - 0.1, (before, after)
    with pytest.raises(MedusaError, match="shared lm_head"):
        train_medusa1(
            Medusa1Config(model="tiny", data=data, out=tmp_path / "h2", shared_lm_head=False, soft_targets=True),
            backbone=(model, None, tmp_path),
        )


def test_medusa1_data_vocab_heads_propose_only_trained_tokens(tmp_path):
    """With --train-vocab data the saved heads carry the training targets' tokens as their draft
    vocabulary (and propose nothing else); --no-draft-vocab leaves them unrestricted; Medusa-2
    started from such heads drops the restriction (its loss is over the full vocabulary)."""
    from exporter.heads import load_heads
    from training.distill import write_atomic
    from training.medusa1 import Medusa1Config, load_split, train_medusa1

    model = tiny_llama()
    data = tmp_path / "d.jsonl"
    write_atomic(data, _records(60))
    base = dict(model="tiny", data=data, num_heads=2, lr=1e-2, epochs=1, batch_tokens=128, max_steps=3)
    summary = train_medusa1(Medusa1Config(out=tmp_path / "dv", **base), backbone=(model, None, tmp_path))
    train = load_split(Path(str(data) + ".hidden"), "train", num_heads=2)
    used = np.unique(train.labels[train.labels != -100])
    assert 0 < len(used) < VOCAB and summary["draft_vocab_size"] == len(used) == summary["train_vocab_size"]
    heads = load_heads(tmp_path / "dv", hidden_size=32, vocab_size=VOCAB)
    assert heads.draft_vocab.tolist() == used.tolist()
    with torch.inference_mode():
        top = heads(torch.randn(64, 32), model.lm_head).topk(3, dim=-1).indices
    assert np.isin(top.numpy(), used).all()
    from training.medusa1 import accuracy_any_and_draft, rank_accuracy, target_vocab

    assert target_vocab(train).tolist() == used.tolist()
    held = load_split(Path(str(data) + ".hidden"), "heldout", num_heads=2)
    any_acc, draft_acc = accuracy_any_and_draft(heads, model.lm_head, held, used)
    assert heads.draft_vocab.tolist() == used.tolist()  # left restricted
    np.testing.assert_allclose(draft_acc, rank_accuracy(heads, model.lm_head, held, max_rank=5))
    free = load_heads(tmp_path / "dv", hidden_size=32, vocab_size=VOCAB)
    free.set_draft_vocab(None)
    np.testing.assert_allclose(any_acc, rank_accuracy(free, model.lm_head, held, max_rank=5))
    from training.card import write_card

    card = write_card(tmp_path / "dv", data, command="medusa-train medusa1 ...", machine="test box").read_text()
    assert f"propose only the {len(used)} tokens of the training softmax" in card

    summary = train_medusa1(
        Medusa1Config(out=tmp_path / "any", draft_vocab=False, **base), backbone=(model, None, tmp_path)
    )
    assert summary["draft_vocab_size"] == 0
    assert load_heads(tmp_path / "any", hidden_size=32, vocab_size=VOCAB).draft_vocab is None

    from training.data import build_examples, split_examples
    from training.medusa2 import Medusa2Config, train_medusa2

    cfg = Medusa2Config(
        model="tiny",
        out=tmp_path / "m2",
        heads=str(tmp_path / "dv"),
        num_heads=2,
        steps=1,
        warmup_steps=1,
        batch_size=2,
    )
    train_medusa2(cfg, backbone=(tiny_llama(), None, tmp_path), examples=split_examples(build_examples(_records(40))))
    assert load_heads(tmp_path / "m2" / "heads", hidden_size=32, vocab_size=VOCAB).draft_vocab is None


def test_loading_a_split_reads_each_index_array_once(tmp_path, monkeypatch):
    """load_split and load_paths read the split's index arrays once, not once per example: an
    NpzFile decompresses a whole array on each access, which made loading 21,000 answers take
    longer than training on a GPU (the index reads grew with the square of the data)."""
    from training.data import build_examples, split_examples
    from training.medusa1 import build_cache, load_paths, load_split

    examples = split_examples(build_examples(_records(40)))
    build_cache(tiny_llama(), examples, tmp_path / "cache", dtype=np.float32, batch_size=8)
    reads = []
    getitem = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, key: reads.append(key) or getitem(self, key))
    split = load_split(tmp_path / "cache", "train", num_heads=3)
    paths = load_paths(tmp_path / "cache", "train", num_heads=3)
    assert split.num_examples == len(examples["train"]) > 20 and len(paths) == len(split.labels)
    assert len(reads) <= 2 * 6, f"{len(reads)} index reads for {split.num_examples} examples"


def test_init_heads_goes_on_training_trained_heads_and_keeps_their_draft_vocabulary(tmp_path):
    """--init-heads: training starts where the given heads are (on the same data, their held-out
    accuracy is the new run's "before"), their draft vocabulary stays proposable on new data that
    covers fewer tokens, and heads of another shape are refused before the hidden states are cached."""
    from exporter.heads import load_heads
    from training.distill import write_atomic
    from training.medusa1 import Medusa1Config, train_medusa1

    model = tiny_llama()
    data = tmp_path / "d.jsonl"
    write_atomic(data, _records(160))
    first = Medusa1Config(model="tiny", data=data, out=tmp_path / "a", num_heads=2, lr=1e-2, epochs=2,
                          batch_tokens=128)  # fmt: skip
    a = train_medusa1(first, backbone=(model, None, tmp_path))
    again = train_medusa1(dataclasses.replace(first, out=tmp_path / "a2", init_heads=tmp_path / "a", max_steps=1),
                          backbone=(model, None, tmp_path))  # fmt: skip
    assert again["heldout_top1_untrained"] == a["heldout_top1"] and again["init_heads"] == str(tmp_path / "a")
    trained = load_heads(tmp_path / "a", hidden_size=32, vocab_size=VOCAB)
    more = tmp_path / "more.jsonl"  # new answers whose targets are 3 tokens: a's draft vocabulary must stay
    write_atomic(more, [dict(r, response_ids=[5, 6, 7] * 8) for r in _records(160, seed=1)])
    cfg = dataclasses.replace(first, data=more, out=tmp_path / "b", init_heads=tmp_path / "a", epochs=1, lr=1e-3)
    train_medusa1(cfg, backbone=(model, None, tmp_path))
    tuned = load_heads(tmp_path / "b", hidden_size=32, vocab_size=VOCAB)
    assert trained.draft_vocab is not None and tuned.draft_vocab is not None
    assert len(trained.draft_vocab) > 3 and set(trained.draft_vocab.tolist()) <= set(tuned.draft_vocab.tolist())
    assert any(not torch.equal(x, y) for x, y in zip(tuned.parameters(), trained.parameters()))
    train_medusa1(dataclasses.replace(cfg, out=tmp_path / "any", draft_vocab=False, max_steps=1),
                  backbone=(model, None, tmp_path))  # fmt: skip
    assert load_heads(tmp_path / "any", hidden_size=32, vocab_size=VOCAB).draft_vocab is None  # --no-draft-vocab
    from training.card import write_card
    from training.data import sample_id

    mixed = tmp_path / "mixed.jsonl"  # greedy answers and two sampled ones a prompt (distill --samples 2)
    recs = _records(4)
    write_atomic(mixed, recs + [dict(r, id=sample_id(r["id"], k), temperature=0.7) for r in recs for k in (1, 2)])
    card = write_card(tmp_path / "a2", mixed, command="...", machine="test box").read_text()
    assert "answered the first 4 prompts (12 answers)" in card, card
    assert "temperature 0.0 (greedy) 4 times, temperature 0.7 8 times" in card
    assert f"went on from the heads in `{tmp_path / 'a'}`" in card and "| top-1 before this run |" in card
    for bad, words in (
        (dict(num_heads=3), "2 medusa heads of 1 block"),
        (dict(shared_lm_head=False), "drop --own-lm-head"),
        (dict(init_heads=tmp_path / "none"), "not found"),
    ):
        with pytest.raises(MedusaError, match=words):
            train_medusa1(dataclasses.replace(cfg, out=tmp_path / "c", cache=tmp_path / "c_cache", **bad),
                          backbone=(model, None, tmp_path))  # fmt: skip
        assert not (tmp_path / "c_cache").exists()
