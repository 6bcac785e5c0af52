"""How head accuracy grows with the number of distilled answers (and with epochs).

    python -m scripts.learning_curve --sizes 560 1120 2245 --extra 1120:4 \
        --reference exporter/shipped_heads/smollm2-135m --out runs/learning_curve

Needs the self-distilled answers (`--data`, with the hidden states distillation kept) and, for
`--reference`, their hidden-state cache: scripts/train_smollm2_heads.sh makes both (~147 min of
distillation on 2 CPU cores); a fresh clone has neither. Everything is written under `--out`
(default runs/learning_curve, git-ignored), except the `--plot` PNG, which replaces an existing
file only with `--force`.

Each run trains Medusa-1 heads (the shipped recipe: `--num-layers`, `--epochs`, `--lr` below)
on the first N training answers of `--data` (file order), keeping every held-out and calibration
record, so that every run is measured on the same held-out answers (splits are by a hash of the
record id). Hidden states come from the distillation's kept states (symlinked), so a subset costs
the training alone. `--extra N:E` adds a run on N answers for E epochs (more passes over the same
data: is the recipe under-trained, or short of data?). `--reference` adds finished heads (their
json's meta gives their answer count). The table and a log-linear fit of head-1 top-1 against
log2(answers) go to stdout and `<out>/learning_curve.json`.

Every run's held-out accuracy is measured here twice, from the heads files: with the heads
proposing any token, and with their draft vocabulary (the tokens of that run's training
softmax, `exporter.heads`), which is what `medusa-train medusa1` ships by default. A smaller run
covers fewer tokens, so without the restriction more of its top ranks go to tokens the loss never
ranked; the fit uses the draft-vocabulary numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subset(data: Path, n_train: int, out: Path) -> tuple[Path, int]:
    """Write held-out + calibration records and the first ``n_train`` training records of ``data``."""
    from training.data import split_of
    from training.distill import states_dir

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"answers_{n_train}.jsonl"
    kept, n = [], 0
    with open(data, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if split_of(rec["id"]) != "train":
                kept.append(line)
            elif n < n_train and rec["response_ids"]:
                kept.append(line)
                n += 1
    if not path.exists() or path.read_text(encoding="utf-8") != "".join(kept):
        path.write_text("".join(kept), encoding="utf-8")
    link = states_dir(path)
    if not link.exists():
        link.symlink_to(states_dir(Path(data)).resolve(), target_is_directory=True)
    return path, n


def train(path: Path, out: Path, epochs: int, a) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "training.cli",
        "medusa1",
        "--model",
        a.model,
        "--data",
        str(path),
        "--out",
        str(out),
        "--num-layers",
        str(a.num_layers),
        "--epochs",
        str(epochs),
        "--lr",
        str(a.lr),
        "--threads",
        str(a.threads),
        "--seed",
        str(a.seed),
    ]
    meta_file = out / "medusa_heads.json"
    if meta_file.exists() and not a.retrain:
        print(f"[learning-curve] reusing {out}")
    else:
        print("[learning-curve] " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(meta_file.read_text())["meta"]


def row(meta: dict, source: str, cache: str) -> dict:
    """One point of the curve: what a heads run's meta says about its training, where the heads
    and the hidden-state cache they were evaluated with are."""
    return {
        "answers": meta["train_examples"],
        "epochs": meta["epochs"],
        "steps": meta["steps"],
        "positions": meta["train_positions_used"],
        "heldout_examples": meta["heldout_examples"],
        "train_seconds": meta["train_seconds"],
        "source": source,
        "cache": cache,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/distill/smollm2_alpaca.jsonl")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sizes", type=int, nargs="+", default=[560, 1120, 2245])
    p.add_argument("--extra", nargs="*", default=[], help="N:EPOCHS runs")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.0015)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", nargs="*", default=[], help="finished heads folders to add to the table")
    p.add_argument(
        "--reference-cache",
        default="runs/distill/smollm2_alpaca.jsonl.hidden",
        help="hidden-state cache of the references' training data",
    )
    p.add_argument("--out", default="runs/learning_curve")
    p.add_argument("--retrain", action="store_true", help="retrain runs whose heads already exist")
    p.add_argument("--plot", default=None, help="write head top-1 against answers to this PNG")
    p.add_argument("--force", action="store_true", help="replace the --plot file if it exists")
    a = p.parse_args(argv)

    from scripts.common import refuse_existing, require_distilled, require_hidden_cache

    require_distilled("learning_curve", ROOT / a.data)
    if a.reference:
        require_hidden_cache("learning_curve", ROOT / a.reference_cache)
    if a.plot:
        refuse_existing("learning_curve", a.plot, a.force)

    out = ROOT / a.out
    runs = [(n, a.epochs) for n in a.sizes] + [tuple(int(x) for x in e.split(":")) for e in a.extra]
    rows = []
    for n, epochs in runs:
        path, got = subset(ROOT / a.data, n, out)
        t0 = time.time()
        heads_dir = out / f"heads_{n}_e{epochs}"
        meta = train(path, heads_dir, epochs, a)
        rows.append(row(meta, str(heads_dir.relative_to(ROOT)), str(path) + ".hidden"))
        print(f"[learning-curve] {got} answers, {epochs} epochs: trained ({time.time() - t0:.0f} s)", flush=True)
    for ref in a.reference:
        meta = json.loads((Path(ref) / "medusa_heads.json").read_text())["meta"]
        rows.append(row(meta, ref, str(ROOT / a.reference_cache)))
    evaluate(rows, a)
    if len({r["heldout_examples"] for r in rows}) > 1:
        print("[learning-curve] warning: runs were measured on different held-out sets", file=sys.stderr)

    rows.sort(key=lambda r: (r["answers"], r["epochs"]))
    print(
        "\nheld-out top-1 per head (1/2/3/4); 'any': the heads may propose any token, 'draft': only their draft vocabulary"
    )
    print(
        "answers  epochs  steps   positions  draft vocab  any: top-1                  draft: top-1                head-1 top-5 draft"
    )
    for r in rows:
        print(
            f"{r['answers']:>7}  {r['epochs']:>6}  {r['steps']:>5}  {r['positions']:>10}  {r['draft_vocab']:>11}  "
            + " / ".join(f"{x:.3f}" for x in r["top1_any"])
            + "   "
            + " / ".join(f"{x:.3f}" for x in r["top1"])
            + f"   {r['top5'][0]:.3f}"
        )

    # head-1 top-1 = a + b * log2(answers), over the runs at the base epoch count
    base = [r for r in rows if r["epochs"] == a.epochs]
    fit, fit_any = None, None
    if len({r["answers"] for r in base}) >= 2:
        xs = [math.log2(r["answers"]) for r in base]
        for key in ("top1_any", "top1"):
            ys = [r[key][0] for r in base]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            c = my - b * mx
            res = {"intercept": c, "per_doubling": b, "residual_max": max(abs(y - c - b * x) for x, y in zip(xs, ys))}
            label = "draft vocabulary" if key == "top1" else "any token"
            print(
                f"\nfit ({a.epochs} epochs, {label}): head-1 top-1 = {c:.3f} + {b:.4f} * log2(answers) "
                f"(largest residual {res['residual_max']:.3f})"
            )
            if b > 0:
                for target in (0.45, 0.56):
                    need = 2 ** ((target - c) / b)
                    res[f"answers_for_{target}"] = need
                    print(
                        f"  head-1 top-1 {target:.2f} would need about {need:,.0f} answers "
                        f"({need / max(r['answers'] for r in base):.0f}x the largest run)"
                    )
            if key == "top1":
                fit = res
            else:
                fit_any = res
    (out / "learning_curve.json").write_text(json.dumps({"rows": rows, "fit": fit, "fit_any_token": fit_any}, indent=1))
    if a.plot:
        plot(rows, a.epochs, fit, a.plot)
    return 0


def evaluate(rows, a) -> None:
    """top1/top5 (draft vocabulary) and top1_any/top5_any (any token) of each row's heads."""
    import torch

    from exporter.heads import load_heads
    from exporter.models import load_backbone
    from training.medusa1 import accuracy_any_and_draft, load_split, target_vocab

    torch.set_num_threads(a.threads)
    model = load_backbone(a.model)[0]
    for r in rows:
        heads = load_heads(ROOT / r["source"], hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size)
        K = heads.config.num_heads
        train = load_split(Path(r["cache"]), "train", K)
        held = load_split(Path(r["cache"]), "heldout", K)
        used = target_vocab(train)
        any_, draft = accuracy_any_and_draft(heads, model.lm_head, held, used)
        r.update(
            {
                "draft_vocab": int(len(used)),
                "top1_any": any_[:, 0].round(4).tolist(),
                "top5_any": any_.sum(1).round(4).tolist(),
                "top1": draft[:, 0].round(4).tolist(),
                "top5": draft.sum(1).round(4).tolist(),
            }
        )
        print(
            f"[learning-curve] evaluated {r['source']}: head-1 top-1 any {any_[0, 0]:.3f}, draft {draft[0, 0]:.3f}",
            flush=True,
        )


def plot(rows, epochs, fit, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base = [r for r in rows if r["epochs"] == epochs]
    for k in range(len(base[0]["top1"])):
        (line,) = ax.plot([r["answers"] for r in base], [r["top1"][k] for r in base], "o-", label=f"head {k + 1}")
        other = [r for r in rows if r["epochs"] != epochs]
        ax.plot([r["answers"] for r in other], [r["top1"][k] for r in other], "x", color=line.get_color(), ms=9)
    if fit:
        xs = [min(r["answers"] for r in base), 20 * max(r["answers"] for r in base)]
        ax.plot(
            xs,
            [fit["intercept"] + fit["per_doubling"] * math.log2(x) for x in xs],
            ":",
            color="gray",
            label="head 1: log-linear fit",
        )
    ax.axhline(0.56, color="k", lw=0.8, ls="--")
    ax.text(xs[0] if fit else base[0]["answers"], 0.565, "official Vicuna-7B head 1 (0.56)", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("self-distilled answers (training split)")
    ax.set_ylabel("held-out top-1")
    ax.set_title(f"Medusa-1 heads on SmolLM2-135M ({epochs} epochs; x: other epoch counts)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
