"""Hydra drafting: level by level (one heads call per depth) against one graph that unrolls the levels.

Issue 13 asks for both ways of drafting a tree with sequentially dependent heads, measured against a
backbone step. The runtime drafts level by level (``runtime.decode.hydra_candidates``: one
``heads.onnx`` call per depth, batched over that depth's parents, the top-k taken in numpy). The
alternative traced here, for one static tree, is a single graph: ``hidden [1, H], root [1] ->
tokens [N]``, every level's heads call and its top-k inside the graph (``torch.topk`` -> ONNX
``TopK``), the paths gathered from the tokens drafted above. Its weights are the artifact's heads
(the shipped checkpoint its provenance names), traced as the exporter traces ``heads.onnx``, and
quantized the same way where the runtime uses ``heads_int8.onnx``.

The script checks that both give the same tokens on real hidden states (MT-Bench prompts' last
prefill positions and every decode step of a short greedy run), then times, interleaved, with the
artifact's threads: the level-by-level drafting as the runtime runs it, the unrolled graph, and a
backbone step verifying the tree (N = the tree's nodes) and a plain step (N = 1).

    python -m scripts.bench_unrolled_drafts artifacts/smollm2-135m-hydra --tree smollm2_hydra_flat8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from scripts.measure_heads_cost import _median_ms

ROOT = Path(__file__).resolve().parents[1]


def unrolled_module(heads, lm_head, embed, tree):
    """The tree's drafting as one torch module: ``(hidden [1, H], root [1]) -> tokens [N]`` (int64),
    node i's token rank ``node_rank[i]`` of head ``depth - 1`` run on its parent's path, as
    ``hydra_candidates`` drafts it. The tree's structure is unrolled into the graph at trace time."""
    import torch

    parent = [int(p) for p in tree.parent]
    rank = [int(r) for r in tree.node_rank]
    depth = [int(d) for d in tree.position_ids]
    K = heads.config.num_heads
    levels = []  # per depth: (parents with children there, per node (its parent's row, its rank))
    for d in range(1, max(depth) + 1):
        nodes = [i for i in range(len(depth)) if depth[i] == d]
        parents = sorted({parent[i] for i in nodes})
        levels.append((d, parents, [(i, parents.index(parent[i]), rank[i]) for i in nodes]))

    def path_of(node: int) -> list[int]:
        out = [node]
        while parent[out[-1]] >= 0:
            out.append(parent[out[-1]])
        return out[::-1]

    class Unrolled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads, self.lm_head, self.embed = heads, lm_head, embed

        def forward(self, hidden, root):
            tokens: list = [None] * len(depth)
            tokens[0] = root
            for d, parents, nodes in levels:
                rows = [torch.cat([tokens[j] for j in path_of(p)]) for p in parents]  # each [d]
                path_ids = torch.stack(rows)  # [P, d]
                if d < K:  # the graph's path width is the head count; unused entries are ignored
                    path_ids = torch.cat([path_ids, path_ids.new_zeros(len(parents), K - d)], dim=1)
                path_len = torch.full((len(parents),), d, dtype=torch.long)
                logits = self.heads(
                    hidden.expand(len(parents), -1), path_ids, path_len, self.lm_head, self.embed.weight
                )
                k = max(r for _, _, r in nodes) + 1
                top = torch.topk(logits, k, dim=-1).indices  # [P, k]
                for i, row, r in nodes:
                    tokens[i] = top[row, r : r + 1]
            return torch.cat(tokens)

    return Unrolled().eval()


def export_unrolled(module, hidden_size: int, path: Path, quantize: bool) -> Path:
    import torch

    args = (torch.zeros(1, hidden_size), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=["hidden_states", "root"], output_names=["tokens"],
                          opset_version=18, do_constant_folding=True, dynamo=False)  # fmt: skip
    if not quantize:
        return path
    from exporter.quantize import quantize_int8

    out = path.with_name(path.stem + "_int8.onnx")
    quantize_int8(path, out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--tree", default=None, help="the tree drafted (default: the artifact's default tree)")
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/mt_bench_question.jsonl"))
    ap.add_argument("--limit", type=int, default=4, help="prompts whose hidden states are drafted from")
    ap.add_argument("--steps", type=int, default=24, help="hidden states per prompt (spread over its positions)")
    ap.add_argument("--repeat", type=int, default=200, help="timed calls of each kind per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median of their medians)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-tokens", type=int, default=256, help="cache length the backbone steps are timed at")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import torch

    import runtime
    from exporter.heads import load_heads
    from exporter.models import load_backbone

    torch.set_num_threads(a.threads)
    gen = runtime.load(a.artifact, threads=a.threads)
    if gen.backend.spec.medusa_head_type != "hydra":
        raise SystemExit(
            f"{a.artifact}: its heads are {gen.backend.spec.medusa_head_type!r}; this compares Hydra drafting"
        )
    prov = json.loads((Path(a.artifact) / "medusa_config.json").read_text())["provenance"]
    model, _, _ = load_backbone(prov["source_model"])
    heads = load_heads(ROOT / prov["heads"]["source"], model.config.hidden_size, model.config.vocab_size)
    from runtime.bench import load_prompts

    texts = [p.text for p in load_prompts(a.prompts, limit=a.limit)]
    r = measure(gen, model, heads.eval(), gen._tree(a.tree) if a.tree else gen.default_tree, texts, a.steps,
                a.repeat, a.rounds, a.threads, a.cache_tokens)  # fmt: skip
    print(f"{a.artifact}: " + "\n".join(report(r)))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


def measure(
    gen, model, heads, tree, texts, per_text: int, repeat: int, rounds: int, threads: int, cache_tokens: int
) -> dict:
    """Trace the unrolled graph for ``tree`` from the torch ``model`` and ``heads`` (the artifact's), check
    its tokens against the runtime's level-by-level drafting on hidden states of ``texts`` (``per_text``
    positions each), and time both and two backbone steps, interleaved over ``rounds``."""
    import onnxruntime as ort

    from runtime.decode import hydra_candidates
    from runtime.onnxrt import _options

    backend, spec = gen.backend, gen.backend.spec
    module = unrolled_module(heads, model.lm_head, model.get_input_embeddings(), tree)
    int8 = _uses_int8(backend, gen)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_unrolled(module, model.config.hidden_size, Path(tmp) / "unrolled.onnx", quantize=int8)
        session = ort.InferenceSession(
            str(path), _options(ort, threads, spin=False), providers=["CPUExecutionProvider"]
        )

    # (hidden state, root) pairs from real text: each sampled position's final-normed hidden state and
    # the backbone's argmax there, what a decode step drafts from
    states = []
    for text in texts:
        ids = np.asarray(gen.encode([{"role": "user", "content": text}]), dtype=np.int64)
        backend.reset()
        logits = backend.forward(ids, np.arange(len(ids)), np.tril(np.ones((len(ids),) * 2, dtype=bool)))
        hidden = backend.hidden_states()
        states.extend((hidden[i], int(np.argmax(logits[i]))) for i in range(0, len(ids), max(1, len(ids) // per_text)))
    drafts = lambda h, paths, lens: backend._run_drafts(np.repeat(h[None], len(paths), axis=0), paths, lens)
    level = lambda h, r: hydra_candidates(r, tree, lambda paths, lens: drafts(h, paths, lens), spec.num_medusa_heads)
    unrolled = lambda h, r: session.run(None, {"hidden_states": h[None], "root": np.array([r], dtype=np.int64)})[0]
    same = sum(bool(np.array_equal(level(h, r), unrolled(h, r))) for h, r in states)

    _fill(backend, cache_tokens)
    h0, r0 = states[0]
    timed = []
    for _ in range(rounds):
        timed.append({
            "level_by_level": _median_ms(lambda: level(h0, r0), repeat, warmup=0),
            "unrolled": _median_ms(lambda: unrolled(h0, r0), repeat, warmup=0),
            "backbone_tree": _step_ms(backend, tree.num_nodes, cache_tokens, repeat // 4),
            "backbone_plain": _step_ms(backend, 1, cache_tokens, repeat // 4),
        })  # fmt: skip
    backend.reset()
    med = {k: statistics.median(t[k] for t in timed) for k in timed[0]}
    return {"tree": tree.name, "nodes": tree.num_nodes, "depth": tree.depth, "int8": int8, "threads": threads,
            "cache_tokens": cache_tokens, "repeat": repeat, "same": same, "states": len(states), "rounds": timed,
            "median_ms": med}  # fmt: skip


def report(r: dict) -> list[str]:
    med = r["median_ms"]
    lines = [f"tree {r['tree']} ({r['nodes']} nodes, depth {r['depth']}), heads {'int8' if r['int8'] else 'float'}, "
             f"{r['threads']} threads, median of {len(r['rounds'])} rounds x {r['repeat']} calls",
             f"  same tokens: {r['same']}/{r['states']} hidden states"]  # fmt: skip
    for k, label in (("level_by_level", f"level by level ({r['depth']} heads calls + numpy top-k)"),
                     ("unrolled", "unrolled (one graph, top-k inside)"),
                     ("backbone_tree", f"backbone step verifying {r['nodes']} tokens ({r['cache_tokens']} cached)"),
                     ("backbone_plain", f"backbone plain step (1 token, {r['cache_tokens']} cached)")):  # fmt: skip
        lines.append(f"  {label:62s} {med[k]:7.3f} ms  = {med[k] / med['backbone_tree']:.3f}x the tree step")
    saved = med["level_by_level"] - med["unrolled"]
    lines.append(f"  unrolling saves {saved:.3f} ms a step = {saved / (med['backbone_tree'] + med['level_by_level']):.1%} "
                 "of a Medusa step (tree step + drafting)")  # fmt: skip
    return lines


def _uses_int8(backend, gen) -> bool:
    """Whether the backend's heads session is heads_int8.onnx (the CPU default)."""
    int8 = gen.config.heads_int8
    return int8 is not None and backend.heads_file == int8.file


def _fill(backend, n: int) -> None:
    """A cache of ``n`` tokens (arbitrary ids) to time backbone steps on."""
    backend.reset()
    ids = np.arange(100, 100 + n, dtype=np.int64)
    backend.forward(ids, np.arange(n), np.tril(np.ones((n, n), dtype=bool)))
    backend.commit(np.arange(n))


def _step_ms(backend, n: int, cached: int, repeat: int) -> float:
    """Median time of a forward over ``n`` new tokens (a chain mask) on the ``cached``-token cache
    :func:`_fill` left; nothing committed, so every call sees the same cache."""
    assert backend.cache_len == cached
    ids = np.full(n, 200, dtype=np.int64)
    pos = cached + np.arange(n)
    mask = np.tril(np.ones((n, n), dtype=bool))
    return _median_ms(lambda: backend.forward(ids, pos, mask), max(repeat, 10), warmup=0)


if __name__ == "__main__":
    main()
