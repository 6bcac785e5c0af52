"""``medusa-run bench``: plain decoding vs Medusa on the same engine, same prompts.

For every prompt (MT-Bench format: first turn, chat template) it runs plain greedy
decoding and Medusa greedy decoding with each tree, on the same loaded engine and the same
``max_new_tokens``, and optionally a peer (Hugging Face ``generate``) in the same run.
Speeds are end-to-end (prefill + decode) tokens per second, the same clock for everyone.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.decode import PHASES
from runtime.errors import MedusaError

OUTSIDE_ENGINE = ("candidates", "acceptance", "kv_update", "other")


@dataclass
class Prompt:
    id: str
    category: str
    text: str


def load_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """MT-Bench-style JSONL (``question_id``, ``category``, ``turns``): first turns."""
    path = Path(path)
    if not path.is_file():
        raise MedusaError(f"prompt file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text = rec["turns"][0] if "turns" in rec else rec["prompt"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise MedusaError(f"{path}:{n}: expected a JSON object with 'turns' (MT-Bench) or 'prompt'") from None
        out.append(Prompt(str(rec.get("question_id", n)), str(rec.get("category", "")), text))
    if not out:
        raise MedusaError(f"{path} holds no prompts")
    return out[:limit] if limit else out


@dataclass
class RunResult:
    tokens: list[int]
    seconds: float
    steps: int = 0
    times: dict = field(default_factory=dict)
    accept_hist: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def _run(gen, ids, max_new_tokens, medusa, tree=None) -> RunResult:
    t = time.perf_counter()
    out = gen.generate(ids, max_new_tokens=max_new_tokens, medusa=medusa, tree=tree)
    seconds = time.perf_counter() - t
    s = out.stats
    return RunResult(out.tokens, seconds, s.steps, dict(s.times), dict(s.accept_hist))


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
    logits = be.forward(seq, np.arange(len(seq)), np.tril(np.ones((len(seq), len(seq)), dtype=bool)))[-1]
    top2 = np.sort(logits.astype(np.float64))[-2:]
    return {"position": pos, "plain_token": ref[pos], "medusa_token": other[pos], "top2_gap": float(top2[1] - top2[0])}


class HFPeer:
    """Hugging Face ``generate`` (greedy) on the artifact's source model: imports torch."""

    def __init__(self, model_path: str, threads: int | None):
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise MedusaError("--peer hf needs torch and transformers installed") from None
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def run(self, ids, max_new_tokens) -> RunResult:
        torch = self.torch
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, top_p=None, top_k=None, temperature=None)
        seconds = time.perf_counter() - t
        return RunResult(out[0, len(ids):].tolist(), seconds)


def _peer_model_path(gen, explicit: str | None) -> str:
    if explicit:
        return explicit
    prov = gen.config.provenance
    path = prov.get("source_model_path") or prov.get("source_model") or ""
    if path.endswith(")") and " (" in path:  # medusa-export records "NAME (resolved folder)"
        path = path[path.index(" (") + 2 : -1]
    if path == "smollm2-135m":
        from exporter.models import resolve_model

        path = str(resolve_model(path))
    if not path or not Path(path).is_dir():
        raise MedusaError("--peer hf: the artifact does not record a local source model folder; pass --peer-model DIR")
    return path


def run_bench(gen, prompts: list[Prompt], trees: list, max_new_tokens: int = 256, peer: str | None = None,
              peer_model: str | None = None, threads: int | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    trees = [gen._tree(t) for t in trees] or [gen.default_tree]
    names = [t.name for t in trees]
    if len(set(names)) != len(names):
        raise MedusaError(f"--tree: trees must have distinct names, got {names}")
    hf = HFPeer(_peer_model_path(gen, peer_model), threads) if peer == "hf" else None
    if peer not in (None, "hf"):
        raise MedusaError(f"unknown peer {peer!r}: the supported peer is 'hf'")
    # warm up the engine (first-call allocations) outside the measurement
    warm = gen.encode([{"role": "user", "content": "Hello"}])
    gen.generate(warm, max_new_tokens=8, medusa=False)
    gen.generate(warm, max_new_tokens=8, tree=trees[0])

    per_prompt = []
    bar = tqdm(total=len(prompts) * (1 + len(trees) + (hf is not None)), desc="bench", unit="run",
               disable=not progress, file=sys.stderr)
    for p in prompts:
        ids = gen.encode([{"role": "user", "content": p.text}])
        row = {"id": p.id, "category": p.category, "prompt_tokens": len(ids)}
        ar = _run(gen, ids, max_new_tokens, medusa=False)
        bar.update()
        row["ar"] = {"tokens": len(ar.tokens), "seconds": ar.seconds, "tokens_per_s": ar.tokens_per_s}
        row["trees"] = {}
        for tree in trees:
            md = _run(gen, ids, max_new_tokens, medusa=True, tree=tree)
            bar.update()
            row["trees"][tree.name] = {
                "tokens": len(md.tokens), "seconds": md.seconds, "tokens_per_s": md.tokens_per_s,
                "speedup": md.tokens_per_s / ar.tokens_per_s if ar.tokens_per_s else 0.0,
                "steps": md.steps, "times": md.times, "accept_hist": md.accept_hist,
                "mean_accepted": sum(k * v for k, v in md.accept_hist.items()) / max(1, sum(md.accept_hist.values())),
                "identical": md.tokens == ar.tokens,
                "divergence": None if md.tokens == ar.tokens else _divergence(gen, ids, ar.tokens, md.tokens),
            }
        if hf is not None:
            pr = hf.run(ids, max_new_tokens)
            bar.update()
            row["peer"] = {"tokens": len(pr.tokens), "seconds": pr.seconds, "tokens_per_s": pr.tokens_per_s,
                           "identical_to_plain": pr.tokens == ar.tokens}
        per_prompt.append(row)
    bar.close()
    return summarize(gen, per_prompt, trees, max_new_tokens, peer, threads)


def _tree_summary(per_prompt, tree, ar_tps) -> dict:
    rows = [r["trees"][tree.name] for r in per_prompt]
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    hist: dict[int, int] = {}
    times = {p: 0.0 for p in PHASES}
    for r in rows:
        for k, v in r["accept_hist"].items():
            hist[int(k)] = hist.get(int(k), 0) + v
        for k, v in r["times"].items():
            times[k] += v
    decode_s = sum(v for k, v in times.items() if k != "prefill")
    tps = tokens / seconds if seconds else 0.0
    near_ties = [r["divergence"] for r in rows if r["divergence"] and r["divergence"].get("top2_gap") is not None
                 and r["divergence"]["top2_gap"] < 1e-4]
    return {
        "tree": tree.name, "nodes": tree.num_nodes, "paths": [list(p) for p in tree.paths],
        "medusa_tokens_per_s": tps, "speedup": tps / ar_tps if ar_tps else 0.0,
        "median_prompt_speedup": statistics.median(r["speedup"] for r in rows),
        "mean_accepted": sum(k * v for k, v in hist.items()) / max(1, sum(hist.values())),
        "accept_hist": {str(k): v for k, v in sorted(hist.items())},
        "identical": sum(r["identical"] for r in rows),
        "near_tie_divergences": len(near_ties),
        "step_ms": {k: 1000 * v / max(1, steps) for k, v in times.items() if k != "prefill"},
        "overhead_fraction": sum(times[k] for k in OUTSIDE_ENGINE) / decode_s if decode_s else 0.0,
        "divergences": [{"id": per_prompt[i]["id"], **r["divergence"]} for i, r in enumerate(rows) if r["divergence"]],
    }


def summarize(gen, per_prompt, trees, max_new_tokens, peer, threads) -> dict:
    ar_tokens = sum(r["ar"]["tokens"] for r in per_prompt)
    ar_s = sum(r["ar"]["seconds"] for r in per_prompt)
    ar_tps = ar_tokens / ar_s if ar_s else 0.0
    tree_rows = {t.name: _tree_summary(per_prompt, t, ar_tps) for t in trees}
    main = tree_rows[trees[0].name]
    backend = gen.backend
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "artifact": str(gen.folder),
        "backend": type(backend).__name__,
        "providers": getattr(backend, "providers", None),
        "threads": threads,
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
        "per_prompt": per_prompt,
    }
    if peer:
        p_tokens = sum(r["peer"]["tokens"] for r in per_prompt)
        p_s = sum(r["peer"]["seconds"] for r in per_prompt)
        out["peer"] = peer
        out["peer_tokens_per_s"] = p_tokens / p_s if p_s else 0.0
        out["ar_vs_peer"] = ar_tps / out["peer_tokens_per_s"] if out["peer_tokens_per_s"] else 0.0
        out["peer_identical_to_plain"] = sum(r["peer"]["identical_to_plain"] for r in per_prompt)
    return out


def format_report(res: dict, per_prompt: bool = True) -> str:
    lines = []
    if per_prompt:
        names = list(res["trees"])
        head = f"{'id':>5} {'category':<11} {'plain tok/s':>11} " + " ".join(f"{n[:18]:>18}" for n in names) + "  identical"
        lines += [head, "-" * len(head)]
        for r in res["per_prompt"]:
            cells = " ".join(f"{r['trees'][n]['tokens_per_s']:6.1f} x{r['trees'][n]['speedup']:4.2f} a{r['trees'][n]['mean_accepted']:.2f}".rjust(18) for n in names)
            same = "".join("=" if r["trees"][n]["identical"] else "≠" for n in names)
            lines.append(f"{r['id']:>5} {r['category'][:11]:<11} {r['ar']['tokens_per_s']:11.1f} {cells}  {same}")
        lines.append("")
    lines.append(f"{res['prompts']} prompts, max_new_tokens {res['max_new_tokens']}, backend {res['backend']} "
                 f"{res.get('providers') or ''} threads {res['threads']}")
    lines.append(f"plain decoding: {res['ar_tokens_per_s']:.2f} tok/s ({res['ar_step_ms']:.1f} ms/token)")
    if "peer_tokens_per_s" in res:
        lines.append(f"peer {res['peer']}: {res['peer_tokens_per_s']:.2f} tok/s -> plain on this engine is "
                     f"{res['ar_vs_peer']:.2f}x the peer; peer tokens identical to plain on {res['peer_identical_to_plain']}/{res['prompts']}")
    head = (f"{'tree':<18} {'nodes':>5} {'tok/s':>7} {'speedup':>7} {'accepted':>8} {'identical':>9} "
            f"{'engine':>7} {'heads':>6} {'cand':>5} {'accept':>6} {'kv':>5} {'other':>5} {'outside':>7}")
    lines += ["", head, "-" * len(head)]
    for t in res["trees"].values():
        ms = t["step_ms"]
        lines.append(
            f"{t['tree'][:18]:<18} {t['nodes']:>5} {t['medusa_tokens_per_s']:7.2f} {t['speedup']:6.2f}x "
            f"{t['mean_accepted']:8.2f} {t['identical']:>4}/{res['prompts']:<4} {ms['engine']:6.1f}m {ms['heads']:5.1f}m "
            f"{ms['candidates']:4.1f}m {ms['acceptance']:5.1f}m {ms['kv_update']:4.1f}m {ms['other']:4.1f}m "
            f"{100 * t['overhead_fraction']:6.1f}%"
        )
    lines.append("(per-step times in ms; 'outside' = time outside engine calls / Medusa decode time)")
    for t in res["trees"].values():
        lines.append(f"accepted-length histogram {t['tree']}: {t['accept_hist']}")
        for d in t["divergences"]:
            gap = "n/a" if d.get("top2_gap") is None else f"{d['top2_gap']:.2e}"
            tie = " (near-tie)" if d.get("top2_gap") is not None and d["top2_gap"] < 1e-4 else ""
            lines.append(f"  prompt {d['id']}: first difference at token {d['position']}, top-2 logit gap {gap}{tie}")
    return "\n".join(lines)


def plot_bench(res: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trees = list(res["trees"].values())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(trees)
    max_len = max(int(k) for t in trees for k in t["accept_hist"]) if trees else 1
    for i, t in enumerate(trees):
        total = sum(t["accept_hist"].values()) or 1
        xs = np.arange(1, max_len + 1)
        ys = [t["accept_hist"].get(str(x), 0) / total for x in xs]
        ax1.bar(xs + (i - (len(trees) - 1) / 2) * width, ys, width, label=f"{t['tree']} (mean {t['mean_accepted']:.2f})")
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
    fig.suptitle(f"medusa-run bench: {res['prompts']} prompts, {res['max_new_tokens']} new tokens, {res['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
