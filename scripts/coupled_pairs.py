"""Paired comparison of draft rankings under coupled sampling (``drafts="coupled"``).

With coupled sampling a seed fixes the tokens whatever is drafted (``runtime.decode.PositionNoise``),
so draft rankings can be compared on the very same text, without the text-to-text variance that
makes unpaired sampling runs hard to read. This script changes only how the heads rank their drafts:
``logits / (c T) + g_t``; ``c = 0``: the heads' own top-k without the noise (what ``drafts="top"``
drafts, verified by the coupled walk). The backbone's draws are untouched, and every run is checked
to emit the first run's tokens.

    python -m scripts.coupled_pairs artifacts/smollm2-135m-medusa --per-category 2 --temperature 0.7 \\
        --factors 0 0.5 1 2

Prints, per tree (the artifact's sampling tree, then its default tree), the accepted tokens per step
for each factor. A measurement tool: it patches ``PositionNoise.perturb`` for the drafts only.
"""

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/mt_bench_question.jsonl"))
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--factors", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.temperature <= 0 or any(c < 0 for c in a.factors):
        raise SystemExit("--temperature must be > 0 and --factors >= 0")

    import runtime
    import runtime.decode as D
    from runtime.bench import load_prompts

    gen = runtime.load(a.artifact, threads=a.threads)
    prompts = load_prompts(a.prompts, per_category=a.per_category)
    chats = [gen.encode([{"role": "user", "content": p.text}]) for p in prompts]
    original = D.PositionNoise.perturb
    draws = D.PositionNoise.choose  # the backbone's draws keep the original noise whatever the drafts do
    try:
        D.PositionNoise.choose = lambda self, logits, cfg, pos: int(
            np.argmax(original(self, logits, cfg.temperature, pos))
        )
        print(f"{len(prompts)} prompts, temperature {a.temperature}, {a.max_new_tokens} new tokens, seeds 0..")
        for tree in (gen.sampling_tree or gen.default_tree, gen.default_tree):
            first = None
            for c in a.factors:
                D.PositionNoise.perturb = _ranking(original, c)
                tokens = steps = 0
                texts = []
                for i, ids in enumerate(chats):
                    g = gen.generate(ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=i, tree=tree)
                    tokens, steps = tokens + len(g.tokens), steps + g.stats.steps
                    texts.append(g.tokens)
                first = first or texts
                same = sum(x == y for x, y in zip(texts, first))
                print(f"tree {tree.name:<16} c={c:<4} accepted {tokens / steps:.3f}  same tokens as c={a.factors[0]}: "
                      f"{same}/{len(texts)}", flush=True)  # fmt: skip
    finally:
        D.PositionNoise.perturb, D.PositionNoise.choose = original, draws


def _ranking(original, c: float):
    if c == 0:

        def unperturbed(self, logits, temperature, pos):
            return np.asarray(logits, dtype=np.float32)

        return unperturbed
    return lambda self, logits, temperature, pos: original(self, logits, temperature * c, pos)


if __name__ == "__main__":
    main()
