"""Paired comparison of trees and draft rankings under coupled sampling (``drafts="coupled"``).

With coupled sampling a seed fixes the tokens whatever is drafted (``runtime.decode.PositionNoise``),
so trees and draft rankings can be compared on the very same text, without the text-to-text variance
that makes unpaired sampling runs hard to read. Each prompt runs plain sampling, every (tree,
factor) configuration and plain sampling again, back to back (interleaved, so the machine's drift falls
on all alike), and every run is checked to emit plain sampling's tokens. A factor ``c`` ranks the heads' drafts by
``logits / (c T) + g_t``; ``c = 0``: the heads' own top-k without the noise (what ``drafts="top"``
drafts, verified by the coupled walk); the backbone's draws (``PositionNoise.choose``) are untouched.

    python -m scripts.coupled_pairs artifacts/smollm2-135m-medusa --per-category 2 --temperature 0.7 \\
        --factors 0 0.5 1 2 --trees chain_1 smollm2_ort_cpu

Prints, per configuration, the accepted tokens per step, tokens/s (decode time, prefill excluded)
and the ratio to plain sampling; then greedy Medusa against plain greedy decoding on the same prompts
(also interleaved), the speedup sampling is held against. A measurement tool: it patches ``PositionNoise.perturb`` for the
drafts only.
"""

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/mt_bench_question.jsonl"))
    ap.add_argument("--per-category", type=int, default=2, help="the first N prompts of each category (0: all)")
    ap.add_argument("--limit", type=int, default=None, help="then the first N prompts")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--factors", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--trees", nargs="+", default=None,
                    help="trees to compare (default: the artifact's sampling tree and its default tree)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.temperature <= 0 or any(c < 0 for c in a.factors):
        raise SystemExit("--temperature must be > 0 and --factors >= 0")

    import runtime
    import runtime.decode as D
    from runtime.bench import load_prompts

    gen = runtime.load(a.artifact, threads=a.threads, reuse_prefix=False)  # each run prefills its prompt
    trees = [gen._tree(t) for t in a.trees] if a.trees else [gen.sampling_tree or gen.default_tree, gen.default_tree]
    trees = list({t.name: t for t in trees}.values())  # each once
    prompts = load_prompts(a.prompts, limit=a.limit, per_category=a.per_category or None)
    chats = [gen.encode([{"role": "user", "content": p.text}]) for p in prompts]
    configs = [(t, c) for t in trees for c in a.factors]
    # per configuration (None: plain sampling, run first and last for each prompt): tokens, decode
    # seconds, steps, runs with plain's tokens
    totals = {k: [0, 0.0, 0, 0] for k in [None, "greedy_plain", "greedy", *range(len(configs))]}
    original = D.PositionNoise.perturb  # the drafts' ranking only: the backbone's draws do not go through it
    try:
        warm = gen.encode([{"role": "user", "content": "Hello"}])
        gen.generate(warm, max_new_tokens=8, temperature=a.temperature, seed=0)
        for i, ids in enumerate(chats):
            kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=i)
            plain = gen.generate(ids, medusa=False, **kw)
            _add(totals[None], plain, plain.tokens)
            for j in range(len(configs)):  # the order rotates by prompt: drift within a prompt hits each alike
                k = (i + j) % len(configs)
                tree, c = configs[k]
                D.PositionNoise.perturb = _ranking(original, c)
                _add(totals[k], gen.generate(ids, tree=tree, **kw), plain.tokens)
            D.PositionNoise.perturb = original
            _add(totals[None], gen.generate(ids, medusa=False, **kw), plain.tokens)  # plain again, last: no order bias
            # greedy on the same prompt, for reference: plain, Medusa (the default tree), plain again
            greedy_plain = gen.generate(ids, medusa=False, max_new_tokens=a.max_new_tokens)
            _add(totals["greedy_plain"], greedy_plain, greedy_plain.tokens)
            _add(totals["greedy"], gen.generate(ids, max_new_tokens=a.max_new_tokens), greedy_plain.tokens)
            _add(
                totals["greedy_plain"],
                gen.generate(ids, medusa=False, max_new_tokens=a.max_new_tokens),
                greedy_plain.tokens,
            )
    finally:
        D.PositionNoise.perturb = original
    n = len(chats)
    base = _rate(totals[None])
    print(f"{a.artifact}: {n} prompts, temperature {a.temperature}, {a.max_new_tokens} new tokens, seeds 0..{n - 1}")
    print(f"  plain sampling                 {base:7.2f} tok/s (before and after each prompt's other runs)")
    for k, (tree, c) in enumerate(configs):
        tokens, _, steps, same = totals[k]
        print(f"  {tree.name:<22} c={c:<4} {_rate(totals[k]):7.2f} tok/s = {_ratio(_rate(totals[k]), base):.2f}x plain "
              f"sampling, accepted {_ratio(tokens, steps):.3f}, plain sampling's tokens {same}/{n}")  # fmt: skip
    g, gp = totals["greedy"], totals["greedy_plain"]
    print(f"  greedy, for reference: Medusa ({gen.default_tree.name}) {_rate(g):.2f} tok/s = "
          f"{_ratio(_rate(g), _rate(gp)):.2f}x plain greedy {_rate(gp):.2f} tok/s, accepted {_ratio(g[0], g[2]):.3f}, "
          f"identical {g[3]}/{n}")  # fmt: skip
    differ = [k for k in totals if totals[k][3] < (2 * n if k in (None, "greedy_plain") else n)]
    if differ:
        raise SystemExit(f"some runs did not emit plain decoding's tokens: {differ}")


def _add(total: list, g, plain_tokens) -> None:
    """Tokens after the prefill's (as DecodeStats.tokens_per_s and mean_accepted count them), decode
    seconds, steps, and whether the run emitted ``plain_tokens``."""
    total[0] += sum(k * v for k, v in g.stats.accept_hist.items())
    total[1] += g.stats.decode_s
    total[2] += sum(g.stats.accept_hist.values())
    total[3] += g.tokens == plain_tokens


def _rate(total: list) -> float:
    return _ratio(total[0], total[1])


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _ranking(original, c: float):
    if c == 0:

        def unperturbed(self, logits, temperature, pos):
            return np.asarray(logits, dtype=np.float32)

        return unperturbed
    return lambda self, logits, temperature, pos: original(self, logits, temperature * c, pos)


if __name__ == "__main__":
    main()
