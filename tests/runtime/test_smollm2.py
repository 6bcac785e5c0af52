"""The real default backbone: greedy Medusa on SmolLM2-135M-Instruct equals Hugging Face generate.

Slow (the model runs on CPU): ``python -m pytest -q -m slow tests/runtime/test_smollm2.py``.
Fresh heads (every block the identity) mostly guess wrong, so nearly every node of each
tree is verified and rejected: the hard case for losslessness.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

NEW_TOKENS = 48  # the Hugging Face reference
NUM_PROMPTS = 3
# new tokens per tree: fresh heads make nearly every step a full-tree forward, and a
# 64-node forward of SmolLM2 costs ~0.5 s on one CPU core, so the big tree checks a prefix
TREES = {"mc_sim_7b_63": 32, "cpu_8": NEW_TOKENS}


@pytest.fixture(scope="module")
def smollm2(shared_data):
    """(model, prompts as token ids, HF greedy continuations), loaded once for the module."""
    torch = pytest.importorskip("torch")
    from exporter.models import load_backbone

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: more threads only oversubscribe its 2 cores
    model, tokenizer, _ = load_backbone("smollm2-135m")
    questions = [json.loads(line) for line in (shared_data / "mt_bench_question.jsonl").read_text().splitlines()]
    prompts, refs = [], []
    for q in questions[:NUM_PROMPTS]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            t = torch.tensor([ids])
            out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=NEW_TOKENS, do_sample=False)
        prompts.append(ids)
        refs.append(out[0, len(ids) :].tolist())
    yield model, tokenizer, prompts, refs
    torch.set_num_threads(threads)


def test_the_model_is_the_real_one(smollm2):
    model, tokenizer, prompts, refs = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (30, 576, 49152)
    assert (c.num_attention_heads, c.num_key_value_heads) == (9, 3)
    # the converted weights speak English: the answer to the travel-blog prompt mentions Hawaii-ish words
    text = tokenizer.decode(refs[0])
    assert len(refs[0]) == NEW_TOKENS and len(set(refs[0])) > 20, text
    assert any(w in text for w in ("Hawaii", "Oahu", "Maui", "island", "Aloha")), text


@pytest.mark.parametrize("prompt_index", range(NUM_PROMPTS))
@pytest.mark.parametrize("tree", TREES)
def test_greedy_medusa_equals_hf(smollm2, tree, prompt_index):
    from exporter.heads import fresh_heads
    from exporter.torch_backend import TorchBackend
    from runtime.decode import DecodeConfig, decode
    from runtime.tree import load_tree

    model, tokenizer, prompts, refs = smollm2
    c = model.config
    backend = TorchBackend(model, fresh_heads(4, c.hidden_size, c.vocab_size))
    n = TREES[tree]
    cfg = DecodeConfig(max_new_tokens=n, eos_token_ids=backend.spec.eos_token_ids)
    res = decode(backend, prompts[prompt_index], cfg, load_tree(tree, num_heads=4))
    ref = refs[prompt_index][:n]
    assert res.tokens == ref, (
        f"diverges at token {next(i for i, (a, b) in enumerate(zip(res.tokens + [-1], ref + [-2])) if a != b)}:\n"
        f"medusa: {tokenizer.decode(res.tokens)!r}\nhf:     {tokenizer.decode(ref)!r}"
    )
    assert sum(res.stats.accept_hist.values()) == res.stats.steps
