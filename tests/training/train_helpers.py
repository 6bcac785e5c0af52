"""Shared by the training tests: a tiny random Llama (vocabulary 64), a character-level
chat tokenizer, and synthetic "distilled" records. Imported as a top-level module (pytest puts
this folder on sys.path; tests/README.md)."""

from __future__ import annotations

import numpy as np
import torch

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
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = EOS
    return model


def synthetic_records(n: int, seed: int = 0, resp_len: int = 24):
    """Synthetic 'distilled' records: each response counts up by 3 (a learnable pattern)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = [1] + rng.integers(3, VOCAB, 4 + i % 5).tolist() + [1]
        start = int(rng.integers(3, VOCAB))
        resp = [3 + (start - 3 + 3 * j) % (VOCAB - 3) for j in range(resp_len)]
        out.append({"id": f"r{i:04d}", "prompt_ids": prompt, "response_ids": resp, "model": "tiny", "temperature": 0.0})
    return out
