"""``medusa-run bench``: plain decoding vs Medusa on the same engine, same prompts.

For every prompt (MT-Bench format: first turn, chat template) it runs plain greedy
decoding and Medusa greedy decoding with each tree, on the same loaded engine and the same
``max_new_tokens``, and optionally a peer in the same run, interleaved prompt by prompt:
Hugging Face ``generate`` (``hf``) or onnxruntime-genai (``ortgenai``, plain and with its own
n-gram speculation; runtime/peers.py). Speeds are end-to-end (prefill + decode) tokens per
second, the same clock for everyone.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime import checks
from runtime.checks import show
from runtime.decode import DEFAULT_LOOKUP_MAX, DEFAULT_LOOKUP_SIZING, PHASES, prefill
from runtime.dynamic import is_dynamic
from runtime.errors import MedusaError
from runtime.paths import not_a_file, read_text

# the Medusa sampling runs compared with plain sampling (--sampling): name -> (acceptance, drafts, what)
# ("exact" means coupled drafts since 2026-12-01; earlier result files hold top-k drafts under "exact");
# exact sampling runs the artifact's sampling tree, typical acceptance the first --tree
SAMPLING_KINDS = {
    "exact": ("exact", "coupled", "exact (the backbone's distribution), coupled drafts: plain sampling's tokens"),
    "exact_top": ("exact", "top", "exact (the backbone's distribution), the heads' top-k as candidates"),
    "exact_sampled": ("exact", "sampled", "exact (the backbone's distribution), candidates drawn from the heads"),
    "typical": ("typical", "top", "typical acceptance (lossy)"),
}


def sampling_kinds(exact_tree) -> dict:
    """The sampling runs a tree takes: a dynamic tree drafts the heads' likeliest tokens only."""
    if is_dynamic(exact_tree):
        return {k: v for k, v in SAMPLING_KINDS.items() if v[1] != "sampled"}
    return SAMPLING_KINDS


def sampling_args(variant, exact_tree, acceptance: str, drafts: str) -> dict:
    """A Medusa sampling run's decode arguments: the first variant's drafts, on ``exact_tree`` where
    the acceptance is exact (the warm-up and the timed runs take the same)."""
    tree = exact_tree if acceptance == "exact" else variant.tree
    return {**variant.decode_args(), "tree": tree, "acceptance": acceptance, "drafts": drafts}


OUTSIDE_ENGINE = ("candidates", "acceptance", "kv_update", "other")


@dataclass
class Prompt:
    id: str
    category: str
    text: str


def load_prompts(
    path: str | Path, limit: int | None = None, per_category: int | None = None, skip: int = 0
) -> list[Prompt]:
    """MT-Bench-style JSONL (``question_id``, ``category``, ``turns``): first turns; JSONL with
    ``prompt``; or an Alpaca JSON list (``instruction`` + ``input``, category ``alpaca``).

    ``skip``: drop the first N prompts; ``per_category``: then the first N of each category (in
    file order); ``limit``: then the first N."""
    path = Path(path)
    if not path.is_file():
        raise MedusaError(f"prompt file {path} {not_a_file(path)}")
    if skip < 0:
        raise MedusaError(f"--skip must be >= 0, got {skip}")
    if limit is not None and limit < 1:
        raise MedusaError(f"--limit must be >= 1, got {limit}")
    if per_category is not None and per_category < 1:
        raise MedusaError(f"--per-category must be at least 1, got {per_category}")
    out = []
    text_all = read_text(path, error=MedusaError)
    if text_all.lstrip().startswith("["):  # an Alpaca-style JSON list
        try:
            recs = json.loads(text_all)
        except json.JSONDecodeError as e:
            raise MedusaError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, rec in enumerate(recs):
            inp = rec.get("input") if isinstance(rec, dict) else None
            if (
                not isinstance(rec, dict)
                or not isinstance(rec.get("instruction"), str)
                or not (inp is None or isinstance(inp, str))
            ):
                raise MedusaError(
                    f"{path}: record {i}: expected an object with an 'instruction' string (and an 'input' string)"
                )
            out.append(
                Prompt(
                    f"alpaca-{i}",
                    "alpaca",
                    _prompt_text(path, f"record {i}", rec["instruction"] + (f"\n\n{inp}" if inp else "")),
                )
            )
    else:
        for n, line in enumerate(text_all.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MedusaError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not ("turns" in rec or "prompt" in rec):
                raise MedusaError(f"{path}:{n}: expected a JSON object with 'turns' (MT-Bench) or 'prompt'")
            if "turns" in rec:
                turns = rec["turns"]
                if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                    raise MedusaError(f"{path}:{n}: 'turns' must be a non-empty list of strings, got {show(turns)}")
                text = turns[0]
            else:
                text = rec["prompt"]
            out.append(
                Prompt(
                    str(rec.get("question_id", n)), str(rec.get("category", "")), _prompt_text(path, f"line {n}", text)
                )
            )
    if skip:
        out = out[skip:]
    if not out:
        raise MedusaError(f"{path} holds no prompts" + (f" after skipping {skip}" if skip else ""))
    if per_category is not None:
        seen: dict[str, int] = {}
        picked = []
        for p in out:
            seen[p.category] = seen.get(p.category, 0) + 1
            if seen[p.category] <= per_category:
                picked.append(p)
        out = picked
    return out[:limit] if limit is not None else out


def _prompt_text(path: Path, where: str, text) -> str:
    """A prompt's text from a prompt file: a non-empty string of valid Unicode (runtime.checks.text)."""
    checks.text(f"{path}: {where}: the prompt", text)
    if not text.strip():
        raise MedusaError(f"{path}: {where}: the prompt is empty")
    return text


@dataclass
class RunResult:
    tokens: list[int]
    seconds: float
    steps: int = 0
    times: dict = field(default_factory=dict)
    accept_hist: dict = field(default_factory=dict)
    lookup_accepted: int = 0
    datastore_accepted: int = 0
    drafts: dict = field(default_factory=dict)  # a speculating peer's draft counters (proposed, accepted)
    nodes: int = 0  # tokens the Medusa steps verified (roots included)
    first_token_s: float | None = None  # a peer's run: from its prompt going in to its first new token
    cached: int = 0  # a peer's chat turn: prompt tokens its KV cache kept from the turn before

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def _run(gen, ids, max_new_tokens, medusa, tree=None, **kw) -> RunResult:
    t = time.perf_counter()
    out = gen.generate(ids, max_new_tokens=max_new_tokens, medusa=medusa, tree=tree, **kw)
    seconds = time.perf_counter() - t
    s = out.stats
    return RunResult(
        out.tokens,
        seconds,
        s.steps,
        dict(s.times),
        dict(s.accept_hist),
        lookup_accepted=s.lookup_accepted,
        datastore_accepted=s.datastore_accepted,
        nodes=s.nodes,
    )


@dataclass
class Variant:
    """One Medusa configuration the bench compares: a tree, a context-lookup setting, and whether
    the lookup falls back on the artifact's datastore."""

    tree: object
    lookup: int
    name: str
    datastore: bool = True
    lookup_max: int = DEFAULT_LOOKUP_MAX
    lookup_sizing: str = DEFAULT_LOOKUP_SIZING

    def decode_args(self) -> dict:
        return {"tree": self.tree, "lookup": self.lookup, "datastore": self.datastore, "lookup_max": self.lookup_max,
                "lookup_sizing": self.lookup_sizing}  # fmt: skip


def make_variants(trees: list, lookups: list[int], datastores: list[bool] | None = None,
                  lookup_maxes: list[int] | None = None, sizings: list[str] | None = None) -> list[Variant]:  # fmt: skip
    """Every tree with every lookup, lookup_max, lookup sizing and datastore setting; named by the
    tree alone when there is one setting of each."""
    datastores = datastores or [True]
    maxes = lookup_maxes or [DEFAULT_LOOKUP_MAX]
    sizings = sizings or [DEFAULT_LOOKUP_SIZING]
    out = []
    for t, lk, mx, sz, ds in itertools.product(trees, lookups, maxes, sizings, datastores):
        name = t.name + (f" lookup={lk}" if len(lookups) > 1 else "")
        name += f" max={mx}" if len(maxes) > 1 else ""
        name += f" {sz}" if len(sizings) > 1 else ""
        name += (" datastore" if ds else " no-datastore") if len(datastores) > 1 else ""
        out.append(Variant(t, lk, name, ds, mx, sz))
    return out


def _divergence(gen, ids, ref: list[int], other: list[int]) -> dict | None:
    """First position where ``other`` differs from the plain decode, and the top-2 logit gap there."""
    pos = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), None)
    if pos is None:
        if len(ref) == len(other):
            return None
        pos = min(len(ref), len(other))
        return {"position": pos, "reason": "lengths differ", "top2_gap": None}
    be = gen.backend
    seq = np.asarray(list(ids) + ref[:pos], dtype=np.int64)
    be.reset()
    last, _ = prefill(be, seq, gen.prefill_chunk)  # in the calls the backend takes
    assert last is not None
    logits = last[-1]
    top2 = np.sort(logits.astype(np.float64))[-2:]
    return {"position": pos, "plain_token": ref[pos], "medusa_token": other[pos], "top2_gap": float(top2[1] - top2[0])}


class HFPeer:
    """Hugging Face ``generate`` (greedy) on the artifact's source model: imports torch."""

    def __init__(self, model_path: str, threads: int | None):
        try:
            import torch
            import transformers
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise MedusaError("--peer hf needs torch and transformers installed") from None
        self.version = f"transformers {transformers.__version__}"
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def run(self, ids, max_new_tokens) -> RunResult:
        torch = self.torch
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                top_p=None,
                top_k=None,
                temperature=None,
            )
        seconds = time.perf_counter() - t
        return RunResult(out[0, len(ids) :].tolist(), seconds)


PEERS = ("hf", "ortgenai")


def _peer_model_path(gen, explicit: str | None) -> str:
    """The Hugging Face folder a peer loads: ``--peer-model``, else the artifact's recorded source."""
    if explicit:
        if not (Path(explicit) / "config.json").is_file():
            raise MedusaError(f"--peer-model {explicit} is not a Hugging Face model folder (no config.json)")
        return explicit
    prov = gen.config.provenance
    path = prov.get("source_model_path") or prov.get("source_model") or ""
    if not path or not Path(path).is_dir():
        raise MedusaError(
            "--peer: the artifact does not record a local source model folder that exists here "
            f"(source_model_path {prov.get('source_model_path')!r}; artifacts exported before 2026-11-30 record none): "
            "pass --peer-model DIR, or re-export it with medusa-export"
        )
    return path


@contextlib.contextmanager
def whole_prefills(gen) -> Iterator[None]:
    """``gen`` with prefix reuse off within the block (restored after): a call must not skip the
    prefill of a prompt an earlier call of the bench (plain decoding, another variant) left cached."""
    reuse, gen.reuse_prefix = gen.reuse_prefix, False
    try:
        yield
    finally:
        gen.reuse_prefix = reuse


def run_bench(
    gen,
    prompts: list[Prompt],
    trees: list,
    max_new_tokens: int = 256,
    peer: str | None = None,
    peer_model: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    lookups: list[int] | None = None,
    sampling: list[float] | None = None,
    seed: int = 0,
    datastores: list[bool] | None = None,
    lookup_maxes: list[int] | None = None,
    lookup_sizings: list[str] | None = None,
    peer_huge_pages: bool = False,
) -> dict:
    """Plain vs Medusa (each tree x each ``lookups`` setting) per prompt, interleaved; with
    ``sampling`` temperatures also plain sampling vs exact vs typical Medusa sampling
    (the first variant's tree and lookup, seeds ``seed + prompt index``)."""
    from tqdm import tqdm

    from runtime.decode import DEFAULT_LOOKUP

    named = bool(trees)
    trees = [gen._tree(t) for t in trees] or [gen.default_tree]
    names = [t.name for t in trees]
    if len(set(names)) != len(names):
        raise MedusaError(f"--tree: trees must have distinct names, got {names}")
    lookups = list(lookups) if lookups else [DEFAULT_LOOKUP]
    if len(set(lookups)) != len(lookups) or any(lk < 0 for lk in lookups):
        raise MedusaError(f"--lookup: distinct integers >= 0, got {lookups}")
    sampling = list(sampling or [])
    if any(not (t > 0) or t != t for t in sampling):
        raise MedusaError(f"--sampling: temperatures must be > 0, got {sampling}")
    if datastores and len(set(datastores)) != len(datastores):
        raise MedusaError("--datastore: on and/or off, each once")
    if lookup_maxes and (len(set(lookup_maxes)) != len(lookup_maxes) or any(m < 0 for m in lookup_maxes)):
        raise MedusaError(f"--lookup-max: distinct integers >= 0, got {lookup_maxes}")
    if lookup_sizings and len(set(lookup_sizings)) != len(lookup_sizings):
        raise MedusaError("--lookup-sizing: cost and/or grow, each once")
    variants = make_variants(trees, lookups, datastores, lookup_maxes, lookup_sizings)
    # exact sampling runs the artifact's sampling tree unless --tree was given (as generate() does)
    exact_tree: Any = variants[0].tree if named else (getattr(gen, "sampling_tree", None) or variants[0].tree)
    if peer not in (None, *PEERS):
        raise MedusaError(f"unknown peer {peer!r}: the supported peers are {', '.join(PEERS)}")
    hf = HFPeer(_peer_model_path(gen, peer_model), threads) if peer == "hf" else None
    og = None
    if peer == "ortgenai":
        from runtime.peers import OrtGenaiPeer, peer_model_dir

        og = OrtGenaiPeer(peer_model_dir(gen, peer_model), threads, huge_pages=peer_huge_pages)
    with whole_prefills(gen):  # every timed call prefills its whole prompt, as the peers' calls do
        # warm up the engines (first-call allocations) outside the measurement
        warm = gen.encode([{"role": "user", "content": "Hello"}])
        # every decoder the loop runs, once: no first-call cost lands on the first prompt of one of them
        gen.generate(warm, max_new_tokens=8, medusa=False)
        for v in variants:
            gen.generate(warm, max_new_tokens=8, **v.decode_args())
        for temp in sampling:
            gen.generate(warm, max_new_tokens=8, medusa=False, temperature=temp, seed=seed)
            for acceptance, drafts, _ in sampling_kinds(exact_tree).values():
                args = sampling_args(variants[0], exact_tree, acceptance, drafts)
                gen.generate(warm, max_new_tokens=8, temperature=temp, seed=seed, **args)
            if og is not None:
                og.run(warm, 8, temperature=temp, seed=seed)
        if hf is not None:
            hf.run(warm, 8)
        if og is not None:
            og.run(warm, 8)
            if not og.ngram_unavailable:
                og.run(warm, 8, ngram=True)

        per_prompt = []
        peer_runs = (hf is not None) + (0 if og is None else 1 + (og.ngram_unavailable is None))
        bar = tqdm(
            total=len(prompts)
            * (1 + len(variants) + peer_runs + (1 + len(SAMPLING_KINDS) + (og is not None)) * len(sampling)),
            desc="bench",
            unit="run",
            disable=not progress,
            file=sys.stderr,
        )
        for i, p in enumerate(prompts):
            ids = gen.encode([{"role": "user", "content": p.text}])
            row: dict[str, Any] = {"id": p.id, "category": p.category, "prompt_tokens": len(ids)}
            ar = _run(gen, ids, max_new_tokens, medusa=False)
            bar.update()
            row["ar"] = {"tokens": len(ar.tokens), "seconds": ar.seconds, "tokens_per_s": ar.tokens_per_s}
            row["trees"] = {}
            for v in variants:
                md = _run(gen, ids, max_new_tokens, medusa=True, **v.decode_args())
                bar.update()
                row["trees"][v.name] = {
                    "tokens": len(md.tokens),
                    "seconds": md.seconds,
                    "tokens_per_s": md.tokens_per_s,
                    "speedup": md.tokens_per_s / ar.tokens_per_s if ar.tokens_per_s else 0.0,
                    "steps": md.steps,
                    "times": md.times,
                    "accept_hist": md.accept_hist,
                    "mean_accepted": _hist_mean(md.accept_hist),
                    "identical": md.tokens == ar.tokens,
                    "divergence": None if md.tokens == ar.tokens else _divergence(gen, ids, ar.tokens, md.tokens),
                    "lookup_accepted": md.lookup_accepted,
                    "datastore_accepted": md.datastore_accepted,
                    "verified": md.nodes,
                }
            if sampling:
                row["sampling"] = {}
            for temp in sampling:  # the same seed for every run: coupled sampling draws plain sampling's tokens
                kw = dict(temperature=temp, seed=seed + i)
                runs = {"plain": _run(gen, ids, max_new_tokens, medusa=False, **kw)}
                for k, (acceptance, drafts, _) in sampling_kinds(exact_tree).items():
                    runs[k] = _run(
                        gen,
                        ids,
                        max_new_tokens,
                        medusa=True,
                        **sampling_args(variants[0], exact_tree, acceptance, drafts),
                        **kw,
                    )
                if og is not None:  # the peer's plain sampling, same temperature and seed (its own generator)
                    runs["peer"] = og.run(ids, max_new_tokens, temperature=temp, seed=seed + i)
                bar.update(1 + len(SAMPLING_KINDS) + (og is not None))
                row["sampling"][str(temp)] = {
                    k: {
                        "tokens": len(r.tokens),
                        "seconds": r.seconds,
                        "tokens_per_s": r.tokens_per_s,
                        "accept_hist": r.accept_hist,
                        "steps": r.steps,
                        "lookup_accepted": r.lookup_accepted,
                        "datastore_accepted": r.datastore_accepted,
                        # coupled sampling draws plain sampling's tokens for a seed (plain sampling's default sampler)
                        "identical": r.tokens == runs["plain"].tokens,
                    }
                    for k, r in runs.items()
                }
            if hf is not None:
                pr = hf.run(ids, max_new_tokens)
                bar.update()
                row["peer"] = _peer_row(pr, ar)
            if og is not None:  # interleaved with ours prompt by prompt: a change in machine load hits both alike
                pr = og.run(ids, max_new_tokens)
                bar.update()
                row["peer"] = _peer_row(pr, ar)
                if not og.ngram_unavailable:
                    ng = og.run(ids, max_new_tokens, ngram=True)
                    bar.update()
                    row["peer_ngram"] = {**_peer_row(ng, ar), "identical_to_peer": ng.tokens == pr.tokens, **ng.drafts}
            per_prompt.append(row)
        bar.close()
    res = summarize(gen, per_prompt, variants, max_new_tokens, peer, threads)
    if sampling:
        res["sampling"] = _summarize_sampling(per_prompt, sampling, res, variants[0].name)
        for e in res["sampling"].values():
            e["exact_tree"] = exact_tree.name
    if hf is not None or og is not None:
        res["peer_version"] = (hf or og).version  # type: ignore[union-attr]
    if og is not None:
        _summarize_ortgenai(res, og, per_prompt)
    return res


def _peer_row(pr: RunResult, ar: RunResult) -> dict:
    """A peer's run on one prompt, checked against our plain decode of the same prompt ids."""
    same = pr.tokens == ar.tokens
    first = (
        None
        if same
        else next(
            (i for i, (a, b) in enumerate(zip(ar.tokens, pr.tokens)) if a != b), min(len(ar.tokens), len(pr.tokens))
        )
    )
    return {
        "tokens": len(pr.tokens),
        "seconds": pr.seconds,
        "tokens_per_s": pr.tokens_per_s,
        "identical_to_plain": same,
        "first_difference": first,
    }


def _hist_mean(hist: dict) -> float:
    """Tokens per step of an accepted-length histogram (keys int or str)."""
    return sum(int(k) * v for k, v in hist.items()) / max(1, sum(hist.values()))


def _merged_hist(hists) -> dict[int, int]:
    out: dict[int, int] = {}
    for h in hists:
        for k, v in h.items():
            out[int(k)] = out.get(int(k), 0) + v
    return out


def _summarize_sampling(per_prompt, temps, res, variant_name) -> dict:
    """Per temperature: plain sampling vs exact and typical Medusa sampling (tokens/s over
    all prompts, speedup over plain sampling, accepted tokens per step), and greedy's
    speedup from the same run for reference."""
    out = {}
    for temp in temps:
        rows = [r["sampling"][str(temp)] for r in per_prompt]
        plain = _tokens_per_s([r["plain"] for r in rows])
        entry = {
            "plain_tokens_per_s": plain,
            "greedy_speedup": res["trees"][variant_name]["speedup"],
            "tree": variant_name,
        }
        for k in SAMPLING_KINDS:
            if k not in rows[0]:  # not run (sampled drafts on a dynamic tree)
                continue
            tps = _tokens_per_s([r[k] for r in rows])
            hist = _merged_hist(r[k]["accept_hist"] for r in rows)
            entry[f"{k}_tokens_per_s"] = tps
            entry[f"{k}_speedup"] = _ratio(tps, plain)
            entry[f"{k}_mean_accepted"] = _hist_mean(hist)
            entry[f"{k}_identical"] = sum(bool(r[k].get("identical")) for r in rows)
            entry[f"{k}_sources"] = draft_sources([r[k] for r in rows])
        entry["prompts"] = len(rows)
        if "peer" in rows[0]:
            peer = _tokens_per_s([r["peer"] for r in rows])
            entry["peer_tokens_per_s"] = peer
            entry["plain_vs_peer"] = _ratio(plain, peer)
            for k in SAMPLING_KINDS:
                if f"{k}_tokens_per_s" in entry:
                    entry[f"{k}_vs_peer"] = _ratio(entry[f"{k}_tokens_per_s"], peer)
        out[str(temp)] = entry
    return out


def draft_sources(rows: list[dict]) -> dict[str, float]:
    """Tokens a Medusa step emitted, by what drafted them, over ``rows`` (runs with ``accept_hist``,
    ``steps``, ``lookup_accepted``, ``datastore_accepted``): ``backbone`` (1: the token after the
    accepted path, its own), ``context`` and ``datastore`` (accepted tokens only the context lookup,
    or only the datastore, drafted), ``heads`` (the rest: tokens a head drafted, whoever else did).
    Context and datastore count their tokens as verified; a last step that an EOS, the length or a
    stop string cut short still counts its cut ones, so ``heads`` reads low by those (at most one
    step's draft an answer)."""
    steps = sum(r.get("steps", 0) for r in rows)
    if not steps:
        return {}
    emitted = _hist_mean(_merged_hist(r["accept_hist"] for r in rows))
    stored = sum(r.get("datastore_accepted", 0) for r in rows) / steps
    context = sum(r.get("lookup_accepted", 0) for r in rows) / steps - stored
    return {"backbone": 1.0, "heads": emitted - 1.0 - context - stored, "context": context, "datastore": stored}


def _by_category(per_prompt, names) -> dict:
    """Plain and each variant's tokens/s, speedup and accepted length per prompt category."""
    cats: dict[str, list] = {}
    for r in per_prompt:
        cats.setdefault(r["category"] or "-", []).append(r)
    out = {}
    for cat, rows in cats.items():
        plain = _tokens_per_s([r["ar"] for r in rows])
        entry: dict[str, Any] = {"prompts": len(rows), "plain_tokens_per_s": plain}
        for n in names:
            vs = [r["trees"][n] for r in rows]
            tps = _tokens_per_s(vs)
            entry[n] = {
                "tokens_per_s": tps,
                "speedup": _ratio(tps, plain),
                "mean_accepted": _hist_mean(_merged_hist(v["accept_hist"] for v in vs)),
            }
        out[cat] = entry
    return out


def _tree_summary(per_prompt, variant, ar_tps) -> dict:
    tree = variant.tree
    rows = [r["trees"][variant.name] for r in per_prompt]
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    hist = _merged_hist(r["accept_hist"] for r in rows)
    times = {p: 0.0 for p in PHASES}
    for r in rows:
        for k, v in r["times"].items():
            times[k] += v
    decode_s = sum(v for k, v in times.items() if k != "prefill")
    tps = tokens / seconds if seconds else 0.0
    near_ties = [
        r["divergence"]
        for r in rows
        if r["divergence"] and r["divergence"].get("top2_gap") is not None and r["divergence"]["top2_gap"] < 1e-4
    ]
    return {
        "tree": variant.name,
        "nodes": tree.num_nodes,
        # tokens verified per Medusa step (the tree, its lookup nodes, a dynamic tree's choice)
        "verified_per_step": sum(r.get("verified", 0) for r in rows) / max(1, steps),
        "paths": [list(p) for p in tree.paths],
        "lookup": variant.lookup,
        "lookup_max": variant.lookup_max,
        "lookup_sizing": variant.lookup_sizing,
        "lookup_accepted": sum(r.get("lookup_accepted", 0) for r in rows),
        "datastore_accepted": sum(r.get("datastore_accepted", 0) for r in rows),
        "sources": draft_sources(rows),
        "medusa_tokens_per_s": tps,
        "speedup": tps / ar_tps if ar_tps else 0.0,
        "median_prompt_speedup": statistics.median(r["speedup"] for r in rows),
        "mean_accepted": _hist_mean(hist),
        "accept_hist": {str(k): v for k, v in sorted(hist.items())},
        "identical": sum(r["identical"] for r in rows),
        "near_tie_divergences": len(near_ties),
        "step_ms": {k: 1000 * v / max(1, steps) for k, v in times.items() if k != "prefill"},
        "overhead_fraction": sum(times[k] for k in OUTSIDE_ENGINE) / decode_s if decode_s else 0.0,
        "divergences": [{"id": per_prompt[i]["id"], **r["divergence"]} for i, r in enumerate(rows) if r["divergence"]],
    }


def summarize(gen, per_prompt, variants, max_new_tokens, peer, threads) -> dict:
    ar_tokens = sum(r["ar"]["tokens"] for r in per_prompt)
    ar_s = sum(r["ar"]["seconds"] for r in per_prompt)
    ar_tps = ar_tokens / ar_s if ar_s else 0.0
    tree_rows = {v.name: _tree_summary(per_prompt, v, ar_tps) for v in variants}
    main = tree_rows[variants[0].name]
    backend = gen.backend
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "artifact": str(gen.folder),
        "backend": type(backend).__name__,
        "providers": getattr(backend, "providers", None),
        "threads": threads,
        # greedy steps' lm_head: the graph's int8 screen (exporter.fused._screen) or float logits, and how
        # many screened rows decoding needed that the screen left to a second, float call
        "lm_head": "screen" if getattr(backend, "screens_argmax", False) else "float",
        "lm_head_sampling": "screen" if getattr(backend, "screens_noise", False) else "float",  # coupled draws
        "screen_fallbacks": getattr(backend, "screen_fallbacks", 0),
        "max_new_tokens": max_new_tokens,
        "prompts": len(per_prompt),
        "tree": main["tree"],
        "identical": main["identical"],
        "ar_tokens_per_s": ar_tps,
        "medusa_tokens_per_s": main["medusa_tokens_per_s"],
        "speedup": main["speedup"],
        "mean_accepted": main["mean_accepted"],
        "overhead_fraction": main["overhead_fraction"],
        "ar_step_ms": 1000 * ar_s / max(1, ar_tokens),
        "trees": tree_rows,
        "by_category": _by_category(per_prompt, list(tree_rows)),
        "per_prompt": per_prompt,
    }
    if peer:
        p_tps = _tokens_per_s([r["peer"] for r in per_prompt])
        out["peer"] = peer
        out["peer_tokens_per_s"] = p_tps
        out["plain_vs_peer"] = _ratio(ar_tps, p_tps)
        out["medusa_vs_peer"] = _ratio(main["medusa_tokens_per_s"], p_tps)
        for t in tree_rows.values():
            t["medusa_vs_peer"] = _ratio(t["medusa_tokens_per_s"], p_tps)
        out["peer_identical"] = sum(r["peer"]["identical_to_plain"] for r in per_prompt)
        out["peer_divergences"] = [
            {"id": r["id"], "position": r["peer"]["first_difference"]}
            for r in per_prompt
            if not r["peer"]["identical_to_plain"]
        ]
        # the names of the first peer summaries, still read by earlier scripts and tests
        out["ar_vs_peer"] = out["plain_vs_peer"]
        out["peer_identical_to_plain"] = out["peer_identical"]
    return out


def _tokens_per_s(rows: list[dict]) -> float:
    """All tokens over all seconds (as ``ar_tokens_per_s``): long answers weigh by their length."""
    seconds = sum(r["seconds"] for r in rows)
    return sum(r["tokens"] for r in rows) / seconds if seconds else 0.0


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _huge_pages_mb() -> int:
    """MB by which our sessions' collapses grew the process's huge pages (runtime.hugepages; 0 where
    off or refused, or where THP ``always`` had put the weights in huge pages already)."""
    from runtime import hugepages
    from runtime.peers import PEER_WEIGHTS

    return sum(r.collapsed_mb for name, r in hugepages.RECORDS.items() if name != PEER_WEIGHTS)


def _summarize_ortgenai(res: dict, og, per_prompt: list[dict]) -> None:
    """onnxruntime-genai's graph and its n-gram run (or why there is none) into ``res``."""
    res["peer_model"] = str(og.model_dir)
    res["huge_pages"] = {"ours": _huge_pages_mb(), "peer": og.huge_pages.collapsed_mb,
                         "peer_asked": og.huge_pages.skipped != "off"}  # fmt: skip
    if og.ngram_unavailable:
        res.update(peer_ngram_tokens_per_s=None, peer_ngram_unavailable=og.ngram_unavailable, medusa_vs_peer_ngram=None)
        for t in res["trees"].values():
            t["medusa_vs_peer_ngram"] = None
        return
    from runtime.peers import MAX_DRAFT_TOKENS, NGRAM_SIZE

    rows = [r["peer_ngram"] for r in per_prompt]
    n_tps = _tokens_per_s(rows)
    proposed = sum(r.get("draft_tokens_proposed", 0) for r in rows)
    res.update(
        peer_ngram_tokens_per_s=n_tps,
        peer_ngram_options={"ngram_size": NGRAM_SIZE, "max_draft_tokens": MAX_DRAFT_TOKENS},
        peer_ngram_speedup=_ratio(n_tps, res["peer_tokens_per_s"]),
        medusa_vs_peer_ngram=_ratio(res["medusa_tokens_per_s"], n_tps),
        # lossless speculation: its tokens must equal the peer's plain ones
        peer_ngram_identical_to_peer=sum(r["identical_to_peer"] for r in rows),
        peer_ngram_drafts_accepted=_ratio(sum(r.get("draft_tokens_accepted", 0) for r in rows), proposed),
    )
    for t in res["trees"].values():
        t["medusa_vs_peer_ngram"] = _ratio(t["medusa_tokens_per_s"], n_tps)


def format_report(res: dict, per_prompt: bool = True) -> str:
    lines = []
    if per_prompt:
        names = list(res["trees"])
        peers = [k for k in ("peer", "peer_ngram") if res.get(f"{k}_tokens_per_s") is not None]
        peer_heads = {"peer": f"{res.get('peer')} tok/s", "peer_ngram": "n-gram tok/s"}
        head = (
            f"{'id':>5} {'category':<11} {'plain tok/s':>11} "
            + " ".join(f"{n[:18]:>18}" for n in names)
            + "".join(f" {peer_heads[k][:14]:>14}" for k in peers)
            + "  identical"
        )
        lines += [head, "-" * len(head)]
        for r in res["per_prompt"]:
            cells = " ".join(
                f"{r['trees'][n]['tokens_per_s']:6.1f} x{r['trees'][n]['speedup']:4.2f} a{r['trees'][n]['mean_accepted']:.2f}".rjust(
                    18
                )
                for n in names
            )
            cells += "".join(f" {r[k]['tokens_per_s']:14.1f}" for k in peers)
            same = "".join("=" if r["trees"][n]["identical"] else "≠" for n in names)
            same += "".join("=" if r[k]["identical_to_plain"] else "≠" for k in peers)
            lines.append(f"{r['id']:>5} {r['category'][:11]:<11} {r['ar']['tokens_per_s']:11.1f} {cells}  {same}")
        lines.append("")
    lines.append(
        f"{res['prompts']} prompts, max_new_tokens {res['max_new_tokens']}, backend {res['backend']} "
        f"{res.get('providers') or ''} threads {res['threads']}"
        + (
            f", lm_head screened{' (greedy and coupled sampling)' if res.get('lm_head_sampling') == 'screen' else ''}"
            f" ({res.get('screen_fallbacks', 0)} rows settled in float)"
            if res.get("lm_head") == "screen"
            else ""
        )
    )
    lines.append(f"plain decoding: {res['ar_tokens_per_s']:.2f} tok/s ({res['ar_step_ms']:.1f} ms/token)")
    w = max(18, *(len(n) for n in res["trees"]))
    head = (
        f"{'tree':<{w}} {'nodes':>5} {'verif':>5} {'tok/s':>7} {'speedup':>7} {'accepted':>8} {'identical':>9} "
        f"{'engine':>7} {'heads':>6} {'cand':>5} {'accept':>6} {'kv':>5} {'other':>5} {'outside':>7}"
    )
    lines += ["", head, "-" * len(head)]
    for t in res["trees"].values():
        ms = t["step_ms"]
        lines.append(
            f"{t['tree']:<{w}} {t['nodes']:>5} {t.get('verified_per_step', 0):5.2f} {t['medusa_tokens_per_s']:7.2f} {t['speedup']:6.2f}x "
            f"{t['mean_accepted']:8.2f} {t['identical']:>4}/{res['prompts']:<4} {ms['engine']:5.1f}ms {ms['heads']:4.1f}ms "
            f"{ms['candidates']:3.1f}ms {ms['acceptance']:4.1f}ms {ms['kv_update']:3.1f}ms {ms['other']:3.1f}ms "
            f"{100 * t['overhead_fraction']:6.1f}%"
        )
    lines.append(
        "(nodes: the tree's most (a dynamic tree: its cap, root included); verif: tokens verified per step, lookup "
        "nodes included; engine .. other: milliseconds per Medusa step; 'outside' = time outside engine calls / "
        "Medusa decode time)"
    )
    cats = res.get("by_category") or {}
    if len(cats) > 1:
        names = list(res["trees"])
        head = f"{'category':<11} {'n':>3} {'plain':>7} " + " ".join(f"{n[:22]:>22}" for n in names)
        lines += ["", "by category (tok/s, speedup, accepted):", head, "-" * len(head)]
        for cat, e in cats.items():
            cells = " ".join(
                f"{e[n]['tokens_per_s']:6.1f} x{e[n]['speedup'] or 0:4.2f} a{e[n]['mean_accepted']:.2f}".rjust(22)
                for n in names
            )
            lines.append(f"{cat[:11]:<11} {e['prompts']:>3} {e['plain_tokens_per_s']:7.1f} {cells}")
    for temp, e in (res.get("sampling") or {}).items():
        lines.append("")
        lines.append(
            f"sampling at temperature {temp} (greedy and typical: tree {e['tree']}, greedy speedup in this run "
            f"{e['greedy_speedup']:.2f}x; exact: tree {e.get('exact_tree', e['tree'])}):"
        )
        lines.append(f"  plain sampling  {e['plain_tokens_per_s']:8.2f} tok/s")
        for k, (_, _, what) in SAMPLING_KINDS.items():
            if k + "_tokens_per_s" not in e:
                continue
            same = f", {e[k + '_identical']}/{e['prompts']} identical" if SAMPLING_KINDS[k][1] == "coupled" else ""
            vs_peer = f" ({e[k + '_vs_peer']:.2f}x the peer's sampling)" if k + "_vs_peer" in e else ""
            lines.append(
                f"  {k:<15} {e[k + '_tokens_per_s']:8.2f} tok/s = {e[k + '_speedup']:.2f}x plain sampling{vs_peer}, "
                f"{e[k + '_mean_accepted']:.2f} accepted/step{same}  [{what}]"
            )
        if "peer_tokens_per_s" in e:
            lines.append(
                f"  peer sampling   {e['peer_tokens_per_s']:8.2f} tok/s (onnxruntime-genai, the whole distribution, same "
                f"seeds); our plain sampling {e['plain_vs_peer']:.2f}x it"
            )
    lines += _sources_report(res)
    for t in res["trees"].values():
        lines.append(f"accepted-length histogram {t['tree']}: {t['accept_hist']}")
        for d in t["divergences"]:
            gap = "n/a" if d.get("top2_gap") is None else f"{d['top2_gap']:.2e}"
            tie = " (near-tie)" if d.get("top2_gap") is not None and d["top2_gap"] < 1e-4 else ""
            lines.append(f"  prompt {d['id']}: first difference at token {d['position']}, top-2 logit gap {gap}{tie}")
    if res.get("peer"):
        lines += ["", *_peer_report(res)]
    return "\n".join(lines)


def _sources_report(res: dict) -> list[str]:
    """Tokens a step emitted, by what drafted them (:func:`draft_sources`): greedy's trees, then each
    sampling kind at each temperature."""
    rows = [(f"greedy, {t['tree']}", t.get("sources")) for t in res["trees"].values()]
    for temp, e in (res.get("sampling") or {}).items():
        for k in SAMPLING_KINDS:
            rows.append((f"{k} at {temp}, {e.get('exact_tree', e['tree']) if k.startswith('exact') else e['tree']}",
                         e.get(f"{k}_sources")))  # fmt: skip
    rows = [(name, src) for name, src in rows if src]
    if not rows:
        return []
    w = max(len(name) for name, _ in rows)
    lines = [
        "",
        "tokens a step, by what drafted them (context / datastore: tokens only they drafted; heads: the rest):",
    ]
    for name, src in rows:
        total = sum(src.values())
        lines.append(f"  {name:<{w}} {total:5.2f} = 1 (backbone) + heads {src['heads']:.2f} + context "
                     f"{src['context']:.2f} + datastore {src['datastore']:.2f}")  # fmt: skip
    return lines


def _peer_report(res: dict) -> list[str]:
    """The peer section: its speeds, ours against them, and whether its tokens equal ours."""
    n = res["prompts"]
    lines = [
        f"peer {res['peer']} ({res['peer_version']}), same prompt ids, same clock"
        + (f", graph {res['peer_model']}" if res.get("peer_model") else "")
        + ":"
    ]
    if "huge_pages" in res:
        hp = res["huge_pages"]
        lines.append(
            f"  huge pages (runtime.hugepages, MB collapsed): ours {hp['ours']}, the peer's {hp['peer']}"
            + (
                " (--peer-huge-pages)"
                if hp.get("peer_asked")
                else " (as its users run it; --peer-huge-pages gives it the same)"
            )
        )
    if not res["threads"]:
        lines.append("  (no --threads: each library chose its thread count; pass --threads for a like-for-like run)")
    diverged = "".join(f"; prompt {d['id']} first differs at token {d['position']}" for d in res["peer_divergences"])
    lines.append(
        f"  peer plain      {res['peer_tokens_per_s']:8.2f} tok/s; its tokens equal our plain decode's on "
        f"{res['peer_identical']}/{n} prompts{diverged}"
    )
    if "peer_ngram_tokens_per_s" in res:
        if res["peer_ngram_tokens_per_s"] is None:
            lines.append(f"  peer n-gram     not run: {res['peer_ngram_unavailable']}")
        else:
            o = res["peer_ngram_options"]
            accepted = res["peer_ngram_drafts_accepted"]
            lines.append(
                f"  peer n-gram     {res['peer_ngram_tokens_per_s']:8.2f} tok/s = "
                f"{res['peer_ngram_speedup']:.2f}x its plain (ngram_size {o['ngram_size']}, max_draft_tokens {o['max_draft_tokens']}"
                + (f", {100 * accepted:.0f}% of drafted tokens accepted" if accepted is not None else "")
                + f"); tokens equal its plain on {res['peer_ngram_identical_to_peer']}/{n}"
            )
    lines.append(f"  our plain       {res['ar_tokens_per_s']:8.2f} tok/s = {res['plain_vs_peer']:.2f}x peer plain")
    for t in res["trees"].values():
        vs_ngram = t.get("medusa_vs_peer_ngram")
        lines.append(
            f"  our Medusa      {t['medusa_tokens_per_s']:8.2f} tok/s = {t['medusa_vs_peer']:.2f}x peer plain"
            + (f", {vs_ngram:.2f}x peer n-gram" if vs_ngram is not None else "")
            + f" (tree {t['tree']})"
        )
    return lines


def plot_bench(res: dict, path: str | Path) -> Path:
    from runtime.errors import require_extra

    require_extra("--plot", "train", ("matplotlib",))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False}):  # a tree named "a$b$" is text, not TeX
        return _plot_bench(plt, res, Path(path))


def _plot_bench(plt, res: dict, path: Path) -> Path:
    from runtime.paths import save_figure

    trees = list(res["trees"].values())
    peer = bool(res.get("peer"))
    fig, axes = plt.subplots(1, 3 if peer else 2, figsize=(18 if peer else 12, 4.5))
    ax1, ax2 = axes[:2]
    width = 0.8 / len(trees)
    max_len = max(int(k) for t in trees for k in t["accept_hist"]) if trees else 1
    for i, t in enumerate(trees):
        total = sum(t["accept_hist"].values()) or 1
        xs = np.arange(1, max_len + 1)
        ys = [t["accept_hist"].get(str(x), 0) / total for x in xs]
        ax1.bar(
            xs + (i - (len(trees) - 1) / 2) * width, ys, width, label=f"{t['tree']} (mean {t['mean_accepted']:.2f})"
        )
    ax1.set_xlabel("tokens accepted per step")
    ax1.set_ylabel("share of steps")
    ax1.set_title("Accepted length")
    ax1.legend(fontsize=8)
    labels = ["plain"] + [t["tree"] for t in trees]
    parts = ["engine", "heads", "candidates", "acceptance", "kv_update", "other"]
    bottom = np.zeros(len(labels))
    ar_ms = res["ar_step_ms"]
    for part in parts:
        vals = np.array([ar_ms if part == "engine" else 0.0] + [t["step_ms"][part] for t in trees])
        ax2.bar(labels, vals, bottom=bottom, label=part)
        bottom += vals
    for i, t in enumerate(trees, 1):
        ax2.text(i, bottom[i], f"{t['speedup']:.2f}x", ha="center", va="bottom", fontsize=9)
    ax2.set_ylabel("ms per step (plain: per token)")
    ax2.set_title("Time per step")
    ax2.legend(fontsize=8)
    if peer:  # throughput beside the peer's, on the same prompts and clock
        bars = [("plain", res["ar_tokens_per_s"], "C0")] + [(t["tree"], t["medusa_tokens_per_s"], "C0") for t in trees]
        bars.append((f"{res['peer']} plain", res["peer_tokens_per_s"], "C1"))
        if res.get("peer_ngram_tokens_per_s") is not None:
            bars.append((f"{res['peer']} n-gram", res["peer_ngram_tokens_per_s"], "C1"))
        axes[2].bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
        axes[2].set_ylabel("tokens/s (prefill + decode)")
        axes[2].set_title(f"Throughput vs {res['peer_version']}")
        axes[2].tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"medusa-run bench: {res['prompts']} prompts, {res['max_new_tokens']} new tokens, {res['backend']}")
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
