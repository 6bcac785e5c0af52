"""Medusa-2: backbone and heads trained jointly (Medusa paper, Sec. 2.2.2).

    loss = L_backbone + lambda * sum_k 0.8**k * CE_k

``L_backbone`` is the backbone's next-token CE on the data (``ce``), or, for self-distilled
data, the KL divergence from the *original* (frozen copy of the) model's distribution to
the tuned one (``kl``), which keeps the backbone's output quality while the heads pull on
its hidden states. The heads get a larger learning rate than the backbone, and the first
``warmup_steps`` train the heads only (the backbone's optimizer does not step), so that
untrained heads' large gradients do not disturb the backbone.

Output: ``OUT/backbone/`` (Hugging Face folder with the tokenizer) and ``OUT/heads/``
(medusa-trt layout).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.errors import MedusaError
from runtime.log import quiet
from training.data import IGNORE, build_examples, dropped, head_labels, next_token_labels, split_examples
from training.medusa1 import format_accuracy, head_weights

log = logging.getLogger("medusa_trt.training")


@dataclass
class Medusa2Config:
    model: str = "smollm2-135m"
    data: Path = Path("runs/distill/smollm2_alpaca.jsonl")
    out: Path = Path("runs/medusa2")
    heads: str | None = None  # start from trained (Medusa-1) heads; None: fresh heads
    num_heads: int = 4
    num_layers: int = 1
    backbone_loss: str = "auto"  # "kl" | "ce" | "auto" (kl when the data is self-distilled)
    head_weight: float = 0.2  # lambda
    lr_backbone: float = 1e-5
    lr_heads: float = 5e-4
    warmup_steps: int = 20  # heads only
    steps: int = 100
    batch_size: int = 4
    max_len: int = 320
    drift_prompts: int = 10  # held-out prompts for the greedy-drift report
    drift_tokens: int = 64
    seed: int = 0
    threads: int | None = None


def is_self_distilled(records: list[dict]) -> bool:
    """Records written by ``medusa-train distill`` carry the generating model and temperature."""
    return bool(records) and all("model" in r and "temperature" in r for r in records)


def make_batch(examples, num_heads: int, pad_id: int = 0):
    """Right-padded ids [B, L], next-token labels [B, L], head labels [B, L, K]."""
    width = max(len(e.tokens) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    lm = np.full((len(examples), width), IGNORE, dtype=np.int64)
    hl = np.full((len(examples), width, num_heads), IGNORE, dtype=np.int64)
    for i, e in enumerate(examples):
        n = len(e.tokens)
        ids[i, :n] = e.tokens
        lm[i, :n] = next_token_labels(e.tokens, e.assistant)
        hl[i, :n] = head_labels(e.tokens, e.assistant, np.arange(n), num_heads)
    return torch.from_numpy(ids), torch.from_numpy(lm), torch.from_numpy(hl)


def combined_loss(
    model, heads, ids, lm_labels, head_lbl, head_weight: float, backbone_loss: str, original=None
) -> tuple[torch.Tensor, dict]:
    """Backbone loss (CE on the data, or KL(original || tuned) on assistant positions) + lambda x heads."""
    hidden = model.model(input_ids=ids).last_hidden_state  # [B, L, H] final-normed
    logits = model.lm_head(hidden)  # [B, L, V]
    mask = lm_labels != IGNORE
    if backbone_loss == "ce":
        l_bb = F.cross_entropy(logits[mask], lm_labels[mask])
    elif backbone_loss == "kl":
        if original is None:
            raise ValueError("the KL backbone loss needs the original model")
        with torch.no_grad():
            ref = F.log_softmax(original(input_ids=ids).logits[mask], dim=-1)
        l_bb = F.kl_div(F.log_softmax(logits[mask], dim=-1), ref, log_target=True, reduction="batchmean")
    else:
        raise MedusaError(f"backbone loss must be 'kl' or 'ce', got {backbone_loss!r}")
    hm = (head_lbl != IGNORE).any(-1)  # positions where some head has a target
    h_logits = heads(hidden[hm], model.lm_head) if heads.config.shared_lm_head else heads(hidden[hm])
    K = h_logits.shape[1]
    per_head = torch.stack(
        [
            F.cross_entropy(h_logits[:, k], head_lbl[hm][:, k], ignore_index=IGNORE)
            if (head_lbl[hm][:, k] != IGNORE).any()
            else h_logits.new_zeros(())
            for k in range(K)
        ]
    )
    l_heads = (head_weights(K) * per_head).sum()
    return l_bb + head_weight * l_heads, {
        "backbone": l_bb.detach(),
        "heads": l_heads.detach(),
        "per_head": per_head.detach(),
    }


def heads_accuracy(model, heads, examples, num_heads: int) -> np.ndarray:
    """Top-1 / top-5 per head on ``examples`` (full vocabulary): [K, 2]."""
    hits = np.zeros((num_heads, 2))
    counts = np.zeros(num_heads)
    with torch.inference_mode():
        for i in range(0, len(examples), 4):
            ids, _, hl = make_batch(examples[i : i + 4], num_heads)
            hidden = model.model(input_ids=ids).last_hidden_state
            hm = (hl != IGNORE).any(-1)
            lg = heads(hidden[hm], model.lm_head) if heads.config.shared_lm_head else heads(hidden[hm])
            lab = hl[hm]
            top = lg.topk(5, dim=-1).indices
            valid = lab != IGNORE
            m = (top == lab.unsqueeze(-1)) & valid.unsqueeze(-1)
            hits[:, 0] += m[..., 0].sum(0).numpy()
            hits[:, 1] += m.any(-1).sum(0).numpy()
            counts += valid.sum(0).numpy()
    return hits / np.maximum(counts, 1)[:, None]


def train_medusa2(cfg: Medusa2Config, backbone=None, examples=None) -> dict:
    """Joint training; saves OUT/backbone and OUT/heads; returns the summary."""
    from tqdm import tqdm

    from exporter.heads import backbone_fingerprint, fresh_heads, load_heads, save_heads
    from exporter.models import load_backbone
    from runtime import checks
    from training.distill import read_records
    from training.files import output_folder

    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.warmup_steps < 0:
        raise MedusaError("steps and batch_size must be at least 1 and warmup_steps at least 0")
    checks.real("lr_backbone", cfg.lr_backbone, 0.0, min_open=True)
    checks.real("lr_heads", cfg.lr_heads, 0.0, min_open=True)
    checks.real("head_weight", cfg.head_weight, 0.0)
    out = output_folder(cfg.out, "--out")  # before the training, not after
    for sub in ("backbone", "heads"):
        output_folder(out / sub, "--out")
    if cfg.lr_heads <= cfg.lr_backbone:
        raise MedusaError(
            f"Medusa-2 trains the heads faster than the backbone: lr_heads ({cfg.lr_heads}) must exceed "
            f"lr_backbone ({cfg.lr_backbone})"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tok, folder = backbone if backbone is not None else load_backbone(cfg.model)
    records = None
    if examples is None:
        records = read_records(cfg.data)
        examples = split_examples(build_examples(records, max_len=cfg.max_len))
        distilled = is_self_distilled(records)
    else:
        distilled = True
    mode = cfg.backbone_loss if cfg.backbone_loss != "auto" else ("kl" if distilled else "ce")
    if mode not in ("kl", "ce"):
        raise MedusaError(f"backbone_loss must be 'kl', 'ce' or 'auto', got {cfg.backbone_loss!r}")
    # the original model: the KL target, and the reference for the drift report
    original = copy.deepcopy(model).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    H, V = model.config.hidden_size, model.config.vocab_size
    if cfg.heads:
        heads = load_heads(cfg.heads, hidden_size=H, vocab_size=V)
        if heads.config.kind != "medusa":  # Hydra heads draft level by level, from the path: another loss
            raise MedusaError(
                f"{cfg.heads} holds {heads.config.kind} heads: Medusa-2 trains Medusa heads (start from Medusa-1 heads, "
                "or from fresh ones without --heads)"
            )
        if heads.config.num_heads != cfg.num_heads:
            raise MedusaError(f"{cfg.heads} holds {heads.config.num_heads} heads; --num-heads says {cfg.num_heads}")
    else:
        heads = fresh_heads(cfg.num_heads, H, V, cfg.num_layers, lm_head=model.lm_head)
    if heads.config.draft_vocab_size:
        # Medusa-2's head loss is over the full vocabulary (and tunes the backbone under it): no restriction
        log.warning(
            "the start heads' draft vocabulary (%d tokens) is dropped: Medusa-2 trains the heads over the "
            "full vocabulary",
            heads.config.draft_vocab_size,
        )
        heads.set_draft_vocab(None)
    start_method = heads.config.meta.get("method")
    heads.config.meta = {}  # the saved heads describe this run, not the run that made the start heads
    acc_start = (
        heads_accuracy(model.eval(), heads.eval(), examples["heldout"], cfg.num_heads)
        if examples["heldout"]
        else np.zeros((cfg.num_heads, 2))
    )
    print(f"held-out accuracy before Medusa-2 ({len(examples['heldout'])} examples):")
    print(format_accuracy(acc_start[:, 0], acc_start[:, 1]))
    model.train()
    heads.train()
    for p in model.parameters():
        p.requires_grad_(True)
    # tied embeddings: lm_head.weight is the embedding matrix; it trains with the backbone
    opt_bb = torch.optim.AdamW(model.parameters(), lr=cfg.lr_backbone, weight_decay=0.0)
    opt_heads = torch.optim.AdamW(heads.parameters(), lr=cfg.lr_heads, weight_decay=0.0)
    train = examples["train"]
    if not train:
        why = dropped(records, cfg.max_len) if records is not None else ""
        raise MedusaError(f"{cfg.data}: no training examples (every record is empty or in a held-out split{why})")
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    loss_log = []
    bar = tqdm(total=cfg.steps, desc="medusa2", unit="step", dynamic_ncols=True, disable=quiet())
    for step in range(cfg.steps):
        batch = [train[i] for i in rng.choice(len(train), min(cfg.batch_size, len(train)), replace=False)]
        ids, lm, hl = make_batch(batch, cfg.num_heads)
        warm = step < cfg.warmup_steps
        loss, parts = combined_loss(
            model, heads, ids, lm, hl, cfg.head_weight, mode, original if mode == "kl" else None
        )
        opt_bb.zero_grad(set_to_none=True)
        opt_heads.zero_grad(set_to_none=True)
        loss.backward()
        lr_scale = 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt_heads.param_groups:
            g["lr"] = cfg.lr_heads * lr_scale
        opt_heads.step()
        if not warm:  # warm-up: the heads learn first; the backbone stays as it was
            for g in opt_bb.param_groups:
                g["lr"] = cfg.lr_backbone * lr_scale
            opt_bb.step()
        loss_log.append(
            {"step": step, "loss": loss.item(), "backbone": parts["backbone"].item(), "heads": parts["heads"].item()}
        )
        bar.set_postfix(bb=f"{parts['backbone'].item():.3f}", heads=f"{parts['heads'].item():.3f}", warm=warm)
        bar.update(1)
    bar.close()
    train_s = time.time() - t0
    model.eval()
    heads.eval()
    acc = (
        heads_accuracy(model, heads, examples["heldout"], cfg.num_heads)
        if examples["heldout"]
        else np.zeros((cfg.num_heads, 2))
    )
    print(f"held-out accuracy after Medusa-2 ({len(examples['heldout'])} examples):")
    print(format_accuracy(acc[:, 0], acc[:, 1]))
    prompts = [e.tokens[: e.response_start].tolist() for e in examples["heldout"][: cfg.drift_prompts]]
    drift = greedy_drift(original, model, prompts, cfg.drift_tokens) if prompts else None
    if drift is not None:
        print(
            f"greedy drift: {drift:.3f} of {cfg.drift_tokens} new tokens identical to the original model's "
            f"on {len(prompts)} held-out prompts"
        )
    summary = {
        "method": "medusa-2 (backbone and heads jointly)",
        "backbone": str(Path(cfg.out) / "backbone"),
        "backbone_fingerprint": backbone_fingerprint(model),  # the tuned backbone's, saved beside the heads
        "backbone_loss": mode,
        "head_weight": cfg.head_weight,
        "steps": cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "lr_backbone": cfg.lr_backbone,
        "lr_heads": cfg.lr_heads,
        "heldout_top1": acc[:, 0].round(4).tolist(),
        "heldout_top5": acc[:, 1].round(4).tolist(),
        "heldout_top1_start": acc_start[:, 0].round(4).tolist(),
        "heldout_top5_start": acc_start[:, 1].round(4).tolist(),
        "start_heads": str(cfg.heads) if cfg.heads else "fresh",
        "start_heads_method": start_method,
        "greedy_identical_share": drift,
        "drift_prompts": len(prompts),
        "drift_tokens": cfg.drift_tokens,
        "train_seconds": round(train_s, 1),
        "first_loss": loss_log[0],
        "last_loss": loss_log[-1],
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "config": {k: str(v) for k, v in asdict(cfg).items()},
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # the backbone is saved whole into a temporary folder, then takes the name (an interrupted save
    # leaves the previous backbone, never part of the new one beside the old)
    staged = Path(tempfile.mkdtemp(dir=out, prefix=".backbone."))
    try:
        model.save_pretrained(str(staged))
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(staged))
        staged.chmod(0o755)
        if (out / "backbone").exists():
            old = out / f".backbone.old.{os.getpid()}"
            (out / "backbone").rename(old)
            staged.rename(out / "backbone")
            shutil.rmtree(old)
        else:
            staged.rename(out / "backbone")
    finally:
        if staged.exists():
            shutil.rmtree(staged)
    save_heads(heads, out / "heads", meta=summary)
    print(f"saved the tuned backbone to {out / 'backbone'} and the heads to {out / 'heads'} ({train_s:.0f} s)")
    return summary


def greedy_drift(original, tuned, prompts: list[list[int]], max_new_tokens: int = 64) -> float:
    """Share of identical tokens between the original's and the tuned backbone's greedy answers,
    position by position over the longer answer (a missing token counts as different)."""
    from training.distill import DistillConfig, generate_batch

    cfg = DistillConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    eos = original.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    same = total = 0
    for p in prompts:
        ((a, _),) = generate_batch(original, [p], 0, eos_ids, cfg)
        ((b, _),) = generate_batch(tuned, [p], 0, eos_ids, cfg)
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    return same / max(total, 1)
