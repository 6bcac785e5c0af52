"""training/: self-distillation, Medusa-1, Medusa-2 and tree selection on tiny random Llamas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.errors import MedusaError

VOCAB = 64
EOS = 2


class CharTokenizer:
    """Just enough tokenizer for distill(): a chat template over characters."""

    pad_token_id = 0
    eos_token_id = EOS

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False):
        text = "".join(m["content"] for m in messages)
        return [1] + [3 + ord(c) % (VOCAB - 3) for c in text] + [1]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(48 + t % 40) for t in ids if not (skip_special_tokens and t < 3))


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)  # tiny models gain nothing from threads; the machine is shared
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=True,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = EOS
    return model


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"instruction": f"question {i} " + "x" * (i % 4), "input": "ctx" if i % 3 == 0 else "", "output": "-"}
            for i in range(10)]
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps(rows))
    return p


# ---------------------------------------------------------------------------- distill


def _distill_cfg(tmp_path, prompts_file, **kw):
    from training.distill import DistillConfig

    return DistillConfig(model="tiny", prompts=prompts_file, out=tmp_path / "out" / "d.jsonl", num_prompts=10,
                         max_new_tokens=6, batch_size=3, **kw)


def test_distill_resume_no_lost_or_duplicated_records(tmp_path, prompts_file):
    from training.distill import distill, read_records

    model, tok = tiny_llama(), CharTokenizer()
    cfg = _distill_cfg(tmp_path, prompts_file)
    partial = cfg.out.with_name(cfg.out.name + ".partial")

    def interrupt(b, records):
        raise KeyboardInterrupt  # killed after the first batch is on disk

    with pytest.raises(KeyboardInterrupt):
        distill(cfg, on_batch=interrupt, backbone=(model, tok))
    assert not cfg.out.exists(), "the final file must not exist before the run completes"
    first = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [r["id"] for r in first] == ["alpaca-00000", "alpaca-00001", "alpaca-00002"]
    with open(partial, "a") as f:  # a torn line from a kill mid-write
        f.write('{"id": "alpaca-00003", "prom')

    generated = []
    records = distill(cfg, on_batch=lambda b, recs: generated.extend(r["id"] for r in recs), backbone=(model, tok))
    assert "alpaca-00000" not in generated and "alpaca-00003" in generated  # skipped vs redone
    assert len(generated) == 7
    assert not partial.exists() and not cfg.out.with_name(cfg.out.name + ".tmp").exists()
    on_disk = read_records(cfg.out)
    assert [r["id"] for r in on_disk] == [f"alpaca-{i:05d}" for i in range(10)]
    assert on_disk == records

    # the same as an uninterrupted run (greedy is deterministic)
    cfg2 = _distill_cfg(tmp_path, prompts_file)
    cfg2.out = tmp_path / "other.jsonl"
    fresh = distill(cfg2, backbone=(model, tok))
    assert [r["response_ids"] for r in fresh] == [r["response_ids"] for r in on_disk]
    r = on_disk[0]
    assert r["messages"] == [{"role": "user", "content": "question 0\n\nctx"}]
    assert r["prompt_ids"] == tok.apply_chat_template(r["messages"])
    assert 1 <= len(r["response_ids"]) <= 6
    assert (r["finish"] == "eos") == (r["response_ids"][-1] == EOS)


def test_distill_batched_matches_unbatched_greedy(tmp_path, prompts_file):
    """Left padding must not change the answers."""
    from training.distill import distill

    model, tok = tiny_llama(), CharTokenizer()
    a = distill(_distill_cfg(tmp_path, prompts_file), backbone=(model, tok))
    cfg = _distill_cfg(tmp_path, prompts_file, )
    cfg.batch_size, cfg.out = 1, tmp_path / "b1.jsonl"
    b = distill(cfg, backbone=(model, tok))
    assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b]


def test_generate_batch_matches_hf_generate():
    """The early-exit batched loop gives HF generate's greedy answers, EOS included."""
    from training.distill import DistillConfig, generate_batch

    model, tok = tiny_llama(), CharTokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in ("a", "hello there", "xyz q")]
    got = generate_batch(model, prompts, 0, [EOS], DistillConfig(max_new_tokens=12))
    for p, (resp, finish) in zip(prompts, got):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=EOS,
                                 pad_token_id=0)[0, len(p):].tolist()
        if EOS in ref:
            ref = ref[:ref.index(EOS) + 1]
        assert resp == ref
        assert finish == ("eos" if resp[-1] == EOS else "length")


def test_distill_extends_a_finished_file_without_redoing_it(tmp_path, prompts_file):
    from training.distill import distill, read_records

    model, tok = tiny_llama(), CharTokenizer()
    cfg = _distill_cfg(tmp_path, prompts_file)
    cfg.num_prompts = 4
    first = distill(cfg, backbone=(model, tok))
    cfg.num_prompts = 10
    generated = []
    records = distill(cfg, on_batch=lambda b, recs: generated.extend(r["id"] for r in recs), backbone=(model, tok))
    assert generated == [f"alpaca-{i:05d}" for i in range(4, 10)]
    assert records[:4] == first and read_records(cfg.out) == records
    cfg.num_prompts = 3  # fewer than the file holds: nothing is redone, nothing dropped
    generated.clear()
    assert distill(cfg, on_batch=lambda b, recs: generated.extend(recs), backbone=(model, tok)) == records
    assert generated == [] and read_records(cfg.out) == records


def test_states_kept_by_distill_replace_the_backbone_pass(tmp_path, prompts_file, monkeypatch):
    """The hidden states kept during batched, left-padded generation equal a fresh causal
    forward over prompt + answer, and the cache copies them instead of running the backbone."""
    import training.medusa1 as m1
    from training.data import build_examples, split_examples
    from training.distill import distill, states_dir

    model, tok = tiny_llama(), CharTokenizer()
    cfg = _distill_cfg(tmp_path, prompts_file)
    cfg.max_new_tokens = 9
    records = distill(cfg, backbone=(model, tok))
    folder = states_dir(cfg.out)
    assert sorted(f.name for f in folder.iterdir()) == [f"{r['id']}.npz" for r in records]
    examples = split_examples(build_examples(records))
    calls = []
    real = m1.last_hidden
    monkeypatch.setattr(m1, "last_hidden", lambda mdl, ids: calls.append(ids.shape) or real(mdl, ids))

    m1.build_cache(model, examples, tmp_path / "ref", dtype=np.float32, batch_size=3)
    assert calls, "the reference cache runs the backbone"
    calls.clear()
    m1.build_cache(model, examples, tmp_path / "kept", batch_size=3, states=folder, model_name="tiny")
    assert calls == [], "every example had kept states: the backbone must not run"
    meta = json.loads((tmp_path / "kept" / "cache.json").read_text())
    assert (meta["from_states"], meta["computed"]) == (sum(len(v) for v in examples.values()), 0)
    (folder / f"{records[0]['id']}.npz").unlink()  # one missing: only that one is recomputed
    m1.build_cache(model, examples, tmp_path / "mixed", batch_size=3, states=folder, model_name="tiny")
    assert [s[0] for s in calls] == [1]
    calls.clear()
    m1.build_cache(model, examples, tmp_path / "other", batch_size=3, states=folder, model_name="another-model")
    assert sum(s[0] for s in calls) == sum(len(v) for v in examples.values()), "another model's states are unused"
    for split in ("train", "heldout", "calib"):
        ref = np.asarray(m1.load_split(tmp_path / "ref", split, 2).hidden, dtype=np.float32)
        for name in ("kept", "mixed"):
            got = np.asarray(m1.load_split(tmp_path / name, split, 2).hidden, dtype=np.float32)
            assert got.shape == ref.shape
            np.testing.assert_allclose(got, ref, atol=2e-2, rtol=1e-2)


def test_distill_refuses_mt_bench_and_mismatched_resume(tmp_path, prompts_file):
    from training.distill import distill, load_prompts

    mt = tmp_path / "mt_bench_question.json"
    mt.write_text("[]")
    with pytest.raises(MedusaError, match="MT-Bench"):
        load_prompts(mt)
    model, tok = tiny_llama(), CharTokenizer()
    cfg = _distill_cfg(tmp_path, prompts_file)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, on_batch=lambda b, r: (_ for _ in ()).throw(KeyboardInterrupt), backbone=(model, tok))
    cfg.temperature = 0.7
    with pytest.raises(MedusaError, match="temperature"):
        distill(cfg, backbone=(model, tok))


# ---------------------------------------------------------------------------- targets and loss


def test_head_label_offset_only_assistant_tokens():
    from training.data import IGNORE, head_labels, next_token_labels

    tokens = np.arange(10, 20)
    assistant = np.arange(10) >= 5  # prompt 0..4, response 5..9
    lab = head_labels(tokens, assistant, np.arange(10), num_heads=3)
    for t in range(10):
        for k in range(3):
            target = t + k + 2  # head k at t predicts t+k+2 (the backbone predicts t+1)
            want = tokens[target] if 5 <= target < 10 else IGNORE
            assert lab[t, k] == want, (t, k)
    assert lab[3, 0] == 15 and lab[2, 0] == IGNORE and lab[2, 1] == 15 and lab[7, 0] == 19 and lab[8, 0] == IGNORE
    nt = next_token_labels(tokens, assistant)
    assert nt[4] == 15 and nt[3] == IGNORE and nt[9] == IGNORE


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
    ce = [F.cross_entropy((blocks[:, k] @ W.T)[labels[:, k] != IGNORE], labels[labels[:, k] != IGNORE, k]) for k in range(3)]
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
    records = [{"id": f"g{i}", "prompt_ids": [1] + rng.integers(3, VOCAB, 5 + i % 4).tolist(),
                "response_ids": rng.integers(3, VOCAB, 10 + i % 7).tolist()} for i in range(12)]
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


def _records(n: int, seed: int = 0, resp_len: int = 24):
    """Synthetic 'distilled' records: each response counts up by 3 (a learnable pattern)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = [1] + rng.integers(3, VOCAB, 4 + i % 5).tolist() + [1]
        start = int(rng.integers(3, VOCAB))
        resp = [3 + (start - 3 + 3 * j) % (VOCAB - 3) for j in range(resp_len)]
        out.append({"id": f"r{i:04d}", "prompt_ids": prompt, "response_ids": resp, "model": "tiny", "temperature": 0.0})
    return out


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
                _, hidden, *_ = step(torch.from_numpy(e.tokens)[None], torch.arange(n)[None],
                                     torch.tril(torch.ones(n, n, dtype=torch.bool))[None], *past)
            a, b = cached_positions(e)
            np.testing.assert_allclose(np.asarray(cached.hidden[row:row + b - a], dtype=np.float32),
                                       hidden[0, a:b].numpy(), atol=atol, rtol=1e-2)
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
    cfg = Medusa1Config(model="tiny", data=data, out=tmp_path / "heads", num_heads=3, lr=1e-2, epochs=4,
                        batch_tokens=128, train_vocab="full")
    summary = train_medusa1(cfg, backbone=(model, None, tmp_path))
    assert summary["heldout_examples"] > 0 and summary["steps"] > 0
    for k in range(3):
        assert summary["heldout_top1"][k] > summary["heldout_top1_untrained"][k] + 0.2, summary
    heads = load_heads(tmp_path / "heads", hidden_size=32, vocab_size=VOCAB)
    assert heads.config.num_heads == 3 and heads.config.meta["heldout_top1"] == summary["heldout_top1"]
    assert len(summary["history"]) == 4  # accuracy after each epoch

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
    cfg = Medusa1Config(model="tiny", data=data, out=tmp_path / "heads", num_heads=2, lr=1e-2, epochs=3,
                        batch_tokens=128, soft_targets=True, train_vocab="full")
    summary = train_medusa1(cfg, backbone=(model, None, tmp_path))
    assert "backbone's distribution" in summary["loss"] and summary["config"]["soft_targets"] == "True"

    held = load_split(Path(str(data) + ".hidden"), "heldout", num_heads=2)
    idx = np.arange(len(held.labels))
    rows, mask = teacher_rows(held, idx)
    h = torch.from_numpy(np.asarray(held.hidden[idx], dtype=np.float32))
    teacher = (torch.from_numpy(np.asarray(held.hidden[rows.ravel()], dtype=np.float32)).reshape(*rows.shape, -1),
               torch.from_numpy(mask))
    labels, W = torch.from_numpy(held.labels), model.lm_head.weight.detach()
    with torch.inference_mode():
        before, _ = projected_loss(fresh_heads(2, 32, VOCAB, lm_head=model.lm_head).blocks(h), labels, W, teacher=teacher)
        after, _ = projected_loss(load_heads(tmp_path / "heads", hidden_size=32, vocab_size=VOCAB).blocks(h),
                                  labels, W, teacher=teacher)
    assert after < before - 0.1, (before, after)
    with pytest.raises(MedusaError, match="shared lm_head"):
        train_medusa1(Medusa1Config(model="tiny", data=data, out=tmp_path / "h2", shared_lm_head=False,
                                    soft_targets=True), backbone=(model, None, tmp_path))


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

    summary = train_medusa1(Medusa1Config(out=tmp_path / "any", draft_vocab=False, **base), backbone=(model, None, tmp_path))
    assert summary["draft_vocab_size"] == 0
    assert load_heads(tmp_path / "any", hidden_size=32, vocab_size=VOCAB).draft_vocab is None

    from training.data import build_examples, split_examples
    from training.medusa2 import Medusa2Config, train_medusa2

    cfg = Medusa2Config(model="tiny", out=tmp_path / "m2", heads=str(tmp_path / "dv"), num_heads=2, steps=1,
                        warmup_steps=1, batch_size=2)
    train_medusa2(cfg, backbone=(tiny_llama(), None, tmp_path), examples=split_examples(build_examples(_records(40))))
    assert load_heads(tmp_path / "m2" / "heads", hidden_size=32, vocab_size=VOCAB).draft_vocab is None


# ---------------------------------------------------------------------------- Medusa-2


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
        cfg = Medusa2Config(model="tiny", out=tmp_path / f"m2_{steps}_{warmup}", num_heads=3, steps=steps,
                            warmup_steps=warmup, batch_size=2, lr_backbone=1e-3, lr_heads=1e-2)
        summary = train_medusa2(cfg, backbone=(model, None, tmp_path), examples=examples)
        return model, summary

    before = tiny_llama().state_dict()
    model, summary = run(steps=3, warmup=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "warm-up must leave the backbone untouched"
    assert summary["greedy_identical_share"] == 1.0 and summary["drift_prompts"] > 0  # untouched: same answers
    from exporter.heads import load_heads

    heads = load_heads(tmp_path / "m2_3_3" / "heads", hidden_size=32, vocab_size=VOCAB)
    assert any(v.abs().sum() > 0 for v in heads.state_dict().values()), "the heads must have trained"
    # fresh start heads are the identity blocks: the start accuracy is lm_head's, the run's own meta only
    assert summary["start_heads"] == "fresh" and len(summary["heldout_top1_start"]) == 3
    assert heads.config.meta["method"].startswith("medusa-2")
    # started from Medusa-1 heads: their meta (epochs, history) does not leak into the new heads' meta
    from exporter.heads import fresh_heads, save_heads

    save_heads(fresh_heads(3, 32, VOCAB), tmp_path / "m1", meta={"method": "medusa-1", "history": [1], "epochs": 9})
    cfg = Medusa2Config(model="tiny", out=tmp_path / "m2_from_m1", heads=str(tmp_path / "m1"), num_heads=3, steps=1,
                        warmup_steps=1, batch_size=2)
    s2 = train_medusa2(cfg, backbone=(tiny_llama(), None, tmp_path), examples=examples)
    meta = load_heads(tmp_path / "m2_from_m1" / "heads", hidden_size=32, vocab_size=VOCAB).config.meta
    assert s2["start_heads_method"] == "medusa-1" and meta["start_heads"] == str(tmp_path / "m1")
    assert "history" not in meta and "epochs" not in meta and meta["method"].startswith("medusa-2")
    model, _ = run(steps=4, warmup=2)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "after warm-up the backbone trains"
    assert (tmp_path / "m2_4_2" / "backbone" / "config.json").is_file()


# ---------------------------------------------------------------------------- tree selection


def test_tree_is_a_chain_when_only_rank_0_is_ever_right():
    from training.select_tree import select

    acc = np.zeros((4, 10))
    acc[:, 0] = [0.6, 0.4, 0.3, 0.2]
    flat = {1: 1.0, 64: 1.0}  # verification is free: take every useful node
    chosen = select(acc, flat)
    assert chosen["paths"] == [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]
    want = 1 + 0.6 + 0.6 * 0.4 + 0.6 * 0.4 * 0.3 + 0.6 * 0.4 * 0.3 * 0.2
    assert chosen["predicted_accepted_length"] == pytest.approx(want)


def test_tree_widens_when_ranks_spread_and_shrinks_when_verification_costs():
    from training.select_tree import select

    acc = np.zeros((3, 10))
    acc[0, :5] = [0.3, 0.15, 0.1, 0.08, 0.05]
    acc[1, :5] = [0.2, 0.1, 0.08, 0.05, 0.04]
    acc[2, :5] = [0.15, 0.08, 0.05, 0.04, 0.03]
    flat = select(acc, {1: 1.0, 64: 1.0}, max_nodes=20)
    assert len(flat["paths"]) == 20
    assert {p[0] for p in flat["paths"] if len(p) == 1} >= {0, 1, 2, 3}  # several ranks of head 1
    steep = select(acc, {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.8, 16: 2.8, 64: 8.0}, max_nodes=20)
    assert 1 <= len(steep["paths"]) < 20
    # the objective picked is the best over all sizes
    assert steep["predicted_speedup_vs_plain"] == pytest.approx(max(s["speedup"] for s in steep["by_size"]), abs=1e-4)


def test_acceptance_bound_is_the_complete_tree():
    """The bound equals the greedy builder's expected length once every node of every rank is
    in the tree (3 + 9 nodes for 2 heads x 3 ranks), and no smaller tree exceeds it."""
    from training.select_tree import acceptance_bound, select

    acc = np.array([[0.5, 0.2, 0.1], [0.3, 0.25, 0.05]])
    full = select(acc, {1: 1.0, 64: 1.0}, max_nodes=100)
    assert len(full["paths"]) == 12
    assert full["predicted_accepted_length"] == pytest.approx(acceptance_bound(acc))
    assert acceptance_bound(acc) == pytest.approx(1 + 0.8 + 0.8 * 0.6)
    assert full["acceptance_bound"] == pytest.approx(acceptance_bound(acc))
    assert all(s["accepted"] <= acceptance_bound(acc) + 1e-9 for s in full["by_size"])
    assert select(acc, {1: 1.0, 2: 1.5, 64: 20.0})["acceptance_bound"] == pytest.approx(acceptance_bound(acc))


def test_heads_cost_enters_the_step_time():
    """A costly heads call makes every Medusa step dearer: the predicted speedup drops by
    exactly that share, and a tree that gains too little is no longer worth it."""
    from training.select_tree import select

    acc = np.zeros((2, 4))
    acc[0, :2] = [0.3, 0.1]
    acc[1, :2] = [0.2, 0.05]
    prof = {1: 1.0, 2: 1.0, 4: 1.2, 8: 1.5}
    free = select(acc, prof, max_nodes=6)
    paid = select(acc, prof, max_nodes=6, heads_cost=0.2)
    n = len(paid["paths"])
    assert paid["relative_step_cost"] == pytest.approx(np.interp(n + 1, [1, 2, 4, 8], [1.0, 1.0, 1.2, 1.5]) + 0.2)
    assert paid["predicted_speedup_vs_plain"] == pytest.approx(paid["predicted_accepted_length"] / paid["relative_step_cost"])
    assert paid["predicted_speedup_vs_plain"] < free["predicted_speedup_vs_plain"]
    assert select(acc, prof, max_nodes=6, heads_cost=0.0)["by_size"] == free["by_size"]
    with pytest.raises(MedusaError, match="heads cost"):
        select(acc, prof, heads_cost=-0.1)


def test_written_tree_loads_in_the_runtime(tmp_path):
    from runtime.tree import load_tree
    from training.select_tree import select, write_tree

    acc = np.zeros((2, 10))
    acc[0, :3] = [0.5, 0.2, 0.1]
    acc[1, :3] = [0.4, 0.2, 0.1]
    prof = {"backend": "test", "relative_cost": {"1": 1.0, "8": 1.2, "64": 3.0}}
    chosen = select(acc, {1: 1.0, 8: 1.2, 64: 3.0})
    path = write_tree(tmp_path, "t", chosen, acc, prof, source="test")
    doc = json.loads(path.read_text())
    assert {"name", "paths", "source", "description", "predicted_accepted_length", "cost_profile"} <= doc.keys()
    assert doc["acceptance_bound_any_tree"] == pytest.approx(1 + 0.8 + 0.8 * 0.7, abs=1e-4)
    tree = load_tree(path, num_heads=2)
    assert tree.num_nodes == len(chosen["paths"]) + 1


def test_cost_profile_is_read_and_interpolated(tmp_path):
    from training.select_tree import interpolate_cost, read_profile

    p = tmp_path / "prof.json"
    p.write_text(json.dumps({"backend": "onnxruntime-cpu", "relative_cost": {"1": 1.0, "4": 1.6, "8": 2.0}}))
    backend, prof = read_profile(p)
    assert backend == "onnxruntime-cpu"
    assert interpolate_cost(prof, 6) == pytest.approx(1.8)
    assert interpolate_cost(prof, 12) == pytest.approx(2.4)  # extrapolated from the last two sizes
    p.write_text(json.dumps({"backend": "x"}))
    with pytest.raises(MedusaError, match="relative_cost"):
        read_profile(p)


def test_measured_cost_profile_grows_with_tokens():
    from training.select_tree import measure_cost_profile

    prof = measure_cost_profile(tiny_llama(), sizes=(1, 8, 64), past=16, repeats=3)
    rel = [prof["relative_cost"][k] for k in ("1", "8", "64")]
    assert rel[0] == 1.0 and rel == sorted(rel)  # never cheaper to verify more tokens
    assert all(s > 0 for s in prof["seconds"].values()) and prof["past"] == 16


def test_select_tree_writes_outside_the_source_tree_and_never_over_a_file(tmp_path, repo_root, capsys, monkeypatch):
    """select-tree's default output folder is runs/trees (git-ignored), not tree_configs/; an existing
    tree file is replaced only with --force."""
    from training.cli import main
    from training.select_tree import SelectConfig

    assert SelectConfig().out_dir == Path("runs/trees")
    monkeypatch.chdir(tmp_path)
    argv = ["select-tree", "--accuracy-from", str(repo_root / "tree_configs" / "smollm2_ort_cpu.json"),
            "--profile", str(repo_root / "docs" / "results" / "latency_profile.json"), "--name", "t"]
    assert main(argv) == 0
    out = tmp_path / "runs" / "trees" / "t.json"
    first = out.read_text()
    out.write_text(first + " ")  # an edit the next run must not silently undo
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "t.json exists: pass --force" in err and out.read_text() == first + " "
    assert main([*argv, "--force"]) == 0 and out.read_text() == first


# ---------------------------------------------------------------------------- CLI


def test_cli_user_error_exits_1_with_one_message(tmp_path, capsys):
    from training.cli import main
    from training.distill import write_atomic

    rc = main(["medusa1", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 1 and "missing.jsonl does not exist" in capsys.readouterr().err
    write_atomic(tmp_path / "d.jsonl", _records(2))
    rc = main(["medusa1", "--model", str(tmp_path / "no_model"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("medusa-train: error:") and "Traceback" not in err
    assert "no_model" in err


def test_medusa1_refuses_data_without_held_out_examples(tmp_path, capsys):
    """Too few records for a held-out split: one clear line before any work, not a 0.000 accuracy
    table for an empty held-out set."""
    from training.cli import main
    from training.data import split_of
    from training.distill import write_atomic
    from training.medusa1 import Medusa1Config, train_medusa1

    records = [r for r in _records(40) if split_of(r["id"]) == "train"][:12]
    write_atomic(tmp_path / "d.jsonl", records)
    model_dir = tmp_path / "model"  # the model is checked first; it is never loaded here
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    rc = main(["medusa1", "--model", str(model_dir), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "too little data" in err and "12 records give 12 training and 0 held-out examples" in err
    assert "medusa-train distill --num-prompts" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(MedusaError, match="0 held-out examples"):
        train_medusa1(Medusa1Config(model="tiny", data=tmp_path / "d.jsonl", out=tmp_path / "o"),
                      backbone=(tiny_llama(), None, tmp_path))
