"""training/: self-distillation, Medusa-1, Medusa-2 and tree selection on tiny random Llamas."""

from __future__ import annotations

import json

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
