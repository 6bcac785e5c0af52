"""Self-distillation: the backbone answers Alpaca prompts; its answers become the heads' data.

Medusa heads learn to predict what the *backbone* will say, so the best training data is
the backbone's own output (Medusa paper, Sec. 3.2.3). Greedy answers (temperature 0)
match greedy Medusa decoding best.

Output: one JSON record a line (``.jsonl``), in prompt order::

    {"id": "alpaca-00042", "messages": [{"role": "user", ...}], "prompt_ids": [...],
     "response_ids": [...], "response_text": "...", "finish": "eos" | "length",
     "model": "smollm2-135m", "temperature": 0.0}

Resume: every finished batch is appended to ``OUT.partial`` (flush + fsync); a restart
skips the ids already there (a torn last line from a kill is dropped). The final file is
written to ``OUT.tmp`` and renamed to ``OUT``, so ``OUT`` is either absent or complete.
Asking for more prompts than a finished ``OUT`` holds extends it; asking for fewer keeps
every record it holds (nothing is dropped). Records carry their resume key (model,
temperature, max_new_tokens, the prompts file's sha256, the seed when sampling): resuming or
extending with anything else, or with another prompt or chat template for a kept id, is
refused (:func:`check_resume`), so two runs' records never mix.
MT-Bench is evaluation data and is never accepted here.

Hidden states for free: generation already runs the backbone over every prompt and answer
token, so (``save_states``) the final-normed last hidden state of each position Medusa-1
trains on is kept, float16, in ``OUT.states/<id>.npz`` (written before the record lands in
``OUT.partial``). ``medusa-train medusa1`` reads them instead of running the backbone again
over the data, which saves ~30% of the CPU time of distillation + caching.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ConfigError, MedusaError
from runtime.log import quiet
from runtime.paths import not_a_file
from runtime.tokenizer import check_template_kwargs

log = logging.getLogger("medusa_trt.training")

DISTILL_FIRST = "does not exist (run `medusa-train distill` first)"  # distilled data not there yet

ALPACA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_5000.json"


@dataclass
class DistillConfig:
    model: str = "smollm2-135m"
    prompts: Path = ALPACA
    out: Path = Path("runs/distill/smollm2_alpaca.jsonl")
    num_prompts: int = 1000
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    batch_size: int = 16
    seed: int = 0
    threads: int | None = None
    # sampled answers per prompt (temperature > 0): with N > 1 a prompt's records are ID@1 .. ID@N, each with
    # its own seed, all in the prompt's split (training.data.split_of)
    samples: int = 1
    # where torch generates ("cpu", "cuda", "cuda:1"); on a GPU a batch's sampled answers share one generator
    # (seeded from the batch's first record), so they depend on how the prompts were batched
    device: str = "cpu"
    save_states: bool = True  # keep the last hidden states for Medusa-1 (OUT.states/)
    # an exported artifact folder: generate on its ONNX Runtime engine, ``batch_size`` sequences
    # batched per engine call (runtime.load(..., max_batch=N)), instead of torch; the hidden states
    # are then computed at the end by one causal pass per record on the same engine
    engine: Path | None = None
    # more variables for the chat template (--chat-template-kwargs), e.g. {"enable_thinking": False} for Qwen3:
    # answers without a reasoning block, as a server asked so returns them
    chat_template_kwargs: dict | None = None


def states_dir(out: Path) -> Path:
    """Where distillation keeps each record's last hidden states."""
    out = Path(out)
    return out.with_name(out.name + ".states")


def save_states(folder: Path, record_id: str, model: str, first: int, hidden, weights: str = "",
                tokens=None) -> None:  # fmt: skip
    """``first``: position of ``hidden[0]``; ``weights``: the backbone's fingerprint
    (exporter.heads.backbone_fingerprint; "" where unknown: states from an engine exported before
    artifacts recorded it); ``tokens``: the record's prompt + answer the states were computed from
    (:func:`load_states` checks them against the record that asks); written to a temp name then
    renamed (never torn)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{record_id}.tmp.npz"
    arrays = {"hidden": np.asarray(hidden, dtype=np.float16), "first": np.int64(first), "model": np.array(model),
              "weights": np.array(weights)}  # fmt: skip
    if tokens is not None:
        arrays["tokens"] = np.asarray(tokens, dtype=np.int64)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, folder / f"{record_id}.npz")
    except BaseException:  # interrupted: no torn temporary stays
        tmp.unlink(missing_ok=True)
        raise


def load_states(folder: Path, record_id: str, tokens=None):
    """(first, model, hidden, weights) that :func:`save_states` wrote, or None (absent, torn or
    foreign); ``weights`` "" where the file records none. With ``tokens`` (the record's prompt +
    answer now): None also where the file records other tokens (a rerun's answer under the same
    id: states of another text), compared over the tokens both have, which are all the states
    depend on; files from before tokens were recorded are not checked."""
    import numpy as np

    f = Path(folder) / f"{record_id}.npz"
    if not f.is_file():
        return None
    try:
        with np.load(f) as z:
            if tokens is not None and "tokens" in z.files:
                kept, now = z["tokens"], np.asarray(tokens, dtype=np.int64)
                n = min(len(kept), len(now))
                if not np.array_equal(kept[:n], now[:n]):
                    return None
            return int(z["first"]), str(z["model"]), z["hidden"], str(z["weights"]) if "weights" in z.files else ""
    except Exception:  # torn or foreign file: the caller recomputes
        return None


# ---------------------------------------------------------------------------- prompts


def load_prompts(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(id, user text) pairs from an Alpaca-style JSON list: instruction (+ blank line + input)."""
    path = Path(path)
    if "mt_bench" in path.name.lower():
        raise MedusaError(f"{path}: MT-Bench is the evaluation set and must never be used to train heads")
    if not path.is_file():
        raise MedusaError(f"prompt file {path} {not_a_file(path)} (expected an Alpaca-style JSON list)")
    from runtime import checks
    from runtime.paths import read_text

    try:
        rows = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise MedusaError(f"prompt file {path} is not valid JSON: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "instruction" in r for r in rows):
        raise MedusaError(f"prompt file {path}: expected a list of objects with 'instruction' (and optional 'input')")
    out = []
    for i, r in enumerate(rows[:limit] if limit else rows):
        extra = r.get("input")  # a string ("": no input); null counts as absent
        if not isinstance(r["instruction"], str) or not (extra is None or isinstance(extra, str)):
            key = "input" if isinstance(r["instruction"], str) else "instruction"
            raise MedusaError(
                f"prompt file {path}: record {i} (alpaca-{i:05d}) has {key!r} {checks.show(r[key])}: it must be a string"
                + (" (or null: no input)" if key == "input" else "")
            )
        text = r["instruction"].strip()
        if extra and extra.strip():
            text += "\n\n" + extra.strip()
        out.append((f"alpaca-{i:05d}", text))
    return out


# ---------------------------------------------------------------------------- resume


def read_partial(path: Path) -> list[dict]:
    """Records already in ``path``; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break  # torn write: everything from here is dropped
            if not line.endswith(b"\n"):
                break
            records.append(rec)
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM) or failed: no half-written OUT.tmp stays
        tmp.unlink(missing_ok=True)
        raise


def read_records(path: Path) -> list[dict]:
    """Records of a finished distillation file (``.jsonl``)."""
    path = Path(path)
    if not path.is_file():
        raise MedusaError(f"distilled data {path} {not_a_file(path, DISTILL_FIRST)}")
    from training.files import text_lines

    out = []
    for n, line in text_lines(path):  # a byte that is not UTF-8 is named with its line
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MedusaError(f"{path}: line {n} is not valid JSON ({e})") from None
        missing = {"id", "prompt_ids", "response_ids"} - (rec.keys() if isinstance(rec, dict) else set())
        if missing:
            raise MedusaError(f"{path}: line {n} lacks {sorted(missing)} (not a medusa-train distill file)")
        out.append(rec)
    return out


# ---------------------------------------------------------------------------- generation


def chat_prompt_ids(tokenizer, user_text: str, template_kwargs: dict | None = None) -> list[int]:
    msgs = [{"role": "user", "content": user_text}]
    ids = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False, **(template_kwargs or {})
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _split_forward(model):
    """(body, head) when the model is ``body`` -> final-normed hidden -> ``head`` (Llama-like), else None."""
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    capped = getattr(model.config, "final_logit_softcapping", None)
    if body is None or head is None or capped or getattr(model.config, "logit_scale", None):
        return None
    return body, head


def generate_batch(
    model,
    prompt_ids: list[list[int]],
    pad_id: int,
    eos_ids: list[int],
    cfg: DistillConfig,
    first_positions: list[int] | None = None,
    seeds: list[int] | None = None,
):
    """Left-padded batched generation; per prompt (response ids incl. a final EOS, finish reason),
    plus, with ``first_positions``, the float16 last hidden states of positions
    ``first .. len(prompt) + len(response) - 2`` (every position whose next token is known).
    ``seeds`` (sampling): one per prompt, each prompt drawing from its own generator, so its answer
    does not depend on the prompts batched with it (else torch's global generator).

    A finished answer leaves the batch at once (its rows are dropped from the KV cache), so
    a batch costs its answers' lengths, not max_new_tokens times the batch size.
    """
    import torch
    from transformers import DynamicCache

    split = _split_forward(model) if first_positions is not None else None
    if first_positions is not None and split is None:
        raise MedusaError(
            f"{type(model).__name__} has no plain body + lm_head split: cannot keep hidden states "
            "(use save_states=False)"
        )

    dev = torch.device(cfg.device)
    n = len(prompt_ids)
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):  # left padding: every prompt ends at the same column
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    cache = DynamicCache(config=model.config)
    alive = torch.arange(n)  # original row of each row still generating
    responses: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    eos = torch.tensor(eos_ids, device=dev)
    states: list[list] = [[] for _ in range(n)]
    # one generator a prompt on the CPU; on a GPU, a draw per row would cost a kernel launch per row and
    # step, so the batch shares one generator seeded from its first prompt
    gens, batch_gen = None, None
    if seeds is not None and cfg.temperature > 0:
        if dev.type == "cpu":
            gens = [torch.Generator().manual_seed(s) for s in seeds]
        else:
            batch_gen = torch.Generator(device=dev).manual_seed(seeds[0])
    with torch.inference_mode():
        for step in range(cfg.max_new_tokens):
            if split is None:
                out = model(
                    input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1
                )
                logits = out.logits[:, -1].float()
            else:
                body, head = split
                assert first_positions is not None  # split is only made when positions are given
                h = body(
                    input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True
                ).last_hidden_state
                logits = head(h[:, -1]).float()
                h16 = h.to(torch.float16).cpu().numpy()
                for row, r in enumerate(alive.tolist()):
                    if step == 0:  # prefill: the prompt occupies the last len(prompt) columns
                        states[r].append(h16[row, width - len(prompt_ids[r]) + first_positions[r] :])
                    else:
                        states[r].append(h16[row])
            if cfg.temperature > 0:
                probs = torch.softmax(logits / cfg.temperature, -1)
                if gens is None:
                    nxt = torch.multinomial(probs, 1, generator=batch_gen)[:, 0]
                else:
                    nxt = torch.cat([torch.multinomial(probs[row], 1, generator=gens[r])
                                     for row, r in enumerate(alive.tolist())])  # fmt: skip
            else:
                nxt = logits.argmax(-1)
            for r, t in zip(alive.tolist(), nxt.tolist()):
                responses[r].append(t)
            done = torch.isin(nxt, eos).cpu()
            for r in alive[done].tolist():
                finish[r] = "eos"
            keep = torch.nonzero(~done).flatten()
            if len(keep) == 0:
                break
            if len(keep) < len(alive):  # drop finished answers from the batch and its cache
                rows = keep.to(dev)
                cache.batch_select_indices(rows)  # every layer's rows
                alive, nxt, mask, pos = alive[keep], nxt[rows], mask[rows], pos[rows]
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones(len(keep), 1, dtype=mask.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
    if split is None:
        return [(responses[i], finish[i]) for i in range(n)]
    import numpy as np

    # the last generated token is never fed back, so positions end at len(prompt) + len(response) - 2
    return [(responses[i], finish[i], np.concatenate(states[i])) for i in range(n)]


def distill(cfg: DistillConfig, on_batch: Callable[[int, list[dict]], None] | None = None, backbone=None) -> list[dict]:
    """Run (or resume) a distillation; returns the final records. ``backbone``: (model, tokenizer) to reuse."""
    import torch
    from tqdm import tqdm

    from exporter.models import load_backbone
    from runtime import checks
    from training.data import first_cached_position, sample_id
    from training.files import output_file, torch_device

    for name in ("num_prompts", "max_new_tokens", "batch_size"):
        checks.integer(f"--{name.replace('_', '-')}", getattr(cfg, name), 1)
    temperature = checks.real("--temperature", cfg.temperature, 0, rule=">= 0 (0: greedy)")
    assert temperature is not None  # not optional: a float or a ConfigError
    cfg.temperature = temperature
    checks.integer("--seed", cfg.seed, 0)
    checks.integer("--samples", cfg.samples, 1)
    if cfg.samples > 1 and cfg.temperature == 0:
        raise MedusaError(
            f"--samples {cfg.samples} needs --temperature > 0: greedy answers to one prompt are all the same"
        )
    checks.threads(cfg.threads)
    device = torch_device(cfg.device)
    if cfg.engine is not None and device.type != "cpu":
        raise ConfigError(f"--engine generates on ONNX Runtime's CPU provider: drop --device {cfg.device}")
    cfg.chat_template_kwargs = check_template_kwargs(cfg.chat_template_kwargs) or None
    output_file(cfg.out, "--out", "the distilled .jsonl")  # a folder there is named now, not as missing data
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts)
    if len(prompts) < cfg.num_prompts:
        raise MedusaError(f"{cfg.prompts} holds {len(prompts)} prompts, fewer than the {cfg.num_prompts} asked for")
    if cfg.samples > 1:
        prompts = [(sample_id(pid, k), text) for pid, text in prompts for k in range(1, cfg.samples + 1)]
    model, tok = backbone if backbone is not None else load_backbone(cfg.model)[:2]
    model.to(device)
    eos_ids = _eos_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    done = {r["id"]: r for r in read_records(out)} if out.exists() else {}  # a finished file is extended
    done.update({r["id"]: r for r in read_partial(partial)})
    key = resume_key(cfg)
    check_resume(done, key, prompts, tok, f"{out} / {partial}", cfg.chat_template_kwargs)
    todo = [
        (pid, text, chat_prompt_ids(tok, text, cfg.chat_template_kwargs)) for pid, text in prompts if pid not in done
    ]
    # batches in prompt order: a run stopped early holds a prefix of the prompts, so rerunning
    # with --num-prompts set to what is done finishes at once (generation length, not prompt
    # length, dominates the cost, so sorting by prompt length would buy little)
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    bar = tqdm(
        total=len(prompts),
        initial=len(prompts) - len(todo),
        desc="distill",
        unit="prompt",
        dynamic_ncols=True,
        disable=quiet(),
    )
    if cfg.engine is not None:
        _distill_on_engine(cfg, tok, todo, key, partial, done, bar, on_batch)
        batches = []
    keep_states = cfg.save_states and cfg.engine is None and _split_forward(model) is not None
    weights = ""
    if keep_states:  # the states are these weights': training reuses them only for the same ones
        from exporter.heads import backbone_fingerprint

        weights = backbone_fingerprint(model)
    if cfg.save_states and cfg.engine is None and not keep_states:
        log.warning("%s: no body + lm_head split, hidden states are not kept", type(model).__name__)
    for b, batch in enumerate(batches):
        firsts = [first_cached_position(len(p)) for _, _, p in batch] if keep_states else None
        seeds = [prompt_seed(cfg, pid) for pid, _, _ in batch] if cfg.temperature > 0 else None
        results = generate_batch(model, [p for _, _, p in batch], pad_id, eos_ids, cfg, first_positions=firsts,
                                 seeds=seeds)  # fmt: skip
        records = [
            {
                "id": pid,
                "messages": [{"role": "user", "content": text}],
                "prompt_ids": p,
                "response_ids": res[0],
                "response_text": tok.decode(res[0], skip_special_tokens=True),
                "finish": res[1],
                **key,
            }
            for (pid, text, p), res in zip(batch, results)
        ]
        if firsts is not None:  # keep_states; before the record lands: a record in OUT.partial has its states on disk
            for rec, first, res in zip(records, firsts, results):
                save_states(states_dir(out), rec["id"], cfg.model, first, res[2], weights,
                            rec["prompt_ids"] + rec["response_ids"])  # fmt: skip
        _append(partial, records)
        done.update({r["id"]: r for r in records})
        bar.update(len(records))
        if on_batch is not None:
            on_batch(b, records)
    bar.close()
    asked = {pid for pid, _ in prompts}
    extra = sorted(pid for pid in done if pid not in asked)  # records beyond --num-prompts are kept
    final = [done[pid] for pid, _ in prompts] + [done[pid] for pid in extra]
    write_atomic(out, final)
    partial.unlink(missing_ok=True)  # absent when a finished file had everything asked for
    if cfg.engine is not None and cfg.save_states:
        keep_states_on_engine(cfg.engine, final, out, cfg.model, threads=cfg.threads)
    return final


def prompt_seed(cfg: DistillConfig, pid: str) -> int:
    """A prompt's own sampling seed, from ``--seed`` and its id: a resumed run samples what an
    uninterrupted one does, whichever prompts are left and however they are batched (on the CPU and
    the engine; on a GPU a batch shares its first prompt's, see :func:`generate_batch`)."""
    return cfg.seed * 1_000_003 + zlib.crc32(pid.encode())


def _distill_on_engine(cfg: DistillConfig, tok, todo, key: dict, partial: Path, done: dict, bar, on_batch) -> None:
    """Answer ``todo`` on the exported artifact ``cfg.engine``: ``cfg.batch_size`` threads, their
    steps batched into one ONNX Runtime call (plain greedy/sampled decoding, no Medusa: the tokens
    are the engine's own). Records reach ``partial`` in prompt order (a finished answer waits for
    the ones before it), so a stopped run still holds a prefix of the prompts."""
    from concurrent.futures import ThreadPoolExecutor

    import runtime

    assert cfg.engine is not None  # distill calls this only with an engine
    gen = runtime.load(cfg.engine, max_batch=cfg.batch_size, threads=cfg.threads, budgets=None)
    try:
        if gen.spec.vocab_size < len(tok):
            raise MedusaError(f"{cfg.engine}: its vocabulary ({gen.spec.vocab_size}) is not --model's ({len(tok)})")

        def answer(item):
            pid, text, p = item
            seed = None if cfg.temperature == 0 else prompt_seed(cfg, pid)
            g = gen.generate(p, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                             medusa=False, lookup=0)  # fmt: skip
            finish = "eos" if g.stats.finish_reason == "eos" else "length"
            return {
                "id": pid,
                "messages": [{"role": "user", "content": text}],
                "prompt_ids": p,
                "response_ids": g.tokens,
                "response_text": tok.decode(g.tokens, skip_special_tokens=True),
                "finish": finish,
                "engine": str(cfg.engine),
                **key,
            }

        with ThreadPoolExecutor(cfg.batch_size) as pool:
            for i, rec in enumerate(pool.map(answer, todo)):
                _append(partial, [rec])
                done[rec["id"]] = rec
                bar.update(1)
                if on_batch is not None:
                    on_batch(i, [rec])
    finally:
        gen.close()


def keep_states_on_engine(engine: Path, records: list[dict], out: Path, model: str, threads=None, chunk=512) -> int:
    """The last hidden states Medusa-1 / Hydra training reads (:func:`save_states`), for every record
    that has none yet, from one causal pass of prompt + answer through the artifact's engine
    (prefill calls of ``chunk`` tokens). Returns how many records it computed."""
    import numpy as np
    from tqdm import tqdm

    import runtime
    from runtime.artifact import read_artifact
    from training.data import first_cached_position

    folder = states_dir(out)
    # the exported backbone's fingerprint ("" for artifacts before it was recorded): states kept from
    # other weights (a re-export into the same folder) are computed again, and training reuses these
    # only for the backbone they came from
    weights = read_artifact(engine).provenance.get("backbone_fingerprint", "")

    def kept(r) -> bool:
        found = load_states(folder, r["id"], r["prompt_ids"] + r["response_ids"])
        return found is not None and not (weights and found[3] and found[3] != weights)

    todo = [r for r in records if not kept(r) and r["response_ids"]]
    if not todo:
        return 0
    gen = runtime.load(engine, threads=threads)
    try:
        backend = gen.backend
        total = sum(len(r["prompt_ids"]) + len(r["response_ids"]) - 1 for r in todo)
        bar = tqdm(total=total, desc="hidden states", unit="tok", dynamic_ncols=True, disable=quiet())
        for r in todo:
            tokens = np.asarray(r["prompt_ids"] + r["response_ids"][:-1], dtype=np.int64)  # the last is never fed
            first = first_cached_position(len(r["prompt_ids"]))
            if len(tokens) > backend.max_context:
                continue  # longer than the engine's context: medusa1 computes it with torch
            backend.reset()
            rows, s = [], 0
            while s < len(tokens):
                m = min(chunk, len(tokens) - s)
                backend.forward(tokens[s : s + m], np.arange(s, s + m), np.tril(np.ones((m, m), dtype=bool)), logits=0)
                backend.commit(np.arange(m))
                rows.append(backend.hidden_states())
                s += m
            save_states(folder, r["id"], model, first, np.concatenate(rows)[first:], weights,
                        r["prompt_ids"] + r["response_ids"])  # fmt: skip
            bar.update(len(tokens))
        bar.close()
    finally:
        gen.close()
    return len(todo)


def resume_key(cfg: DistillConfig) -> dict:
    """What shapes a record besides its prompt, stored in every record: a resumed or extended run
    must ask for the same (the prompt itself, as templated, is compared record by record)."""
    import hashlib

    key = {
        "model": cfg.model,
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
        "prompts_sha256": hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest(),
    }
    if cfg.temperature > 0:  # sampled answers depend on the seed too
        key["seed"] = cfg.seed
    if cfg.chat_template_kwargs:  # (absent otherwise: records from before the option stay resumable)
        key["chat_template_kwargs"] = cfg.chat_template_kwargs
    return key


def check_resume(
    done: dict[str, dict],
    key: dict,
    prompts: list[tuple[str, str]],
    tok,
    where: str,
    template_kwargs: dict | None = None,
) -> None:
    """Refuse to mix records: every kept record must carry this run's ``key`` (records written
    before a key field existed are exempt from it) and, where this run asks for its id, the
    same prompt text and templated prompt ids (another prompts file, or another chat template)."""
    legacy_optional = ("prompts_sha256", "seed")
    for r in done.values():
        diff = [k for k, v in key.items() if r.get(k) != v and not (k in legacy_optional and k not in r)]
        if diff:
            was = ", ".join(f"{k}={r.get(k)!r}" for k in diff)
            now = ", ".join(f"{k}={key.get(k)!r}" for k in diff)
            what = " (another --prompts file or an edited one)" if "prompts_sha256" in diff else ""
            raise MedusaError(
                f"{where} was started with {was}; this run asks for {now}{what}: resuming would mix "
                "records of two runs; delete them or use the same options"
            )
    texts = {pid: text for pid, text in prompts}
    for pid, r in done.items():
        if pid not in texts:
            continue
        if r.get("messages") != [{"role": "user", "content": texts[pid]}] or r.get("prompt_ids") != chat_prompt_ids(
            tok, texts[pid], template_kwargs
        ):
            raise MedusaError(
                f"{where}: record {pid} was made from another prompt (or chat template) than this run's "
                "prompt of that id: resuming would mix records; delete them or use the same --prompts"
            )


def _eos_ids(model, tok) -> list[int]:
    gen = getattr(model, "generation_config", None)
    eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else tok.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise MedusaError("the tokenizer and generation config name no EOS token: cannot tell where answers end")
    return ids
