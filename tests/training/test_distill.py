"""training/distill.py: self-distillation on a tiny random Llama (resume, batching, kept hidden states)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import EOS, VOCAB, CharTokenizer, tiny_llama

from runtime.errors import MedusaError


@pytest.fixture
def prompts_file(tmp_path):
    rows = [
        {"instruction": f"question {i} " + "x" * (i % 4), "input": "ctx" if i % 3 == 0 else "", "output": "-"}
        for i in range(10)
    ]
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps(rows))
    return p


def _distill_cfg(tmp_path, prompts_file, **kw):
    from training.distill import DistillConfig

    return DistillConfig(
        model="tiny",
        prompts=prompts_file,
        out=tmp_path / "out" / "d.jsonl",
        num_prompts=10,
        max_new_tokens=6,
        batch_size=3,
        **kw,
    )


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


def test_sampled_distill_resumes_as_an_uninterrupted_run(tmp_path, prompts_file):
    """Sampled answers (torch path) come from each prompt's own seed: stopped after the first batch
    and resumed, the run writes what an uninterrupted one does, and another --seed writes others."""
    from training.distill import distill

    model, tok = tiny_llama(), CharTokenizer()
    cfg = _distill_cfg(tmp_path, prompts_file, temperature=1.0, seed=3)
    cfg.max_new_tokens = 12

    def interrupt(b, records):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(cfg, on_batch=interrupt, backbone=(model, tok))
    resumed = distill(cfg, backbone=(model, tok))
    whole = distill(dataclasses.replace(cfg, out=tmp_path / "whole.jsonl"), backbone=(model, tok))
    assert [r["response_ids"] for r in resumed] == [r["response_ids"] for r in whole]
    one_by_one = distill(dataclasses.replace(cfg, out=tmp_path / "b1.jsonl", batch_size=1), backbone=(model, tok))
    assert [r["response_ids"] for r in one_by_one] == [r["response_ids"] for r in whole]
    other = distill(dataclasses.replace(cfg, out=tmp_path / "seed4.jsonl", seed=4), backbone=(model, tok))
    assert [r["response_ids"] for r in other] != [r["response_ids"] for r in whole]


def test_distill_batched_matches_unbatched_greedy(tmp_path, prompts_file):
    """Left padding must not change the answers."""
    from training.distill import distill

    model, tok = tiny_llama(), CharTokenizer()
    a = distill(_distill_cfg(tmp_path, prompts_file), backbone=(model, tok))
    cfg = _distill_cfg(
        tmp_path,
        prompts_file,
    )
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
            ref = model.generate(
                torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=0
            )[0, len(p) :].tolist()
        if EOS in ref:
            ref = ref[: ref.index(EOS) + 1]
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
    from training.distill import distill, load_states, states_dir

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
    calls.clear()  # the same name, other weights (a fine-tune saved over the folder): its states are unused too
    from exporter.heads import backbone_fingerprint

    assert load_states(folder, records[1]["id"])[3] == backbone_fingerprint(model)
    m1.build_cache(model, examples, tmp_path / "retuned", batch_size=3, states=folder, model_name="tiny",
                   weights="0" * 16)  # fmt: skip
    assert sum(s[0] for s in calls) == sum(len(v) for v in examples.values()), "other weights' states are unused"
    # medusa-train medusa1's cache: new weights saved over the same folder rebuild it, without their old states
    calls.clear()
    m1.prepare_cache(model, "same-folder", cfg.out, tmp_path / "cache", 64, model_name="tiny")
    assert [s[0] for s in calls] == [1], "the kept states of these weights fill the cache (but the one removed)"
    calls.clear()
    m1.prepare_cache(model, "same-folder", cfg.out, tmp_path / "cache", 64, model_name="tiny")
    assert calls == [], "the same weights reuse the cache"
    retuned = tiny_llama()
    with torch.no_grad():
        for p in retuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m1.prepare_cache(retuned, "same-folder", cfg.out, tmp_path / "cache", 64, model_name="tiny")
    assert sum(s[0] for s in calls) == sum(len(v) for v in examples.values()), "new weights: rebuilt, no old states"
    # a rerun whose answer differs under the same id (its output deleted, the states left beside it): the
    # kept states are of another text, recomputed; the same tokens, or a prefix of them, still match
    calls.clear()
    e = next(x for x in examples["train"] if x.id != records[0]["id"])
    other = e.tokens.copy()
    other[e.response_start] = (other[e.response_start] + 1) % VOCAB
    assert load_states(folder, e.id, other) is None and load_states(folder, e.id, e.tokens[:-2]) is not None
    rerun = {k: [dataclasses.replace(x, tokens=other) if x is e else x for x in v] for k, v in examples.items()}
    m1.build_cache(model, rerun, tmp_path / "rerun", batch_size=3, states=folder, model_name="tiny")
    assert sum(s[0] for s in calls) == 2, "only the example whose tokens changed (and the one removed above) ran"
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


def _prompts(path: Path, word: str) -> Path:
    path.write_text(json.dumps([{"instruction": f"{word} {i}", "input": "", "output": "-"} for i in range(6)]))
    return path


def test_resume_with_another_prompts_file_is_refused(tmp_path):
    """Issue 15, 6 (distillation resume): a .partial file made from other prompts is not resumed."""
    from training.distill import DistillConfig, distill

    model, tok = tiny_llama(), CharTokenizer()
    a, b = _prompts(tmp_path / "a.json", "question"), _prompts(tmp_path / "b.json", "other")
    cfg = DistillConfig(
        model="tiny",
        prompts=a,
        out=tmp_path / "d.jsonl",
        num_prompts=6,
        max_new_tokens=3,
        batch_size=2,
        save_states=False,
    )

    def stop(b_, recs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(cfg, on_batch=stop, backbone=(model, tok))
    cfg.prompts = b
    with pytest.raises(MedusaError, match=r"prompts_sha256=.*another --prompts file"):
        distill(cfg, backbone=(model, tok))
    # records written before the key existed: the prompt itself is compared
    partial = tmp_path / "d.jsonl.partial"
    recs = [json.loads(line) for line in partial.read_text().splitlines()]
    partial.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "prompts_sha256"}) + "\n" for r in recs))
    with pytest.raises(MedusaError, match="record alpaca-00000 was made from another prompt"):
        distill(cfg, backbone=(model, tok))
    cfg.prompts = a  # the same file resumes, and the records carry the key
    records = distill(cfg, backbone=(model, tok))
    assert len(records) == 6 and all(r["messages"][0]["content"] == f"question {i}" for i, r in enumerate(records))


class ThinkingCharTokenizer(CharTokenizer):
    """CharTokenizer whose template, as Qwen3's, takes ``enable_thinking``: False closes an empty reasoning
    block at the end of the prompt (here: token 4 twice)."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kw):
        ids = super().apply_chat_template(messages, add_generation_prompt, tokenize, return_dict)
        return ids + [4, 4] if kw.get("enable_thinking") is False else ids


def test_chat_template_kwargs_shape_the_prompts_and_a_resume_must_ask_for_the_same(tmp_path, prompts_file):
    from runtime.errors import ConfigError
    from training.distill import distill

    model, tok = tiny_llama(), ThinkingCharTokenizer()
    off = {"enable_thinking": False}
    cfg = _distill_cfg(tmp_path, prompts_file, chat_template_kwargs=off, save_states=False)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, on_batch=lambda b, r: (_ for _ in ()).throw(KeyboardInterrupt), backbone=(model, tok))
    # resumed without the variables: the kept records' prompts are not this run's
    plain = dataclasses.replace(cfg, chat_template_kwargs=None)
    with pytest.raises(MedusaError, match="made from another prompt"):
        distill(plain, backbone=(model, tok))
    records = distill(cfg, backbone=(model, tok))
    for r in records:
        assert r["prompt_ids"] == tok.apply_chat_template(r["messages"], enable_thinking=False)
        assert r["prompt_ids"][-2:] == [4, 4] and r["chat_template_kwargs"] == off
    for bad, words in (({"messages": 1}, "set by the call itself"), ({"x-y": 1}, "not a template variable name")):
        with pytest.raises(ConfigError, match=words):
            distill(dataclasses.replace(cfg, chat_template_kwargs=bad), backbone=(model, tok))


def test_medusa_train_distill_reads_the_variables_as_json(capsys):
    from training.cli import build_parser, distill_config

    a = build_parser().parse_args(["distill", "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert distill_config(a).chat_template_kwargs == {"enable_thinking": False}
    assert distill_config(build_parser().parse_args(["distill"])).chat_template_kwargs is None
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["distill", "--chat-template-kwargs", "[1]"])
    assert exit_.value.code == 2 and "a JSON object is needed, got a list" in capsys.readouterr().err


def test_several_sampled_answers_per_prompt_share_its_split(tmp_path, prompts_file):
    """--samples N: records ID@1 .. ID@N, each its own seed (so its own answer), every one in the
    prompt's split (the held-out prompts stay unseen); greedy answers cannot be sampled twice."""
    from training.data import split_of
    from training.distill import distill

    model, tok = tiny_llama(), CharTokenizer()
    cfg = _distill_cfg(tmp_path, prompts_file, temperature=1.0, seed=3, samples=3)
    cfg.max_new_tokens, cfg.num_prompts = 12, 4
    records = distill(cfg, backbone=(model, tok))
    assert [r["id"] for r in records] == [f"alpaca-{i:05d}@{k}" for i in range(4) for k in (1, 2, 3)]
    for i in range(4):
        answers = [r["response_ids"] for r in records[3 * i : 3 * i + 3]]
        assert len({tuple(a) for a in answers}) > 1, f"prompt {i}: its samples share one seed"
        assert {r["messages"][0]["content"] for r in records[3 * i : 3 * i + 3]} == {
            records[3 * i]["messages"][0]["content"]
        }
    ids = [f"alpaca-{i:05d}" for i in range(400)]
    assert {split_of(f"{pid}@2") for pid in ids if split_of(pid) == "heldout"} == {"heldout"}
    assert {split_of(pid) for pid in ids} == {"train", "heldout", "calib"}
    with pytest.raises(MedusaError, match="--samples 3 needs --temperature > 0"):
        distill(dataclasses.replace(cfg, temperature=0.0, out=tmp_path / "g.jsonl"), backbone=(model, tok))


def test_a_device_torch_cannot_use_is_one_line_before_any_work(tmp_path, prompts_file):
    """--device names where torch runs; a device that is not there (CUDA on a CPU build) or not a
    device is a ConfigError naming the flag, before anything is written."""
    from runtime.errors import ConfigError
    from training.distill import distill
    from training.files import torch_device

    assert torch_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: this torch .* sees no CUDA GPU"):
            torch_device("cuda")
    with pytest.raises(ConfigError, match="--device 'gpu0' is not a torch device"):
        torch_device("gpu0")
    with pytest.raises(ConfigError, match="runs on cpu, cuda or mps, not meta"):
        torch_device("meta")
    model, tok = tiny_llama(), CharTokenizer()
    cfg = _distill_cfg(tmp_path, prompts_file, device="gpu0")
    with pytest.raises(ConfigError, match="--device 'gpu0'"):
        distill(cfg, backbone=(model, tok))
    assert not cfg.out.exists() and not cfg.out.with_name(cfg.out.name + ".partial").exists()
