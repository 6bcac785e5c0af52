"""Write the model card (CARD.md) of trained heads from their ``medusa_heads.json`` meta."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import MedusaError
from runtime.paths import read_text
from training.data import prompt_id


def write_card(heads_dir: Path, data: Path, command: str, machine: str, extra: str = "") -> Path:
    heads_dir = Path(heads_dir)
    cfg_path = heads_dir / "medusa_heads.json"
    if not cfg_path.is_file():
        raise MedusaError(f"{cfg_path} does not exist: train the heads first")
    cfg = json.loads(read_text(cfg_path))
    meta = cfg["meta"]
    records = [json.loads(line) for line in read_text(Path(data)).splitlines() if line.strip()]
    temps = sorted({r.get("temperature", "unknown") for r in records}, key=str)
    prompts = len({prompt_id(str(r["id"])) for r in records})  # ID@k: a prompt's k-th sampled answer
    if len(temps) == 1:
        sampling = f"with temperature {temps[0]}{' (greedy)' if temps == [0.0] else ''}"
    else:
        counts = {t: sum(r.get("temperature", "unknown") == t for r in records) for t in temps}
        sampling = "with " + ", ".join(
            f"temperature {t}{' (greedy)' if t == 0.0 else ''} {n} times" for t, n in counts.items()
        )
    answers = f" ({len(records)} answers)" if len(records) != prompts else ""
    tokens = sum(len(r["response_ids"]) for r in records)
    eos = sum(r.get("finish") == "eos" for r in records)
    weights = heads_dir / "medusa_heads.safetensors"
    size = weights.stat().st_size
    from safetensors import safe_open

    from exporter.heads import DRAFT_VOCAB_KEY

    with safe_open(str(weights), framework="pt") as f:
        dtypes = sorted({str(f.get_slice(k).get_dtype()).lower() for k in f.keys() if k != DRAFT_VOCAB_KEY})
    dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
    dtype_text = "/".join(dtype.get(d, d) for d in dtypes)
    blocks = "residual block" if cfg["num_layers"] == 1 else "residual blocks"
    rows = "\n".join(
        f"| {k + 1} | {a:.3f} | {b:.3f} | {c:.3f} |"
        for k, (a, b, c) in enumerate(zip(meta["heldout_top1"], meta["heldout_top5"], meta["heldout_top1_untrained"]))
    )
    hist = "\n".join(
        f"| {h['epoch']} | {h['step']} | " + " / ".join(f"{x:.3f}" for x in h["top1"]) + " |" for h in meta["history"]
    )
    init = meta.get("init_heads")
    start = "before this run" if init else "untrained"
    went_on = (
        f"Training went on from the heads in `{init}` (the column '{start}': those heads on this held-out split).\n"
        if init
        else ""
    )
    cache_s = meta["cache_seconds"]
    if not meta.get("cache_built", True):
        cache_note = f"the hidden-state cache of an earlier run was reused ({cache_s:.0f} s with loading the model)"
    elif meta.get("cache_examples_from_states") is not None:
        cache_note = (
            f"building the hidden-state cache took {cache_s:.0f} s with loading the model "
            f"({meta['cache_examples_from_states']} answers copied from the states distillation kept, "
            f"{meta['cache_examples_computed']} run through the backbone)"
        )
    else:
        cache_note = f"loading or building the hidden-state cache took {cache_s:.0f} s"
    draft = ""
    if cfg.get("draft_vocab_size"):
        draft = (
            f"\nThe heads propose only the {cfg['draft_vocab_size']} tokens of the training softmax (their draft "
            "vocabulary, `exporter.heads`): a token that never was a target is never a candidate."
        )
        draft += " The held-out accuracy below is theirs with it."
        added = meta.get("draft_vocab_added")
        if added:
            fmt = lambda xs: " / ".join(f"{x:.3f}" for x in xs)
            draft += (
                f" It was added after training (`{added['command']}`); held-out top-1 without it "
                f"{fmt(added['heldout_top1_any_token'])}, with it {fmt(added['heldout_top1_draft'])} (top-5 "
                f"{fmt(added['heldout_top5_any_token'])} -> {fmt(added['heldout_top5_draft'])}); the per-epoch "
                "values further below were measured during training, without it."
            )
        draft += "\n"
    hydra = cfg.get("kind", "medusa") == "hydra"
    if hydra:
        title = "Hydra heads (sequentially dependent)"
        shape = (
            f"{cfg['num_heads']} heads: an input layer over the hidden state and the k path tokens' embeddings "
            f"(head k, 1-based), then {cfg['num_layers'] - 1} residual block(s), sharing the backbone's `lm_head`"
        )
        method = (
            "Hydra (Ankner et al. 2024, its MLP form; frozen backbone) on cached last hidden states, teacher "
            "forcing: head k reads the answer's own tokens as its path; loss sum_k 0.8^k CE_k over"
        )
    else:
        title = "Medusa-1 heads"
        shape = f"{cfg['num_heads']} heads, {cfg['num_layers']} {blocks} each, sharing the backbone's `lm_head`"
        method = "Medusa-1 (frozen backbone) on cached last hidden states: loss sum_k 0.8^k CE_k over"
    scale = "For scale, the official Medusa-1 Vicuna-7B heads reach about 0.56 / 0.32 / 0.20 top-1 for heads 1-3."
    if hydra:
        scale = (
            "Hydra heads read their path, so head k's accuracy here is its accuracy given that the tokens above it "
            "are right (teacher forcing): what a tree's acceptance multiplies. " + scale
        )
    text = f"""# SmolLM2-135M-Instruct {title}

{shape}
({size / 1e6:.1f} MB, {dtype_text}; loaded as float32). Head k (1-based) predicts the token k positions after the
backbone's own next token. Layout: medusa-trt (`exporter.heads.load_heads`).

## Data
Self-distilled: SmolLM2-135M-Instruct answered the first {prompts} prompts{answers} of
`../shared/data/alpaca_5000.json` (instruction + input, chat template) {sampling},
at most {records[0].get("max_new_tokens", "?")} new tokens:
{tokens} response tokens, {eos} answers ended with EOS, {len(records) - eos} hit the length limit.
Splits by a hash of the record id: {meta["train_examples"]} train, {meta["heldout_examples"]} held-out
(the accuracy below), the rest calibration (tree selection). MT-Bench was not used.

## Training
{method}
assistant-token targets; {meta["steps"]} steps ({meta["epochs"]} epochs) of {meta["batch_tokens"]}
positions ({meta["train_positions_used"]} train positions), AdamW lr {meta["lr"]}, linear warm-up
+ cosine decay; training softmax over the {meta["train_vocab_size"]} tokens that occur as targets{" or in the starting heads' draft vocabulary" if init else ""}
(`--train-vocab {meta["train_vocab"]}`); accuracy is ranked over the full vocabulary.
Time: training {meta["train_seconds"]:.0f} s; {cache_note}. Machine: {machine}.
{went_on}{draft}
## Held-out accuracy (ranked over the full vocabulary)
| head | top-1 | top-5 | top-1 {start} |
| --- | --- | --- | --- |
{rows}

{scale}

Top-1 per head after each epoch:

| epoch | step | top-1 per head |
| --- | --- | --- |
{hist}
{extra}
## Reproduce
```
{command}
```
"""
    from runtime.paths import write_text_atomic

    return write_text_atomic(heads_dir / "CARD.md", text)
